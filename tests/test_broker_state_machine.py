"""A stateful property test of the approval broker (fast tier, fake clock, real SQLite inline).

Trio runs in a helper thread on a ``MockClock`` that only moves when a rule says so; every rule
runs one operation inside that Trio run and waits until every task is blocked, so each step is
deterministic. Random interleavings of ask, allow, deny, grant, deadline, disconnect, reconnect,
restart (a crash: no cleanup), a planned restart (undecided approvals stay pending: the -32007
their askers get is not their outcome) and a decommissioning stop must keep the invariants:

- every request gets exactly one outcome (on its connection or queued, never both, never none);
- an allowed call executes exactly once; nothing executes after deny, timeout or shutdown;
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
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from agentgate.approvals import Result
from agentgate.broker import Broker
from agentgate.errors import RateLimited
from agentgate.guardian import Action, ApprovalCard, CardUpdate
from agentgate.store import Store, open_store

T = TypeVar("T")
TIMEOUT = 60.0
MAX_PENDING = 3
AGENT = "pi"


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
        self._start_broker()

    def _start_broker(self) -> None:
        async def start() -> None:
            async def execute(tool: str, args: dict[str, Any]) -> Any:
                await trio.lowlevel.checkpoint()
                self.executed[args["n"]] += 1
                return {"n": args["n"]}

            async def describe(tool: str, args: dict[str, Any]) -> str | None:
                return None

            async def on_grant(agent: str, signature: str, by: str, permanent: bool) -> None:
                return None

            self.broker = Broker(
                self.host.store,
                execute=execute,
                describe=describe,
                sessions=lambda agent: [s for s in self.sessions if s.open],
                on_grant=on_grant,
                now=lambda: 1_800_000_000.0 + trio.current_time(),
                approval_timeout=TIMEOUT,
                guardian=self.guardian,
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

    @rule(target=requests)
    def ask(self) -> int:
        self.next_rpc += 1
        rpc = self.next_rpc
        session = self.session

        async def ask() -> str | None:
            try:
                return await self.broker.ask(
                    session,
                    rpc,
                    "ha_call_service",
                    {"n": rpc},
                    f"sig({rpc})",
                    "rule 0",
                    max_pending=MAX_PENDING,
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

    @rule(rpc=requests, action=st.sampled_from(["allow", "deny", "grant"]))
    def decide(self, rpc: int, action: str) -> None:
        ids = [rid for rid, r in self.rpc_of.items() if r == rpc]
        if not ids:
            return
        self.host.call(self.broker.decide, ids[0], Action(action), "guardian")

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
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_broker_state_machine = FinalCheckMachine.TestCase
