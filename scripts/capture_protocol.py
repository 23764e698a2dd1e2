"""Capture real wire-protocol sessions for ``docs/protocol.md``.

Starts real gateways on 127.0.0.1 (TLS with throw-away trustme certificates, a scripted
guardian, the fake Home Assistant), plays each scenario as a bare JSON-RPC agent and records
every frame sent (``→``) and received (``←``) plus what happened around them (``#`` lines)::

    python scripts/capture_protocol.py                           # print the sessions (markdown)
    python scripts/capture_protocol.py --write docs/protocol.md  # refresh the doc's blocks
    python scripts/capture_protocol.py --serve                   # a gateway for raw_agent.py
                                                                 # (asks decided in this terminal)

``--write`` replaces the text between ``<!-- BEGIN capture NAME -->`` and
``<!-- END capture NAME -->`` in the file and leaves everything else alone.

Shown frames are the frames on the wire except for three presentation changes, stated in the
doc: frames longer than one line are pretty-printed, Home Assistant state objects lose their
``last_*`` timestamps and ``context`` (replaced by ``"…"``), and long lists keep their first
items followed by ``"…"``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from agentgate.testing.fake_homeassistant import run_fake_homeassistant
from agentgate.testing.harness import Harness, running_gateway

CEILING = 60  # seconds for the whole capture; a hang fails loudly
ONE_LINE = 100  # frames longer than this are pretty-printed
AUTH_DEADLINE = 2
APPROVAL_TIMEOUT = 4
_STATE_NOISE = ("last_changed", "last_reported", "last_updated", "context")


# -- presentation ------------------------------------------------------------------------------


def _shorten(value: Any, *, list_limit: int) -> Any:
    if isinstance(value, dict):
        is_state = "entity_id" in value and "context" in value
        return {
            k: "…" if is_state and k in _STATE_NOISE else _shorten(v, list_limit=list_limit)
            for k, v in value.items()
        }
    if isinstance(value, list):
        items = [_shorten(v, list_limit=list_limit) for v in value[:list_limit]]
        return [*items, "…"] if len(value) > list_limit else items
    return value


def render(text: str | bytes, *, list_limit: int = 2) -> str:
    """A frame as shown in the doc (see the module docstring)."""
    if isinstance(text, bytes):
        return f"<binary frame, {len(text)} bytes>"
    try:
        value = json.loads(text)
    except ValueError:
        return text
    value = _shorten(value, list_limit=list_limit)
    compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if len(compact) <= ONE_LINE:
        return compact
    return json.dumps(value, indent=2, ensure_ascii=False)


class Transcript:
    """One example session: a title, a capture name and its lines."""

    def __init__(self, name: str, title: str) -> None:
        self.name = name
        self.title = title
        self.lines: list[str] = []
        self.received: list[dict[str, Any]] = []
        self._connections = 0

    def note(self, text: str) -> None:
        self.lines.append(f"# {text}")

    def frame(self, arrow: str, shown: str) -> None:
        first, *rest = shown.splitlines()
        self.lines.append(f"{arrow} {first}")
        self.lines.extend(f"  {line}" for line in rest)

    def next_connection(self) -> int:
        self._connections += 1
        return self._connections

    def block(self) -> str:
        return "```text\n" + "\n".join(self.lines) + "\n```"


class Peer:
    """A bare agent connection that records everything into a transcript."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, log: Transcript, label: str):
        self.ws = ws
        self.log = log
        self.label = label
        self._id = 0

    async def send(self, frame: Any, *, show: str | None = None) -> None:
        if isinstance(frame, str | bytes):
            text = frame
        else:
            text = json.dumps(frame, separators=(",", ":"), ensure_ascii=False)
        self.log.frame("→", show if show is not None else render(text))
        await self.ws.send_message(text)

    async def recv(self, *, list_limit: int = 2) -> dict[str, Any]:
        text = await self.ws.get_message()
        self.log.frame("←", render(text, list_limit=list_limit))
        frame: dict[str, Any] = json.loads(text)
        self.log.received.append(frame)
        return frame

    async def reply(self, *, list_limit: int = 2) -> dict[str, Any]:
        """Frames until one that is not a notification (notifications are recorded too)."""
        while True:
            frame = await self.recv(list_limit=list_limit)
            if "id" in frame:
                return frame

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, rpc_id: Any = None
    ) -> dict[str, Any]:
        if rpc_id is None:
            self._id += 1
            rpc_id = self._id
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.send(message)
        return await self.reply()

    async def tool(self, tool: str, rpc_id: Any = None, **args: Any) -> dict[str, Any]:
        return await self.call("tool_request", {"tool": tool, "args": args}, rpc_id=rpc_id)

    async def expect_close(self) -> None:
        """Record frames until the gateway closes the socket, then its close code and reason."""
        try:
            while True:
                await self.recv()
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            if reason is None or reason.code == 1006:
                self.log.note("the connection drops without a close frame (code 1006)")
            else:
                self.log.note(
                    f"the gateway closes the WebSocket: code {reason.code} {reason.reason!r}"
                )

    async def close(self) -> None:
        await self.ws.aclose()
        self.log.note(f"{self.label} closed by the agent")


@asynccontextmanager
async def connect(
    gw: Harness, log: Transcript, *, token: str | None = None, auth: bool = True
) -> AsyncIterator[Peer]:
    number = log.next_connection()
    label = f"connection {number}"
    async with trio_websocket.open_websocket_url(
        gw.url, ssl_context=gw.client_ssl, max_message_size=16 << 20
    ) as ws:
        log.note(f"{label}: WSS handshake to {gw.url.split('//')[0]}//127.0.0.1:PORT/")
        peer = Peer(ws, log, label)
        if auth:
            await peer.call("auth", {"token": token or gw.tokens["pi"]})
        yield peer


async def wait_disconnected(gw: Harness, agent: str = "pi") -> None:
    """Until the gateway has noticed that ``agent`` has no connection left (polls its state)."""
    while gw.gateway.door.connections.get(agent):  # noqa: ASYNC110 - no event to wait on
        await trio.sleep(0.01)


async def press(gw: Harness, log: Transcript, request_id: str, action: str) -> None:
    """Wait until the guardian sees the card of ``request_id``, then press a button on it."""
    while request_id not in gw.scripted.cards:
        await gw.scripted.wait_for_card(len(gw.scripted.cards) + 1)
    answer = await gw.scripted.press(request_id, action)
    log.note(f"the guardian presses {action!r} in Telegram (button answer: {answer!r})")


LIGHT_ON = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}


# -- scenarios on the main gateway -------------------------------------------------------------

Scenario = Callable[[Harness, Transcript], Any]
MAIN: list[tuple[str, str, Scenario]] = []
LIMITS: list[tuple[str, str, Scenario]] = []
SHUTDOWN: list[tuple[str, str, Scenario]] = []


def scenario(
    where: list[tuple[str, str, Scenario]], name: str, title: str
) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        where.append((name, title, fn))
        return fn

    return register


@scenario(MAIN, "auth", "auth: success")
async def _auth(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log):
        pass


@scenario(MAIN, "auth-failed", "auth: unknown token")
async def _auth_failed(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log, auth=False) as peer:
        await peer.send(
            {"jsonrpc": "2.0", "id": 1, "method": "auth", "params": {"token": "not-a-token"}}
        )
        await peer.expect_close()


@scenario(MAIN, "auth-not-first", "auth: the first message is not auth")
async def _auth_not_first(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log, auth=False) as peer:
        await peer.send({"jsonrpc": "2.0", "id": 1, "method": "list_tools"})
        await peer.expect_close()


@scenario(MAIN, "auth-deadline", f"auth: nothing within the deadline ({AUTH_DEADLINE} s here)")
async def _auth_deadline(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log, auth=False) as peer:
        log.note(f"the agent sends nothing; {AUTH_DEADLINE} s later:")
        await peer.expect_close()


@scenario(MAIN, "allowed", "tool_request: allowed by policy")
async def _allowed(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        await peer.tool("ha_get_state", entity_id="sensor.living_room_temperature")


@scenario(MAIN, "denied", "tool_request: denied by policy (-32003)")
async def _denied(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        await peer.tool(
            "ha_call_service", domain="lock", service="unlock", entity_id="lock.front_door"
        )


async def ask(peer: Peer, rpc_id: Any, args: dict[str, Any]) -> str:
    """Send a tool request the policy asks about; returns the request_id of its approval_pending."""
    await peer.send(
        {
            "jsonrpc": "2.0",
            "id": rpc_id,
            "method": "tool_request",
            "params": {"tool": "ha_call_service", "args": args},
        }
    )
    frame = await peer.recv()
    assert frame.get("method") == "approval_pending", frame
    return str(frame["params"]["request_id"])


@scenario(MAIN, "asked-allowed", "tool_request: asked → approval_pending → allowed → result")
async def _asked_allowed(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        request_id = await ask(peer, 2, LIGHT_ON)
        await press(gw, log, request_id, "allow")
        await peer.reply()


@scenario(MAIN, "asked-denied", "tool_request: asked → denied by the guardian (-32001)")
async def _asked_denied(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        request_id = await ask(peer, 2, {**LIGHT_ON, "entity_id": "light.kitchen"})
        await press(gw, log, request_id, "deny")
        await peer.reply()


@scenario(
    MAIN,
    "asked-timeout",
    "tool_request: asked → nobody decides → approval timed out (-32002;"
    f" approval_timeout = {APPROVAL_TIMEOUT} s here)",
)
async def _asked_timeout(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        await ask(peer, "req-7", LIGHT_ON)
        log.note(f"the guardian does not answer; {APPROVAL_TIMEOUT} s after the request:")
        await peer.reply()


COFFEE_ON = {"domain": "switch", "service": "turn_on", "entity_id": "switch.coffee_maker"}


@scenario(
    MAIN,
    "reconnect-live",
    "decided after a reconnect: results_pending on the new connection → get_pending_results",
)
async def _reconnect_live(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as first:
        request_id = await ask(first, 2, {**LIGHT_ON, "entity_id": "light.kitchen"})
        await first.close()
    await wait_disconnected(gw)
    async with connect(gw, log) as second:
        await press(gw, log, request_id, "allow")
        frame = await second.recv()
        assert frame.get("method") == "results_pending", frame
        await second.call("get_pending_results", rpc_id=3)
        log.note("each queued result is handed out once:")
        await second.call("get_pending_results", rpc_id=4)


@scenario(
    MAIN,
    "reconnect-later",
    "decided while no connection was open: results_pending right after auth",
)
async def _reconnect_later(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as first:
        request_id = await ask(first, 2, COFFEE_ON)
        while request_id not in gw.scripted.cards:
            await gw.scripted.wait_for_card(len(gw.scripted.cards) + 1)
        await first.close()
    await wait_disconnected(gw)
    await press(gw, log, request_id, "deny")
    while not await gw.gateway.store.queued_count("pi"):  # noqa: ASYNC110 - polls the store
        await trio.sleep(0.01)
    async with connect(gw, log) as second:
        frame = await second.recv()
        assert frame.get("method") == "results_pending", frame
        await second.call("get_pending_results", rpc_id=3)


@scenario(
    MAIN,
    "queued-ack",
    "acknowledged delivery: listed until acknowledged, even across a lost connection",
)
async def _queued_ack(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as first:
        request_id = await ask(first, 2, {**LIGHT_ON, "entity_id": "light.kitchen"})
        while request_id not in gw.scripted.cards:
            await gw.scripted.wait_for_card(len(gw.scripted.cards) + 1)
        await first.close()
    await wait_disconnected(gw)
    await press(gw, log, request_id, "deny")
    while not await gw.gateway.store.queued_count("pi"):  # noqa: ASYNC110 - polls the store
        await trio.sleep(0.01)
    async with connect(gw, log) as second:
        frame = await second.recv()
        assert frame.get("method") == "results_pending", frame
        await second.call("get_pending_results", {"ack": []}, rpc_id=3)
        log.note("the agent goes away before it could use the result (nothing acknowledged)")
    await wait_disconnected(gw)
    async with connect(gw, log) as third:
        await third.recv()  # results_pending: still queued
        await third.call("get_pending_results", {"ack": []}, rpc_id=3)
        log.note("the agent has it now: it acknowledges it (and sees what else is queued):")
        await third.call("get_pending_results", {"ack": [request_id]}, rpc_id=4)


@scenario(MAIN, "list-tools", "list_tools")
async def _list_tools(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        await peer.send({"jsonrpc": "2.0", "id": 2, "method": "list_tools"})
        await peer.recv(list_limit=100)


@scenario(MAIN, "err-parse", "-32700 parse error")
async def _err_parse(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        await peer.send('{"jsonrpc": "2.0", "id": 2, "method": "list_tools"')
        await peer.reply()
        log.note("the connection stays open:")
        await peer.call("get_pending_results", rpc_id=3)


@scenario(MAIN, "err-invalid", "-32600 invalid request")
async def _err_invalid(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        await peer.send({"id": 2, "method": "list_tools"})
        await peer.reply()
        await peer.send([{"jsonrpc": "2.0", "id": 3, "method": "list_tools"}])
        await peer.reply()
        await peer.send({"jsonrpc": "2.0", "id": 4, "method": "list_tools", "extra": 1})
        await peer.reply()
        await peer.send(b'{"jsonrpc":"2.0","id":5,"method":"list_tools"}')
        await peer.reply()
        await peer.call("auth", {"token": gw.tokens["pi"]}, rpc_id=6)
        pad = "x" * 70_000
        big = json.dumps(
            {"jsonrpc": "2.0", "id": 7, "method": "list_tools", "params": {"pad": pad}},
            separators=(",", ":"),
        )
        await peer.send(
            big,
            show=f'{{"jsonrpc":"2.0","id":7,"method":"list_tools","params":{{"pad":"xxx…"}}}}'
            f"  ({len(big)} bytes)",
        )
        await peer.reply()


@scenario(MAIN, "err-method", "-32601 method not found")
async def _err_method(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        await peer.call("execute", {"tool": "ha_get_states"}, rpc_id=2)


@scenario(MAIN, "err-params", "-32602 invalid params")
async def _err_params(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        await peer.tool("ha_get_state", rpc_id=2, entity_id="sensor.*")
        await peer.tool("ha_get_state", rpc_id=3, entity_id="Sensor.Kitchen")
        await peer.tool("ha_get_state", rpc_id=4)
        await peer.tool(
            "ha_call_service", rpc_id=5, domain="light", service="turn_on", area_id="kitchen"
        )
        await peer.tool("shell_exec", rpc_id=6, command="id")
        await peer.call("tool_request", {"tool": "ha_get_states", "args": []}, rpc_id=7)


@scenario(MAIN, "err-execution", "-32004 execution failed")
async def _err_execution(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        await peer.tool("ha_get_state", rpc_id=2, entity_id="sensor.does_not_exist")


@scenario(MAIN, "ids", "ids: string, number and null are echoed; booleans are refused")
async def _ids(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        for rpc_id in ("a-string", 42.5, None, True):
            await peer.send({"jsonrpc": "2.0", "id": rpc_id, "method": "get_pending_results"})
            await peer.reply()
        log.note("a notification (no id) is never answered and executes nothing:")
        await peer.send(
            {
                "jsonrpc": "2.0",
                "method": "tool_request",
                "params": {
                    "tool": "ha_get_state",
                    "args": {"entity_id": "sensor.outdoor_humidity"},
                },
            }
        )
        log.note("the next frame from the gateway is the answer to id 9:")
        await peer.call("get_pending_results", rpc_id=9)
        rows = await gw.gateway.store.audit_rows(agent="pi")
        assert not [r for r in rows if r.signature == "ha_get_state(sensor.outdoor_humidity)"]


@scenario(MAIN, "hard-cap", "a frame over the transport's hard cap (1 MiB by default): close 1009")
async def _hard_cap(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        pad = "x" * (1 << 20)
        big = json.dumps(
            {"jsonrpc": "2.0", "id": 2, "method": "list_tools", "params": {"pad": pad}},
            separators=(",", ":"),
        )
        await peer.send(
            big,
            show=f'{{"jsonrpc":"2.0","id":2,"method":"list_tools","params":{{"pad":"xxx…"}}}}'
            f"  ({len(big)} bytes)",
        )
        await peer.expect_close()


# -- scenarios on a gateway with tight limits --------------------------------------------------


@scenario(
    LIMITS,
    "rate-limits",
    "-32006 rate limited (requests_per_minute = 3, max_pending_per_agent = 1 here)",
)
async def _rate_limits(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        request_id = await ask(peer, 2, LIGHT_ON)
        await peer.tool("ha_call_service", rpc_id=3, **{**LIGHT_ON, "entity_id": "light.kitchen"})
        await peer.send({"jsonrpc": "2.0", "id": 4, "method": "get_pending_results"})
        await peer.reply()
        await peer.send({"jsonrpc": "2.0", "id": 5, "method": "get_pending_results"})
        await peer.reply()
        await press(gw, log, request_id, "deny")
        await peer.reply()


@scenario(
    LIMITS,
    "failed-auth",
    "-32006 after too many failed authentications (failed_auth_per_minute = 2 here)",
)
async def _failed_auth(gw: Harness, log: Transcript) -> None:
    for _ in range(2):
        async with connect(gw, log, auth=False) as peer:
            await peer.send(
                {"jsonrpc": "2.0", "id": 1, "method": "auth", "params": {"token": "guess"}}
            )
            await peer.expect_close()
    log.note("a third attempt from the same address within the minute, even with a valid token:")
    async with connect(gw, log, auth=False) as peer:
        await peer.send(
            {"jsonrpc": "2.0", "id": 1, "method": "auth", "params": {"token": gw.tokens["pi"]}}
        )
        await peer.expect_close()


# -- shutdown ----------------------------------------------------------------------------------


@scenario(SHUTDOWN, "shutdown", "-32007 gateway shutting down, then close 1001")
async def _shutdown(gw: Harness, log: Transcript) -> None:
    async with connect(gw, log) as peer:
        request_id = await ask(peer, 2, LIGHT_ON)
        while request_id not in gw.scripted.cards:
            await gw.scripted.wait_for_card(len(gw.scripted.cards) + 1)
        log.note("the operator stops the gateway (SIGTERM) while the approval waits:")
        gw.running.request_stop()
        await peer.expect_close()


# -- running -----------------------------------------------------------------------------------


async def _play(
    gw: Harness, scenarios: list[tuple[str, str, Scenario]], only: set[str] | None
) -> list[Transcript]:
    out = []
    for name, title, play in scenarios:
        if only and name not in only:
            continue
        log = Transcript(name, title)
        await play(gw, log)
        out.append(log)
    return out


async def capture(only: set[str] | None = None) -> list[Transcript]:
    """Play every scenario (or those named in ``only``) against real gateways."""
    transcripts: list[Transcript] = []
    with trio.fail_after(CEILING), tempfile.TemporaryDirectory() as tmp:
        async with run_fake_homeassistant() as home:
            gateway = {"auth_deadline": AUTH_DEADLINE, "approval_timeout": APPROVAL_TIMEOUT}
            async with running_gateway(Path(tmp) / "main", home=home, gateway=gateway) as gw:
                transcripts += await _play(gw, MAIN, only)
            limits = {"requests_per_minute": 3, "max_pending_per_agent": 1}
            limits["failed_auth_per_minute"] = 2
            async with running_gateway(Path(tmp) / "limits", home=home, limits=limits) as gw:
                transcripts += await _play(gw, LIMITS, only)
            async with running_gateway(Path(tmp) / "shutdown", home=home) as gw:
                transcripts += await _play(gw, SHUTDOWN, only)
    if not only:
        transcripts.append(error_frames(transcripts))
    return transcripts


ERROR_CODES = (-32700, -32600, -32601, -32602, *range(-32001, -32008, -1))


def error_frames(transcripts: list[Transcript]) -> Transcript:
    """One real error frame per error code (docs/protocol.md), from the sessions, one line each."""
    first: dict[int, dict[str, Any]] = {}
    for log in transcripts:
        for frame in log.received:
            code = frame.get("error", {}).get("code")
            if isinstance(code, int) and code not in first:
                first[code] = frame
    out = Transcript("error-frames", "one real error frame per code")
    for code in ERROR_CODES:
        if code not in first:
            raise RuntimeError(f"no session produced error {code}")
        out.lines.append(json.dumps(first[code], separators=(",", ":"), ensure_ascii=False))
    return out


def _replace_with(block: str) -> Callable[[re.Match[str]], str]:
    return lambda m: f"{m[1]}{block}\n{m[2]}"


def update_file(path: Path, transcripts: list[Transcript]) -> list[str]:
    """Replace each capture block in ``path``; returns the names that had no block."""
    text = path.read_text()
    missing = []
    for log in transcripts:
        pattern = re.compile(
            rf"(<!-- BEGIN capture {re.escape(log.name)} -->\n).*?(<!-- END capture "
            rf"{re.escape(log.name)} -->)",
            re.DOTALL,
        )
        text, count = pattern.subn(_replace_with(log.block()), text)
        if not count:
            missing.append(log.name)
    path.write_text(text)
    return missing


async def serve(home_token: str | None = None) -> None:
    """Run a harness gateway until SIGINT/SIGTERM; print how to point an agent at it. Its asks
    are decided in this terminal (the terminal guardian: keys a, d, h), not left to time out."""
    from agentgate.guardian.terminal import KeySource, TerminalGuardian, cbreak

    guardian = TerminalGuardian(user="you (terminal)", keys=KeySource(sys.stdin.fileno()))
    with tempfile.TemporaryDirectory() as tmp, cbreak(sys.stdin.fileno()):
        async with (
            run_fake_homeassistant(token=home_token) as home,
            running_gateway(Path(tmp) / "gate", home=home, guardian=guardian) as gw,
            trio.open_nursery() as nursery,
        ):
            guardian.control = gw.gateway.controls
            nursery.start_soon(guardian.run)
            token_file = Path(tmp) / "pi.token"
            token_file.write_text(gw.tokens["pi"] + "\n")
            print(f"gateway: {gw.url}\nca:      {gw.ca_path}", flush=True)
            print(
                f"try:     python examples/raw_agent.py --url {gw.url} "
                f"--token - --ca {gw.ca_path} < {token_file}",
                flush=True,
            )
            print(guardian.banner(), flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="refresh the capture blocks of this file")
    parser.add_argument("--only", action="append", help="capture only this scenario (repeat)")
    parser.add_argument("--serve", action="store_true", help="run a gateway for raw agents")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the gateway's log")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL)
    # trio-websocket's client leaves its socket to the garbage collector after a 1009 close.
    warnings.filterwarnings("ignore", category=ResourceWarning)
    if args.serve:
        trio.run(serve)
        return 0
    transcripts = trio.run(capture, set(args.only) if args.only else None)
    if args.write:
        missing = update_file(args.write, transcripts)
        for name in missing:
            print(f"{args.write}: no capture block named {name!r}", file=sys.stderr)
        return 1 if missing else 0
    for log in transcripts:
        print(f"### {log.title}\n\n<!-- BEGIN capture {log.name} -->\n{log.block()}")
        print(f"<!-- END capture {log.name} -->\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
