"""``agentgate mcp``: an MCP server on stdio, on the agent's device, forwarding to the gateway.

An MCP host (Claude Desktop, Claude Code, Cursor, ...) starts it as a subprocess and speaks MCP
on its stdin/stdout; it forwards every call over WSS with the agent SDK (announcing itself as
``client: "mcp-stdio"``, so the audit log and the card say "via MCP") and reconnects by itself.
Its diagnostics go to stderr only: stdout is the protocol. It never logs the token and never
puts it on a command line.

Where to connect, as ``agentgate call`` (flags win)::

    --url URL          AGENTGATE_URL    wss://host:port/ (ws:// for a gateway run --insecure)
    --token-file FILE  AGENTGATE_TOKEN  the agent's token (the file's surrounding whitespace
                                        is stripped); --token - reads one line from stdin first
    --ca FILE          AGENTGATE_CA     a PEM CA to trust, besides the system store
                                        (which honours SSL_CERT_FILE)
    --wait SECONDS     (50)             how long a call waits for the guardian before "pending"

An ask the bridge stops waiting for (answered "pending", cancelled by the MCP client) goes on at
the gateway; its outcome is returned once by ``agentgate_pending_results`` (which asks the
gateway for the outcome of each such request id) and always by ``agentgate_result`` with its
request id (which reads the gateway's store, so it works across a restart of the bridge too).

Imports: client (the SDK), cli and cli_agent (connection settings, errors as the CLI says
them), mcp.server.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import trio
from mcp.server.stdio import stdio_server

from agentgate.cli import UsageError, error
from agentgate.cli_agent import EXIT_CONNECTION, EXIT_OK, connection_from_args, describe_error
from agentgate.client import AgentgateError, ConnectionLost, Gateway
from agentgate.mcp.server import Asked, Outcome, build_server, entry_outcome

__all__ = ["DEFAULT_WAIT", "SdkBackend", "run"]

log = logging.getLogger(__name__)

CLIENT: Final = "mcp-stdio"
DEFAULT_WAIT: Final = 50.0
RESULT_STEP: Final = 50.0  # seconds one get_result waits after the connection dropped mid-ask
REMEMBERED: Final = 4096  # request ids returned by agentgate_result, not to be returned again


class SdkBackend:
    """The bridge's :class:`~agentgate.mcp.server.Backend`: the gateway, through the SDK."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._names: set[str] | None = None
        # Asks the MCP client stopped waiting for (answered "pending", cancelled), by request
        # id: the gateway still decides them; agentgate_pending_results asks for their outcome.
        self._abandoned: dict[str, str] = {}
        self._returned: deque[str] = deque(maxlen=REMEMBERED)

    def known(self, tool: str) -> bool:
        return self._names is None or tool in self._names

    async def tools(self) -> list[dict[str, Any]]:
        entries = await self.gw.list_tools()
        self._names = {str(entry.get("name")) for entry in entries}
        return entries

    async def call(
        self, tool: str, args: dict[str, Any], asked: Callable[[Asked], None]
    ) -> Outcome:
        if self._names is None:
            await self.tools()
        state: dict[str, Any] = {}

        def on_pending(params: dict[str, Any]) -> None:
            request_id, expires_at = params.get("request_id"), params.get("expires_at")
            if isinstance(request_id, str) and isinstance(expires_at, int | float):
                state["request_id"] = request_id
                asked(Asked(request_id, float(expires_at)))

        done = False
        try:
            outcome = await self._final(tool, args, on_pending, state)
            done = True
            return outcome
        except AgentgateError:
            done = True
            raise
        finally:
            request_id = state.get("request_id")
            if not done and isinstance(request_id, str):
                self._abandoned[request_id] = tool

    async def _final(
        self,
        tool: str,
        args: dict[str, Any],
        on_pending: Callable[[dict[str, Any]], None],
        state: dict[str, Any],
    ) -> Outcome:
        try:
            reply = await self.gw.request(tool, args, on_pending=on_pending)
            return {"request_id": reply.get("request_id"), "data": reply.get("data")}
        except ConnectionLost as exc:
            request_id = exc.data.get("request_id") or state.get("request_id")
            if not isinstance(request_id, str):
                raise  # it never reached an approval: nothing to find again
            state["request_id"] = request_id
        # The approval goes on at the gateway: ask for its outcome by id once reconnected.
        log.warning("connection lost while %s waited; asking for its outcome", request_id)
        for _ in range(100):
            try:
                entry = await self.gw.get_result(request_id, wait=RESULT_STEP)
            except ConnectionLost:
                if not self.gw.connected:
                    await trio.sleep(1)  # the SDK reconnects; calls wait for it
                continue
            if entry.get("status") != "pending":
                outcome = entry_outcome(entry)
                if isinstance(outcome, AgentgateError):
                    raise outcome
                return outcome
        raise ConnectionLost(f"no outcome for request {request_id} yet: ask agentgate_result")

    async def result(self, request_id: str, wait: float) -> dict[str, Any]:
        entry = await self.gw.get_result(request_id, wait=wait)
        if entry.get("status") != "pending":
            self._abandoned.pop(request_id, None)
            self._returned.append(request_id)
        return entry

    async def pending_results(self) -> list[dict[str, Any]]:
        entries = await self.gw.pending_results()
        # An abandoned ask's outcome went to this bridge's connection (the SDK had stopped
        # waiting for it): the gateway's store has it, by id.
        for request_id in list(self._abandoned):
            entry = await self.gw.get_result(request_id, wait=0)
            if entry.get("status") != "pending":
                del self._abandoned[request_id]
                entries.append(entry)
        returned = set(self._returned)
        out = []
        for entry in entries:
            rid = entry.get("request_id")
            if not isinstance(rid, str) or rid in returned:
                continue
            returned.add(rid)
            self._returned.append(rid)
            out.append(entry)
        return out


def _read_token_file(path: str) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--token-file {path}: cannot read it ({exc})") from exc
    if not token:
        raise UsageError(f"--token-file {path}: the file is empty")
    return token


def _read_token_line() -> str:
    """One line from fd 0, byte by byte: what follows it is the MCP stream, left unread."""
    line = bytearray()
    while len(line) < 4096:
        byte = os.read(0, 1)
        if not byte or byte == b"\n":
            break
        line += byte
    token = line.decode("utf-8", "replace").strip()
    if not token:
        raise UsageError("--token -: no token on the first line of stdin")
    return token


def run(args: argparse.Namespace) -> int:
    """Run the bridge until stdin closes; 0 then, 3 if the gateway cannot be reached."""
    if not (args.wait > 0 and math.isfinite(args.wait)):
        raise UsageError("--wait: expected a positive number of seconds")
    if args.token_file is not None:
        token: str | None = _read_token_file(args.token_file)
    elif args.token == "-":  # noqa: S105 - "read it from stdin"
        token = _read_token_line()
    elif args.token is not None:
        raise UsageError("--token: only '-' (read stdin); use --token-file or $AGENTGATE_TOKEN")
    else:
        token = None
    settings = argparse.Namespace(url=args.url, token=token, ca=args.ca)
    conn = connection_from_args(settings)
    logging.basicConfig(
        stream=sys.stderr, level=args.log_level, format="agentgate mcp: %(levelname)s: %(message)s"
    )
    try:
        trio.run(_serve, conn, args.wait)
    except AgentgateError as exc:
        error(describe_error(exc))
        return EXIT_CONNECTION
    except ValueError as exc:  # connect(): a URL it cannot use
        raise UsageError(str(exc)) from exc
    return EXIT_OK


async def _serve(conn: Any, wait: float) -> None:
    async with conn.open(client=CLIENT) as gw:
        log.info("connected to %s as %s", conn.url, gw.agent)
        backend = SdkBackend(gw)
        server = build_server(lambda ctx: backend, wait=wait)
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
        log.info("stdin closed: stopping")
