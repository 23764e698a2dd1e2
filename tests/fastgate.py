"""Fast-tier plumbing: the real gateway over memory streams, HA behind httpx.MockTransport.

The gateway is built by :func:`agentgate.gateway.open_gateway`, the same wiring ``agentgate
serve`` uses; only the listener is replaced by memory streams handed to the WebSocket door.
No sockets and no threads (the store runs inline), so ``autojump_clock`` makes the 10 s auth
deadline and the 900 s approval timeout take milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream, wrap_server_stream

from agentgate.config import load_config
from agentgate.gateway import Gateway, open_gateway
from agentgate.listener import Watched
from agentgate.testing.guardian import ScriptedGuardian
from agentgate.testing.harness import DEFAULT_TOKENS, write_gate_toml

BASE = 1_800_000_000.0


def now() -> float:
    """Wall clock that moves with Trio's (mock) clock."""
    return BASE + trio.current_time()


class MockHome:
    """A tiny HA behind MockTransport, counting service calls."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {
            "light.bedroom": {"entity_id": "light.bedroom", "state": "off", "attributes": {}},
            "sensor.temp": {"entity_id": "sensor.temp", "state": "21", "attributes": {}},
        }
        self.service_calls: list[tuple[str, dict[str, Any]]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path.startswith("/api/states/"):
            state = self.states.get(path.removeprefix("/api/states/"))
            if state is None:
                return httpx.Response(404, json={"message": "Entity not found."})
            return httpx.Response(200, json=state)
        if request.method == "POST" and path.startswith("/api/services/"):
            body = json.loads(request.content or b"{}")
            self.service_calls.append((path, body))
            entity = self.states[body["entity_id"]]
            entity["state"] = "on" if path.endswith("turn_on") else "off"
            return httpx.Response(200, json=[entity])
        if path == "/api/":
            return httpx.Response(200, json={"message": "API running."})
        return httpx.Response(404, json={"message": "Not found"})


@attrs.define
class FastGateway:
    gateway: Gateway
    guardian: ScriptedGuardian
    home: MockHome
    nursery: trio.Nursery

    async def connect(
        self, *, lockstep: bool = False, remote: str | None = None
    ) -> WebSocketConnection:
        """A client connection; ``lockstep``: no buffering between the two ends, so a client
        that stops reading stops the gateway's writes to it. ``remote``: the peer address the
        gateway sees (by default each memory stream is an address of its own)."""
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        server_stream, client_stream = pair()

        async def serve() -> None:
            stream = Watched(server_stream)  # as the listener wraps a socket: replies gathered
            request = await wrap_server_stream(self.nursery, stream)
            await self.gateway.door.handle(request, remote, stream=stream)

        self.nursery.start_soon(serve)
        return await wrap_client_stream(self.nursery, client_stream, "gate.test", "/")


async def call(ws: WebSocketConnection, rpc_id: int, method: str, **params: Any) -> dict[str, Any]:
    await ws.send_message(
        json.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params})
    )
    return await reply(ws)


async def reply(ws: WebSocketConnection) -> dict[str, Any]:
    """The next frame that is not a notification."""
    while True:
        frame: dict[str, Any] = json.loads(await ws.get_message())
        if "id" in frame:
            return frame


async def authed(fg: FastGateway, agent: str = "pi", **kw: Any) -> WebSocketConnection:
    ws = await fg.connect(**kw)
    answer = await call(ws, 0, "auth", token=DEFAULT_TOKENS[agent])
    assert answer["result"]["agent"] == agent
    return ws


@asynccontextmanager
async def fast_gateway(
    workdir: Path,
    *,
    home: MockHome | None = None,
    inline_store: bool | None = True,
    tokens: Mapping[str, str] = DEFAULT_TOKENS,
    http_transports: dict[str, httpx.AsyncBaseTransport] | None = None,
    **toml: Any,
) -> AsyncIterator[FastGateway]:
    """The gateway over memory streams; ``inline_store=None`` runs the store as ``serve`` does
    (durable commits and checkpoints in worker threads: not for ``autojump_clock``)."""
    await trio.Path(workdir).mkdir(parents=True, exist_ok=True)
    path = write_gate_toml(
        workdir,
        tokens=tokens,
        ha_url="http://ha.test",
        ha_token="ha-token-0123456789",
        tls=None,
        **toml,
    )
    config = load_config(path, insecure=True)
    home = home or MockHome()
    guardian = ScriptedGuardian()
    async with (
        open_gateway(
            config,
            guardian=guardian,
            ha_transport=httpx.MockTransport(home.handler),
            now=now,
            inline_store=inline_store,
            http_transports=http_transports,
        ) as gateway,
        trio.open_nursery() as nursery,
    ):
        guardian.control = gateway.controls
        yield FastGateway(gateway, guardian, home, nursery)
        nursery.cancel_scope.cancel()  # a crash, as far as the store can tell
