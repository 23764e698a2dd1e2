"""A real gateway on 127.0.0.1 for tests, benchmarks and the demo.

``async with running_gateway(workdir, home=home) as gw:`` writes a ``gate.toml`` and a policy
into ``workdir``, issues a throw-away TLS certificate (trustme), starts :func:`serve_gateway`
in-process and yields everything an agent needs (``gw.url``, ``gw.ca_path``, ``gw.tokens``).

Imports: config, gateway, guardian (the protocol), testing.guardian.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
import trio_websocket

from agentgate.config import Config, ConfigError, load_config
from agentgate.gateway import RunningGateway, serve_gateway
from agentgate.guardian import Guardian
from agentgate.testing.guardian import ScriptedGuardian

DEFAULT_POLICY = """\
defaults:
  - pattern: "ha_get_*"
    action: allow
rules:
  - pattern: "ha_get_state(sensor.*)"
    action: allow
    description: sensors are harmless
  - pattern: "ha_call_service(light.*)"
    action: ask
    description: lights need a human
  - pattern: "ha_call_service(switch.*)"
    action: ask
  - pattern: "ha_call_service(lock.*)"
    action: deny
    description: never the locks
  - pattern: "ha_fire_event(*)"
    action: ask
"""

DEFAULT_TOKENS = {"pi": "pi-token-0123456789abcdef", "laptop": "laptop-token-0123456789abcdef"}


@attrs.define
class Harness:
    url: str
    config: Config
    running: RunningGateway
    guardian: Guardian | None
    tokens: dict[str, str]
    ca_path: Path | None
    client_ssl: ssl.SSLContext | None
    workdir: Path

    @property
    def gateway(self) -> Any:
        return self.running.gateway

    @property
    def mcp_url(self) -> str:
        """The MCP endpoint (``https://127.0.0.1:PORT/mcp``); needs ``mcp={...}``."""
        assert self.running.mcp_url is not None, "start the gateway with mcp={} for [mcp]"
        return self.running.mcp_url

    @property
    def scripted(self) -> ScriptedGuardian:
        assert isinstance(self.guardian, ScriptedGuardian)
        return self.guardian

    async def settled(self) -> None:
        """Wait until every approval has finished: its outcome is recorded first, then told to
        the agent, then shown on the card (the caller's deadline bounds the wait)."""
        await self.gateway.broker.idle()


def write_certificates(workdir: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate for 127.0.0.1/localhost: (ca, cert, key) PEM files."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_path, cert_path, key_path = workdir / "ca.pem", workdir / "gate.crt", workdir / "gate.key"
    ca.cert_pem.write_to_path(str(ca_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def client_ssl_context(ca_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_path))


def _toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def write_gate_toml(
    workdir: Path,
    *,
    tokens: Mapping[str, str],
    ha_url: str | None,
    ha_token: str | None,
    tls: tuple[Path, Path] | None,
    policy: str = DEFAULT_POLICY,
    agent_policies: Mapping[str, str] | None = None,
    gateway: Mapping[str, Any] | None = None,
    limits: Mapping[str, Any] | None = None,
    agents_extra: Mapping[str, Mapping[str, Any]] | None = None,
    telegram: Mapping[str, Any] | None = None,
    guardian_settings: Mapping[str, Any] | None = None,
    ha_timeout: float = 5,
    mcp: Mapping[str, Any] | None = None,
    extra_toml: str = "",
    store: Mapping[str, Any] | None = None,
    audit: Mapping[str, Any] | None = None,
) -> Path:
    (workdir / "permissions.yaml").write_text(policy)
    gateway = dict(gateway or {})
    lines = ["[gateway]", f"listen = {_toml_value(gateway.pop('listen', '127.0.0.1:0'))}"]
    if tls is not None:
        lines += [f'tls_cert = "{tls[0]}"', f'tls_key = "{tls[1]}"']
    for key, value in gateway.items():
        lines.append(f"{key} = {_toml_value(value)}")
    lines += ["", "[store]", f'path = "{workdir / "agentgate.db"}"']
    lines += [f"{k} = {_toml_value(v)}" for k, v in (store or {}).items()]
    lines += ["", "[policy]", 'file = "permissions.yaml"']
    for name, token in tokens.items():
        lines += ["", f"[agents.{name}]", f'token = "{token}"']
        if agent_policies and name in agent_policies:
            (workdir / f"permissions-{name}.yaml").write_text(agent_policies[name])
            lines.append(f'policy = "permissions-{name}.yaml"')
        for key, value in ((agents_extra or {}).get(name) or {}).items():
            lines.append(f"{key} = {_toml_value(value)}")
    if guardian_settings:
        lines += ["", "[guardian]"] + [
            f"{k} = {_toml_value(v)}" for k, v in guardian_settings.items()
        ]
    if telegram is not None:
        lines += ["", "[guardian.telegram]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in telegram.items()]
    if ha_url is not None:
        lines += ["", "[services.homeassistant]", f'url = "{ha_url}"', f'token = "{ha_token}"']
        lines.append(f"timeout = {ha_timeout}")
    if limits:
        lines += ["", "[limits]"] + [f"{k} = {_toml_value(v)}" for k, v in limits.items()]
    if mcp is not None:
        mcp = {"listen": "127.0.0.1:0", **mcp}
        lines += ["", "[mcp]"] + [f"{k} = {_toml_value(v)}" for k, v in mcp.items()]
    if audit:
        lines += ["", "[audit]"] + [f"{k} = {_toml_value(v)}" for k, v in audit.items()]
    path = workdir / "gate.toml"
    path.write_text("\n".join(lines) + "\n" + extra_toml)
    return path


def _prepare(
    workdir: Path, home: Any | None, tls: bool, tokens: dict[str, str], toml: dict[str, Any]
) -> tuple[Config, Path | None, ssl.SSLContext | None]:
    workdir.mkdir(parents=True, exist_ok=True)
    ca_path = client_ssl = None
    tls_files = None
    if tls:
        ca_path, cert_path, key_path = (
            workdir / "ca.pem",
            workdir / "gate.crt",
            workdir / "gate.key",
        )
        if not (ca_path.exists() and cert_path.exists() and key_path.exists()):
            # Reused across restarts in the same workdir, so agents keep trusting the gateway.
            ca_path, cert_path, key_path = write_certificates(workdir)
        tls_files = (cert_path, key_path)
        client_ssl = client_ssl_context(ca_path)
    path = write_gate_toml(
        workdir,
        tokens=tokens,
        ha_url=None if home is None else home.url,
        ha_token=None if home is None else home.token,
        tls=tls_files,
        **toml,
    )
    return load_config(path, insecure=not tls), ca_path, client_ssl


@asynccontextmanager
async def running_gateway(
    workdir: Path,
    *,
    home: Any | None,
    guardian: Guardian | None = None,
    use_telegram: bool = False,
    tls: bool = True,
    tokens: Mapping[str, str] | None = None,
    now: Callable[[], float] = time.time,
    **toml: Any,
) -> AsyncIterator[Harness]:
    """Start a real gateway for the body of the block; stop it cleanly afterwards.

    ``guardian`` defaults to a :class:`ScriptedGuardian` unless ``use_telegram`` (then pass
    ``telegram={...}`` for ``[guardian.telegram]``). ``home`` is a fake (or real) Home Assistant
    with ``url`` and ``token``. ``now`` is the gateway's wall clock (a test can move it on to
    pass an undo window or a quota's). Other keywords go to :func:`write_gate_toml`.
    """
    tokens = dict(tokens or DEFAULT_TOKENS)
    config, ca_path, client_ssl = _prepare(workdir, home, tls, tokens, toml)
    if guardian is None and not use_telegram:
        guardian = ScriptedGuardian()
    refused: ConfigError | None = None  # at start-up (a token or chat refused): raised as is
    async with trio.open_nursery() as nursery:
        try:
            running: RunningGateway = await nursery.start(
                lambda task_status: serve_gateway(
                    config, insecure=not tls, guardian=guardian, now=now, task_status=task_status
                )
            )
        except ConfigError as exc:
            refused = exc
        else:
            if isinstance(guardian, ScriptedGuardian):
                guardian.control = running.gateway.controls
            try:
                yield Harness(
                    url=running.url,
                    config=config,
                    running=running,
                    guardian=guardian if guardian is not None else running.gateway.broker.guardian,
                    tokens=tokens,
                    ca_path=ca_path,
                    client_ssl=client_ssl,
                    workdir=workdir,
                )
            finally:
                running.request_stop()
    if refused is not None:
        raise refused


class RawAgent:
    """A bare JSON-RPC agent over trio-websocket, for protocol-level tests (no SDK)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self._next = 0
        self.notifications: list[dict[str, Any]] = []

    async def send(self, message: Any) -> None:
        await self.ws.send_message(message if isinstance(message, str) else json.dumps(message))

    async def recv(self) -> dict[str, Any]:
        """The next non-notification frame (notifications are kept in ``notifications``)."""
        while True:
            frame = json.loads(await self.ws.get_message())
            if "id" not in frame and "method" in frame:
                self.notifications.append(frame)
                continue
            return frame  # type: ignore[no-any-return]

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._next += 1
        rpc_id = self._next
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.send(message)
        return await self.recv()

    async def tool(self, tool: str, **args: Any) -> dict[str, Any]:
        return await self.call("tool_request", {"tool": tool, "args": args})


@asynccontextmanager
async def raw_agent(
    harness: Harness, agent: str = "pi", *, auth: bool = True
) -> AsyncIterator[RawAgent]:
    async with trio_websocket.open_websocket_url(harness.url, ssl_context=harness.client_ssl) as ws:
        client = RawAgent(ws)
        if auth:
            reply = await client.call("auth", {"token": harness.tokens[agent]})
            assert reply.get("result", {}).get("status") == "authenticated", reply
        yield client
