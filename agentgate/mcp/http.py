"""The MCP Streamable HTTP door, on the gateway itself (``[mcp]`` in gate.toml).

::

    serve_mcp (one supervised task of serve_gateway)     Hypercorn's Trio worker, TLS
    └── each HTTP request ──▶ guard                      (nothing runs unless it passes)
        ├── path other than [mcp] path ─────────────────▶ 404
        ├── Origin not in allowed_origins ──────────────▶ 403, whatever the token
        ├── failed-auth limiter (shared with WSS) ──────▶ 429 + Retry-After
        ├── bearer token (same agents, constant time) ──▶ 401 + JSON-RPC error
        ├── body over max_message_bytes / not JSON ─────▶ 413 / 415 + JSON-RPC error
        └── the SDK's Streamable HTTP app ──▶ agentgate.mcp.server ──▶ PipelineBackend
                                                                       └─▶ pipeline.submit

Every error body is a JSON-RPC error object. The agent a request authenticated as is put in
the ASGI scope (and as the SDK's authenticated user, so a session can only be used with the
token that opened it); the tool handlers read it from there. A call that waits for the
guardian holds a one-shot reply handle (:class:`_Waiter`); when the call stops waiting
(answered "pending", cancelled, or its client gone: the guard sets an event when the HTTP
request ends) the handle refuses the late result and the broker queues it for the agent. A
configuration reload that removes an agent or changes its token ends that agent's requests in
flight (:meth:`McpHttpDoor.disconnect`).

Imports: pipeline, approvals (the reply handle), config, limits, errors, protocol (ids); mcp.server.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections.abc import Callable
from typing import Any, Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from starlette.types import ASGIApp as App
from starlette.types import Message, Receive, Scope, Send

from agentgate.approvals import Result
from agentgate.config import Config, McpConfig
from agentgate.errors import (
    AgentgateError,
    AuthenticationFailed,
    GatewayShuttingDown,
    InvalidRequest,
    OutcomeUnknown,
    RateLimited,
)
from agentgate.limits import FailedAuthTracker
from agentgate.mcp.server import Asked, Outcome, build_server
from agentgate.pipeline import INTERRUPTED, Executed, Pipeline
from agentgate.protocol import JsonId

__all__ = ["AGENT_KEY", "McpHttpDoor", "PipelineBackend", "serve_mcp", "take_results"]

log = logging.getLogger(__name__)

AGENT_KEY: Final = "agentgate.agent"  # ASGI scope: the agent the request authenticated as
GONE_KEY: Final = "agentgate.gone"  # ASGI scope: set once the HTTP request has ended
VIA: Final = "mcp-http"
DRAIN_LIMIT: Final = 16 * 1024 * 1024  # bytes of an oversized body read (and dropped) to refuse it
MAX_SESSIONS: Final = 1000  # open MCP sessions (2025 handshakes), all agents together
SESSION_IDLE: Final = 600.0  # seconds a session with nothing in flight is kept
SUBMIT_BOUND: Final = 60.0  # seconds a started submit may finish after its caller gave up


async def take_results(pipeline: Pipeline, agent: str) -> list[dict[str, Any]]:
    """The agent's queued results for ``agentgate_pending_results``.

    The one place that says how the MCP door hands them out: acknowledged as they are
    returned (a tool result is their delivery; MCP has no later acknowledgement to wait for),
    which is ``get_pending_results`` without ``ack``. A result lost with its HTTP answer can
    still be read by id (``agentgate_result``).
    """
    return await pipeline.take_queued(agent)


class _Waiter:
    """The reply handle of one MCP call: hears its ask, takes its late result once."""

    via = VIA
    confirms_delivery = False  # handing the result to the waiting call delivers it

    def __init__(self, agent: str, asked: Callable[[Asked], None]) -> None:
        self.agent = agent
        self._asked = asked
        self.result: Result | None = None
        self.decided = trio.Event()
        self.abandoned = False  # the call stopped waiting: a late result goes to the queue

    def approval_pending(self, request_id: str, reply_to: JsonId, expires_at: float) -> None:
        self._asked(Asked(request_id, expires_at))

    def deliver(self, result: Result) -> bool:
        if self.abandoned or self.decided.is_set():
            return False
        self.result = result
        self.decided.set()
        return True

    def results_waiting(self, count: int) -> None:
        pass  # MCP has no push for this: the agent calls agentgate_pending_results

    async def drained(self) -> None:
        pass


class PipelineBackend:
    """The HTTP door's :class:`~agentgate.mcp.server.Backend`: the pipeline, as ``agent``."""

    def __init__(self, door: McpHttpDoor, agent: str) -> None:
        self._door = door
        self.pipeline = door.pipeline
        self.agent = agent

    def _submit_bound(self) -> float:
        """How long a started submit may go on after its caller gave up: longer than the
        service's own timeout, so an execution under way is never cut short by this door."""
        ha = self.pipeline.config.services.homeassistant
        return max(SUBMIT_BOUND, (ha.timeout if ha is not None else 0.0) + SUBMIT_BOUND / 2)

    def known(self, tool: str) -> bool:
        return tool in self.pipeline.offered

    async def tools(self) -> list[dict[str, Any]]:
        return self.pipeline.list_tools(self.agent)

    async def call(
        self, tool: str, args: dict[str, Any], asked: Callable[[Asked], None]
    ) -> Outcome:
        waiter = _Waiter(self.agent, asked)
        self._door.calls_started()
        try:
            # A request the pipeline has started finishes (its decision committed, an allowed
            # call executed) even if the MCP client cancels meanwhile: nothing half-done.
            outcome: object = None
            with trio.CancelScope(shield=True) as shield:
                shield.deadline = trio.current_time() + self._submit_bound()
                outcome = await self.pipeline.submit(self.agent, tool, args, waiter, None)
            if outcome is None:  # cut off by the bound: the pipeline recorded it as unknown
                raise OutcomeUnknown(INTERRUPTED)
            if isinstance(outcome, Executed):
                return {"request_id": outcome.request_id, "data": outcome.data}
            await waiter.decided.wait()
        finally:
            if not waiter.decided.is_set():
                waiter.abandoned = True
            self._door.calls_ended()
        result = waiter.result
        assert result is not None  # decided is set only with a result
        if result.error is not None:
            raise result.error
        return {"request_id": result.request_id, "data": result.data}

    async def result(self, request_id: str, wait: float) -> dict[str, Any]:
        return await self.pipeline.result_of(self.agent, request_id, wait)

    async def pending_results(self) -> list[dict[str, Any]]:
        return await take_results(self.pipeline, self.agent)


class SessionLedger:
    """The MCP sessions each agent holds (by the ids the SDK hands out), so that one agent
    cannot take every session of the shared pool (``MAX_SESSIONS``). A session counts until it
    is closed (``DELETE``) or unused for ``SESSION_IDLE`` seconds, as the SDK forgets it."""

    def __init__(self, per_agent: int) -> None:
        self.per_agent = per_agent
        self._agent: dict[str, str] = {}  # session id -> agent
        self._last: dict[str, float] = {}  # session id -> last use (trio time)

    def _prune(self) -> None:
        stale = trio.current_time() - SESSION_IDLE
        for sid in [sid for sid, last in self._last.items() if last < stale]:
            self._forget(sid)

    def _forget(self, sid: str) -> None:
        self._agent.pop(sid, None)
        self._last.pop(sid, None)

    def held(self, agent: str) -> int:
        self._prune()
        return sum(1 for owner in self._agent.values() if owner == agent)

    def room_for(self, agent: str) -> None:
        """RateLimited when ``agent`` already holds its share of sessions."""
        if self.held(agent) >= self.per_agent:
            raise RateLimited(
                f"too many open MCP sessions for agent {agent} (limit {self.per_agent}); close"
                f" one (HTTP DELETE) or let an idle one expire ({SESSION_IDLE:.0f} s)"
            )

    def used(self, sid: str, *, closing: bool = False) -> None:
        if sid in self._agent:
            if closing:
                self._forget(sid)
            else:
                self._last[sid] = trio.current_time()

    def recording(self, agent: str, send: Send) -> Send:
        """``send`` that notes the session id the SDK's answer to ``initialize`` carries."""

        async def record(message: Message) -> None:
            if message.get("type") == "http.response.start":
                for key, value in message.get("headers", ()):
                    if bytes(key).lower() == b"mcp-session-id":
                        sid = bytes(value).decode("latin-1")
                        self._agent[sid], self._last[sid] = agent, trio.current_time()
            await send(message)

        return record


def _opens_session(receive: Receive) -> bool:
    """Whether a POST body (as read by ``_Guard._body``) is an ``initialize`` request."""
    body = getattr(receive, "body", b"")
    if b"initialize" not in body:
        return False
    try:
        message = json.loads(body)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("method") == "initialize"


class McpHttpDoor:
    """The MCP front door over Streamable HTTP onto one pipeline (see the module docstring)."""

    def __init__(self, config: Config, pipeline: Pipeline, failed_auth: FailedAuthTracker):
        assert config.mcp is not None, "the MCP door needs [mcp] in gate.toml"
        self.config = config
        self.settings: McpConfig = config.mcp
        self.pipeline = pipeline
        self.failed_auth = failed_auth
        self.origins = frozenset(self.settings.allowed_origins)
        self._calls = 0
        self._idle: trio.Event | None = None
        self.sessions = SessionLedger(config.limits.max_connections_per_agent)
        self._requests: dict[str, set[trio.CancelScope]] = {}  # agent -> HTTP requests running
        self.server = build_server(self._backend_for, wait=self.settings.wait, gone_for=_gone_for)
        limit = config.limits.max_message_bytes
        sdk_app = self.server.streamable_http_app(
            streamable_http_path=self.settings.path,
            # Origins are checked by the guard (allowed_origins); TLS and a bearer token stand
            # where the SDK's DNS-rebinding check would (a browser holds no agent token).
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            max_request_body_size=limit,
            # Sessions are opened by authenticated agents only; these bound what they can hold.
            max_sessions=MAX_SESSIONS,
            session_idle_timeout=SESSION_IDLE,
        )
        self.app: App = _Guard(sdk_app, self)

    def _backend_for(self, ctx: ServerRequestContext[Any, Any]) -> PipelineBackend:
        request = ctx.request
        scope = getattr(request, "scope", None)
        agent = scope.get(AGENT_KEY) if isinstance(scope, dict) else None
        if not isinstance(agent, str):  # never: the guard lets nothing through without one
            raise MCPError(code=AuthenticationFailed.code, message="not authenticated")
        return PipelineBackend(self, agent)

    def disconnect(self, agent: str) -> int:
        """End every HTTP request of ``agent`` now in flight (a configuration reload removed
        it or changed its token: its next request needs the new token); how many. A call
        waiting for the guardian stops waiting; its result is queued."""
        scopes = self._requests.get(agent, set())
        for scope in scopes:
            scope.cancel()
        return len(scopes)

    # -- shutdown -----------------------------------------------------------------------------

    def calls_started(self) -> None:
        self._calls += 1

    def calls_ended(self) -> None:
        self._calls -= 1
        if not self._calls and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def idle(self) -> None:
        """Return once no tool call is in flight (each has its outcome to answer with)."""
        if self._calls:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()


def _gone_for(ctx: ServerRequestContext[Any, Any]) -> trio.Event | None:
    scope = getattr(ctx.request, "scope", None)
    gone = scope.get(GONE_KEY) if isinstance(scope, dict) else None
    return gone if isinstance(gone, trio.Event) else None


class _Guard:
    """What every HTTP request passes before the SDK sees it (see the module docstring)."""

    def __init__(self, app: App, door: McpHttpDoor) -> None:
        self.app = app
        self.door = door
        self.path = door.settings.path.rstrip("/") or "/"
        self.limit = door.config.limits.max_message_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            if scope.get("type") == "lifespan":
                await self.app(scope, receive, send)
            return  # no WebSocket here
        try:
            await self._http(scope, receive, send)
        except Exception:
            log.exception("MCP request failed unexpectedly")
            raise

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        door = self.door
        headers = _headers(scope)
        if (scope.get("path", "").rstrip("/") or "/") != self.path:
            await _refuse(send, 404, InvalidRequest(f"not found: the MCP endpoint is {self.path}"))
            return
        origin = headers.get("origin")
        if origin is not None and origin.lower().rstrip("/") not in door.origins:
            log.warning("MCP request with Origin %r refused (not in allowed_origins)", origin)
            await _refuse(send, 403, AuthenticationFailed("origin not allowed"))
            return
        if door.pipeline.closing:
            await _refuse(send, 503, GatewayShuttingDown())
            return
        client = scope.get("client")
        remote = str(client[0]) if client else "unknown"
        attempt = door.failed_auth.begin(remote)
        if attempt is None:
            wait = max(1, math.ceil(door.failed_auth.retry_after(remote)))
            limited = RateLimited(
                f"too many failed authentications from {remote}; retry in {wait} s"
            )
            await _refuse(send, 429, limited, [(b"retry-after", str(wait).encode())])
            return
        try:
            token = _bearer(headers.get("authorization"))
            if token is None:
                await _refuse(
                    send, 401, AuthenticationFailed("authentication needed: a bearer token")
                )
                return
            agent = door.config.find_agent(token)  # every agent compared, no early exit
            if agent is None:
                attempt.failed()
                log.warning("MCP authentication from %s refused: unknown token", remote)
                await _refuse(
                    send, 401, AuthenticationFailed("authentication failed: unknown token")
                )
                return
            attempt.succeeded()
        finally:
            attempt.abandoned()  # no guess made (no token): the place is given back
        if scope.get("method") == "POST":
            content_type = headers.get("content-type", "").lower()
            if not content_type.startswith("application/json"):
                error = InvalidRequest("Content-Type must be application/json")
                await _refuse(send, 415, error)
                return
            replay = await self._body(scope, receive, send)
            if replay is None:
                return
            receive = replay
        now = door.config.agents.get(agent.name)
        if now is None or now.digest != agent.digest:  # a reload came while the body came
            await _refuse(send, 401, AuthenticationFailed("authentication failed: unknown token"))
            return
        session = headers.get("mcp-session-id")
        if session is None and _opens_session(receive):
            # A new session costs the agent a request, and each agent holds only a few: one
            # agent cannot fill the sessions every agent shares.
            try:
                door.pipeline.admit(agent.name)
                door.sessions.room_for(agent.name)
            except RateLimited as exc:
                await _refuse(send, 429, exc)
                return
            send = door.sessions.recording(agent.name, send)
        elif session is not None:
            door.sessions.used(session, closing=scope.get("method") == "DELETE")
        scope = dict(scope)
        # The SDK binds a session to the principal that opened it: no other agent can use it.
        access = AccessToken(token="-", client_id=agent.name, scopes=[])  # noqa: S106
        scope["user"] = AuthenticatedUser(access)
        scope[AGENT_KEY] = agent.name
        gone = scope[GONE_KEY] = trio.Event()
        running = door._requests.setdefault(agent.name, set())
        with trio.CancelScope() as request:
            running.add(request)
            try:
                await self.app(scope, receive, send)
            finally:
                gone.set()
                running.discard(request)
                if not running:
                    door._requests.pop(agent.name, None)

    async def _body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the whole body (at most ``max_message_bytes``), or refuse it (413)."""
        declared = _headers(scope).get("content-length")
        too_large = InvalidRequest(f"message too large: over {self.limit} bytes")
        if declared is not None and declared.isdigit() and int(declared) > DRAIN_LIMIT:
            await _refuse(send, 413, too_large)  # not worth reading: the connection closes
            return None
        body = bytearray()
        size = 0
        while True:
            message = await receive()
            if message.get("type") != "http.request":
                return None  # the client left before its body was complete
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.limit:
                body += chunk
            elif size > DRAIN_LIMIT:
                break
            if not message.get("more_body", False):
                break
        if size > self.limit:
            # Read to its end (up to DRAIN_LIMIT), so the client is there to read the answer.
            await _refuse(send, 413, too_large)
            return None
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        replay.body = bytes(body)  # type: ignore[attr-defined]  # read by _opens_session
        return replay


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        out[key.decode("latin-1").lower()] = value.decode("latin-1")
    return out


def _bearer(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def _refuse(
    send: Send,
    status: int,
    error: AgentgateError,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error.to_wire()}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="agentgate"'))
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- serving -----------------------------------------------------------------------------------


class McpListening:
    """What :func:`serve_mcp` hands to ``nursery.start``: where it listens, how to stop it."""

    def __init__(self, url: str, port: int, stop: trio.Event, stopped: trio.Event) -> None:
        self.url = url
        self.port = port
        self.stop = stop
        self.stopped = stopped


async def serve_mcp(
    door: McpHttpDoor,
    ssl_context: ssl.SSLContext | None,
    *,
    task_status: trio.TaskStatus[McpListening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the MCP door with Hypercorn's Trio worker until stopped (``McpListening.stop``:
    a graceful stop) or cancelled. ``nursery.start`` returns the :class:`McpListening`."""
    config = door.config
    settings = door.settings
    hyper = HypercornConfig()
    host, port = settings.host, settings.port
    hyper.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if ssl_context is not None:
        hyper.certfile = str(config.gateway.tls_cert)
        hyper.keyfile = str(config.gateway.tls_key)
    hyper.errorlog = logging.getLogger("agentgate.mcp.hypercorn")
    hyper.accesslog = None
    hyper.graceful_timeout = 2.0
    hyper.include_server_header = False
    hyper.ssl_handshake_timeout = config.gateway.auth_deadline
    stop, stopped = trio.Event(), trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                lambda task_status: hypercorn_serve(
                    door.app,  # type: ignore[arg-type]
                    hyper,
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            )
            bound = binds[0]  # scheme://host:port, the port really bound
            bound_port = int(bound.rsplit(":", 1)[1])
            scheme = "https" if ssl_context is not None else "http"
            log.info("mcp listening on %s://%s:%d%s", scheme, host, bound_port, settings.path)
            url = f"{scheme}://{_url_host(host)}:{bound_port}{settings.path}"
            task_status.started(McpListening(url, bound_port, stop, stopped))
    finally:
        stopped.set()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):  # noqa: S104 - a wildcard bind is reached via loopback
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
