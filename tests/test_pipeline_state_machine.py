"""A stateful property test of the whole pipeline: gateway, store, queue and agent together.

The broker's own state machine (``test_broker_state_machine.py``) fakes the store's neighbours;
this one runs the real wiring (:func:`agentgate.gateway.open_gateway`) on a real SQLite file,
the WebSocket door on lockstep memory streams (a socket that stops taking bytes holds the
gateway's frames in its outbox, as a full TCP window does), Home Assistant behind
``httpx.MockTransport``, a scripted guardian and the SDK's own bookkeeping
(:class:`agentgate.client._core.ClientCore`, in acknowledged mode) as the agent. Trio runs in a
helper thread on a ``MockClock`` that only moves when a rule says so; each rule runs to
quiescence, and Trio's scheduling order is drawn by Hypothesis, so every example replays.

Rules interleave at random: ask (policy ask, allow or deny), the guardian's allow / deny /
allow 1 h, time passing (deadlines, Home Assistant's timeout), a Home Assistant call that hangs
and then answers or loses its answer, an agent that stops reading (frames the gateway wrote are
then lost with the connection) or whose socket stops taking bytes, that drops or leaves its
connection, reconnects (abandoning a half-open one), collects and acknowledges queued results,
asks for a result by id; a crash (everything dropped, no cleanup: the store's connection dies
first) and a planned restart (the product's own shutdown, approvals stay pending), each with
time passing while the gateway is down; and COMMITs that fail, whichever writes they end.

After every step:

- at most one execution per request; each one, at the moment Home Assistant receives it, has a
  committed row that lets it run (``executing`` for an approval, ``allow`` for a decision), read
  through a separate read-only SQLite connection; no gateway executes after it crashed;
- every request has at most one outcome handed to the program (its answer or a queued result),
  every copy of it anywhere (frames, queue, ``get_result``, the store) says the same, and what
  did not execute did not run;
- every resolution reached the agent or its queue: a stored outcome marked delivered was written
  to the agent's socket, acknowledged, or read by id;
- a result whose acknowledgement the gateway confirmed is never listed again.

At the end (liveness), the disk heals, every deadline passes, the agent reconnects, collects,
acknowledges and asks by id for what its lost calls became: every approval is resolved, the queue
is empty, and every request has exactly one outcome, seen once, except where the protocol cannot
recover it (``docs/protocol.md``): an answer given at once (policy, grant, refusal) lost with its
connection, and an approval's outcome the gateway wrote to a connection that then dropped before
the program read it, when the program never learnt the request's id either.

Every property is checked with no exemption. What it found is pinned by focused tests in
``test_pipeline_findings.py``.

``AGENTGATE_PROPTEST_EXAMPLES`` sets the number of examples (``make soak`` runs thousands),
``AGENTGATE_PROPTEST_STEPS`` the steps in each.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import tempfile
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
import trio
import trio.lowlevel
import trio.testing
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    wrap_client_stream,
    wrap_server_stream,
)

from agentgate.client._core import ApprovalPending, ClientCore, Completed, ResultsPending
from agentgate.config import Config, load_config
from agentgate.gateway import SHUTDOWN_BOUND, Gateway, open_gateway
from agentgate.testing.guardian import ScriptedGuardian
from agentgate.testing.harness import write_gate_toml

T = TypeVar("T")

EXAMPLES = int(os.environ.get("AGENTGATE_PROPTEST_EXAMPLES", "200"))
STEPS = int(os.environ.get("AGENTGATE_PROPTEST_STEPS", "40"))
BASE = 1_800_000_000.0
APPROVAL_TIMEOUT = 60.0
HA_TIMEOUT = 5.0
TOKEN = "pi-token-0123456789abcdef"
STUCK_AFTER = 1.0  # real seconds everything may wait in a step whose time stands still
STEP_CEILING = 600.0  # mock seconds a step whose time flows may take (a hang fails, not waits)
POLICY = """\
rules:
  - pattern: "ha_get_state(*)"
    action: allow
  - pattern: "ha_call_service(light.*)"
    action: ask
  - pattern: "ha_call_service(switch.*)"
    action: allow
  - pattern: "ha_call_service(lock.*)"
    action: deny
"""
# entity -> (domain, service, what the policy says)
ENTITIES = {
    "light.a": ("light", "turn_on", "ask"),
    "light.b": ("light", "turn_on", "ask"),
    "switch.s": ("switch", "turn_on", "allow"),
    "lock.l": ("lock", "unlock", "deny"),
}
# The agent's error codes, as the statuses of queued results (docs/protocol.md).
STATUS_OF_CODE = {
    -32001: "denied",
    -32002: "timed_out",
    -32003: "denied",
    -32004: "failed",
    -32006: "limited",
    -32007: "shutdown",
}
RUNS = {"executed": 1, "unknown": None}  # how many executions each outcome allows (else 0)


def _status(code: int, data: Any) -> str:
    if code == -32004 and isinstance(data, dict) and data.get("outcome") == "unknown":
        return "unknown"
    return STATUS_OF_CODE.get(code, f"code {code}")


def _note(what: str) -> None:
    """A statistic (``pytest --hypothesis-show-statistics``)."""
    if currently_in_test_context():
        event(what)


def _scratch() -> str | None:
    """A RAM-backed directory when there is one: the durable commits' fsyncs cost nothing."""
    shm = "/dev/shm"  # a private TemporaryDirectory is made inside it
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


# -- Trio in a thread --------------------------------------------------------------------------


class StepStuck(AssertionError):
    """A step that should finish without time passing waits for something."""


class TrioHost:
    """Trio in a thread on a ``MockClock``; :meth:`run` runs one step there to quiescence."""

    def __init__(self) -> None:
        self.clock = trio.testing.MockClock()
        self._jumped = 0.0  # seconds the running step moved the clock on by itself
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._ready.wait(10)
        assert self.error is None, self.error

    def _run(self) -> None:
        try:
            trio.run(self._main, clock=self.clock)
        except BaseException as exc:  # surfaced by run()
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, fn: Callable[[], Awaitable[T]], *, time_flows: bool = False) -> T:
        """Run ``fn`` and wait until every task is blocked. Without ``time_flows`` the clock
        stands still and ``fn`` must finish (else :class:`StepStuck`); with it, the clock jumps
        to the next deadline whenever everything waits (at most ``STEP_CEILING`` seconds)."""

        async def step() -> T:
            box: list[T] = []
            done = trio.Event()

            async def child() -> None:
                box.append(await fn())
                done.set()

            start, self._jumped = trio.current_time(), 0.0
            # Nothing here waits for real I/O or threads: everything blocked means the step
            # waits for time. A step whose time stands still is let run that long (real time)
            # before the clock jumps, and then fails.
            self.clock.autojump_threshold = 0 if time_flows else STUCK_AFTER
            try:
                with trio.move_on_after(STEP_CEILING) as ceiling:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(child)
                        await done.wait()
            finally:
                self.clock.autojump_threshold = math.inf
            if ceiling.cancelled_caught:
                raise StepStuck(f"{fn!r} still waits after {STEP_CEILING:g} s")
            if not time_flows and trio.current_time() != start + self._jumped:
                raise StepStuck(f"{fn!r} waited for time to pass while time stands still")
            await trio.testing.wait_all_tasks_blocked()
            return box[0]

        assert self.error is None, self.error
        return trio.from_thread.run(step, trio_token=self.token)

    def jump(self, seconds: float) -> None:
        """Move the clock on (from inside a step)."""
        self.clock.jump(seconds)
        self._jumped += seconds

    def close(self) -> None:
        if self.error is None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self.thread.join(10)


# -- the store's connection, failing on demand -------------------------------------------------


class FlakyConnection:
    """The store's sqlite3 connection: ``fail_commits`` COMMITs fail (a disk that fills up or
    dies at the end of a transaction) and are rolled back; once ``dead`` (the process crashed)
    nothing reaches the file any more. Every other statement runs for real."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.fail_commits = 0
        self.failed = 0
        self.dead = False

    def execute(self, sql: str, *args: Any) -> Any:
        if self.dead:
            raise sqlite3.OperationalError("the gateway process is gone")
        if self.fail_commits and sql.strip().upper() == "COMMIT":
            self.fail_commits -= 1
            self.failed += 1
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        if self.dead:
            raise sqlite3.OperationalError("the gateway process is gone")
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


# -- Home Assistant ----------------------------------------------------------------------------


@attrs.define(eq=False)
class Hang:
    """A service call Home Assistant received and has not answered yet."""

    n: int
    released: trio.Event = attrs.field(factory=trio.Event)
    lose: bool = False  # answer lost: the gateway sees a read timeout


class Home:
    """Home Assistant behind MockTransport. Every service call is an execution, counted when
    received, and checked then against the store's committed state (read-only connection)."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.executions: Counter[int] = Counter()
        self.violations: list[str] = []
        self.stall_next = False
        self.hung: list[Hang] = []
        self._ro: sqlite3.Connection | None = None

    def reader(self) -> sqlite3.Connection:
        if self._ro is None:
            self._ro = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, check_same_thread=False)
        return self._ro

    def close(self) -> None:
        if self._ro is not None:
            self._ro.close()

    async def handler(self, instance: Instance, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path.startswith("/api/states/"):
            entity = path.removeprefix("/api/states/")
            if entity not in ENTITIES:
                return httpx.Response(404, json={"message": "Entity not found."})
            return httpx.Response(200, json={"entity_id": entity, "state": "off"})
        if path == "/api/":
            return httpx.Response(200, json={"message": "API running."})
        assert request.method == "POST", path
        assert path.startswith("/api/services/"), path
        body = json.loads(request.content)
        trace = request.extensions.get("trace")
        if trace is not None:  # what httpcore says once the request is on its way
            await trace("http11.send_request_headers.started", {})
        self.received(instance, body["n"])
        if self.stall_next:
            self.stall_next = False
            hang = Hang(body["n"])
            self.hung.append(hang)
            try:
                await hang.released.wait()
            finally:  # answered, or the gateway stopped waiting (its timeout, a crash)
                if hang in self.hung:
                    self.hung.remove(hang)
            if hang.lose:
                raise httpx.ReadTimeout("the answer was lost", request=request)
        return httpx.Response(200, json=[{"entity_id": body["entity_id"], "state": "on"}])

    def received(self, instance: Instance, n: int) -> None:
        if not instance.alive:
            self.violations.append(f"call {n} sent by a gateway that had crashed")
        if self.executions[n]:
            self.violations.append(f"call {n} executed twice")
        self.executions[n] += 1
        ro = self.reader()
        states = [
            r[0]
            for r in ro.execute(
                "SELECT state FROM pending_requests WHERE json_extract(args, '$.n') = ?", (n,)
            )
        ]
        if states:
            if states != ["executing"]:
                self.violations.append(f"call {n} ran while its committed approval is {states}")
            return
        allowed = ro.execute(
            "SELECT COUNT(*) FROM audit_log WHERE decision = 'allow'"
            " AND json_extract(args, '$.n') = ?",
            (n,),
        ).fetchone()[0]
        if allowed != 1:
            self.violations.append(f"call {n} ran without a committed allow decision")


# -- the gateway, one process lifetime at a time -----------------------------------------------


@attrs.define(eq=False)
class Instance:
    """One run of the gateway (a process, as far as the store and the agent can tell)."""

    number: int
    alive: bool = True
    gateway: Gateway | None = None
    conn: FlakyConnection | None = None
    nursery: trio.Nursery | None = None
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    stop: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)
    planned: bool = False
    streams: list[trio.abc.Stream] = attrs.field(factory=list)  # its side of each socket


# -- the agent ---------------------------------------------------------------------------------


class Valve(trio.abc.Stream):
    """The agent's end of a lockstep stream, which can stop taking bytes (``jammed``): what
    the gateway writes then waits in its own outbox, as behind a full TCP window."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.open = trio.Event()
        self.open.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await self.open.wait()
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def jammed(self) -> bool:
        return not self.open.is_set()

    def jam(self, jammed: bool) -> None:
        if not jammed:
            self.open.set()
        elif not self.jammed:
            self.open = trio.Event()


@attrs.define(eq=False)
class Socket:
    """The agent's side of one connection: ``inbox`` holds frames the program has not read."""

    number: int
    ws: WebSocketConnection
    stream: Valve
    inbox: list[str] = attrs.field(factory=list)
    closed: bool = False  # the connection is gone (either side)
    stalled: bool = False  # the program stopped reading it

    @property
    def jammed(self) -> bool:
        return self.stream.jammed

    def jam(self, jammed: bool) -> None:
        self.stream.jam(jammed)


@attrs.define(eq=False)
class Req:
    """One tool request of the program, and everything seen about it."""

    rpc: int
    n: int
    entity: str
    policy: str
    request_id: str | None = None  # as far as the program knows
    seen: list[tuple[str, str]] = attrs.field(factory=list)  # (channel, status) to the program
    looked_up: list[str] = attrs.field(factory=list)  # statuses get_result answered
    wire: list[str] = attrs.field(factory=list)  # outcome statuses the agent's sockets received
    lost: bool = False  # its call ended with ConnectionLost
    sent: bool = True  # False: the socket was gone before the frame left
    asked_by_id: bool = False  # a get_result for it is in flight
    socket: Socket | None = None  # where it was asked


@attrs.define(eq=False)
class Waiter:
    kind: str  # auth, tool, collect, result
    req: Req | None = None
    acks: tuple[str, ...] = ()
    confirmed_before: frozenset[str] = frozenset()


class PipelineMachine(RuleBasedStateMachine):
    @initialize(scheduling=st.random_module())  # Trio's scheduling order, explored too
    def start(self, scheduling: Any) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="agentgate-prop-", dir=_scratch())
        workdir = Path(self.tmp.name)
        path = write_gate_toml(
            workdir,
            tokens={"pi": TOKEN},
            ha_url="http://ha.test",
            ha_token="ha-token-0123456789",
            tls=None,
            policy=POLICY,
            gateway={"approval_timeout": APPROVAL_TIMEOUT},
            limits={
                "requests_per_minute": 1_000_000,
                "max_pending_per_agent": 4,
                "max_connections_per_agent": 1_000,
            },
            ha_timeout=HA_TIMEOUT,
        )
        self.config: Config = load_config(path, insecure=True)
        self.db = Path(self.config.store.path)
        self.home = Home(self.db)
        self.guardian = ScriptedGuardian()
        self.core: ClientCore[Waiter] = ClientCore()
        self.reqs: dict[int, Req] = {}
        self.next_n = 0
        self.sockets = 0
        self.current: Socket | None = None
        self.want_collect = False
        self.acks_sent: set[str] = set()
        self.confirmed: set[str] = set()
        self.looked_up: set[str] = set()  # request ids asked for with get_result
        self.collections: dict[int, Waiter] = {}  # get_pending_results calls in flight
        self.violations: list[str] = []
        self.abandoned: list[Socket] = []  # sockets the program gave up on (maybe half-open)
        self.stats: set[str] = set()  # what this example exercised (hypothesis statistics)
        self.instances = 0
        self.host = TrioHost()
        self.instance = self.host.run(self._open)
        self._step(self._connect)

    def teardown(self) -> None:
        if hasattr(self, "host"):
            self.host.close()
            self.home.close()
            self.tmp.cleanup()

    def _step(self, fn: Callable[[], Awaitable[Any]], *, time_flows: bool = False) -> None:
        async def step() -> None:
            await fn()
            await self._pump()

        self.host.run(step, time_flows=time_flows)

    # -- the gateway's lifetimes ------------------------------------------------------------------

    async def _open(self) -> Instance:
        self.instances += 1
        instance = Instance(self.instances)
        return await self.host.nursery.start(self._serve, instance)  # type: ignore[no-any-return]

    async def _serve(self, instance: Instance, task_status: trio.TaskStatus[Instance]) -> None:
        transport = httpx.MockTransport(partial(self.home.handler, instance))
        try:
            with instance.scope:
                async with (
                    open_gateway(
                        self.config,
                        guardian=self.guardian,
                        ha_transport=transport,
                        now=lambda: BASE + trio.current_time(),
                        inline_store=True,
                    ) as gateway,
                    trio.open_nursery() as nursery,
                ):
                    # The test's hook on the store (as in test_store's fail-at-commit tests).
                    conn = FlakyConnection(gateway.store._conn)
                    gateway.store._conn = conn  # type: ignore[assignment]
                    self.guardian.control = gateway.controls
                    instance.gateway, instance.conn, instance.nursery = gateway, conn, nursery
                    task_status.started(instance)
                    await instance.stop.wait()
                    if instance.planned:  # as serve_gateway does on SIGTERM
                        with trio.move_on_after(SHUTDOWN_BOUND, shield=True) as bound:
                            await gateway.shutdown()
                        if bound.cancelled_caught:
                            self.stats.add("a planned stop that ran out its bound")
                    nursery.cancel_scope.cancel()
        finally:
            instance.alive = False
            instance.done.set()

    async def _stop(self, planned: bool, down: float) -> None:
        instance = self.instance
        assert instance.conn is not None
        if planned:
            instance.planned = True
            instance.stop.set()
        else:  # a crash: the store's connection goes first, nothing is written after it
            instance.conn.dead = True
            instance.alive = False
            instance.scope.cancel()
        if instance.gateway is not None and instance.gateway.broker.approvals:
            self.stats.add(
                "planned restart with open approvals" if planned else "crash with open approvals"
            )
        await instance.done.wait()
        for stream in instance.streams:  # the OS closes a dead process's sockets
            await stream.aclose()
        instance.conn.dead = True  # anything left of it writes nothing
        await trio.testing.wait_all_tasks_blocked()
        self.host.jump(down)
        self.instance = await self._open()

    # -- the agent's sockets ----------------------------------------------------------------------

    async def _connect(self) -> None:
        instance = self.instance
        assert instance.nursery is not None
        assert instance.gateway is not None
        door = instance.gateway.door
        server_stream, inner = trio.testing.lockstep_stream_pair()
        client_stream = Valve(inner)
        instance.streams.append(server_stream)
        instance_nursery = instance.nursery

        async def serve() -> None:
            request = await wrap_server_stream(instance_nursery, server_stream)
            await door.handle(request, None)

        instance_nursery.start_soon(serve)
        ws = await wrap_client_stream(self.host.nursery, client_stream, "gate.test", "/")
        self.sockets += 1
        sock = Socket(self.sockets, ws, client_stream)
        self.host.nursery.start_soon(self._receive, sock)
        self.current = sock
        await self._send("auth", {"token": TOKEN}, Waiter("auth"))
        self.want_collect = True  # the SDK collects right after connecting

    async def _receive(self, sock: Socket) -> None:
        """The socket's reader: every frame the gateway wrote lands in the inbox."""
        while True:
            try:
                text = await sock.ws.get_message()
            except ConnectionClosed:
                sock.closed = True
                return
            assert isinstance(text, str)
            sock.inbox.append(text)
            self._on_wire(text)

    def _on_wire(self, text: str) -> None:
        """What reached the agent's socket, read by the program or not."""
        frame = json.loads(text)
        collection = self.collections.pop(frame.get("id"), None)  # type: ignore[arg-type]
        if collection is not None and "result" in frame:
            for entry in frame["result"]["results"]:
                if entry["request_id"] in collection.confirmed_before:
                    self.violations.append(f"{entry['request_id']} listed after its ack")
            return
        req = self.reqs.get(frame.get("id")) if isinstance(frame.get("id"), int) else None
        if req is None:
            return
        if "result" in frame:
            req.wire.append("executed")
        elif not frame["error"].get("data", {}).get("pending"):  # a planned restart's -32007
            req.wire.append(_status(frame["error"]["code"], frame["error"].get("data")))

    async def _send(self, method: str, params: dict[str, Any] | None, waiter: Waiter) -> None:
        sock = self.current
        assert sock is not None
        rpc, text = self.core.begin(method, params, waiter)
        if waiter.req is not None and waiter.kind == "tool":
            waiter.req.rpc, waiter.req.socket = rpc, sock
            self.reqs[rpc] = waiter.req
        if method == "get_pending_results":
            waiter.acks = tuple(json.loads(text)["params"]["ack"])
            waiter.confirmed_before = frozenset(self.confirmed)
            self.acks_sent.update(waiter.acks)
            self.collections[rpc] = waiter
        try:
            await sock.ws.send_message(text)
        except ConnectionClosed:
            sock.closed = True
            if waiter.req is not None:
                waiter.req.sent = False

    async def _pump(self) -> None:
        """The program: reads what arrived on its connection, collects when told to."""
        while True:
            await trio.testing.wait_all_tasks_blocked()
            sock = self.current
            if sock is None or sock.stalled:
                return
            if sock.inbox:
                frames, sock.inbox = sock.inbox, []
                for text in frames:
                    await self._read(text)
                continue
            if sock.closed:
                self._lose(sock)
                continue
            if self.want_collect:
                self.want_collect = False
                await self._send("get_pending_results", None, Waiter("collect"))
                continue
            return

    def _lose(self, sock: Socket) -> None:
        """The program gives up on ``sock``: unread frames are lost, calls in flight fail."""
        self.abandoned.append(sock)
        if sock.inbox:
            self.stats.add("frames the gateway wrote were lost unread")
        sock.inbox.clear()
        for waiter, _error in self.core.lose_all("connection lost"):
            if waiter.req is None:
                continue
            if waiter.kind == "tool":
                waiter.req.lost = True
            else:  # a get_result whose answer was lost: asked again later
                waiter.req.asked_by_id = False
        if self.current is sock:
            self.current = None
        self.want_collect = False

    async def _read(self, text: str) -> None:
        event = self.core.receive(text)
        if isinstance(event, ResultsPending):
            self.want_collect = True
        elif isinstance(event, ApprovalPending):
            req = self.reqs.get(event.params.get("rpc_id"))  # type: ignore[arg-type]
            if req is not None:
                req.request_id = event.params["request_id"]
        elif isinstance(event, Completed):
            self._completed(event)

    def _completed(self, event: Completed[Waiter]) -> None:
        waiter = event.waiter
        assert waiter is not None
        error = event.error
        if waiter.kind == "auth":
            assert error is None, error
        elif waiter.kind == "tool":
            req = waiter.req
            assert req is not None
            if error is None:
                req.request_id = event.result["request_id"]
                req.seen.append(("answer", "executed"))
            elif error.data.get("pending"):  # a planned restart: its outcome comes later
                req.request_id = error.data["request_id"]
            else:
                req.request_id = req.request_id or error.data.get("request_id")
                req.seen.append(("answer", _status(error.code, error.data)))
        elif waiter.kind == "collect":
            if error is not None:
                if error.code != -32004:  # the store failed: nothing acknowledged, try again
                    self.violations.append(f"get_pending_results failed: {error!r}")
                return
            self.confirmed.update(waiter.acks)
            taken = self.core.take_results()
            for entry in taken:
                request_id = entry["request_id"]
                req = self.reqs.get(entry["rpc_id"])
                if req is None:
                    self.violations.append(f"a queued result for no request: {entry}")
                    continue
                if req.request_id not in (None, request_id):
                    self.violations.append(f"rpc {req.rpc} has two request ids")
                req.request_id = request_id
                if req.looked_up:  # already read by id (get_result): the program drops it
                    req.looked_up.append(entry["status"])
                    continue
                req.seen.append(("queue", entry["status"]))
            if taken:
                self.want_collect = True  # the SDK acknowledges soon after handing them out
        elif waiter.kind == "result":
            req = waiter.req
            assert req is not None
            if error is not None:
                if error.code != -32004:  # the store failed: asked again later
                    self.violations.append(f"get_result for rpc {req.rpc} failed: {error!r}")
                req.asked_by_id = False
            elif event.result.get("status") != "pending":
                req.looked_up.append(event.result["status"])
            else:
                req.asked_by_id = False  # still open: asked again later

    # -- rules ------------------------------------------------------------------------------------

    async def _ask(self, entity: str) -> None:
        if self.current is None or self.current.closed:
            if self.current is not None:
                self._lose(self.current)
            await self._connect()  # the SDK (re)connects for the call
        domain, service, policy = ENTITIES[entity]
        self.next_n += 1
        args = {"domain": domain, "service": service, "entity_id": entity, "n": self.next_n}
        waiter = Waiter("tool", Req(0, self.next_n, entity, policy))
        await self._send("tool_request", {"tool": "ha_call_service", "args": args}, waiter)

    @rule(entity=st.sampled_from(sorted(ENTITIES)))
    def ask(self, entity: str) -> None:
        """A call the policy asks about, allows or denies (sent even while the program does
        not read its answers)."""
        self._step(partial(self._ask, entity))

    @rule(entity=st.sampled_from(["light.a", "light.b"]))
    def ask_guardian(self, entity: str) -> None:
        """A call the policy asks the guardian about (half of the calls)."""
        self._step(partial(self._ask, entity))

    @precondition(lambda self: bool(self.guardian.cards))
    @rule(back=st.integers(0, 3), action=st.sampled_from(["allow", "deny", "grant"]))
    def press(self, back: int, action: str) -> None:
        """The guardian presses a button on a recent card (maybe decided already)."""
        cards = list(self.guardian.cards)
        request_id = cards[-1 - back % len(cards)]
        self._step(partial(self.guardian.press, request_id, action))

    @rule(seconds=st.sampled_from([0.1, 1.0, 6.0, 31.0, 61.0]))
    def advance(self, seconds: float) -> None:
        """Time passes: group commits, Home Assistant's timeout, approval deadlines."""

        async def jump() -> None:
            self.host.jump(seconds)
            await trio.lowlevel.checkpoint()

        self._step(jump)

    @rule(what=st.sampled_from(["stall", "answer", "lose"]))
    def home_assistant(self, what: str) -> None:
        """Home Assistant holds on to its next service call, answers the calls it holds, or
        loses their answers (the gateway cannot know whether they ran)."""
        if what == "stall":
            self.home.stall_next = True
            return

        async def release() -> None:
            for hang in self.home.hung:
                hang.lose = what == "lose"
                hang.released.set()
            self.home.hung.clear()

        self._step(release)

    @rule(
        what=st.sampled_from(
            ["stall", "resume", "jam", "flow", "drop", "leave", "reconnect", "collect", "look up"]
        )
    )
    def agent(self, what: str) -> None:
        """The program stops reading (what the gateway writes then may never be read) or reads
        again; its socket stops taking bytes (frames wait in the gateway's outbox) or takes
        them again; the network drops its connection or it leaves; it reconnects (abandoning
        a connection it does not read: half-open); it collects queued results, or asks by id
        for the outcomes of calls lost with a connection."""
        sock = self.current
        if what == "stall" and sock is not None:
            sock.stalled = True
        elif what in ("jam", "flow") and sock is not None:
            self._step(partial(self._jam, sock, what == "jam"))
        elif what == "resume" and sock is not None and sock.stalled:
            sock.stalled = False
            self._step(trio.lowlevel.checkpoint)
        elif what in ("drop", "leave") and sock is not None:
            self._step(partial(self._disconnect, sock, what == "leave"))
        elif what == "reconnect":
            if sock is not None:
                self._lose(sock)
            self._step(self._connect)
        elif what == "collect" and self._live():
            self.want_collect = True
            self._step(trio.lowlevel.checkpoint)
        elif what == "look up" and self._live():
            self._step(self._look_up)

    def _live(self) -> bool:
        return self.current is not None and not self.current.stalled

    async def _jam(self, sock: Socket, jammed: bool) -> None:
        sock.jam(jammed)

    async def _disconnect(self, sock: Socket, graceful: bool) -> None:
        self._lose(sock)
        if graceful:
            sock.jam(False)  # a close handshake reads until the gateway's close frame
            await sock.ws.aclose()
        else:
            await sock.stream.aclose()

    async def _look_up(self) -> None:
        for req in list(self.reqs.values()):
            if req.lost and req.request_id and not (req.seen or req.looked_up or req.asked_by_id):
                if self.current is None or self.current.closed:
                    return
                self.looked_up.add(req.request_id)
                req.asked_by_id = True
                await self._send(
                    "get_result", {"request_id": req.request_id, "wait": 0}, Waiter("result", req)
                )

    @rule(planned=st.booleans(), down=st.sampled_from([0.0, 31.0, 61.0]))
    def restart(self, planned: bool, down: float) -> None:
        """A crash (``kill -9``, or a power cut after the fsync'd commits: no cleanup at all),
        or a planned restart (``systemctl restart``: the product's own shutdown path, approvals
        stay pending), then ``down`` seconds before the gateway is back."""
        self._step(partial(self._stop, planned, down), time_flows=True)

    @rule(count=st.integers(1, 3))
    def commits_fail(self, count: int) -> None:
        """The next ``count`` COMMITs fail (a full or failing disk), whichever writes they are."""
        assert self.instance.conn is not None
        self.instance.conn.fail_commits = count
        self.stats.add("COMMITs made to fail")

    # -- invariants -------------------------------------------------------------------------------

    def _rows(self) -> list[tuple[str, Any, str, str | None, int]]:
        return [
            (r[0], json.loads(r[1]), r[2], r[3], r[4])
            for r in self.home.reader().execute(
                "SELECT request_id, rpc_id, state, outcome, delivered FROM pending_requests"
            )
        ]

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "host"):
            return
        rows = self._rows()
        problems = self.home.violations + self.violations
        for req in self.reqs.values():
            handed = [status for _, status in req.seen]
            if len(handed) > 1:
                problems.append(f"rpc {req.rpc} ({req.policy}) handed out {req.seen}")
            statuses = set(handed) | set(req.looked_up) | set(req.wire)
            if len(statuses) > 1:
                problems.append(
                    f"rpc {req.rpc} ({req.policy}) has outcomes {sorted(statuses)}:"
                    f" {req.seen} looked up {req.looked_up} wire {req.wire}"
                )
            runs = self.home.executions[req.n]
            for status in statuses:
                allowed = RUNS.get(status, 0)
                if allowed is not None and runs != allowed:
                    problems.append(f"rpc {req.rpc}: {status} but executed {runs} times")
        for request_id, rpc_id, state, outcome, delivered in rows:
            req = self.reqs.get(rpc_id)
            if req is None:
                problems.append(f"approval {request_id} for no request of the agent ({rpc_id})")
                continue
            if state == "done" and outcome is not None:
                others = {s for _, s in req.seen} | set(req.looked_up) | set(req.wire)
                if others - {outcome}:
                    problems.append(f"rpc {req.rpc}: stored {outcome}, agent saw {sorted(others)}")
                allowed = RUNS.get(outcome, 0)
                runs = self.home.executions[req.n]
                if allowed is not None and runs != allowed:
                    problems.append(f"rpc {req.rpc}: stored {outcome}, executed {runs} times")
            if request_id in self.confirmed and not delivered:
                problems.append(f"rpc {req.rpc}: acknowledged, and queued again")
            # Only a written frame, an acknowledgement or a read by id takes a result out of the
            # queue: never a frame still in an outbox.
            reached = req.wire or request_id in self.acks_sent | self.looked_up
            if state == "done" and delivered and not reached:
                problems.append(
                    f"rpc {req.rpc}: {outcome} marked delivered but never reached the agent"
                )
        assert not problems, "\n".join(problems)

    # -- liveness ---------------------------------------------------------------------------------

    def check_final(self) -> None:
        """Heal the disk, let every deadline pass, reconnect, collect, acknowledge."""
        assert self.instance.conn is not None
        self.instance.conn.fail_commits = 0
        self.home_assistant("answer")
        if self.current is not None and self.current.jammed:
            self.agent("flow")

        async def give_up() -> None:  # TCP gives up on half-open connections, in the end
            for sock in self.abandoned:
                await sock.stream.aclose()

        self._step(give_up)

        async def wait() -> None:
            await trio.sleep(2 * APPROVAL_TIMEOUT)

        self._step(wait, time_flows=True)
        if self.current is not None and self.current.stalled:
            self._lose(self.current)
        if self.current is not None and self.current.closed:
            self._lose(self.current)
        if self.current is None:
            self._step(self._connect)
        self._step(self._look_up)
        self.agent("collect")
        self.consistent()
        problems: list[str] = []
        rows = self._rows()
        for request_id, rpc_id, state, outcome, delivered in rows:
            if state != "done":
                problems.append(f"approval {request_id} (rpc {rpc_id}) never resolved: {state}")
            elif not delivered:
                problems.append(f"approval {request_id} (rpc {rpc_id}): {outcome} still queued")
        asked = {rpc_id: request_id for request_id, rpc_id, *_ in rows}
        for req in self.reqs.values():
            if req.seen or req.looked_up:
                continue
            if not req.sent:
                _note("a request whose socket was gone before it left")
            elif req.rpc not in asked:
                # Answered at once (policy, grant, refusal): never queued, by design; only a
                # lost connection may keep that answer from the program.
                if not req.lost:
                    problems.append(f"rpc {req.rpc} ({req.policy}): never answered")
                else:
                    _note(f"an answer at once lost with its connection ({req.policy})")
            elif req.request_id is not None:
                problems.append(f"rpc {req.rpc}: its id is known, its outcome was not recovered")
            elif not req.wire:
                problems.append(f"rpc {req.rpc}: asked, no outcome ever reached the agent")
            else:
                _note("an approval's outcome lost in transit, its request id unknown")
        assert not problems, "\n".join(problems)
        for req in self.reqs.values():
            for channel, status in req.seen:
                self.stats.add(f"{status} by {channel}")
            for status in req.looked_up:
                self.stats.add(f"{status} by get_result")
        for what in sorted(self.stats):
            _note(what)


class FinalCheckMachine(PipelineMachine):
    def teardown(self) -> None:
        try:
            if hasattr(self, "host"):
                self.check_final()
        finally:
            super().teardown()


FinalCheckMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_pipeline_state_machine = FinalCheckMachine.TestCase
