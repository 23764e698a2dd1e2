"""The WebSocket front door: one JSON-RPC connection per agent socket, and nothing that decides.

Per connection::

    handle(request)                      one per accepted WebSocket (agentgate.listener),
    │                                     holding its place in the connection limits
    ├── auth under a deadline             the first frame must be "auth" (failed-auth limiter)
    ├── reader                            parse, admit (methods, in-flight cap, rate), spawn
    ├── writer                            the only task that writes to the socket (replies
    │                                     queued together leave in one write)
    ├── close watch                       closes 1008 an agent that stops reading its replies,
    │                                     or that a configuration reload removed
    └── one task per request              list_tools / get_pending_results / get_result /
                                          tool_request -> agentgate.pipeline (which decides)

A :class:`Connection` is also the request's reply handle
(:class:`~agentgate.approvals.ReplyHandle`): an approval's "pending" notice and its late result
become frames on the connection that asked. Nothing a connection does can crash the server:
every handler catches what is not cancellation, logs it and answers -32603, and the connection
stays up (docs/protocol.md, "Errors").

Imports: pipeline (and its outcome types), approvals, protocol, limits, config, errors.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, Final, Protocol

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from agentgate.approvals import Result
from agentgate.config import AgentConfig, Config
from agentgate.errors import (
    AgentgateError,
    AuthenticationFailed,
    GatewayShuttingDown,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    RateLimited,
)
from agentgate.limits import (
    AuthAttempt,
    ConnectionLimits,
    FailedAuthTracker,
    OverLimit,
    Throttle,
    Ticket,
    source_of,
)
from agentgate.pipeline import Asked, Pipeline
from agentgate.protocol import (
    JsonId,
    Notification,
    Request,
    encode_error,
    encode_notification,
    encode_result,
    error_id,
    parse_request,
)

__all__ = ["CLOSE_GOING_AWAY", "CLOSE_POLICY", "Connection", "WebSocketDoor", "frame_size"]

log = logging.getLogger(__name__)

MAX_IN_FLIGHT: Final = 512  # concurrent requests per connection
OUTBOX: Final = 1024  # frames buffered for one connection's writer
CLOSE_POLICY: Final = 1008
CLOSE_GOING_AWAY: Final = 1001
_METHODS: Final = frozenset({"tool_request", "list_tools", "get_pending_results", "get_result"})
# auth's optional "client" member: the front doors it may name (anything else is "ws").
_CLIENTS: Final = frozenset({"mcp-stdio"})
MAX_RESULT_WAIT: Final = 300.0  # seconds one get_result may wait for an approval

Frame = tuple[str, tuple[str, ...]]  # text, and the request ids of the results it carries
GATHER_FRAMES: Final = 64  # replies queued together that the writer sends in one write
GATHER_BYTES: Final = 256 * 1024  # ... and their characters at most
# What a write raises once the agent's socket is gone (a gathered write meets the stream's own).
_GONE: Final = (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError)


class Gathering(Protocol):
    """The stream under a WebSocket (:class:`agentgate.listener.Watched`): the writes made
    inside ``gathered()`` leave together."""

    def gathered(self) -> AbstractAsyncContextManager[None]: ...


def frame_size(text: str) -> int:
    """The memory one queued frame holds (a str's size, O(1))."""
    return sys.getsizeof(text)


@attrs.define(eq=False)
class Connection:
    """One authenticated agent connection, and its requests' reply handle.

    Its outbox is bounded in frames (the channel) and in bytes (``max_outbox_bytes``): an agent
    that stops reading while replies pile up is closed (1008) rather than growing the gateway.
    ``closing`` is set when it stops taking frames, ``gone`` once its socket is done with.
    """

    # Its writer records a result delivered once it wrote the frame (ReplyHandle).
    confirms_delivery: ClassVar[bool] = True
    agent: str
    remote: str
    # Frames for the writer, each with the request ids of the results it hands out: they leave
    # the agent's queue once the writer wrote their frame (Pipeline.written), not before.
    _send: trio.MemorySendChannel[Frame]
    closed: bool = False
    in_flight: int = 0
    max_outbox_bytes: int = 16 * 1024 * 1024
    # Frames queued and frames the writer is done with (sent or given up), for drained().
    queued: int = 0
    written: int = 0
    outbox_bytes: int = 0  # memory held by frames queued and not yet written
    overflowed: bool = False  # closed because the agent did not read its replies
    revoked: str | None = None  # closed by a configuration reload: why (1008)
    via: str = "ws"  # "mcp-stdio" when the agent is agentgate's MCP bridge (auth "client")
    closing: trio.Event = attrs.field(factory=trio.Event)  # set by close()
    gone: trio.Event = attrs.field(factory=trio.Event)  # set when the connection has ended
    # drained() waiters as (frames that must be written, event), in the order they came: their
    # targets never decrease, so each frame written wakes exactly the waiters it satisfies.
    _waiters: deque[tuple[int, trio.Event]] = attrs.field(factory=deque)
    # Request ids of the results in frames queued and not yet written (or given up): still
    # queued and skipped by listings (Store.telling); released if the connection ends first.
    carrying: set[str] = attrs.field(factory=set)

    # -- the reply handle ---------------------------------------------------------------------

    def approval_pending(self, request_id: str, reply_to: JsonId, expires_at: float) -> None:
        params = {"rpc_id": reply_to, "request_id": request_id, "expires_at": expires_at}
        self.try_send(encode_notification("approval_pending", params))

    def deliver(self, result: Result) -> bool:
        if result.error is None:
            body = {"status": "executed", "request_id": result.request_id, "data": result.data}
            text = encode_result(result.reply_to, body)
        else:
            text = encode_error(result.reply_to, result.error)
        return self.try_send(text, result.request_id)

    def results_waiting(self, count: int) -> None:
        self.try_send(encode_notification("results_pending", {"count": count}))

    # -- the outbox ---------------------------------------------------------------------------

    def try_send(self, text: str, request_id: str | None = None) -> bool:
        """Queue a frame without waiting; False if the connection is closed or full."""
        size = self._room_for(text)
        if size is None:
            return False
        try:
            self._send.send_nowait((text, (request_id,) if request_id else ()))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        if request_id:
            self.carrying.add(request_id)
        self.queued += 1
        self.outbox_bytes += size
        return True

    async def send(self, text: str, request_ids: tuple[str, ...] = ()) -> bool:
        """Queue a reply, waiting if the agent reads slowly; False if the connection is gone."""
        size = self._room_for(text)
        if size is None:
            return False
        self.outbox_bytes += size  # counted while it waits for a place in the channel
        self.carrying.update(request_ids)
        try:
            await self._send.send((text, request_ids))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.outbox_bytes -= size
            self.carrying.difference_update(request_ids)
            return False
        self.queued += 1
        return True

    def _room_for(self, text: str) -> int | None:
        """The frame's size if it may be queued; None if closed, or closing it for overflow."""
        if self.closed:
            return None
        size = frame_size(text)
        if self.outbox_bytes and self.outbox_bytes + size > self.max_outbox_bytes:
            log.warning(
                "agent %s (%s) is not reading: over %d bytes of replies wait for it;"
                " closing the connection (1008)",
                self.agent,
                self.remote,
                self.max_outbox_bytes,
            )
            self.overflowed = True
            self.close()
            return None
        return size

    async def drained(self) -> None:
        """Return once the writer is done with every frame queued so far, or has stopped."""
        if self.written >= self.queued or self.closed:
            return
        event = trio.Event()
        self._waiters.append((self.queued, event))
        await event.wait()

    def wrote(self, size: int = 0, request_ids: tuple[str, ...] = ()) -> None:
        """The writer is done with one more frame (of ``size`` bytes, :func:`frame_size`,
        handing out ``request_ids``)."""
        self.written += 1
        self.outbox_bytes -= size
        self.carrying.difference_update(request_ids)
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._send.close()
        self.closing.set()
        self._wake()  # nothing more will be written: every drained() returns

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and (self.closed or waiters[0][0] <= self.written):
            waiters.popleft()[1].set()


class WebSocketDoor:
    """The JSON-RPC-over-WebSocket front door (``docs/protocol.md``) onto one pipeline."""

    def __init__(self, config: Config, pipeline: Pipeline) -> None:
        self.config = config
        self.pipeline = pipeline
        self.connections: dict[str, set[Connection]] = {}
        self.failed_auth = FailedAuthTracker(config.limits.failed_auth_per_minute)
        limits = config.limits
        self.connection_limits = ConnectionLimits(
            limits.max_connections,
            limits.max_unauthenticated_per_address,
            limits.max_connections_per_agent,
        )
        self._refusals = Throttle()  # refusals are logged once per address and minute
        self._in_flight = 0  # requests running on every connection
        self._idle: trio.Event | None = None  # set when nothing is in flight (idle())
        self._none_left: trio.Event | None = None  # set when no connection is left

    def disconnect(self, agent: str, reason: str) -> int:
        """Close every connection of ``agent`` with 1008 and ``reason`` (a configuration reload
        removed it or changed its token); how many. Requests in flight finish; their results
        are queued."""
        conns = list(self.connections.get(agent, ()))
        for conn in conns:
            conn.revoked = reason
            conn.close()
        if conns:
            log.warning("agent %s: %d connection(s) closed: %s", agent, len(conns), reason)
        return len(conns)

    async def gone(self, agent: str) -> None:
        """Return once every connection ``agent`` has now is over (its ``gone`` event)."""
        for conn in list(self.connections.get(agent, ())):
            await conn.gone.wait()

    # -- shutdown -----------------------------------------------------------------------------

    async def idle(self) -> None:
        """Return once no request is in flight on any connection."""
        if self._in_flight:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    async def close_all(self) -> None:
        """Close every connection (each writer says 1001 while shutting down) and wait."""
        for conns in list(self.connections.values()):
            for conn in list(conns):
                conn.close()
        if self.connections:
            if self._none_left is None:
                self._none_left = trio.Event()
            await self._none_left.wait()
            self._none_left = None

    # -- one connection -----------------------------------------------------------------------

    async def handle(
        self,
        request: WebSocketRequest,
        remote: str | None = None,
        ticket: Ticket | None = None,
        stream: Gathering | None = None,
    ) -> None:
        """The listener's handler for one WebSocket from ``remote`` (the peer's address; by
        default what trio-websocket says) holding ``ticket`` in :attr:`connection_limits`
        (without one, the socket is admitted here, and refused with HTTP 503 over a limit).
        ``stream``, the stream under the WebSocket, lets replies queued together leave in one
        write. Never raises (but Cancelled)."""
        remote = remote if remote is not None else _address(request.remote)
        own = ticket is None
        if ticket is None:
            try:
                ticket = self.connection_limits.admit(remote)
            except OverLimit as over:
                self._log_refusal(over.key, "refused a connection from %s: %s", remote, over)
                with contextlib.suppress(Exception):
                    await request.reject(503, body=f"{over}\n".encode())
                return
        try:
            try:
                ws = await request.accept()
            except Exception:
                log.debug("handshake with %s failed", remote, exc_info=True)
                return
            try:
                await self._connection(ws, remote, ticket, stream)
            except Exception:
                log.exception("connection from %s failed unexpectedly", remote)
            finally:
                with trio.move_on_after(2):
                    await ws.aclose()
        finally:
            if own:
                ticket.close()

    async def _connection(
        self, ws: WebSocketConnection, remote: str, ticket: Ticket, stream: Gathering | None
    ) -> None:
        authenticated = await self._authenticate(ws, remote, ticket)
        if authenticated is None:
            return
        agent, via = authenticated
        try:
            await self._session(ws, remote, agent, via, stream)
        finally:
            ticket.leave_agent()

    async def _session(
        self,
        ws: WebSocketConnection,
        remote: str,
        agent: AgentConfig,
        via: str,
        stream: Gathering | None,
    ) -> None:
        send, receive = trio.open_memory_channel[Frame](OUTBOX)
        conn = Connection(
            agent.name, remote, send, max_outbox_bytes=self.config.limits.max_outbox_bytes, via=via
        )
        self.connections.setdefault(agent.name, set()).add(conn)
        self.pipeline.sessions.add(conn)
        log.info("agent %s connected from %s", agent.name, remote)
        if self.pipeline.closing:  # authenticated while the gateway began to shut down
            conn.close()
        elif (now := self.config.agents.get(agent.name)) is None or now.digest != agent.digest:
            # A reload removed it, or changed its token, while it authenticated.
            conn.revoked = "agent removed or token changed by a configuration reload"
            conn.close()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, ws, conn, receive, stream)
                nursery.start_soon(self._close_on_overflow, ws, conn)
                queued = await self.pipeline.queued_count(agent.name)
                if queued:
                    conn.results_waiting(queued)
                await self._reader(ws, conn, nursery)
                conn.close()
        finally:
            conn.close()
            self.pipeline.unwritten(conn.carrying)  # frames its writer never reached
            conn.carrying.clear()
            self.pipeline.sessions.discard(conn)
            left = self.connections.get(agent.name, set())
            left.discard(conn)
            if not left:
                self.connections.pop(agent.name, None)
            if self._none_left is not None and not self.connections:
                self._none_left.set()
            log.info("agent %s disconnected (%s)", agent.name, remote)
            conn.gone.set()

    def _log_refusal(self, key: str, message: str, *args: object) -> None:
        if self._refusals.allow(key):
            missed = self._refusals.take_suppressed(key)
            log.warning(message + (f" ({missed} more in the last minute)" if missed else ""), *args)

    async def _close_on_overflow(self, ws: WebSocketConnection, conn: Connection) -> None:
        # The agent does not read: its socket is full, so the close frame may never go out;
        # _close gives it a moment, then closes the stream, which frees the blocked writer.
        await conn.closing.wait()
        if conn.overflowed:
            await _close(ws, CLOSE_POLICY, "not reading: too many replies waiting")
        elif conn.revoked is not None:
            await _close(ws, CLOSE_POLICY, conn.revoked[:120])

    # -- authentication -----------------------------------------------------------------------

    async def _authenticate(
        self, ws: WebSocketConnection, remote: str, ticket: Ticket
    ) -> tuple[AgentConfig, str] | None:
        async def refuse(rpc_id: JsonId, error: AgentgateError, code: int = CLOSE_POLICY) -> None:
            with trio.move_on_after(2), contextlib.suppress(ConnectionClosed):
                await ws.send_message(encode_error(rpc_id, error))
            await _close(ws, code, error.message[:120])

        if self.pipeline.closing:
            await refuse(None, GatewayShuttingDown(), CLOSE_GOING_AWAY)
            return None
        # The attempt takes its place among the source's failed-auth budget now, before it can
        # guess: sockets opened in parallel cannot multiply the guesses.
        attempt = self.failed_auth.begin(remote)
        if attempt is None:
            wait = self.failed_auth.retry_after(remote)
            await refuse(
                None,
                RateLimited(
                    f"too many failed authentications from {remote}; retry in {wait:.0f} s"
                ),
            )
            return None
        try:
            return await self._first_frame(ws, remote, attempt, ticket, refuse)
        finally:
            attempt.abandoned()  # ended without a guess (the peer left, or cancellation)

    async def _first_frame(
        self,
        ws: WebSocketConnection,
        remote: str,
        attempt: AuthAttempt,
        ticket: Ticket,
        refuse: Callable[[JsonId, AgentgateError], Awaitable[None]],
    ) -> tuple[AgentConfig, str] | None:
        message: str | bytes | None = None
        with trio.move_on_after(self.config.gateway.auth_deadline):
            try:
                message = await ws.get_message()
            except ConnectionClosed:
                return None
        if message is None:
            attempt.failed()
            log.warning("no authentication from %s within the deadline", remote)
            await refuse(None, AuthenticationFailed("authentication deadline passed"))
            return None
        rpc_id: JsonId = None
        agent: AgentConfig | None = None
        via = "ws"
        try:
            if _too_large(message, self.config.limits.max_message_bytes):
                raise AuthenticationFailed("authenticate first: message too large")
            parsed = parse_request(message)
            if isinstance(parsed, Request):
                rpc_id = parsed.id
            if not isinstance(parsed, Request) or parsed.method != "auth":
                raise AuthenticationFailed('authenticate first: the first message must be "auth"')
            token = parsed.params.get("token")
            if not isinstance(token, str) or not token:
                raise AuthenticationFailed("auth needs a token")
            agent = self.config.find_agent(token)  # every agent compared, no early exit
            if agent is None:
                raise AuthenticationFailed("authentication failed: unknown token")
            # Which program speaks for the agent (older agents do not say): a label for the
            # audit log and the card, chosen by the agent itself, so it decides nothing.
            client = parsed.params.get("client")
            via = client if isinstance(client, str) and client in _CLIENTS else "ws"
        except AgentgateError as exc:
            attempt.failed()
            rpc_id = rpc_id if rpc_id is not None else error_id(exc)
            error = (
                exc
                if isinstance(exc, AuthenticationFailed)
                else AuthenticationFailed(f"authenticate first: {exc.message}")
            )
            log.warning("authentication from %s refused: %s", remote, error.message)
            await refuse(rpc_id, error)
            return None
        attempt.succeeded()
        if not ticket.authenticate(agent.name):  # a valid token: not a failed guess
            cap = self.config.limits.max_connections_per_agent
            self._log_refusal(
                f"agent {agent.name} {source_of(remote)}",
                "agent %s from %s refused: it already holds %d connections"
                " (max_connections_per_agent)",
                agent.name,
                remote,
                cap,
            )
            limited = RateLimited(
                f"too many connections for agent {agent.name} (max_connections_per_agent ="
                f" {cap}): close one first"
            )
            await refuse(rpc_id, limited)
            return None
        try:
            await ws.send_message(
                encode_result(rpc_id, {"status": "authenticated", "agent": agent.name})
            )
        except ConnectionClosed:
            return None
        return agent, via

    # -- writing ------------------------------------------------------------------------------

    async def _writer(
        self,
        ws: WebSocketConnection,
        conn: Connection,
        receive: trio.MemoryReceiveChannel[Frame],
        stream: Gathering | None,
    ) -> None:
        broken = False
        undelivered: list[str] = []
        dropped = 0  # replies never written because the agent was closed for not reading
        carried: Frame | None = None  # taken from the channel, not gathered: written next
        async with receive:
            while True:
                if carried is not None:
                    frames, carried = [carried], None
                else:
                    try:
                        frames = [await receive.receive()]
                    except trio.EndOfChannel:
                        break
                if stream is not None:
                    carried = _gather(receive, frames)
                broken = broken or conn.overflowed  # what is left waits for the next connection
                sent = False
                try:
                    if not broken:
                        try:
                            await _write(ws, frames, stream)
                            sent = True
                        except _GONE:
                            conn.closed = broken = True
                    for _, request_ids in frames:
                        if sent:
                            if request_ids:
                                self.pipeline.written(request_ids)
                        else:
                            undelivered.extend(request_ids)
                            self.pipeline.unwritten(request_ids)
                            dropped += not request_ids
                finally:
                    for text, request_ids in frames:
                        conn.wrote(frame_size(text), request_ids)
            if self.pipeline.closing and not broken and not conn.overflowed:
                await _close(ws, CLOSE_GOING_AWAY, "gateway shutting down")
        if dropped and conn.overflowed:
            log.warning(
                "agent %s (%s): %d replies were never read (their outcomes are in the audit"
                " log; results of approvals are queued)",
                conn.agent,
                conn.remote,
                dropped,
            )
        await self.pipeline.requeue(conn.agent, undelivered)

    # -- reading ------------------------------------------------------------------------------

    async def _reader(
        self, ws: WebSocketConnection, conn: Connection, nursery: trio.Nursery
    ) -> None:
        limit = self.config.limits.max_message_bytes
        while not conn.closed:
            try:
                message = await ws.get_message()
            except ConnectionClosed:
                return
            try:
                if isinstance(message, bytes):
                    raise InvalidRequest("binary frames are not supported: send JSON text frames")
                if _too_large(message, limit):
                    raise InvalidRequest(f"message too large: over {limit} bytes")
                parsed = parse_request(message)
                if isinstance(parsed, Notification):
                    log.debug("ignoring notification %r from %s", parsed.method, conn.agent)
                    continue
                self._admit(conn, parsed)
            except AgentgateError as exc:
                await conn.send(encode_error(error_id(exc), exc))
                continue
            conn.in_flight += 1
            self._in_flight += 1
            nursery.start_soon(self._request, conn, parsed)

    def _admit(self, conn: Connection, req: Request) -> None:
        if req.method == "auth":
            raise _with_id(InvalidRequest("already authenticated"), req.id)
        if req.method not in _METHODS:
            raise _with_id(MethodNotFound(f"method not found: {req.method}"), req.id)
        if conn.in_flight >= MAX_IN_FLIGHT:
            limited = RateLimited(f"too many requests in flight (limit {MAX_IN_FLIGHT})")
            raise _with_id(limited, req.id)

    async def _request(self, conn: Connection, req: Request) -> None:
        try:
            if req.method == "tool_request":
                result = await self._tool_request(conn, req)
            elif req.method == "list_tools":
                result = {"tools": self.pipeline.list_tools(conn.agent)}
            elif req.method == "get_result":
                result = await self._get_result(conn, req)
            else:
                await self._pending_results(conn, req)
                return
            if result is not None:
                await conn.send(encode_result(req.id, result))
        except AgentgateError as exc:
            await conn.send(encode_error(req.id, exc))
        except Exception:
            log.exception("request %r from %s failed unexpectedly", req.method, conn.agent)
            await conn.send(encode_error(req.id, InternalError("internal error (logged)")))
        finally:
            conn.in_flight -= 1
            self._in_flight -= 1
            if not self._in_flight and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def _pending_results(self, conn: Connection, req: Request) -> None:
        """``get_pending_results``: acknowledged delivery if the call carries ``ack``."""
        extra = set(req.params) - {"ack"}
        if extra:
            raise InvalidParams(f"unexpected params: {', '.join(sorted(extra))}")
        if "ack" in req.params:
            # Listed, not handed out: whatever happens to this frame, the results stay queued
            # until a later call acknowledges them.
            listed = await self.pipeline.list_queued(conn.agent, acknowledge=req.params["ack"])
            await conn.send(encode_result(req.id, {"results": listed}))
            return
        # Each result handed out once: it stays queued until this frame is written, and a
        # concurrent call (or its own answer on its way) does not hand it out again.
        results = await self.pipeline.hand_out(conn.agent)
        handed = tuple(r["request_id"] for r in results)
        try:
            sent = await conn.send(encode_result(req.id, {"results": results}), handed)
        except BaseException:
            self.pipeline.unwritten(handed)
            raise
        if not sent:
            await self.pipeline.requeue(conn.agent, handed)

    async def _tool_request(self, conn: Connection, req: Request) -> dict[str, Any] | None:
        params = req.params
        extra = set(params) - {"tool", "args"}
        if extra:
            raise InvalidParams(f"unexpected params: {', '.join(sorted(extra))}")
        tool = params.get("tool")
        args = params.get("args", {})
        if not isinstance(tool, str) or not tool:
            raise InvalidParams('"tool" must be a non-empty string')
        if not isinstance(args, dict):
            raise InvalidParams('"args" must be an object')
        outcome = await self.pipeline.submit(conn.agent, tool, args, conn, req.id)
        if isinstance(outcome, Asked):
            return None  # the approval answers later, through the connection (or the queue)
        return {"status": "executed", "request_id": outcome.request_id, "data": outcome.data}

    async def _get_result(self, conn: Connection, req: Request) -> dict[str, Any]:
        """``get_result {"request_id", "wait"}``: the queued-result entry of one of this
        agent's requests, or ``{"status": "pending", ...}`` once ``wait`` seconds passed."""
        params = req.params
        extra = set(params) - {"request_id", "wait"}
        if extra:
            raise InvalidParams(f"unexpected params: {', '.join(sorted(extra))}")
        request_id = params.get("request_id")
        wait = params.get("wait", 0)
        if not isinstance(request_id, str) or not request_id:
            raise InvalidParams('"request_id" must be a non-empty string')
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait >= 0:
            raise InvalidParams('"wait" must be a number of seconds, 0 or more')
        wait = min(float(wait), MAX_RESULT_WAIT)
        return await self.pipeline.result_of(conn.agent, request_id, wait)


def _gather(receive: trio.MemoryReceiveChannel[Frame], frames: list[Frame]) -> Frame | None:
    """Add the replies already queued behind ``frames[0]`` to ``frames``, to be written
    together (bounded: ``GATHER_FRAMES``, ``GATHER_BYTES``). A frame that hands out queued
    results is written alone: if its write fails, exactly its results go back to the queue.
    Returns a frame taken from the channel but not gathered (written next), or None."""
    if frames[0][1]:
        return None
    size = len(frames[0][0])
    while len(frames) < GATHER_FRAMES:
        try:
            frame = receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return None
        size += len(frame[0])
        if frame[1] or size > GATHER_BYTES:
            return frame
        frames.append(frame)
    return None


async def _write(ws: WebSocketConnection, frames: list[Frame], stream: Gathering | None) -> None:
    """Send ``frames``, several in one write on ``stream`` when there is one."""
    if stream is None or len(frames) == 1:
        for text, _ in frames:
            await ws.send_message(text)
        return
    async with stream.gathered():
        for text, _ in frames:
            await ws.send_message(text)


async def _close(ws: WebSocketConnection, code: int, reason: str) -> None:
    with trio.move_on_after(2):
        await ws.aclose(code, reason)


def _too_large(message: str | bytes, limit: int) -> bool:
    """Is the frame over ``limit`` bytes (UTF-8)? Cheap for the common short frame."""
    if len(message) <= limit // 4:
        return False
    size = len(message) if isinstance(message, bytes) else len(message.encode("utf-8", "replace"))
    return size > limit


def _with_id(err: AgentgateError, rpc_id: JsonId) -> AgentgateError:
    err.rpc_id = rpc_id  # type: ignore[attr-defined]  # read back by protocol.error_id
    return err


def _address(endpoint: object) -> str:
    address = getattr(endpoint, "address", None)
    return str(address) if address is not None else str(endpoint)
