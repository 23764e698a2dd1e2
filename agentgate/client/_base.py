"""What both transports share: options, URL/TLS set-up and the user-facing ``Gateway`` methods.

Imports: client._core, errors.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import urlsplit

from attrs import field, frozen

from agentgate.client._core import (
    ApprovalPending,
    Backoff,
    ClientCore,
    Completed,
    Event,
    ResultsPending,
    auth_agent,
    tool_result,
    tools_list,
)
from agentgate.errors import AgentgateError, ConnectionLost, InternalError

logger = logging.getLogger("agentgate.client")

PendingHook = Callable[[dict[str, Any]], Awaitable[None] | None]
"""``on_pending`` callback: gets the ``approval_pending`` params; may be sync or async."""


@frozen
class Target:
    """Where to connect: parsed from a ``ws://`` or ``wss://`` URL."""

    url: str
    host: str
    port: int
    resource: str
    ssl_context: ssl.SSLContext | None

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.ssl_context else 80
        return host if self.port == default else f"{host}:{self.port}"


def make_target(
    url: str, *, ca: str | os.PathLike[str] | None, ssl_context: ssl.SSLContext | None
) -> Target:
    """Parse the URL and build the TLS context (``ValueError`` on a bad combination)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"gateway URL must start with wss:// (or ws://), got {url!r}")
    if not parts.hostname:
        raise ValueError(f"gateway URL has no host: {url!r}")
    secure = parts.scheme == "wss"
    if not secure and (ca is not None or ssl_context is not None):
        raise ValueError("ca= / ssl_context= need a wss:// URL")
    if ca is not None and ssl_context is not None:
        raise ValueError("give ca= or ssl_context=, not both")
    context: ssl.SSLContext | None = None
    if secure:
        context = ssl_context or ssl.create_default_context(
            cafile=os.fspath(ca) if ca is not None else None
        )
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError as exc:
        raise ValueError(f"gateway URL has a bad port: {url!r}") from exc
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url, parts.hostname, port, resource, context)


@frozen
class Options:
    """Everything ``connect()`` was given, validated once."""

    target: Target
    token: str = field(repr=False)
    reconnect: bool
    on_pending: PendingHook | None
    backoff: Backoff
    handshake_timeout: float
    rng: random.Random = field(factory=random.Random)
    collect: bool = True
    client: str | None = None  # auth's "client" member: which program speaks for the agent


class Gateway:
    """A connection to an agentgate gateway, as yielded by :func:`agentgate.client.connect`.

    The same class surface under Trio and asyncio; the event-loop specific part is the
    transport (``_rpc``, ``_spawn``, ``_resolve``). Every method may be called from many
    tasks at once: calls share one connection and are matched to replies by id.
    """

    agent: str
    """The agent name the gateway authenticated us as (empty if the gateway did not say)."""

    def __init__(self, options: Options, collect_lock: AbstractAsyncContextManager[Any]) -> None:
        self._options = options
        self._core: ClientCore[Any] = ClientCore()
        self._collect_lock = collect_lock
        self._collect_queued = False
        self._acks_queued = False
        self._results_waiting = 0
        self.agent = ""

    # -- public API -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a live, authenticated connection exists right now."""
        raise NotImplementedError

    async def call(self, tool: str, /, **args: Any) -> Any:
        """Run ``tool`` with keyword ``args`` and return the service's ``data``.

        Raises the :class:`~agentgate.errors.AgentgateError` subclass of the gateway's answer
        (``DeniedByPolicy``, ``DeniedByGuardian``, ``ApprovalTimedOut``, ``InvalidParams``,
        ``ExecutionFailed``, ``RateLimited`` …) with the gateway's ``error.data``
        (``request_id``, ``signature``) on ``.data``; ``ConnectionLost`` if the connection
        dropped while the call was in flight. A call that needs a human waits as long as the
        guardian takes; bound it with your own cancel scope / ``asyncio.timeout``.
        """
        result = await self.request(tool, args)
        return result["data"]

    async def request(
        self,
        tool: str,
        args: dict[str, Any] | None = None,
        *,
        on_pending: PendingHook | None = None,
    ) -> dict[str, Any]:
        """Like :meth:`call` but return the whole result: ``{"status", "request_id", "data"}``.

        ``on_pending`` (sync or async) is called with this call's ``approval_pending`` params
        ``{"rpc_id", "request_id", "expires_at"}`` if it waits for the guardian (as well as
        ``connect(on_pending=...)``).
        """
        params = {"tool": tool, "args": dict(args or {})}
        reply = await self._rpc("tool_request", params, on_pending)
        return tool_result(reply)

    async def get_result(self, request_id: str, *, wait: float = 0) -> dict[str, Any]:
        """The outcome of one of this agent's requests that waited for the guardian.

        Returns its queued-result entry ``{"request_id", "rpc_id", "tool", "signature",
        "status", "data" | "error"}`` (reading it delivers it: it leaves the queue, and asking
        again returns the same entry), or ``{"status": "pending", "request_id", "expires_at"}``
        if it is still undecided after ``wait`` seconds (the gateway caps a wait at 300 s).
        Raises ``InvalidParams`` for an unknown id or another agent's. Nothing executes.
        """
        reply = await self._rpc("get_result", {"request_id": request_id, "wait": wait})
        if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
            raise InternalError(f"the gateway sent a malformed get_result reply: {reply!r}")
        return reply

    async def list_tools(self) -> list[dict[str, Any]]:
        """The tools this gateway offers: ``[{"name", "description", "args": <JSON Schema>}]``."""
        return tools_list(await self._rpc("list_tools", None))

    @property
    def results_waiting(self) -> int:
        """How many queued results the gateway last said wait for this agent (its latest
        ``results_pending`` notification; 0 until it sends one). Useful with
        ``connect(collect=False)``, which leaves them on the gateway."""
        return self._results_waiting

    async def pending_results(self, *, acknowledge: bool = True) -> list[dict[str, Any]]:
        """Queued results: those collected automatically so far plus freshly fetched ones.

        Each entry is ``{"request_id", "rpc_id", "tool", "signature", "status", "data" |
        "error"}`` and is returned once in this ``connect()`` session, whatever the
        connection does. The gateway keeps each result until the SDK acknowledges it, which
        it does right after handing it out here (``acknowledge=True``). With
        ``acknowledge=False`` the results stay on the gateway until you call
        :meth:`acknowledge` (say, once you have stored them): if your program stops before,
        the next session gets them again.

        If fetching fails (e.g. ``ConnectionLost``) the exception is raised and the buffered
        entries stay for the next call.
        """
        async with self._collect_lock:
            await self._rpc("get_pending_results", None)
        taken = self._core.take_results(acknowledge=acknowledge)
        if acknowledge and taken:
            self._acknowledge_soon()
        return taken

    async def acknowledge(self, results: Iterable[dict[str, Any] | str]) -> None:
        """Tell the gateway these results (entries or their ``request_id``) are in your hands;
        it drops them from the agent's queue. For results taken with
        ``pending_results(acknowledge=False)``; acknowledging twice, or an id the gateway does
        not hold, is harmless.

        Raises ``ConnectionLost`` if the gateway could not confirm it now; the SDK then
        acknowledges them with its next collection (on this connection or the next).
        """
        self._core.acknowledge(r.get("request_id") if isinstance(r, dict) else r for r in results)
        await self._send_acks()

    # -- shared machinery -----------------------------------------------------------------

    async def _rpc(
        self, method: str, params: dict[str, Any] | None, on_pending: PendingHook | None = None
    ) -> Any:
        raise NotImplementedError

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        raise NotImplementedError

    def _resolve(self, event: Completed[Any]) -> None:
        raise NotImplementedError

    async def _handshake(
        self,
        send: Callable[[str], Awaitable[None]],
        receive: Callable[[], Awaitable[str | bytes]],
    ) -> str:
        """Send ``auth`` and wait for its answer (dispatching anything else); the agent name."""
        auth: dict[str, Any] = {"token": self._options.token}
        if self._options.client is not None:
            auth["client"] = self._options.client
        rpc_id, text = self._core.begin("auth", auth, None)
        try:
            await send(text)
            while True:
                event = self._core.receive(await receive())
                if isinstance(event, Completed) and event.rpc_id == rpc_id:
                    if event.error is not None:
                        raise event.error
                    return auth_agent(event.result)
                self._dispatch(event)
        finally:
            self._core.abandon(rpc_id)

    def _dispatch(self, event: Event[Any]) -> None:
        """Act on one event from the core (called by the transport's reader)."""
        if isinstance(event, Completed):
            if event.waiter is not None:
                self._resolve(event)
        elif isinstance(event, ApprovalPending):
            logger.info("approval pending: %s", event.params)
            if self._options.on_pending is not None:
                self._spawn(self._run_hook, self._options.on_pending, event.params)
            if event.hook is not None:
                self._spawn(self._run_hook, event.hook, event.params)
        elif isinstance(event, ResultsPending):
            self._results_waiting = event.count
            if self._options.collect:
                self._request_collection()
        else:
            logger.debug("ignored: %s", event.reason)

    def _connected(self) -> None:
        """A (re)connection is authenticated: collect what waits, acknowledge what was handed."""
        if self._options.collect:
            self._request_collection()
        elif self._core.unacknowledged:
            self._acknowledge_soon()

    def _request_collection(self) -> None:
        """Collect queued results in the background (coalesced: one waiting collector)."""
        if not self._collect_queued:
            self._collect_queued = True
            self._spawn(self._collect_quietly)

    def _acknowledge_soon(self) -> None:
        """Send pending acknowledgements in the background (coalesced)."""
        if not self._acks_queued:
            self._acks_queued = True
            self._spawn(self._acknowledge_quietly)

    async def _acknowledge_quietly(self) -> None:
        self._acks_queued = False
        try:
            await self._send_acks()
        except ConnectionLost as exc:
            logger.debug("acknowledgements wait for the next connection: %s", exc)
        except AgentgateError as exc:
            logger.warning("could not acknowledge queued results: %s", exc)

    async def _send_acks(self) -> None:
        """Collections until the gateway has confirmed every acknowledgement (each carries
        up to ``MAX_ACK``; what they list is buffered, duplicates dropped)."""
        async with self._collect_lock:
            while self._core.unacknowledged:  # each answered collection confirms some
                await self._rpc("get_pending_results", None)

    async def _flush_acknowledgements(self) -> None:
        """On leaving ``connect()``: acknowledge what was handed out, if connected (the
        transport bounds this)."""
        if self._core.unacknowledged and self.connected:
            try:
                await self._send_acks()
            except AgentgateError as exc:
                logger.warning(
                    "%d queued result(s) handed out but not acknowledged (%s): the gateway"
                    " will hand them out again",
                    self._core.unacknowledged,
                    exc,
                )

    async def _collect_quietly(self) -> None:
        try:
            async with self._collect_lock:
                self._collect_queued = False
                await self._rpc("get_pending_results", None)
        except ConnectionLost as exc:
            # Closing, or reconnecting: the results stay queued and are collected next time.
            logger.debug("queued results not collected now: %s", exc)
        except AgentgateError as exc:
            logger.warning("could not collect queued results: %s", exc)

    async def _run_hook(self, hook: PendingHook, params: dict[str, Any]) -> None:
        try:
            outcome = hook(params)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            logger.exception("on_pending callback failed (ignored)")
