"""The agent SDK: the sans-io core (synchronous) and both transports against a scripted gateway.

The scripted gateway (:class:`FakeGateway`) is a tiny trio-websocket server on 127.0.0.1
speaking the wire protocol (docs/protocol.md) just enough: auth, tool_request (allow / deny /
ask), approvals pressed by the test, queued results, notifications, disconnects and restarts.
The transport tests run each scenario under Trio directly and under asyncio in a worker thread
(``asyncio.Runner`` with a plain selector loop, so trio-asyncio's loop policy is not involved).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import re
import ssl
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio_websocket
import trustme

from agentgate.client import (
    AgentgateError,
    AuthenticationFailed,
    Backoff,
    ConnectionLost,
    DeniedByPolicy,
    ExecutionFailed,
    Gateway,
    InternalError,
    InvalidParams,
    connect,
)
from agentgate.client._base import make_target
from agentgate.client._core import (
    ApprovalPending,
    ClientCore,
    Completed,
    Ignored,
    ResultsPending,
    auth_agent,
    is_fatal,
    tool_result,
    tools_list,
)
from agentgate.client._groups import collapse_groups
from agentgate.errors import (
    ApprovalTimedOut,
    DeniedByGuardian,
    GatewayShuttingDown,
    RateLimited,
)
from agentgate.protocol import (
    MAX_ACK,
    Request,
    encode_error,
    encode_notification,
    encode_result,
    parse_request,
)
from tests import client_contract
from tests.client_contract import CONTRACT, capture, deadline, event, gather, sleep

CEILING = 20.0

# =============================================================================================
# Sans-io core (fast tier, synchronous)
# =============================================================================================


def _gateway_reply(text: str, result: Any) -> tuple[Request, str]:
    """The other end of the fake link: parse what the core sent, answer it."""
    request = parse_request(text)
    assert isinstance(request, Request)
    return request, encode_result(request.id, result)


def test_core_ids_are_unique_and_replies_find_their_waiter() -> None:
    core: ClientCore[str] = ClientCore()
    first, text1 = core.begin("tool_request", {"tool": "t", "args": {}}, "w1")
    second, text2 = core.begin("list_tools", None, "w2")
    assert first != second
    assert core.in_flight == 2
    req2, reply2 = _gateway_reply(text2, {"tools": []})
    assert req2.method == "list_tools"
    req1, reply1 = _gateway_reply(text1, {"status": "executed", "request_id": "r", "data": 1})
    assert req1.params == {"tool": "t", "args": {}}
    # replies arrive out of order
    assert core.receive(reply2) == Completed("w2", second, "list_tools", result={"tools": []})
    event = core.receive(reply1)
    assert isinstance(event, Completed)
    assert event.waiter == "w1"
    assert event.result["data"] == 1
    assert core.in_flight == 0


def test_core_error_reply_keeps_class_and_data() -> None:
    core: ClientCore[str] = ClientCore()
    rpc_id, _ = core.begin("tool_request", {}, "w")
    data = {"request_id": "r1", "signature": "ha_call_service(lock.unlock, lock.door)"}
    event = core.receive(encode_error(rpc_id, DeniedByPolicy("no", data=data)))
    assert isinstance(event, Completed)
    assert isinstance(event.error, DeniedByPolicy)
    assert event.error.data == data


def test_core_abandoned_call_late_reply_is_ignored() -> None:
    core: ClientCore[str] = ClientCore()
    rpc_id, _ = core.begin("tool_request", {}, "w")
    core.abandon(rpc_id)
    core.abandon(rpc_id)  # twice is harmless
    assert isinstance(core.receive(encode_result(rpc_id, {})), Ignored)
    assert isinstance(core.receive(encode_result(999, {})), Ignored)
    assert isinstance(core.receive(encode_result("x", {})), Ignored)


def test_core_cancelled_collection_still_buffers_results() -> None:
    core: ClientCore[str] = ClientCore()
    rpc_id, _ = core.begin("get_pending_results", None, "w")
    core.abandon(rpc_id)
    event = core.receive(encode_result(rpc_id, {"results": [{"request_id": "a"}]}))
    assert isinstance(event, Completed)
    assert event.waiter is None
    assert core.buffered == 1
    assert core.take_results() == [{"request_id": "a"}]
    assert core.take_results() == []


def _collect(core: ClientCore[str], *entries: dict[str, Any]) -> tuple[list[str], Any]:
    """One collection: the ids it acknowledged, and the event its reply made."""
    rpc_id, text = core.begin("get_pending_results", None, "w")
    acks = json.loads(text)["params"]["ack"]
    return acks, core.receive(encode_result(rpc_id, {"results": list(entries)}))


def test_core_collections_acknowledge_what_was_handed_out_and_drop_duplicates() -> None:
    core: ClientCore[str] = ClientCore()
    r1, r2 = {"request_id": "r1", "status": "executed"}, {"request_id": "r2", "status": "denied"}
    acks, event = _collect(core, r1)
    assert acks == []  # acknowledged mode even with nothing to acknowledge
    assert isinstance(event, Completed)
    assert event.result == 1
    # listed again (the gateway keeps it until acknowledged): a duplicate, dropped
    assert _collect(core, r1, r2)[0] == []
    assert core.take_results() == [r1, r2]
    assert core.unacknowledged == 2
    # the next collection acknowledges them; the gateway may still list them in a reply it
    # computed before, which is dropped
    rpc_id, text = core.begin("get_pending_results", None, "w")
    assert json.loads(text)["params"] == {"ack": ["r1", "r2"]}
    old_acks, _ = _collect(core, r1)  # a collection sent earlier and answered late
    assert old_acks == ["r1", "r2"]
    assert core.unacknowledged == 0
    core.receive(encode_result(rpc_id, {"results": [r2]}))
    assert core.take_results() == []
    # once nothing listed before the acknowledgement can arrive, the ids are forgotten
    assert core._seen == set()


def test_core_acknowledgements_survive_a_lost_or_failed_collection() -> None:
    core: ClientCore[str] = ClientCore()
    _collect(core, {"request_id": "r1"})
    assert [e["request_id"] for e in core.take_results()] == ["r1"]
    core.begin("get_pending_results", None, "w")
    core.lose_all("gone")  # never answered: still to acknowledge
    assert core.unacknowledged == 1
    rpc_id, _ = core.begin("get_pending_results", None, "w")
    event = core.receive(encode_error(rpc_id, RateLimited("slow down")))
    assert isinstance(event, Completed)
    assert isinstance(event.error, RateLimited)
    assert core.unacknowledged == 1
    # and the entry is not handed out again in between
    acks, event = _collect(core, {"request_id": "r1"})
    assert acks == ["r1"]
    assert isinstance(event, Completed)
    assert event.result == 0
    assert core.take_results() == []
    assert core.unacknowledged == 0


def test_core_an_answered_approval_listed_again_is_dropped_and_acknowledged() -> None:
    # The gateway queues an approval's outcome before it answers, and takes it out of the
    # queue once the answer is written: a crash in between lists it again after the restart.
    core: ClientCore[str] = ClientCore()
    asked, _ = core.begin("tool_request", {}, "w")
    pending = {"rpc_id": asked, "request_id": "r1", "expires_at": 1.0}
    core.receive(encode_notification("approval_pending", pending))
    denied = DeniedByGuardian("denied", data={"request_id": "r1"})
    answer = core.receive(encode_error(asked, denied))
    assert isinstance(answer, Completed)
    assert isinstance(answer.error, DeniedByGuardian)
    acks, event = _collect(core, {"request_id": "r1", "status": "denied"}, {"request_id": "r2"})
    assert acks == ["r1"]  # acknowledged with the next collection: the gateway drops it
    assert isinstance(event, Completed)
    assert event.result == 1
    assert core.take_results() == [{"request_id": "r2"}]  # r1 was the answer: never twice
    # A planned restart's -32007 with data.pending is no outcome: the queued one is not dropped.
    asked, _ = core.begin("tool_request", {}, "w")
    pending = {"rpc_id": asked, "request_id": "r3", "expires_at": 1.0}
    core.receive(encode_notification("approval_pending", pending))
    restarting = GatewayShuttingDown("restarting", data={"request_id": "r3", "pending": True})
    core.receive(encode_error(asked, restarting))
    _collect(core, {"request_id": "r3", "status": "executed"})
    assert core.take_results() == [{"request_id": "r3", "status": "executed"}]


def test_core_take_results_without_acknowledging() -> None:
    core: ClientCore[str] = ClientCore()
    _collect(core, {"request_id": "r1"}, {"status": "no id"})
    assert len(core.take_results(acknowledge=False)) == 2
    assert core.unacknowledged == 0
    assert _collect(core, {"request_id": "r1"})[0] == []
    assert core.take_results() == []  # handed out once, even unacknowledged
    core.acknowledge(["r1", 7, "", None])  # only request ids count
    assert _collect(core)[0] == ["r1"]


def test_core_never_keeps_an_acknowledgement_the_gateway_refuses() -> None:
    core: ClientCore[str] = ClientCore()
    core.acknowledge(["r1", "x" * 129, ""])
    assert core.unacknowledged == 1  # what cannot be a request id is never sent
    rpc_id, _ = core.begin("get_pending_results", None, "w")
    event = core.receive(encode_error(rpc_id, InvalidParams("ack: no")))
    assert isinstance(event, Completed)
    assert isinstance(event.error, InvalidParams)
    assert core.unacknowledged == 0  # given up: the next collections are not poisoned
    assert _collect(core)[0] == []


def test_core_acknowledges_at_most_max_ack_per_collection() -> None:
    core: ClientCore[str] = ClientCore()
    core.acknowledge(f"r{i}" for i in range(MAX_ACK + 5))
    first, _ = _collect(core)
    assert len(first) == MAX_ACK
    second, _ = _collect(core)
    assert second == [f"r{i}" for i in range(MAX_ACK, MAX_ACK + 5)]
    assert core.unacknowledged == 0


def test_core_malformed_collection_reply_is_an_error() -> None:
    core: ClientCore[str] = ClientCore()
    rpc_id, _ = core.begin("get_pending_results", None, "w")
    event = core.receive(encode_result(rpc_id, {"results": "nope"}))
    assert isinstance(event, Completed)
    assert isinstance(event.error, InternalError)


def test_core_notifications() -> None:
    core: ClientCore[str] = ClientCore()
    rpc_id, _ = core.begin("tool_request", {}, "w")
    params = {"rpc_id": rpc_id, "request_id": "req-1", "expires_at": "2026-11-01T00:00:00Z"}
    assert core.receive(encode_notification("approval_pending", params)) == ApprovalPending(params)
    assert core.receive(encode_notification("results_pending", {"count": 3})) == ResultsPending(3)
    assert core.receive(encode_notification("results_pending", {"count": "x"})) == ResultsPending(1)
    assert isinstance(core.receive(encode_notification("whatever", {})), Ignored)
    # the approval's request_id is remembered for ConnectionLost.data
    ((waiter, lost),) = core.lose_all("gone")
    assert waiter == "w"
    assert lost.data == {"rpc_id": rpc_id, "method": "tool_request", "request_id": "req-1"}
    assert core.in_flight == 0


def test_core_lose_all_skips_calls_nobody_waits_for() -> None:
    core: ClientCore[str] = ClientCore()
    rpc_id, _ = core.begin("get_pending_results", None, "w")
    core.abandon(rpc_id)
    core.begin("auth", {"token": "t"}, None)
    assert core.lose_all("gone") == []
    assert core.in_flight == 0


@pytest.mark.parametrize("frame", ["not json", "[]", '{"jsonrpc":"2.0","id":1}', b"\xff"])
def test_core_garbage_from_the_gateway_is_connection_lost(frame: str | bytes) -> None:
    core: ClientCore[str] = ClientCore()
    with pytest.raises(ConnectionLost, match="invalid frame"):
        core.receive(frame)


def test_backoff_is_capped_jittered_and_never_zero() -> None:
    backoff = Backoff(initial=0.5, maximum=8.0)
    rng = random.Random(7)
    for attempt in range(200):
        ceiling = min(8.0, 0.5 * 2**attempt)
        delay = backoff.delay(attempt, rng)
        assert ceiling / 2 <= delay <= ceiling
    assert backoff.delay(10**9, rng) <= 8.0
    delays = {backoff.delay(5, rng) for _ in range(20)}
    assert len(delays) > 1  # jitter


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"maximum": -1}, {"factor": 0.5}])
def test_backoff_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - attrs' and our validators
        Backoff(**kwargs)


def test_only_authentication_failures_stop_reconnecting() -> None:
    assert is_fatal(AuthenticationFailed())
    assert not is_fatal(ConnectionLost())
    assert not is_fatal(RateLimited())


def test_result_shapes_fail_closed() -> None:
    assert auth_agent({"status": "authenticated", "agent": "pi"}) == "pi"
    with pytest.raises(AuthenticationFailed):
        auth_agent({"status": "nope"})
    assert tool_result({"status": "executed", "request_id": "r", "data": None})["data"] is None
    with pytest.raises(InternalError):
        tool_result({"status": "queued"})
    with pytest.raises(InternalError):
        tools_list({"tools": [1]})
    assert tools_list({"tools": [{"name": "x"}]}) == [{"name": "x"}]


def test_targets() -> None:
    plain = make_target("ws://127.0.0.1:8080", ca=None, ssl_context=None)
    assert (plain.host, plain.port, plain.resource, plain.ssl_context) == (
        "127.0.0.1",
        8080,
        "/",
        None,
    )
    assert plain.host_header == "127.0.0.1:8080"
    secure = make_target("wss://gate.example/x?y=1", ca=None, ssl_context=None)
    assert (secure.port, secure.resource, secure.host_header) == (443, "/x?y=1", "gate.example")
    assert isinstance(secure.ssl_context, ssl.SSLContext)
    assert make_target("wss://[::1]:9/", ca=None, ssl_context=None).host_header == "[::1]:9"
    for url in ("http://x", "wss://", "ws://host:notaport"):
        with pytest.raises(ValueError, match="URL"):
            make_target(url, ca=None, ssl_context=None)
    with pytest.raises(ValueError, match="wss"):
        make_target("ws://x", ca="ca.pem", ssl_context=None)
    with pytest.raises(ValueError, match="not both"):
        make_target("wss://x", ca="ca.pem", ssl_context=ssl.create_default_context())


async def test_collapse_groups_never_leaks_a_group() -> None:
    with pytest.raises(ValueError, match="inner") as info, collapse_groups():
        raise ExceptionGroup("g", [ExceptionGroup("h", [ValueError("inner")])])
    assert not isinstance(info.value, BaseExceptionGroup)
    with trio.CancelScope() as scope, collapse_groups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught


# =============================================================================================
# Scripted gateway (real tier: sockets on 127.0.0.1)
# =============================================================================================

_HA_ID = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z0-9_]+)?$")
TOOLS = [
    {"name": n, "description": f"{n} (scripted)", "args": {"type": "object"}}
    for n in ("ha_get_state", "ha_get_states", "ha_call_service", "ha_fire_event")
]


@attrs.define(eq=False)
class _Conn:
    ws: trio_websocket.WebSocketConnection
    alive: bool = True


@attrs.define(eq=False)
class _Approval:
    request_id: str
    rpc_id: Any
    tool: str
    conn: _Conn
    resolved: bool = False


class FakeGateway:
    """Scripted gateway. Policy: reads allowed, ``lock.unlock`` denied, ``light.turn_on`` ask."""

    def __init__(self, nursery: trio.Nursery, *, approval_timeout: float = 1.0) -> None:
        self.nursery = nursery
        self.token = "s3cret"
        self.approval_timeout = approval_timeout
        self.port = 0
        self.ssl_context: ssl.SSLContext | None = None
        self.conns: set[_Conn] = set()
        self.approvals: dict[str, _Approval] = {}
        self.queued: list[dict[str, Any]] = []
        self.collections = 0
        self.acknowledged: list[str] = []
        self.listed = 0  # acknowledged-mode collections that listed something
        self.auths = 0
        self.release = trio.Event()
        self.held = 0  # "slow" requests waiting for release
        self.answer_auth = True
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        self._sending = 0  # replies and notifications still being written
        self._changed = trio.Event()  # set (and renewed) whenever any of the above changes

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds (the caller's deadline bounds it)."""
        while not predicate():
            await self._changed.wait()

    async def settled(self) -> None:
        """Wait until every reply and notification sent in the background is written."""
        await self.until(lambda: self._sending == 0)

    @property
    def url(self) -> str:
        return f"{'wss' if self.ssl_context else 'ws'}://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        self._scope, self._stopped = trio.CancelScope(), trio.Event()
        server = await self.nursery.start(self._serve, self._scope, self._stopped)
        self.port = server.port

    async def _serve(
        self, scope: trio.CancelScope, stopped: trio.Event, *, task_status: Any
    ) -> None:
        try:
            with scope:
                await trio_websocket.serve_websocket(
                    self._handle, "127.0.0.1", self.port, self.ssl_context, task_status=task_status
                )
        finally:
            stopped.set()

    async def restart(self) -> None:
        self._scope.cancel()
        for conn in list(self.conns):
            conn.alive = False
        await self._stopped.wait()  # the port is free again
        await self.start()

    def press(self, request_id: str, decision: str) -> None:
        approval = self.approvals[request_id]
        if decision == "allow":
            self._resolve(approval, result=self._executed(approval.request_id, {"ok": True}))
        else:
            self._resolve(approval, error=DeniedByGuardian(data={"request_id": request_id}))

    def drop_all(self) -> None:
        for conn in list(self.conns):
            conn.alive = False
            self.nursery.start_soon(conn.ws.aclose, 1001)

    def queue_result(self, entry: dict[str, Any]) -> None:
        self.queued.append(entry)
        self._notify_results()

    # -- internals ------------------------------------------------------------------------------

    @staticmethod
    def _executed(request_id: str, data: Any) -> dict[str, Any]:
        return {"status": "executed", "request_id": request_id, "data": data}

    def _send(self, conn: _Conn, text: str) -> None:
        async def send() -> None:
            try:
                with contextlib.suppress(trio_websocket.ConnectionClosed):
                    await conn.ws.send_message(text)
            finally:
                self._sending -= 1
                self._touch()

        self._sending += 1
        self.nursery.start_soon(send)

    def _notify_results(self) -> None:
        for conn in self.conns:
            if conn.alive:
                self._send(conn, encode_notification("results_pending", {"count": 1}))

    def _resolve(
        self, approval: _Approval, *, result: Any = None, error: AgentgateError | None = None
    ) -> None:
        if approval.resolved:
            return
        approval.resolved = True
        if approval.conn.alive:
            reply = encode_result(approval.rpc_id, result) if error is None else None
            self._send(approval.conn, reply or encode_error(approval.rpc_id, error))  # type: ignore[arg-type]
            return
        entry: dict[str, Any] = {
            "request_id": approval.request_id,
            "rpc_id": approval.rpc_id,
            "tool": approval.tool,
            "signature": "sig",
        }
        if error is None:
            entry.update(status="executed", data=result["data"])
        else:
            entry.update(status="denied", error={"code": error.code, "message": error.message})
        self.queue_result(entry)

    async def _expire(self, approval: _Approval) -> None:
        await trio.sleep(self.approval_timeout)
        self._resolve(approval, error=ApprovalTimedOut(data={"request_id": approval.request_id}))

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        conn = _Conn(ws)
        try:
            first = parse_request(await ws.get_message())
            self.auths += 1
            self._touch()
            if not self.answer_auth:
                await trio.sleep_forever()
            if not (isinstance(first, Request) and first.method == "auth"):
                return
            if first.params.get("token") != self.token:
                await ws.send_message(encode_error(first.id, AuthenticationFailed()))
                await ws.aclose(1008)
                return
            welcome = {"status": "authenticated", "agent": "pi"}
            await ws.send_message(encode_result(first.id, welcome))
            self.conns.add(conn)
            async with trio.open_nursery() as nursery:
                await self._read(conn, nursery)
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            conn.alive = False
            self.conns.discard(conn)

    async def _read(self, conn: _Conn, nursery: trio.Nursery) -> None:
        try:
            while True:
                message = parse_request(await conn.ws.get_message())
                if isinstance(message, Request):
                    nursery.start_soon(self._answer, conn, message)
        except trio_websocket.ConnectionClosed:
            nursery.cancel_scope.cancel()

    async def _answer(self, conn: _Conn, req: Request) -> None:
        request_id = str(uuid.uuid4())
        try:
            result = await self._result(conn, req, request_id)
        except AgentgateError as exc:
            text = encode_error(req.id, exc)
        else:
            if result is None:
                return
            text = encode_result(req.id, result)
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await conn.ws.send_message(text)

    async def _result(self, conn: _Conn, req: Request, request_id: str) -> Any:
        if req.method == "list_tools":
            return {"tools": TOOLS}
        if req.method == "get_pending_results":
            self.collections += 1
            self._touch()
            if "ack" in req.params:  # acknowledged mode: listed until acknowledged
                acked = set(req.params["ack"])
                self.acknowledged.extend(req.params["ack"])
                self.queued = [e for e in self.queued if e.get("request_id") not in acked]
                self.listed += bool(self.queued)
                return {"results": list(self.queued)}
            taken, self.queued = self.queued, []
            return {"results": taken}
        tool, args = req.params.get("tool"), req.params.get("args", {})
        if tool == "ha_get_state":
            entity_id = args.get("entity_id", "")
            if not _HA_ID.match(entity_id):
                raise InvalidParams("bad entity_id", data={"request_id": request_id})
            return self._executed(request_id, {"entity_id": entity_id, "state": "21.5"})
        if tool == "ha_call_service":
            action = f"{args.get('domain')}.{args.get('service')}"
            signature = f"ha_call_service({action}, {args.get('entity_id')})"
            if action == "lock.unlock":
                data = {"request_id": request_id, "signature": signature}
                raise DeniedByPolicy("denied by policy", data=data)
            if action == "light.turn_on":
                approval = _Approval(request_id, req.id, tool, conn)
                self.approvals[request_id] = approval
                self.nursery.start_soon(self._expire, approval)
                params = {"rpc_id": req.id, "request_id": request_id, "expires_at": "soon"}
                await conn.ws.send_message(encode_notification("approval_pending", params))
                return None  # answered by press() / expiry
            return self._executed(request_id, {"called": action})
        if tool == "slow":
            self.held += 1
            self._touch()
            await self.release.wait()
            return self._executed(request_id, args)
        if tool == "fail":
            raise ExecutionFailed("service unreachable", data={"request_id": request_id})
        if tool == "drop":
            conn.alive = False
            await conn.ws.aclose(1001)
            return None
        if tool == "garbage":
            await conn.ws.send_message("this is not json")
            return None
        if tool == "queue":
            self.queue_result({"request_id": "queued-1", "rpc_id": 1, "status": "executed"})
            return self._executed(request_id, None)
        raise InvalidParams("unknown tool", data={"request_id": request_id})


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeGateway:
    gateway = FakeGateway(nursery)
    await gateway.start()
    return gateway


# -- running one scenario under either library -----------------------------------------------

Scenario = Callable[[Callable[..., Any], Any], Awaitable[None]]


class _TrioHome:
    def __init__(self, fake: FakeGateway) -> None:
        self.fake = fake
        self.approval_timeout = fake.approval_timeout

    async def press(self, request_id: str, decision: str) -> None:
        self.fake.press(request_id, decision)

    async def restart_gateway(self) -> None:
        await self.fake.restart()

    async def settled(self) -> None:
        await self.fake.settled()

    async def do(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a synchronous control function of the fake in the Trio thread."""
        return fn(*args)

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` (about the fake) holds, in the Trio thread."""
        await self.fake.until(predicate)


class _AsyncioHome:
    """The same, awaited from an asyncio loop in a worker thread."""

    def __init__(self, fake: FakeGateway, token: trio.lowlevel.TrioToken) -> None:
        self.fake = fake
        self.token = token
        self.approval_timeout = fake.approval_timeout

    async def _trio(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return await asyncio.to_thread(trio.from_thread.run, afn, *args, trio_token=self.token)

    async def press(self, request_id: str, decision: str) -> None:
        await self.do(self.fake.press, request_id, decision)

    async def restart_gateway(self) -> None:
        await self._trio(self.fake.restart)

    async def settled(self) -> None:
        await self._trio(self.fake.settled)

    async def do(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(trio.from_thread.run_sync, fn, *args, trio_token=self.token)

    async def until(self, predicate: Callable[[], bool]) -> None:
        await self._trio(self.fake.until, predicate)


def _asyncio_thread(scenario: Scenario, factory: Callable[..., Any], home: Any) -> None:
    async def main() -> None:
        async with asyncio.timeout(CEILING):
            await scenario(factory, home)

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(main())


FAST = Backoff(initial=0.05, maximum=0.2)


async def run_scenario(library: str, fake: FakeGateway, scenario: Scenario, **kw: Any) -> None:
    factory = functools.partial(connect, fake.url, token=fake.token, backoff=FAST, **kw)
    if library == "trio":
        with trio.fail_after(CEILING):
            await scenario(factory, _TrioHome(fake))
    else:
        home = _AsyncioHome(fake, trio.lowlevel.current_trio_token())
        await trio.to_thread.run_sync(_asyncio_thread, scenario, factory, home)


LIBRARIES = pytest.mark.parametrize("library", ["trio", "asyncio"])


# -- the contract suite against the scripted gateway (proves the suite and both SDKs) ----------


@pytest.mark.slow
@LIBRARIES
@pytest.mark.parametrize("case", CONTRACT, ids=[c.__name__ for c in CONTRACT])
async def test_contract_against_scripted_gateway(
    library: str, fake: FakeGateway, case: Scenario
) -> None:
    await run_scenario(library, fake, case)


# -- transport behaviour beyond the contract -------------------------------------------------


@pytest.mark.slow
@LIBRARIES
async def test_results_pending_is_collected_automatically(library: str, fake: FakeGateway) -> None:
    async def scenario(factory: Callable[..., Any], home: Any) -> None:
        async with factory() as gw:
            await gw.call("queue")
            # collected in the background by the results_pending notification (after the
            # collection every connection starts with)
            await home.until(lambda: fake.collections >= 2)
            assert gw.results_waiting == 1
            # listed again by pending_results' own collection (nothing acknowledged it yet):
            # handed out once all the same
            assert await gw.pending_results() == [
                {"request_id": "queued-1", "rpc_id": 1, "status": "executed"}
            ]
            assert await gw.pending_results() == []
            assert await home.do(lambda: fake.queued) == []
            assert await home.do(lambda: fake.acknowledged) == ["queued-1"]

    await run_scenario(library, fake, scenario)


ENTRY = {"request_id": "queued-1", "rpc_id": 1, "status": "executed"}


@pytest.mark.slow
@LIBRARIES
async def test_a_result_listed_again_after_a_reconnect_is_handed_out_once(
    library: str, fake: FakeGateway
) -> None:
    async def scenario(factory: Callable[..., Any], home: Any) -> None:
        async with factory() as gw:
            await gw.call("queue")
            await home.until(lambda: fake.listed >= 1)  # collected, not handed out
            await home.do(fake.drop_all)
            listed = await home.do(lambda: fake.listed)
            # the new connection's collection lists it again: a duplicate, dropped
            await home.until(lambda: fake.listed > listed)
            assert await gw.pending_results() == [ENTRY]
            assert await gw.pending_results() == []
        assert await home.do(lambda: fake.acknowledged) == ["queued-1"]

    await run_scenario(library, fake, scenario)


@pytest.mark.slow
@LIBRARIES
async def test_leaving_connect_acknowledges_what_was_handed_out_only(
    library: str, fake: FakeGateway
) -> None:
    async def scenario(factory: Callable[..., Any], home: Any) -> None:
        async with factory() as gw:
            await gw.call("queue")
            assert await gw.pending_results() == [ENTRY]
            # leaving at once: the acknowledgement goes out before the socket closes
        assert await home.do(lambda: fake.acknowledged) == ["queued-1"]
        assert await home.do(lambda: fake.queued) == []
        async with factory() as gw:
            await gw.call("queue")  # collected in the background, never handed out
            await home.until(lambda: fake.listed > 0)
        assert await home.do(lambda: fake.queued) == [ENTRY]  # still the gateway's
        async with factory() as gw:
            assert await gw.pending_results() == [ENTRY]

    await run_scenario(library, fake, scenario)


@pytest.mark.slow
@LIBRARIES
async def test_collect_false_leaves_results_on_the_gateway(library: str, fake: FakeGateway) -> None:
    async def scenario(factory: Callable[..., Any], home: Any) -> None:
        async with factory(collect=False) as gw:
            await gw.call("queue")
            await gw.call("ha_get_state", entity_id="sensor.x")  # after the notification
            assert gw.results_waiting == 1
            assert await home.do(lambda: fake.collections) == 0
            taken = await gw.pending_results(acknowledge=False)
            assert taken == [ENTRY]
            assert await gw.pending_results() == []  # handed out once all the same
            assert await home.do(lambda: fake.queued) == [ENTRY]  # not acknowledged
            await gw.acknowledge(taken)
            assert await home.do(lambda: fake.queued) == []
            await gw.acknowledge(["queued-1", "never-heard-of"])  # harmless

    await run_scenario(library, fake, scenario)


@pytest.mark.slow
@LIBRARIES
async def test_async_hook_and_failing_hook(library: str, fake: FakeGateway) -> None:
    seen: list[str] = []
    hooked: list[trio.Event | asyncio.Event] = []

    async def hook(params: dict[str, Any]) -> None:
        await sleep(0)
        seen.append(params["request_id"])
        hooked[0].set()
        raise RuntimeError("hook bug")  # logged, never kills the connection

    async def scenario(factory: Callable[..., Any], home: Any) -> None:
        hooked.append(event())
        async with factory(on_pending=hook) as gw:

            async def guardian() -> None:
                await hooked[0].wait()
                await home.press(seen[0], "allow")

            (result, error), _ = await gather(
                lambda: gw.call("ha_call_service", domain="light", service="turn_on"),
                guardian,
            )
            assert error is None
            assert result == {"ok": True}

    await run_scenario(library, fake, scenario)


@pytest.mark.slow
@LIBRARIES
async def test_drop_fails_in_flight_then_reconnects(library: str, fake: FakeGateway) -> None:
    async def scenario(factory: Callable[..., Any], home: Any) -> None:
        async with factory() as gw:
            (_, slow_error), (_, drop_error) = await gather(
                lambda: gw.call("slow"), lambda: gw.call("drop")
            )
            assert isinstance(slow_error, ConnectionLost)
            assert slow_error.data["rpc_id"]
            assert isinstance(drop_error, ConnectionLost)
            # the next call waits for the reconnection and works
            assert (await gw.call("ha_get_state", entity_id="sensor.x"))["state"] == "21.5"
            assert gw.agent == "pi"
            assert await home.do(lambda: fake.auths) >= 2

    await run_scenario(library, fake, scenario)


@pytest.mark.slow
@LIBRARIES
async def test_without_reconnect_calls_fail_fast(library: str, fake: FakeGateway) -> None:
    async def scenario(factory: Callable[..., Any], home: Any) -> None:
        async with factory(reconnect=False) as gw:
            _, error = await capture(lambda: gw.call("drop"))
            assert isinstance(error, ConnectionLost)
            _, error = await capture(lambda: gw.call("ha_get_state", entity_id="sensor.x"))
            assert isinstance(error, ConnectionLost)
            assert not gw.connected

    await run_scenario(library, fake, scenario)


@pytest.mark.slow
@LIBRARIES
async def test_garbage_frame_drops_and_recovers(library: str, fake: FakeGateway) -> None:
    async def scenario(factory: Callable[..., Any], home: Any) -> None:
        async with factory() as gw:
            _, error = await capture(lambda: gw.call("garbage"))
            assert isinstance(error, ConnectionLost)
            assert (await gw.call("ha_get_state", entity_id="sensor.x"))["state"] == "21.5"

    await run_scenario(library, fake, scenario)


@pytest.mark.slow
@LIBRARIES
async def test_token_revoked_during_reconnect_stops_for_good(
    library: str, fake: FakeGateway
) -> None:
    async def scenario(factory: Callable[..., Any], home: Any) -> None:
        async with factory() as gw:
            await home.do(setattr, fake, "token", "rotated")
            await home.do(fake.drop_all)
            await home.until(lambda: fake.auths >= 2)  # the SDK saw the drop: it reconnects
            _, error = await capture(lambda: gw.call("ha_get_state", entity_id="sensor.x"))
            assert isinstance(error, AuthenticationFailed), error
            _, error = await capture(lambda: gw.list_tools())
            assert isinstance(error, AuthenticationFailed), error

    await run_scenario(library, fake, scenario)


@pytest.mark.slow
@LIBRARIES
async def test_errors_keep_their_data(library: str, fake: FakeGateway) -> None:
    async def scenario(factory: Callable[..., Any], home: Any) -> None:
        async with factory() as gw:
            _, error = await capture(lambda: gw.call("fail"))
            assert isinstance(error, ExecutionFailed)
            assert error.message == "service unreachable"
            assert error.data["request_id"]

    await run_scenario(library, fake, scenario)


@pytest.mark.slow
@LIBRARIES
async def test_unreachable_and_slow_handshakes(library: str, fake: FakeGateway) -> None:
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    fake.answer_auth = False

    async def scenario(factory: Callable[..., Any], home: Any) -> None:
        async with deadline(CEILING):
            dead = functools.partial(connect, f"ws://127.0.0.1:{dead_port}/", token="t")
            _, error = await capture(lambda: client_contract._enter(dead()))
            assert isinstance(error, ConnectionLost), error
            _, error = await capture(lambda: client_contract._enter(factory(handshake_timeout=0.3)))
            assert isinstance(error, ConnectionLost), error

    await run_scenario(library, fake, scenario)


@pytest.mark.slow
@LIBRARIES
async def test_tls_with_ca_file(library: str, nursery: trio.Nursery, tmp_path: Any) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    fake = FakeGateway(nursery)
    fake.ssl_context = server_ctx
    await fake.start()

    async def scenario(factory: Callable[..., Any], home: Any) -> None:
        async with factory(ca=ca_file) as gw:
            assert (await gw.call("ha_get_state", entity_id="sensor.x"))["state"] == "21.5"
        _, error = await capture(lambda: client_contract._enter(factory(ca=other)))
        assert isinstance(error, ConnectionLost), error

    await run_scenario(library, fake, scenario)


async def test_user_errors_leave_connect_unwrapped(fake: FakeGateway) -> None:
    with trio.fail_after(CEILING):

        async def body_raises() -> None:
            async with connect(fake.url, token=fake.token) as gw:
                await gw.list_tools()
                raise KeyError("mine")

        async def call_raises() -> None:
            async with connect(fake.url, token=fake.token) as gw:
                await gw.call("ha_call_service", domain="lock", service="unlock")

        with pytest.raises(KeyError) as info:
            await body_raises()
        assert type(info.value) is KeyError
        with pytest.raises(DeniedByPolicy) as denied:
            await call_raises()
        assert type(denied.value) is DeniedByPolicy


async def test_cancelled_trio_call_then_late_reply(fake: FakeGateway) -> None:
    with trio.fail_after(CEILING):
        async with connect(fake.url, token=fake.token) as gw:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(gw.call, "slow"))
                await fake.until(lambda: fake.held == 1)  # the gateway holds it
                nursery.cancel_scope.cancel()
            fake.release.set()  # the late reply arrives and is discarded
            assert isinstance(gw, Gateway)
            assert (await gw.call("slow", x=1)) == {"x": 1}


async def test_not_json_serialisable_args_raise_before_sending(fake: FakeGateway) -> None:
    with trio.fail_after(CEILING):
        async with connect(fake.url, token=fake.token) as gw:
            with pytest.raises(TypeError):
                await gw.call("ha_get_state", entity_id=object())
            json.dumps(await gw.list_tools())
