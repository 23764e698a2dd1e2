"""The gateway, wired: one function builds every part, one serves it over WSS.

Task tree::

    serve_gateway(config)             `agentgate serve`, the test harness, the demo, the bench
    ├── open_gateway(config)          the same wiring for the fast tests (memory streams)
    │   ├── store writer              (agentgate.store: group commit, off the loop)
    │   ├── audit log                 (agentgate.checkpoints: signed checkpoints, witnessed)
    │   ├── executor                  (agentgate.services: Home Assistant and the HTTP
    │   │                              services over httpx; several as one ServiceSet)
    │   ├── guardian                  (Telegram in a trio-asyncio loop, supervised; or given)
    │   ├── broker.run                (agentgate.broker: one task per pending approval)
    │   └── trim_after_activity       (agentgate.memory: freed heap back to the OS after work)
    │   → Gateway: pipeline (decides), controls (the guardian's), door (WebSocket), undo
    ├── serve_websockets              (agentgate.listener) → door.handle per connection
    ├── serve_mcp (if [mcp])          (agentgate.mcp.http) → the MCP door, Streamable HTTP
    └── serve_control                 (agentgate.control_socket) → reload, revoke, undo

Shutdown is an event, not a bare cancellation: new work is refused, undecided approvals are
suspended for the next start (their askers hear -32007 while the connections are still there,
their cards say the gateway is restarting) or, with ``cancel_pending``, resolved as
``shutdown``; in-flight requests finish, then sockets close with 1001 — all under a 5 s bound.

Start-up fails fast (:class:`~agentgate.config.ConfigError`, ``agentgate serve`` exits 2) when
Home Assistant or Telegram refuses the configured token or chat; an unreachable service is
logged and ridden out instead.

A configuration reload (:mod:`agentgate.reload`) swaps what :meth:`Gateway.apply` lists, at once,
and closes the connections of agents it removed or whose token it changed
(:meth:`Gateway.disconnect`).

Imports: config, store, checkpoints (when the gateway opens: it loads ``cryptography``), policy,
preflight, http_tools, services and services.homeassistant, guardian, guardian.card and
guardian.supervisor, broker, controls, pipeline, connection, listener, memory, quotas, undo,
reload, control_socket, and mcp.http when ``[mcp]`` is set.
Nothing imports this module but the entry points.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs
import httpx
import trio

from agentgate import preflight
from agentgate.broker import Broker
from agentgate.config import Config, ConfigError
from agentgate.connection import WebSocketDoor
from agentgate.controls import Controls
from agentgate.guardian import Guardian, GuardianControl
from agentgate.guardian.card import CardRules
from agentgate.listener import serve_websockets
from agentgate.memory import trim_after_activity
from agentgate.pipeline import INTERRUPTED, Pipeline, Sessions
from agentgate.policy import Policy, load_policy
from agentgate.preflight import server_tls_context
from agentgate.quotas import Quotas
from agentgate.reload import Reloader
from agentgate.services import Executor
from agentgate.store import Store, open_store
from agentgate.undo import Undo

if TYPE_CHECKING:
    from agentgate.checkpoints import AuditLog
    from agentgate.mcp.http import McpHttpDoor, McpListening

__all__ = [
    "Gateway",
    "RunningGateway",
    "card_rules",
    "load_policies",
    "open_gateway",
    "serve_gateway",
    "server_ssl_context",
]

log = logging.getLogger(__name__)

SHUTDOWN_BOUND: Final = 5.0  # seconds for a clean shutdown, then what is left is cancelled


class Gateway:
    """Every part of a running gateway; made by :func:`open_gateway`."""

    def __init__(
        self,
        config: Config,
        store: Store,
        executor: Executor | None,
        pipeline: Pipeline,
        controls: Controls,
        broker: Broker,
        door: WebSocketDoor,
        guardian: Guardian | None,
        undo: Undo | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.executor = executor
        self.pipeline = pipeline
        self.controls = controls
        self.broker = broker
        self.door = door
        self.guardian = guardian
        self.undo = undo
        self.audit = audit  # signed checkpoints of the audit log (None: tests without one)
        self.mcp: McpHttpDoor | None = None  # the MCP door, when serve_gateway serves one
        self.reloader = Reloader(self)  # serve_gateway sets how gate.toml was read

    def apply(self, config: Config, policies: dict[str | None, Policy], quotas: Quotas) -> None:
        """A reloaded configuration, everywhere it is read, at once (synchronous: no request
        sees half of it). ``config`` keeps what needs a restart as it runs."""
        self.config = config
        self.pipeline.config = config
        self.pipeline.policies = policies
        self.pipeline.quotas = quotas
        self.door.config = config
        self.door.failed_auth.limit = config.limits.failed_auth_per_minute
        limits = self.door.connection_limits
        limits.max_unauthenticated = config.limits.max_unauthenticated_per_address
        limits.max_per_agent = config.limits.max_connections_per_agent
        self.broker.approval_timeout = config.gateway.approval_timeout
        self.broker.suggest_after = config.guardian.suggest_after
        if self.undo is not None:
            self.undo.window = config.guardian.undo_window
        if self.mcp is not None:
            self.mcp.config = config

    def disconnect(self, agent: str, reason: str) -> int:
        """Close every connection of ``agent`` (1008 with ``reason``; on the MCP door, its
        requests in flight end); how many."""
        closed = self.door.disconnect(agent, reason)
        if self.mcp is not None:
            closed += self.mcp.disconnect(agent)
        return closed

    async def shutdown(self, *, cancel_pending: bool = False) -> None:
        """Refuse new work, suspend undecided approvals for the next start (or resolve them as
        ``shutdown`` with ``cancel_pending``), drain, close sockets with 1001, and sign a last
        checkpoint of the audit log (posted to the guardians' chat)."""
        self.pipeline.closing = True
        await self.broker.shutdown(cancel_pending=cancel_pending)
        await self.door.idle()
        if self.mcp is not None:
            await self.mcp.idle()
        await self.door.close_all()
        if self.audit is not None:
            await self.audit.close()


def card_rules(config: Config) -> CardRules:
    """``[guardian] max_card_chars`` and ``card_overflow``."""
    guardian = config.guardian
    if guardian.card_overflow == "document":
        return CardRules(guardian.max_card_chars, "document")
    return CardRules(guardian.max_card_chars, "refuse")


def load_policies(config: Config) -> dict[str | None, Policy]:
    """The default policy (key ``None``) and each agent's own, loaded once at start-up (their
    lint knows the configuration's HTTP tools)."""
    from agentgate.http_tools import known_tools

    known = known_tools(config) if config.services.http else None
    policies: dict[str | None, Policy] = {None: load_policy(config.policy.file, known=known)}
    for name, agent in config.agents.items():
        if agent.policy is not None:
            policies[name] = load_policy(agent.policy, known=known)
    return policies


@asynccontextmanager
async def open_gateway(
    config: Config,
    *,
    guardian: Guardian | None = None,
    ha_transport: httpx.AsyncBaseTransport | None = None,
    now: Callable[[], float] = time.time,
    inline_store: bool | None = None,
    http_transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
) -> AsyncIterator[Gateway]:
    """Build and run every part of the gateway for the ``async with`` block.

    ``guardian`` replaces the configured Telegram guardian (tests, the demo); ``ha_transport``
    replaces Home Assistant's network (``httpx.MockTransport``), ``http_transports`` that of
    the ``[services.http.NAME]`` services named; ``now`` is the wall clock;
    ``inline_store=True`` keeps the store off threads (deterministic tests). Leaving the block
    cancels what still runs, as a crash would; call :meth:`Gateway.shutdown` first for a clean
    stop. Front doors are served by the caller (:func:`serve_gateway` serves the WebSocket one).
    """
    policies = load_policies(config)
    transports = (ha_transport, http_transports or {})
    with _config_errors_ungrouped():
        async with _open_gateway(config, guardian, transports, now, inline_store, policies) as gw:
            yield gw


@asynccontextmanager
async def _open_gateway(
    config: Config,
    guardian: Guardian | None,
    transports: tuple[httpx.AsyncBaseTransport | None, Mapping[str, httpx.AsyncBaseTransport]],
    now: Callable[[], float],
    inline_store: bool | None,
    policies: dict[str | None, Policy],
) -> AsyncIterator[Gateway]:
    async with (
        open_store(
            config.store.path, synchronous=config.store.synchronous, inline=inline_store
        ) as store,
        _open_services(config, *transports) as executor,
    ):
        from agentgate.checkpoints import open_audit_log

        audit = await open_audit_log(config, store, now, source=preflight.display(config.source))
        if executor is not None:
            try:
                warning = await executor.check_health()
            except ConfigError as exc:
                file = preflight.display(config.source)
                raise ConfigError(*(f"{file}: {p}" for p in exc.problems)) from None
            if warning:
                log.warning("%s", warning)
        interrupted = await store.settle_interrupted(now(), INTERRUPTED)
        if interrupted:
            log.warning(
                "%d allowed call(s) were executing when the gateway last stopped: recorded as"
                " outcome unknown (they may have run)",
                interrupted,
            )
        sessions = Sessions()
        controls = Controls(store, connected=sessions.counts, now=now)
        cards = card_rules(config)
        pipeline = Pipeline(
            config,
            store=store,
            policies=policies,
            executor=executor,
            controls=controls,
            sessions=sessions,
            cards=cards,
            now=now,
        )
        undo = None
        if executor is not None:
            service = executor

            async def read_state(entity_id: str) -> object:
                return await service.execute("ha_get_state", {"entity_id": entity_id})

            undo = Undo(
                store,
                read_state=read_state,
                execute=pipeline.execute,
                now=now,
                window=config.guardian.undo_window,
                describe=pipeline.describe,
            )
            await undo.resume()
        broker = Broker(
            store,
            execute=pipeline.execute,
            describe=pipeline.describe,
            read_back=pipeline.state_after,
            recheck=pipeline.recheck,
            sessions=sessions.of,
            on_grant=controls.add_grant,
            now=now,
            approval_timeout=config.gateway.approval_timeout,
            undo=undo,
            suggest_after=config.guardian.suggest_after,
        )
        pipeline.broker = controls.broker = broker
        pipeline.undo = controls.undos = undo
        pipeline.quotas = await Quotas().derive(store, policies, config.agents, now())
        await controls.load_state()
        async with _maybe_telegram(config, controls, guardian, cards) as active_guardian:
            broker.guardian = active_guardian
            audit.guardian = active_guardian
            if undo is not None:
                undo.guardian = active_guardian
            if active_guardian is None:
                log.warning("no guardian configured: every ask fails closed (-32004)")
            async with trio.open_nursery() as nursery:
                await nursery.start(broker.run)
                await nursery.start(audit.run)
                nursery.start_soon(trim_after_activity, lambda: store.commits, store.wait_committed)
                try:
                    yield Gateway(
                        config,
                        store,
                        executor,
                        pipeline,
                        controls,
                        broker,
                        WebSocketDoor(config, pipeline),
                        active_guardian,
                        undo,
                        audit,
                    )
                finally:
                    nursery.cancel_scope.cancel()


@asynccontextmanager
async def _open_services(
    config: Config,
    ha_transport: httpx.AsyncBaseTransport | None,
    http_transports: Mapping[str, httpx.AsyncBaseTransport],
) -> AsyncIterator[Executor | None]:
    """The configured services as one executor (None without any)."""
    async with AsyncExitStack() as stack:
        members: list[Executor] = []
        ha_config = config.services.homeassistant
        if ha_config is not None:
            from agentgate.services.homeassistant import open_homeassistant

            members.append(
                await stack.enter_async_context(
                    open_homeassistant(ha_config, transport=ha_transport)
                )
            )
        if config.services.http:
            from agentgate.http_tools import http_tools
            from agentgate.services.http import open_http_service

            defined = http_tools(config)
            for name, service in config.services.http.items():
                mine = {tool: d for tool, d in defined.items() if d.service == name}
                opened = open_http_service(service, mine, transport=http_transports.get(name))
                members.append(await stack.enter_async_context(opened))
        if len(members) <= 1:
            yield members[0] if members else None
        else:
            from agentgate.services.registry import ServiceSet

            yield ServiceSet(members)


@asynccontextmanager
async def _maybe_telegram(
    config: Config, control: GuardianControl, guardian: Guardian | None, cards: CardRules
) -> AsyncIterator[Guardian | None]:
    telegram = config.guardian.telegram
    if guardian is not None or telegram is None:
        yield guardian
        return
    from agentgate.guardian.supervisor import supervised_telegram

    source = preflight.display(config.source)
    async with supervised_telegram(telegram, control, cards, source=source) as tg:
        yield tg


@contextmanager
def _config_errors_ungrouped() -> Iterator[None]:
    """A configuration error found while starting leaves as itself, not inside the exception
    groups of the nurseries it crossed (``agentgate serve`` maps it to exit status 2)."""
    try:
        yield
    except BaseExceptionGroup as group:
        matched, rest = group.split(ConfigError)
        if matched is not None and rest is None:
            leaves: list[BaseException] = [matched]
            while isinstance(leaves[0], BaseExceptionGroup):
                leaves = list(leaves[0].exceptions)
            raise leaves[0] from None
        raise


def server_ssl_context(config: Config) -> ssl.SSLContext:
    """The TLS context; :class:`~agentgate.config.ConfigError` names the key that is wrong."""
    return server_tls_context(config)


@attrs.define
class RunningGateway:
    """What :func:`serve_gateway` hands to ``nursery.start``."""

    gateway: Gateway
    host: str
    port: int
    url: str
    stop: trio.Event
    mcp_url: str | None = None  # the MCP endpoint (https://HOST:PORT/mcp) when [mcp] is set
    control_socket: Path | None = None  # the operator's control socket, if it could be bound

    def request_stop(self) -> None:
        self.stop.set()


async def serve_gateway(
    config: Config,
    *,
    insecure: bool = False,
    guardian: Guardian | None = None,
    ha_transport: httpx.AsyncBaseTransport | None = None,
    now: Callable[[], float] = time.time,
    stop: trio.Event | None = None,
    cancel_pending: bool = False,
    ignore: Sequence[str] = (),
    guardians: int | None = None,
    control: bool = True,
    task_status: trio.TaskStatus[RunningGateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until ``stop`` is set (or the caller cancels), then shut down cleanly.

    ``guardian`` replaces the configured Telegram guardian (tests). Pending approvals stay
    pending for the next start, unless ``cancel_pending`` (decommissioning: they resolve as
    ``shutdown``). ``ignore`` (tables left out of gate.toml, as ``serve --terminal-guardian``
    does) and ``guardians`` (people who can press Allow) are how a reload reads the file again.
    ``control``: serve the operator's control socket. Supports the start protocol:
    ``running = await nursery.start(serve_gateway, config)``.
    """
    stop = stop if stop is not None else trio.Event()
    ssl_context = None if insecure else server_ssl_context(config)
    limits = config.limits
    async with (
        open_gateway(config, guardian=guardian, ha_transport=ha_transport, now=now) as gateway,
        trio.open_nursery() as nursery,
    ):
        gateway.reloader = Reloader(gateway, insecure=insecure, ignore=ignore, guardians=guardians)
        listening = await nursery.start(
            partial(
                serve_websockets,
                gateway.door.handle,
                config.gateway.host,
                config.gateway.port,
                ssl_context,
                max_message_size=max(4 * limits.max_message_bytes, 1 << 20),
                connect_timeout=config.gateway.auth_deadline,
                limits=gateway.door.connection_limits,
            )
        )
        scheme = "ws" if ssl_context is None else "wss"
        host = config.gateway.host
        url = f"{scheme}://{_url_host(host)}:{listening.port}/"
        if ssl_context is None:
            log.warning(
                "INSECURE: serving plain ws:// without TLS; tokens and requests cross"
                " the network in clear text. Use this only on loopback."
            )
        log.info("listening on %s://%s:%d", scheme, host, listening.port)
        mcp: McpListening | None = None
        if config.mcp is not None:
            # Imported only when configured: the MCP SDK and Hypercorn cost memory at start-up.
            from agentgate.mcp.http import McpHttpDoor, serve_mcp

            gateway.mcp = McpHttpDoor(config, gateway.pipeline, gateway.door.failed_auth)
            mcp = await nursery.start(serve_mcp, gateway.mcp, ssl_context)
        mcp_url = mcp.url if mcp is not None else None
        control_path = None
        if control:
            from agentgate.control_socket import serve_control

            control_path = await nursery.start(serve_control, gateway, config.control_socket())
        task_status.started(
            RunningGateway(gateway, host, listening.port, url, stop, mcp_url, control_path)
        )
        try:
            await stop.wait()
        finally:
            with trio.move_on_after(SHUTDOWN_BOUND, shield=True) as scope:
                await gateway.shutdown(cancel_pending=cancel_pending)
                if mcp is not None:  # Hypercorn's graceful stop: answers in flight go out
                    mcp.stop.set()
                    await mcp.stopped.wait()
            if scope.cancelled_caught:
                log.warning("shutdown took longer than 5 s; cancelling what is left")
            nursery.cancel_scope.cancel()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):  # noqa: S104 - a wildcard bind is reached via loopback
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
