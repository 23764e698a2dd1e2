"""A bare agentgate agent: raw JSON-RPC 2.0 over a WebSocket, no SDK.

This is what an agent written in any language has to do (docs/protocol.md): open a WSS
connection, send ``auth`` first, number its requests and match replies by ``id``, and handle
the gateway's notifications (``approval_pending``, ``results_pending``) whenever they arrive.
Every frame is printed: ``→`` sent, ``←`` received (the token in ``auth`` shown as ``***``).
Needs only trio and trio-websocket::

    python examples/raw_agent.py --url wss://localhost:8443/ --token - --ca gate.crt < token.txt

It authenticates, collects queued results, lists the tools and reads one entity (``--entity``,
default ``sun.sun``, which every Home Assistant with its default configuration has). Exit
status: 0 ok, 1 the gateway answered the read with an error (e.g. no such entity in your home:
pass one with --entity), 2 bad arguments, 3 connection or authentication failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import ssl
import sys
from typing import Any

import trio
import trio_websocket


class GatewayError(Exception):
    """The gateway answered a request with a JSON-RPC error."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.error = error


class RawAgent:
    """One connection: sends requests, waits for the reply with the same id."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, *, quiet: bool = False) -> None:
        self.ws = ws
        self.quiet = quiet
        self.ids = itertools.count(1)  # never reuse an id on a connection

    def show(self, arrow: str, text: str) -> None:
        if not self.quiet:
            print(arrow, text, flush=True)

    async def request(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send one request and return its ``result`` (raises GatewayError on ``error``).

        Requests here go one at a time, so the next reply with our id is ours; an agent that
        sends several at once keeps a table ``id -> waiter`` and dispatches each reply by id.
        """
        rpc_id = next(self.ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
        if params is not None:
            message["params"] = params
        text = json.dumps(message, separators=(",", ":"))
        shown = (
            {**message, "params": {**(params or {}), "token": "***"}} if method == "auth" else None
        )
        self.show("→", text if shown is None else json.dumps(shown, separators=(",", ":")))
        await self.ws.send_message(text)
        while True:
            frame = await self.receive()
            if "id" not in frame:  # a notification: no id, never answered
                self.on_notification(frame.get("method"), frame.get("params") or {})
                continue
            if frame["id"] != rpc_id:
                print(f"# reply to an id we are not waiting for: {frame['id']!r}", flush=True)
                continue
            if "error" in frame:
                raise GatewayError(frame["error"])
            return frame["result"]

    async def receive(self) -> dict[str, Any]:
        text = await self.ws.get_message()
        self.show("←", text if isinstance(text, str) else repr(text))
        frame = json.loads(text)
        if not isinstance(frame, dict):
            raise ValueError("the gateway sent something that is not a JSON object")
        return frame

    def on_notification(self, method: object, params: dict[str, Any]) -> None:
        if method == "approval_pending":
            print(
                f"# request {params.get('rpc_id')!r} waits for the guardian until"
                f" {params.get('expires_at')} (request_id {params.get('request_id')})",
                flush=True,
            )
        elif method == "results_pending":
            print(f"# {params.get('count')} queued result(s): call get_pending_results", flush=True)
        else:
            print(f"# unknown notification {method!r}: ignored", flush=True)


async def run(url: str, token: str, ca: str | None, entity: str, quiet: bool) -> int:
    ssl_context = None
    if url.startswith("wss://"):
        ssl_context = ssl.create_default_context(cafile=ca)  # ca None: the system store
    try:
        async with trio_websocket.open_websocket_url(
            url,
            ssl_context,
            max_message_size=64 << 20,  # ha_get_states answers can be large
            connect_timeout=10,
            disconnect_timeout=5,
        ) as ws:
            agent = RawAgent(ws, quiet=quiet)
            # 1. auth must be the first message, within the gateway's auth_deadline.
            try:
                who = await agent.request("auth", {"token": token})
            except GatewayError as exc:
                print(f"authentication failed: {exc}", file=sys.stderr)
                return 3
            print(f"# authenticated as {who['agent']}", flush=True)
            # 2. results decided while we were away. With "ack" they stay queued until we
            #    acknowledge them, so none is lost if we die before showing it.
            queued = await agent.request("get_pending_results", {"ack": []})
            for item in queued["results"]:
                print(f"# queued: rpc_id {item['rpc_id']!r} {item['status']}", flush=True)
            if queued["results"]:
                seen = [item["request_id"] for item in queued["results"]]
                await agent.request("get_pending_results", {"ack": seen})
            # 3. what may we ask for?
            tools = await agent.request("list_tools")
            print("# tools:", ", ".join(t["name"] for t in tools["tools"]), flush=True)
            # 4. one tool call.
            try:
                result = await agent.request(
                    "tool_request", {"tool": "ha_get_state", "args": {"entity_id": entity}}
                )
            except GatewayError as exc:
                print(f"tool_request failed: {exc}", file=sys.stderr)
                return 1
            data = result["data"]
            unit = data.get("attributes", {}).get("unit_of_measurement", "")
            print(f"# {data['entity_id']} = {data['state']} {unit}".rstrip(), flush=True)
            return 0
    except trio_websocket.ConnectionTimeout:
        # trio-websocket reports a certificate that does not verify as a timeout
        # (python-trio/trio-websocket#199), so say both.
        print(
            f"connection failed: no WebSocket handshake with {url} within 10 s"
            " (unreachable, or its TLS certificate does not verify: check --ca)",
            file=sys.stderr,
        )
        return 3
    except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed) as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        print(f"connection failed: {cause}", file=sys.stderr)
        return 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A raw JSON-RPC agentgate agent (no SDK).")
    parser.add_argument("--url", required=True, help="wss://HOST:PORT/ (any path works)")
    parser.add_argument(
        "--token", required=True, help="this agent's token; '-' reads it from stdin (not in ps)"
    )
    parser.add_argument("--ca", help="PEM file of the CA that signed the gateway's certificate")
    parser.add_argument("--entity", default="sun.sun", help="an entity to read (default sun.sun)")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print the frames")
    args = parser.parse_args(argv)
    token = sys.stdin.readline().strip() if args.token == "-" else args.token  # noqa: S105
    return trio.run(run, args.url, token, args.ca, args.entity, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
