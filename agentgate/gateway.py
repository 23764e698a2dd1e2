"""The gateway: WSS listener, one nursery per connection, requests, and the guardian's controls.

Task tree (DESIGN §3)::

    serve_gateway
    └── nursery
        ├── store writer          (open_store: group commit, off the loop)
        ├── guardian              (Telegram in a trio-asyncio loop, optional)
        ├── broker.run            (one task per pending approval)
        └── serve_websockets      (agentgate.listener: trio-websocket's server)
            └── handle(request) per connection
                ├── auth under a deadline (cancel scope)
                ├── reader            (this task: parse, rate-limit, spawn)
                ├── writer            (the only task that writes to the socket)
                └── one task per request

Nothing a connection does can crash the server: every handler catches what is not cancellation,
logs it and answers -32603, and the connection stays up. Shutdown is an event, not a bare
cancellation, so pending approvals resolve as ``shutdown`` (-32007) while the connections are
still there to hear it, and then sockets close with 1001 — all under a 5 s bound.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import sys
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import httpx
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from agentgate import tools
from agentgate.broker import Broker, Kind
from agentgate.config import AgentConfig, Config
from agentgate.errors import (
    AgentgateError,
    AuthenticationFailed,
    DeniedByPolicy,
    ExecutionFailed,
    GatewayShuttingDown,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    RateLimited,
)
from agentgate.guardian import (
    Action,
    ApprovalCard,
    CardUpdate,
    GatewayStatus,
    Grant,
    Guardian,
    GuardianControl,
    GuardianUnavailable,
    PendingCard,
)
from agentgate.guardian.card import CardRules, CardTooLarge
from agentgate.limits import AuthAttempt, FailedAuthTracker, TokenBucket
from agentgate.listener import serve_websockets
from agentgate.policy import Policy, load_policy
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
from agentgate.store import AuditEntry, GrantRow, Store, open_store

log = logging.getLogger(__name__)

GRANT_SECONDS = 3600.0
MAX_IN_FLIGHT = 512  # concurrent requests per connection
OUTBOX = 1024  # frames buffered for one connection's writer
CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001


@attrs.define(eq=False)
class Connection:
    """One authenticated agent connection (the broker's ``Session``).

    Its outbox is bounded in frames (the channel) and in bytes (``max_outbox_bytes``): an agent
    that stops reading while replies pile up is closed (1008) rather than growing the gateway.
    """

    agent: str
    remote: str
    # Frames for the writer, each with the request ids of the results it hands out, so a frame
    # that never reaches the socket puts those results back in the agent's queue.
    _send: trio.MemorySendChannel[tuple[str, tuple[str, ...]]]
    closed: bool = False
    in_flight: int = 0
    bucket: TokenBucket | None = None
    max_outbox_bytes: int = 16 * 1024 * 1024
    # Frames queued and frames the writer is done with (sent or given up), for drained().
    queued: int = 0
    written: int = 0
    outbox_bytes: int = 0  # memory held by frames queued and not yet written
    overflowed: bool = False  # closed because the agent did not read its replies
    closing: trio.Event = attrs.field(factory=trio.Event)  # set by close()
    # drained() waiters as (frames that must be written, event), in the order they came: their
    # targets never decrease, so each frame written wakes exactly the waiters it satisfies.
    _waiters: deque[tuple[int, trio.Event]] = attrs.field(factory=deque)

    def try_send(self, text: str, request_id: str | None = None) -> bool:
        size = self._room_for(text)
        if size is None:
            return False
        try:
            self._send.send_nowait((text, (request_id,) if request_id else ()))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        self.queued += 1
        self.outbox_bytes += size
        return True

    async def send(self, text: str, request_ids: tuple[str, ...] = ()) -> bool:
        """Queue a reply, waiting if the agent reads slowly; False if the connection is gone."""
        size = self._room_for(text)
        if size is None:
            return False
        self.outbox_bytes += size  # counted while it waits for a place in the channel
        try:
            await self._send.send((text, request_ids))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.outbox_bytes -= size
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

    def wrote(self, size: int = 0) -> None:
        """The writer is done with one more frame (of ``size`` bytes, :func:`frame_size`)."""
        self.written += 1
        self.outbox_bytes -= size
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


def frame_size(text: str) -> int:
    """The memory one queued frame holds (a str's size, O(1))."""
    return sys.getsizeof(text)


@attrs.define(eq=False)
class _Reading:
    """A describe in flight; asks for the same entity meanwhile wait for its text."""

    done: trio.Event = attrs.field(factory=trio.Event)
    text: str | None = None
    finished: bool = False


class Gateway(GuardianControl):
    """Request handling and the guardian's controls; :func:`serve_gateway` wires it up."""

    def __init__(
        self,
        config: Config,
        *,
        store: Store,
        policies: dict[str | None, Policy],
        executor: Any | None,
        now: Callable[[], float] = time.time,
        guardian: Guardian | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.policies = policies
        self.executor = executor
        self.now = now
        self.connections: dict[str, set[Connection]] = defaultdict(set)
        self.buckets: dict[str, TokenBucket] = {}
        self.failed_auth = FailedAuthTracker(config.limits.failed_auth_per_minute)
        self.cards = card_rules(config)
        self.frozen = False
        self.shutting_down = False
        self._grants: dict[tuple[str, str], GrantRow] = {}
        self._readings: dict[str, _Reading] = {}  # entity_id -> its describe in flight
        self._in_flight = 0  # requests running on every connection
        self._drained = trio.Event()  # set when shutting down and nothing is in flight
        self._all_closed = trio.Event()  # set when shutting down and no connection is left
        self.broker = Broker(
            store,
            execute=self._execute,
            describe=self._describe,
            sessions=self._sessions,
            on_grant=self._add_grant,
            now=now,
            approval_timeout=config.gateway.approval_timeout,
            guardian=guardian,
        )

    async def load_state(self) -> None:
        """Restore what survives a restart: the freeze and the remembered grants."""
        self.frozen = (await self.store.get_setting("frozen")) == "1"
        for grant in await self.store.active_grants(self.now()):
            self._grants[(grant.agent, grant.signature)] = grant
        if self.frozen:
            log.warning("the gateway is FROZEN by the guardian: every request is denied")

    # -- connections --------------------------------------------------------------------------

    async def handle(self, request: WebSocketRequest) -> None:
        """trio-websocket handler for one connection. Never raises (but Cancelled)."""
        remote = _address(request.remote)
        try:
            ws = await request.accept()
        except Exception:
            log.debug("handshake with %s failed", remote, exc_info=True)
            return
        try:
            await self._connection(ws, remote)
        except Exception:
            log.exception("connection from %s failed unexpectedly", remote)

    async def _connection(self, ws: WebSocketConnection, remote: str) -> None:
        agent = await self._authenticate(ws, remote)
        if agent is None:
            return
        rpm, _ = self.config.agent_limits(agent.name)
        bucket = self.buckets.get(agent.name)
        if bucket is None or bucket.capacity != rpm:
            bucket = self.buckets[agent.name] = TokenBucket(rpm, 60.0)
        send, receive = trio.open_memory_channel[tuple[str, tuple[str, ...]]](OUTBOX)
        conn = Connection(
            agent.name,
            remote,
            send,
            bucket=bucket,
            max_outbox_bytes=self.config.limits.max_outbox_bytes,
        )
        self.connections[agent.name].add(conn)
        log.info("agent %s connected from %s", agent.name, remote)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, ws, conn, receive)
                nursery.start_soon(self._close_on_overflow, ws, conn)
                queued = await self._queued_count(agent.name)
                if queued:
                    conn.try_send(encode_notification("results_pending", {"count": queued}))
                await self._reader(ws, conn, nursery)
                conn.close()
        finally:
            conn.close()
            self.connections[agent.name].discard(conn)
            if not self.connections[agent.name]:
                del self.connections[agent.name]
            if self.shutting_down and not self.connections:
                self._all_closed.set()
            log.info("agent %s disconnected (%s)", agent.name, remote)

    async def _close_on_overflow(self, ws: WebSocketConnection, conn: Connection) -> None:
        # The agent does not read: its socket is full, so the close frame may never go out;
        # _close gives it a moment, then closes the stream, which frees the blocked writer.
        await conn.closing.wait()
        if conn.overflowed:
            await self._close(ws, CLOSE_POLICY, "not reading: too many replies waiting")

    async def _queued_count(self, agent: str) -> int:
        try:
            return await self.store.queued_count(agent)
        except ExecutionFailed:
            return 0

    async def _close(self, ws: WebSocketConnection, code: int, reason: str) -> None:
        with trio.move_on_after(2):
            await ws.aclose(code, reason)

    async def _authenticate(self, ws: WebSocketConnection, remote: str) -> AgentConfig | None:
        async def refuse(rpc_id: JsonId, error: AgentgateError, code: int = CLOSE_POLICY) -> None:
            with trio.move_on_after(2), contextlib.suppress(ConnectionClosed):
                await ws.send_message(encode_error(rpc_id, error))
            await self._close(ws, code, error.message[:120])

        if self.shutting_down:
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
            return await self._first_frame(ws, remote, attempt, refuse)
        finally:
            attempt.abandoned()  # ended without a guess (the peer left, or cancellation)

    async def _first_frame(
        self,
        ws: WebSocketConnection,
        remote: str,
        attempt: AuthAttempt,
        refuse: Callable[[JsonId, AgentgateError], Awaitable[None]],
    ) -> AgentConfig | None:
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
        try:
            await ws.send_message(
                encode_result(rpc_id, {"status": "authenticated", "agent": agent.name})
            )
        except ConnectionClosed:
            return None
        return agent

    async def _writer(
        self,
        ws: WebSocketConnection,
        conn: Connection,
        receive: trio.MemoryReceiveChannel[tuple[str, tuple[str, ...]]],
    ) -> None:
        broken = False
        undelivered: list[str] = []
        dropped = 0  # replies never written because the agent was closed for not reading
        async with receive:
            async for text, request_ids in receive:
                broken = broken or conn.overflowed  # what is left waits for the next connection
                try:
                    if not broken:
                        try:
                            await ws.send_message(text)
                            continue
                        except ConnectionClosed:
                            conn.closed = broken = True
                    undelivered.extend(request_ids)
                    dropped += not request_ids
                finally:
                    conn.wrote(frame_size(text))
            if self.shutting_down and not broken and not conn.overflowed:
                await self._close(ws, CLOSE_GOING_AWAY, "gateway shutting down")
        if dropped and conn.overflowed:
            log.warning(
                "agent %s (%s): %d replies were never read (their outcomes are in the audit"
                " log; results of approvals are queued)",
                conn.agent,
                conn.remote,
                dropped,
            )
        await self._requeue(conn.agent, undelivered)

    async def _requeue(self, agent: str, request_ids: list[str] | tuple[str, ...]) -> None:
        """Results that never reached the socket go back to the agent's queue."""
        for request_id in request_ids:
            with contextlib.suppress(ExecutionFailed):
                await self.store.mark_undelivered(request_id)
        if request_ids:
            await self.broker.announce_queued(agent)

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
            raise _id(InvalidRequest("already authenticated"), req.id)
        if req.method not in _METHODS:
            raise _id(MethodNotFound(f"method not found: {req.method}"), req.id)
        if conn.in_flight >= MAX_IN_FLIGHT:
            raise _id(RateLimited(f"too many requests in flight (limit {MAX_IN_FLIGHT})"), req.id)
        assert conn.bucket is not None
        if not conn.bucket.try_take():
            wait = conn.bucket.retry_after()
            raise _id(
                RateLimited(
                    f"rate limited: over {conn.bucket.capacity:.0f} requests per minute;"
                    f" retry in {wait:.1f} s"
                ),
                req.id,
            )

    async def _request(self, conn: Connection, req: Request) -> None:
        try:
            if self.shutting_down:
                raise GatewayShuttingDown()
            if req.method == "tool_request":
                result = await self._tool_request(conn, req)
            elif req.method == "list_tools":
                result = {"tools": tools.list_tools()}
            else:  # get_pending_results
                results = await self.store.take_queued(conn.agent)
                handed = tuple(r["request_id"] for r in results)
                if not await conn.send(encode_result(req.id, {"results": results}), handed):
                    await self._requeue(conn.agent, handed)
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
            if self.shutting_down and not self._in_flight:
                self._drained.set()

    # -- tool requests ------------------------------------------------------------------------

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
        agent = conn.agent
        now = self.now()
        if tool not in tools.TOOLS:
            await self._audit_refusal(agent, tool, args, None, "invalid", f"unknown tool: {tool}")
            raise InvalidParams(f"unknown tool: {tool}")
        policy = self.policies.get(agent) or self.policies[None]
        try:
            evaluation = policy.evaluate(tool, args)
        except InvalidParams as exc:
            await self._audit_refusal(agent, tool, args, None, "invalid", exc.message)
            raise
        signature, decision = evaluation.signature, evaluation.decision
        # A rule's own text repeats from request to request: one shared string (S6's 10,000
        # pending approvals). A reason naming the agent's entities is never interned.
        matched = sys.intern(evaluation.reason) if evaluation.checked is None else evaluation.reason
        request_id = str(uuid.uuid4())
        data = {"request_id": request_id, "signature": signature}
        if self.frozen:
            await self._audit_refusal(
                agent, tool, args, signature, "deny", "frozen by guardian", request_id
            )
            raise DeniedByPolicy("frozen by guardian", data=data)
        if decision == "deny":
            await self._audit_refusal(agent, tool, args, signature, "deny", matched, request_id)
            raise DeniedByPolicy(f"denied by policy: {matched}", data=data)
        if decision == "ask":
            grant = self._grants.get((agent, signature))
            if grant is not None and not tools.grantable(tool, args):
                grant = None  # not even one made before this rule (tools.grantable)
            if grant is not None and grant.expires_at > now:
                decision, matched = "allow", f"grant {grant.grant_id} by {grant.granted_by}"
            else:
                await self._check_card(agent, tool, args, signature, matched, request_id, data)
                _, max_pending = self.config.agent_limits(agent)
                await self.broker.ask(
                    conn,
                    req.id,
                    tool,
                    args,
                    signature,
                    matched,
                    max_pending=max_pending,
                )
                return None
        # allow: the decision is committed before anything executes (fail closed).
        await self.store.audit(
            AuditEntry(
                time=now,
                agent=agent,
                request_id=request_id,
                tool=tool,
                args=args,
                signature=signature,
                decision="allow",
                matched=matched,
            )
        )
        try:
            result = await self._execute(tool, args)
        except AgentgateError as exc:
            exc.data.update(data)
            await self._resolve_quietly(request_id, "failed", error=exc.message)
            raise
        await self._resolve_quietly(request_id, "executed", result=result)
        return {"status": "executed", "request_id": request_id, "data": result}

    async def _check_card(
        self,
        agent: str,
        tool: str,
        args: dict[str, Any],
        signature: str,
        matched: str,
        request_id: str,
        data: dict[str, Any],
    ) -> None:
        """Refuse an ask whose card could not show the guardian every argument (-32602)."""
        card = ApprovalCard(
            request_id=request_id,
            agent=agent,
            tool=tool,
            args=args,
            signature=signature,
            matched=matched,
            expires_at=self.now() + self.config.gateway.approval_timeout,
        )
        try:
            self.cards.layout(card)
        except CardTooLarge as exc:
            await self._audit_refusal(
                agent, tool, args, signature, "invalid", f"{exc} ({matched})", request_id
            )
            limits = {"size": exc.size, "limit": exc.limit}
            raise InvalidParams(str(exc), data={**data, **limits}) from None

    async def _resolve_quietly(self, request_id: str, resolution: str, **kw: Any) -> None:
        # The decision row was committed before execution; the resolution joins the next group
        # commit without holding up the reply (a failure to write it is logged by the store).
        await self.store.resolve_audit(
            request_id, resolution, resolved_by=None, resolved_at=self.now(), wait=False, **kw
        )

    async def _audit_refusal(
        self,
        agent: str,
        tool: str,
        args: dict[str, Any],
        signature: str | None,
        decision: str,
        matched: str,
        request_id: str | None = None,
    ) -> None:
        now = self.now()
        await self.store.audit(
            AuditEntry(
                time=now,
                agent=agent,
                request_id=request_id,
                tool=tool,
                args=args,
                signature=signature,
                decision=decision,
                matched=matched,
                resolution="denied" if decision == "deny" else "rejected",
                resolved_at=now,
            )
        )

    async def _execute(self, tool: str, args: dict[str, Any]) -> Any:
        if self.executor is None:
            raise ExecutionFailed(
                f"no service is configured for {tool}: add [services.homeassistant] to gate.toml"
            )
        return await self.executor.execute(tool, args)

    async def _describe(self, tool: str, args: dict[str, Any]) -> str | None:
        """The card's line about the target entity, read from Home Assistant.

        Single flight: an ask for an entity whose state is being read right now joins that
        read instead of queueing one more request (10,000 asks at once would otherwise wait
        behind each other for Home Assistant's connections, past its timeout).
        """
        entity_id = args.get("entity_id")
        if self.executor is None or not isinstance(entity_id, str):
            return None
        while (reading := self._readings.get(entity_id)) is not None:
            await reading.done.wait()
            if reading.finished:
                return reading.text
            # that read was cancelled (its approval ended): read it ourselves
        reading = self._readings[entity_id] = _Reading()
        try:
            reading.text = await self._read_target(entity_id)
            reading.finished = True
        finally:
            del self._readings[entity_id]
            reading.done.set()
        return reading.text

    async def _read_target(self, entity_id: str) -> str:
        assert self.executor is not None
        try:
            return str(await self.executor.describe(entity_id))
        except AgentgateError as exc:
            return f"{entity_id} — current state unavailable: {exc.message}"
        except Exception as exc:
            log.exception("describing %s failed", entity_id)
            return f"{entity_id} — current state unavailable: {exc}"

    def _sessions(self, agent: str) -> list[Connection]:
        return list(self.connections.get(agent, ()))

    async def _add_grant(self, agent: str, signature: str, by: str) -> None:
        now = self.now()
        grant = GrantRow(str(uuid.uuid4())[:8], agent, signature, by, now, now + GRANT_SECONDS)
        await self.store.add_grant(grant)
        self._grants[(agent, signature)] = grant
        await self._audit_guardian(by, "grant", f"{agent}: {signature} for 1 h ({grant.grant_id})")

    async def _audit_guardian(self, by: str, decision: str, what: str) -> None:
        await self.store.audit(
            AuditEntry(
                time=self.now(),
                kind="guardian",
                agent="-",
                request_id=None,
                tool=None,
                args=None,
                signature=None,
                decision=decision,
                matched=what,
                resolved_by=by,
            )
        )

    # -- GuardianControl ----------------------------------------------------------------------

    async def decide(self, request_id: str, action: Action, by: str, *, message_ref: str) -> str:
        if self.broker.misplaced(request_id, message_ref):
            what = f"button {action.value}:{request_id} pressed on {message_ref}"
            await self.refused(by, f"{what}, which is not that approval's card")
            return "expired: that button is not on this approval's card"
        return await self.broker.decide(request_id, action, by)

    async def card_copied(self, request_id: str, message_ref: str) -> None:
        self.broker.add_copy(request_id, message_ref)

    async def refused(self, user: str, what: str) -> None:
        log.warning("refused guardian action from %s: %s", user, what)
        with contextlib.suppress(ExecutionFailed):
            await self._audit_guardian(user, "refused", what)

    async def pending(self) -> list[PendingCard]:
        return self.broker.pending_cards()

    async def grants(self) -> list[Grant]:
        now = self.now()
        return [
            Grant(g.grant_id, g.agent, g.signature, g.granted_by, g.expires_at)
            for g in self._grants.values()
            if g.expires_at > now
        ]

    async def revoke_grant(self, grant_id: str, by: str) -> bool:
        for key, grant in list(self._grants.items()):
            if grant.grant_id == grant_id:
                del self._grants[key]
                await self.store.revoke_grant(grant_id, by, self.now())
                await self._audit_guardian(by, "revoke", f"{grant.agent}: {grant.signature}")
                return True
        return False

    async def set_frozen(self, frozen: bool, by: str) -> None:
        await self.store.set_setting("frozen", "1" if frozen else "0")
        self.frozen = frozen
        await self._audit_guardian(by, "freeze" if frozen else "unfreeze", "all agents")
        if frozen:
            count = self.broker.resolve_all(Kind.FROZEN, by, "frozen by guardian")
            log.warning("frozen by %s: %d pending approval(s) denied", by, count)
        else:
            log.warning("unfrozen by %s", by)

    async def status(self) -> GatewayStatus:
        return GatewayStatus(
            agents_connected={a: len(c) for a, c in self.connections.items() if c},
            pending=self.broker.waiting(),
            frozen=self.frozen,
        )

    # -- shutdown -----------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Refuse new work, resolve approvals as shutdown, drain, close sockets with 1001."""
        self.shutting_down = True
        await self.broker.shutdown()
        if self._in_flight:
            await self._drained.wait()
        for conns in list(self.connections.values()):
            for conn in list(conns):
                conn.close()
        if self.connections:  # each writer says 1001 and closes its socket
            await self._all_closed.wait()


_METHODS = frozenset({"tool_request", "list_tools", "get_pending_results"})


def _too_large(message: str | bytes, limit: int) -> bool:
    """Is the frame over ``limit`` bytes (UTF-8)? Cheap for the common short frame."""
    if len(message) <= limit // 4:
        return False
    size = len(message) if isinstance(message, bytes) else len(message.encode("utf-8", "replace"))
    return size > limit


def _id(err: AgentgateError, rpc_id: JsonId) -> AgentgateError:
    err.rpc_id = rpc_id  # type: ignore[attr-defined]
    return err


def _address(endpoint: object) -> str:
    address = getattr(endpoint, "address", None)
    return str(address) if address is not None else str(endpoint)


def card_rules(config: Config) -> CardRules:
    """``[guardian] max_card_chars`` and ``card_overflow``."""
    guardian = config.guardian
    if guardian.card_overflow == "document":
        return CardRules(guardian.max_card_chars, "document")
    return CardRules(guardian.max_card_chars, "refuse")


def load_policies(config: Config) -> dict[str | None, Policy]:
    """The default policy (key ``None``) and each agent's own, loaded once at start-up."""
    policies: dict[str | None, Policy] = {None: load_policy(config.policy.file)}
    for name, agent in config.agents.items():
        if agent.policy is not None:
            policies[name] = load_policy(agent.policy)
    return policies


def server_ssl_context(config: Config) -> ssl.SSLContext:
    cert, key = config.gateway.tls_cert, config.gateway.tls_key
    if cert is None or key is None:
        raise ValueError("TLS needs gateway.tls_cert and gateway.tls_key (or --insecure)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


@attrs.define
class RunningGateway:
    """What :func:`serve_gateway` hands to ``nursery.start``."""

    gateway: Gateway
    host: str
    port: int
    url: str
    stop: trio.Event

    def request_stop(self) -> None:
        self.stop.set()


@contextlib.asynccontextmanager
async def _maybe_homeassistant(
    config: Config, transport: httpx.AsyncBaseTransport | None
) -> AsyncIterator[Any | None]:
    ha_config = config.services.homeassistant
    if ha_config is None:
        yield None
        return
    from agentgate.services.homeassistant import open_homeassistant

    async with open_homeassistant(ha_config, transport=transport) as ha:
        yield ha


@contextlib.asynccontextmanager
async def _maybe_telegram(
    config: Config, control: GuardianControl, guardian: Guardian | None
) -> AsyncIterator[Guardian | None]:
    telegram = config.guardian.telegram
    if guardian is not None or telegram is None:
        yield guardian
        return
    # Telegram unreachable or answering errors: the gateway keeps running (reads are served,
    # asks fail closed with -32004) and the bot is started again in the background.
    supervisor = _TelegramSupervisor(telegram, control, card_rules(config))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.run)
        await supervisor.first_attempt.wait()
        try:
            yield supervisor
        finally:
            nursery.cancel_scope.cancel()


TELEGRAM_RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # seconds, the last one repeats


class _TelegramSupervisor:
    """The configured Telegram guardian, (re)started until it runs; a :class:`Guardian`.

    While the bot cannot start (Bot API unreachable, token refused), cards cannot be sent:
    :meth:`send_card` raises :class:`GuardianUnavailable`, so every ask fails closed.
    """

    def __init__(self, telegram: Any, control: GuardianControl, cards: CardRules) -> None:
        self._telegram = telegram
        self._control = control
        self._cards = cards
        self.active: Guardian | None = None
        self.problem = "the Telegram guardian is starting"
        self.first_attempt = trio.Event()

    async def send_card(self, card: ApprovalCard) -> str:
        if self.active is None:
            raise GuardianUnavailable(f"guardian unreachable: {self.problem}")
        return await self.active.send_card(card)

    async def update_card(self, card: ApprovalCard, message_ref: str, update: CardUpdate) -> None:
        if self.active is not None:
            await self.active.update_card(card, message_ref, update)

    async def run(self) -> None:
        from agentgate.guardian.telegram import open_telegram_guardian

        failures = 0
        while True:
            try:
                async with open_telegram_guardian(
                    self._telegram, self._control, cards=self._cards
                ) as tg:
                    self.active = tg
                    self.first_attempt.set()
                    failures = 0
                    await trio.sleep_forever()
            except GuardianUnavailable as exc:
                self.problem = exc.message
                delay = TELEGRAM_RESTART_DELAYS[min(failures, len(TELEGRAM_RESTART_DELAYS) - 1)]
                failures += 1
                log.error(
                    "guardian unreachable: %s; every ask fails closed (-32004) until the"
                    " Telegram guardian starts (next attempt in %g s)",
                    exc.message,
                    delay,
                )
                self.first_attempt.set()
                await trio.sleep(delay)
            finally:
                self.active = None


async def serve_gateway(
    config: Config,
    *,
    insecure: bool = False,
    guardian: Guardian | None = None,
    ha_transport: httpx.AsyncBaseTransport | None = None,
    now: Callable[[], float] = time.time,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[RunningGateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until ``stop`` is set (or the caller cancels), then shut down cleanly.

    ``guardian`` replaces the configured Telegram guardian (tests). Supports the start protocol:
    ``running = await nursery.start(serve_gateway, config)``.
    """
    stop = stop if stop is not None else trio.Event()
    ssl_context = None if insecure else server_ssl_context(config)
    policies = load_policies(config)
    limits = config.limits
    async with (
        open_store(config.store.path, synchronous=config.store.synchronous) as store,
        _maybe_homeassistant(config, ha_transport) as ha,
    ):
        gateway = Gateway(config, store=store, policies=policies, executor=ha, now=now)
        await gateway.load_state()
        async with _maybe_telegram(config, gateway, guardian) as active_guardian:
            gateway.broker.guardian = active_guardian
            if active_guardian is None:
                log.warning("no guardian configured: every ask fails closed (-32004)")
            if ha is not None:
                warning = await ha.check_health()
                if warning:
                    log.warning("Home Assistant health check: %s", warning)
            async with trio.open_nursery() as nursery:
                await nursery.start(gateway.broker.run)
                server = await nursery.start(
                    partial(
                        serve_websockets,
                        gateway.handle,
                        config.gateway.host,
                        config.gateway.port,
                        ssl_context,
                        max_message_size=max(4 * limits.max_message_bytes, 1 << 20),
                        connect_timeout=config.gateway.auth_deadline,
                        disconnect_timeout=2,
                    )
                )
                scheme = "ws" if ssl_context is None else "wss"
                host = config.gateway.host
                url = f"{scheme}://{_url_host(host)}:{server.port}/"
                if ssl_context is None:
                    log.warning(
                        "INSECURE: serving plain ws:// without TLS; tokens and requests cross"
                        " the network in clear text. Use this only on loopback."
                    )
                log.info("listening on %s://%s:%d", scheme, host, server.port)
                task_status.started(RunningGateway(gateway, host, server.port, url, stop))
                try:
                    await stop.wait()
                finally:
                    with trio.move_on_after(5, shield=True) as scope:
                        await gateway.shutdown()
                    if scope.cancelled_caught:
                        log.warning("shutdown took longer than 5 s; cancelling what is left")
                    nursery.cancel_scope.cancel()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):  # noqa: S104 - a wildcard bind is reached via loopback
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
