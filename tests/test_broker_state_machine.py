"""A stateful property test of the approval broker (fast tier, fake clock, real SQLite inline).

Trio runs in a helper thread on a ``MockClock`` that only moves when a rule says so; every rule
runs one operation inside that Trio run and waits until every task is blocked, so each step is
deterministic. Random interleavings of ask (needing one guardian or two), allow, deny, grant and
always presses by two guardians, Undo presses (confirmed or not), deadline, disconnect,
reconnect, restart (a crash: no cleanup), a planned restart (undecided approvals stay pending:
the -32007 their askers get is not their outcome) and a decommissioning stop must keep the
invariants:

- every request gets exactly one outcome (on its connection or queued, never both, never none);
- an allowed call executes exactly once; nothing executes after deny, timeout or shutdown;
- a call that needs two guardians runs only after two different guardians pressed Allow;
- an Undo restores a call at most once, and only a call that executed; it changes no outcome;
- every queued result is handed out once.
"""

from __future__ import annotations

import tempfile
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.lowlevel
import trio.testing
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from agentgate.approvals import Result, UndoCheck
from agentgate.broker import Broker
from agentgate.errors import RateLimited
from agentgate.guardian import Action, ApprovalCard, CardUpdate
from agentgate.store import Store, open_store
from agentgate.undo import Undo

T = TypeVar("T")
TIMEOUT = 60.0
UNDO_WINDOW = 90.0
MAX_PENDING = 3
AGENT = "pi"
GUARDIANS = ("alex", "sam")


class TrioHost:
    """Trio in a thread; ``call`` runs one async operation there and waits for quiescence."""

    def __init__(self, db: Path) -> None:
        self.clock = trio.testing.MockClock()
        self.db = db
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        try:
            trio.run(self._main, clock=self.clock)
        except BaseException as exc:  # surfaced by the test
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        async with open_store(self.db, inline=True) as store, trio.open_nursery() as nursery:
            self.store: Store = store
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def step() -> T:
            result = await fn(*args)
            await trio.testing.wait_all_tasks_blocked()
            return result

        assert self.error is None, self.error
        return trio.from_thread.run(step, trio_token=self.token)

    def close(self) -> None:
        if self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self.thread.join(10)


class FakeSession:
    """A front door's reply handle; its frames as the WebSocket door would write them."""

    def __init__(self) -> None:
        self.agent = AGENT
        self.via = "ws"
        self.confirms_delivery = False
        self.open = True
        self.frames: list[dict[str, Any]] = []

    def approval_pending(self, request_id: str, reply_to: Any, expires_at: float) -> None:
        if self.open:
            self.frames.append({"method": "approval_pending", "params": {"rpc_id": reply_to}})

    def deliver(self, result: Result) -> bool:
        if self.open:
            if result.error is None:
                self.frames.append({"id": result.reply_to, "result": {"data": result.data}})
            else:
                self.frames.append({"id": result.reply_to, "error": result.error.to_wire()})
        return self.open

    def results_waiting(self, count: int) -> None:
        if self.open:
            self.frames.append({"method": "results_pending", "params": {"count": count}})

    async def drained(self) -> None:
        return None


class FakeGuardian:
    def __init__(self) -> None:
        self.cards: list[str] = []

    async def send_card(self, card: ApprovalCard) -> str:
        self.cards.append(card.request_id)
        return f"card-{len(self.cards)}"

    async def update_card(self, card: ApprovalCard, message_ref: str, update: CardUpdate) -> None:
        return None

    async def restore_card(self, card: ApprovalCard, message_ref: str) -> None:
        return None

    async def notify(self, text: str, buttons: Any = ()) -> None:
        return None


def entity(rpc: int) -> str:
    return f"light.n{rpc}"


class BrokerMachine(RuleBasedStateMachine):
    requests = Bundle("requests")

    @initialize()
    def start(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.host = TrioHost(Path(self.tmp.name) / "store.db")
        self.executed: Counter[int] = Counter()
        self.outcomes: dict[int, list[str]] = {}  # rpc id -> outcomes seen by the agent
        self.rpc_of: dict[str, int] = {}
        self.next_rpc = 0
        self.session = FakeSession()
        self.sessions: list[FakeSession] = [self.session]
        self.taken: list[dict[str, Any]] = []
        self.guardian = FakeGuardian()
        self.quorum: dict[int, int] = {}
        self.allowed_by: dict[int, set[str]] = {}  # Allow presses made before it ran
        self.restored: Counter[int] = Counter()  # Undo's restore calls, per request
        self.states: dict[str, str] = {}  # the fake home: entity -> on/off
        self._start_broker()

    def _start_broker(self) -> None:
        async def start() -> None:
            async def execute(tool: str, args: dict[str, Any]) -> Any:
                await trio.lowlevel.checkpoint()
                self.executed[int(args["entity_id"].removeprefix("light.n"))] += 1
                self.states[args["entity_id"]] = "on"
                return [{"entity_id": args["entity_id"], "state": "on"}]

            async def restore(tool: str, args: dict[str, Any]) -> Any:  # an Undo's calls
                await trio.lowlevel.checkpoint()
                self.restored[int(args["entity_id"].removeprefix("light.n"))] += 1
                state = "on" if args["service"] == "turn_on" else "off"
                self.states[args["entity_id"]] = state
                return [{"entity_id": args["entity_id"], "state": state}]

            async def read_state(entity_id: str) -> Any:
                await trio.lowlevel.checkpoint()
                return {"entity_id": entity_id, "state": self.states.get(entity_id, "off")}

            async def describe(tool: str, args: dict[str, Any]) -> str | None:
                return None

            async def on_grant(agent: str, signature: str, by: str, permanent: bool) -> None:
                return None

            now = self.now
            self.undo = Undo(
                self.host.store,
                read_state=read_state,
                execute=restore,
                now=now,
                window=UNDO_WINDOW,
                guardian=self.guardian,
            )
            await self.undo.resume()
            self.broker = Broker(
                self.host.store,
                execute=execute,
                describe=describe,
                sessions=lambda agent: [s for s in self.sessions if s.open],
                on_grant=on_grant,
                now=now,
                approval_timeout=TIMEOUT,
                guardian=self.guardian,
                undo=self.undo,
                suggest_after=1,
            )
            self.broker_scope = trio.CancelScope()
            self.broker_done = trio.Event()

            async def run(task_status: trio.TaskStatus[None]) -> None:
                try:
                    with self.broker_scope:
                        await self.broker.run(task_status=task_status)
                finally:
                    self.broker_done.set()

            await self.host.nursery.start(run)

        self.host.call(start)

    @staticmethod
    def now() -> float:
        return 1_800_000_000.0 + trio.current_time()

    def teardown(self) -> None:
        self.host.close()
        self.tmp.cleanup()

    def _harvest(self) -> None:
        """Record every final answer that reached a session (notifications are not answers)."""
        for session in self.sessions:
            while session.frames:
                frame = session.frames.pop(0)
                if "id" not in frame:
                    continue
                if frame.get("error", {}).get("data", {}).get("pending"):
                    continue  # a planned restart: the outcome comes later, queued
                status = "executed" if "result" in frame else str(frame["error"]["code"])
                self.outcomes.setdefault(frame["id"], []).append(status)

    # -- rules --------------------------------------------------------------------------------

    @rule(target=requests, quorum=st.sampled_from([1, 2]))
    def ask(self, quorum: int) -> int:
        self.next_rpc += 1
        rpc = self.next_rpc
        session = self.session
        self.quorum[rpc] = quorum
        args = {"domain": "light", "service": "turn_on", "entity_id": entity(rpc)}

        async def ask() -> str | None:
            try:
                return await self.broker.ask(
                    session,
                    rpc,
                    "ha_call_service",
                    args,
                    f"ha_call_service(light.turn_on, {entity(rpc)})",
                    "rule 0",
                    max_pending=MAX_PENDING,
                    quorum=quorum,
                )
            except RateLimited:
                return None

        waiting = self.broker.waiting(AGENT)
        request_id = self.host.call(ask)
        if request_id is None:
            assert waiting >= MAX_PENDING
            self.outcomes.setdefault(rpc, []).append("limited")
        else:
            self.rpc_of[request_id] = rpc
        return rpc

    @rule(
        rpc=requests,
        action=st.sampled_from(["allow", "allow", "deny", "grant", "always"]),
        guardian=st.sampled_from(GUARDIANS),
    )
    def decide(self, rpc: int, action: str, guardian: str) -> None:
        ids = [rid for rid, r in self.rpc_of.items() if r == rpc]
        if not ids:
            return
        if action == "allow" and not self.executed[rpc]:
            self.allowed_by.setdefault(rpc, set()).add(guardian)

        async def press() -> str:
            answer = await self.broker.decide(ids[0], Action(action), guardian, voter=guardian)
            return answer.text

        answer = self.host.call(press)
        if self.quorum[rpc] > 1 and action == "allow":
            event(f"vote: {answer.split(':')[0].split(' (')[0]}")

    @rule(rpc=requests)
    def both_allow(self, rpc: int) -> None:
        """Both guardians press Allow, one after the other (a two-person approval's way)."""
        for guardian in GUARDIANS:
            self.decide(rpc, "allow", guardian)

    @rule(rpc=requests)
    def outside_change(self, rpc: int) -> None:
        """Someone else switches the light (an Undo must then be confirmed)."""
        light = entity(rpc)
        self.states[light] = "off" if self.states.get(light) == "on" else "on"

    @rule(rpc=requests, confirm=st.booleans(), guardian=st.sampled_from(GUARDIANS))
    def undo(self, rpc: int, confirm: bool, guardian: str) -> None:
        ids = [rid for rid, r in self.rpc_of.items() if r == rpc]
        if not ids:
            return
        before = self.restored[rpc]

        async def press() -> Any:
            return await self.undo.undo(ids[0], guardian, confirm=confirm)

        done = self.host.call(press)
        event(f"undo: {done.check.value}")
        if done.check is UndoCheck.UNDONE:
            assert self.restored[rpc] == before + 1
        else:
            assert self.restored[rpc] == before, done

    @rule(seconds=st.sampled_from([1.0, 30.0, 61.0]))
    def advance(self, seconds: float) -> None:
        async def jump() -> None:
            self.host.clock.jump(seconds)
            await trio.lowlevel.checkpoint()

        self.host.call(jump)

    @precondition(lambda self: self.session.open)
    @rule()
    def disconnect(self) -> None:
        self.session.open = False

    @rule()
    def reconnect(self) -> None:
        self.session.open = False
        self.session = FakeSession()
        self.sessions.append(self.session)
        self._take()

    def _take(self) -> None:
        taken = self.host.call(self.host.store.take_queued, AGENT)
        self.taken.extend(taken)
        for entry in taken:
            status = (
                entry["status"] if entry["status"] == "executed" else str(entry["error"]["code"])
            )
            self.outcomes.setdefault(entry["rpc_id"], []).append(status)

    @rule()
    def restart(self) -> None:
        """A crash: the broker's tasks die without any cleanup; a new broker resumes."""
        self._harvest()

        async def kill() -> None:
            self.broker_scope.cancel()
            await self.broker_done.wait()

        self.host.call(kill)
        for session in self.sessions:
            session.open = False
        self.session = FakeSession()
        self.sessions.append(self.session)
        self._start_broker()

    @rule()
    def shutdown(self) -> None:
        """A planned restart (SIGTERM): what is undecided stays pending for the next start."""
        self.host.call(self.broker.shutdown)
        self.restart()

    @rule()
    def decommission(self) -> None:
        """``serve --cancel-pending``: everything undecided resolves as shutdown."""

        async def stop() -> None:
            await self.broker.shutdown(cancel_pending=True)

        self.host.call(stop)
        self.restart()

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def each_request_has_at_most_one_outcome_and_runs_at_most_once(self) -> None:
        if not hasattr(self, "host"):
            return
        self._harvest()
        for rpc, seen in self.outcomes.items():
            assert len(seen) <= 1, (rpc, seen)
            if seen and seen[0] != "executed":
                assert self.executed[rpc] == 0, (rpc, seen)
        for rpc, count in self.executed.items():
            assert count <= 1, (rpc, count)
            if count and self.quorum.get(rpc, 1) > 1:
                assert len(self.allowed_by.get(rpc, ())) >= 2, (rpc, self.allowed_by.get(rpc))
        for rpc, count in self.restored.items():
            assert count <= 1, (rpc, count)
            assert self.executed[rpc] == 1, (rpc, "undone but never executed")
        request_ids = [e["request_id"] for e in self.taken]
        assert len(request_ids) == len(set(request_ids))

    def check_final(self) -> None:
        """Let every deadline pass, collect everything: each request has exactly one outcome."""
        self.advance(TIMEOUT + 1)
        self.reconnect()
        self._harvest()
        for rpc in range(1, self.next_rpc + 1):
            seen = self.outcomes.get(rpc, [])
            assert len(seen) == 1, (rpc, seen)
            assert (seen[0] == "executed") == (self.executed[rpc] == 1), (rpc, seen)


class FinalCheckMachine(BrokerMachine):
    def teardown(self) -> None:
        try:
            if hasattr(self, "host"):
                self.check_final()
        finally:
            super().teardown()


FinalCheckMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_broker_state_machine = FinalCheckMachine.TestCase
