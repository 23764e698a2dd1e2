"""A load worker process: ``python -m bench.load '<json spec>'`` prints one JSON result.

Modes (``spec["mode"]``):

- ``gateway``: ``connections`` SDK connections (tokens taken round-robin from ``tokens``), each
  with ``in_flight`` tasks calling ``ha_get_state`` back to back.
- ``floor``: the same HTTP work straight at the fake home with ``httpx.AsyncClient`` under Trio:
  ``clients`` clients, ``in_flight`` tasks in all, pool sized to the tasks (or ``pool``), and
  with ``slots``, each client's requests through a ``trio.CapacityLimiter`` of that many (as the
  gateway's Home Assistant client does).
- ``echo``: the door's floor: ``connections`` WSS connections to :mod:`bench.door`'s echo
  server, each with ``in_flight`` tasks sending an ``ha_get_state`` request frame and waiting
  for its result-sized answer, matched by id by one reader per connection (as the SDK does).
- ``asks``: ``connections`` agents each send ``per_agent`` asks at once and wait for their
  outcome (S6): reports when each was sent and answered, and how.
- ``mcp``: one official MCP client (Streamable HTTP, one session) with ``in_flight`` tasks
  calling the ``ha_get_state`` tool back to back (M1).

Every mode warms up until ``start_at`` (wall clock, so several workers share one window), then
counts the calls that complete within ``[start_at, start_at + duration]``.
"""

from __future__ import annotations

import trio_asyncio  # noqa: F401  # isort: skip  # patch asyncio before httpx, anyio or telegram are imported

import itertools
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import trio

from agentgate.client import AgentgateError, connect
from bench import stats

Call = Callable[[], Awaitable[Any]]


class Window(stats.Window):
    """The window, and the event that stops the loops at its end."""

    def __init__(self, start_at: float, duration: float) -> None:
        super().__init__(start_at, duration)
        self.stop = trio.Event()


async def _loop(call: Call, window: Window) -> None:
    clock = time.time
    while not window.stop.is_set():
        begun = clock()
        try:
            await call()
        except (AgentgateError, httpx.HTTPError, AssertionError) as exc:
            window.failed(exc, clock())
            await trio.sleep(0.001)
            continue
        window.done(begun, clock())


async def _timer(window: Window) -> None:
    await trio.sleep(max(0.0, window.end - time.time()))
    window.stop.set()


def _result(window: Window, setup_late: float) -> dict[str, Any]:
    return window.result(setup_late)


async def run_gateway(spec: dict[str, Any]) -> dict[str, Any]:
    window = Window(spec["start_at"], spec["duration"])
    tokens: list[str] = spec["tokens"]
    entity = spec["entity"]
    async with AsyncExitStack() as stack:
        gateways = []
        for i in range(spec["connections"]):
            gw = await stack.enter_async_context(
                connect(spec["url"], token=tokens[i % len(tokens)], ca=spec["ca"], reconnect=False)
            )
            gateways.append(gw)
        late = max(0.0, time.time() - window.start)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_timer, window)
            # "entities": each call in flight reads its own entity (S2U), else all read one.
            spread: list[str] = spec.get("entities") or [entity]
            for gw in gateways:
                for i in range(spec["in_flight"]):
                    call = _bind_sdk(gw, spread[i % len(spread)])
                    nursery.start_soon(_loop, call, window)
    return _result(window, late)


def _bind_sdk(gw: Any, entity: str) -> Call:
    async def call() -> Any:
        data = await gw.call("ha_get_state", entity_id=entity)
        assert data["entity_id"] == entity
        return data

    return call


async def run_floor(spec: dict[str, Any]) -> dict[str, Any]:
    window = Window(spec["start_at"], spec["duration"])
    clients_n: int = spec["clients"]
    in_flight: int = spec["in_flight"]
    per_client = spec.get("pool") or max(1, math.ceil(in_flight / clients_n))
    limits = httpx.Limits(
        max_connections=per_client, max_keepalive_connections=per_client, keepalive_expiry=60
    )
    headers = {"Authorization": f"Bearer {spec['ha_token']}"}
    path = f"/api/states/{spec['entity']}"
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=spec["ha_url"], headers=headers, limits=limits)
            )
            for _ in range(clients_n)
        ]

        def bind(client: httpx.AsyncClient, slots: trio.CapacityLimiter | None) -> Call:
            async def call() -> Any:
                reply = await client.get(path)
                reply.raise_for_status()
                return reply.json()

            async def call_in_turn() -> Any:
                assert slots is not None
                async with slots:
                    reply = await client.get(path)
                reply.raise_for_status()
                return reply.json()

            return call if slots is None else call_in_turn

        calls = [
            bind(client, trio.CapacityLimiter(spec["slots"]) if spec.get("slots") else None)
            for client in clients
        ]
        late = max(0.0, time.time() - window.start)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_timer, window)
            for i in range(in_flight):
                nursery.start_soon(_loop, calls[i % clients_n], window)
    return _result(window, late)


async def run_echo(spec: dict[str, Any]) -> dict[str, Any]:
    import trio_websocket

    from agentgate.testing.harness import client_ssl_context
    from bench.door import MAX_MESSAGE, request_frame

    window = Window(spec["start_at"], spec["duration"])
    context = client_ssl_context(Path(spec["ca"]))

    async def reader(ws: Any, waiting: dict[int, trio.Event]) -> None:
        while True:
            answer = json.loads(await ws.get_message())
            waiting.pop(answer["id"]).set()

    def bind(ws: Any, waiting: dict[int, trio.Event]) -> Call:
        ids = itertools.count()

        async def call() -> Any:
            rpc_id = next(ids)
            answered = waiting[rpc_id] = trio.Event()
            await ws.send_message(request_frame(rpc_id))
            await answered.wait()

        return call

    async with AsyncExitStack() as stack:
        sockets = [
            await stack.enter_async_context(
                trio_websocket.open_websocket_url(
                    spec["url"], ssl_context=context, max_message_size=MAX_MESSAGE
                )
            )
            for _ in range(spec["connections"])
        ]
        late = max(0.0, time.time() - window.start)
        async with trio.open_nursery() as readers:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_timer, window)
                for ws in sockets:
                    waiting: dict[int, trio.Event] = {}
                    readers.start_soon(reader, ws, waiting)
                    call = bind(ws, waiting)  # one id sequence per connection
                    for _ in range(spec["in_flight"]):
                        nursery.start_soon(_loop, call, window)
            readers.cancel_scope.cancel()
    return _result(window, late)


async def run_asks(spec: dict[str, Any]) -> dict[str, Any]:
    """S6: many agents, many pending asks each; every outcome with its timing."""
    tokens: list[str] = spec["tokens"]
    outcomes: Counter[str] = Counter()
    lateness: list[float] = []  # answer time minus the approval's expires_at, seconds
    expires: dict[str, float] = {}  # request_id -> expires_at (from approval_pending)

    def on_pending(params: dict[str, Any]) -> None:
        expires[params["request_id"]] = float(params["expires_at"])

    timeout = float(spec["approval_timeout"])
    ready = 0

    async def one(gw: Any, i: int) -> None:
        try:
            await gw.call(
                "ha_call_service", domain="light", service="turn_on", entity_id="light.kitchen"
            )
            outcomes["executed"] += 1
        except AgentgateError as exc:
            outcomes[type(exc).__name__] += 1
            expires_at = expires.get(str((exc.data or {}).get("request_id")))
            if type(exc).__name__ == "ApprovalTimedOut" and expires_at is not None:
                lateness.append(round(time.time() - expires_at, 4))

    go = trio.Event()
    all_in = trio.Event()
    limiter = trio.CapacityLimiter(20)  # TLS handshakes at once

    async def agent(token: str) -> None:
        nonlocal ready
        async with limiter:
            stack = AsyncExitStack()
            gw = await stack.enter_async_context(
                connect(
                    spec["url"],
                    token=token,
                    ca=spec["ca"],
                    reconnect=False,
                    on_pending=on_pending,
                )
            )
        async with stack:
            ready += 1
            if ready == len(tokens):
                all_in.set()
            await go.wait()
            async with trio.open_nursery() as nursery:
                for i in range(spec["per_agent"]):
                    nursery.start_soon(one, gw, i)

    connect_started = time.time()
    connected = 0.0
    with trio.fail_after(timeout + spec.get("grace", 180)):
        async with trio.open_nursery() as nursery:
            for token in tokens:
                nursery.start_soon(agent, token)
            await all_in.wait()
            connected = time.time() - connect_started
            print(json.dumps({"event": "connected", "seconds": connected}), file=sys.stderr)
            go.set()
    lateness.sort()
    return {
        "connected_s": round(connected, 2),
        "outcomes": dict(outcomes),
        "lateness_s": lateness,
    }


async def run_presses(spec: dict[str, Any]) -> dict[str, Any]:
    """S5 (and S6's probes): ``asks`` approvals one after another, each waiting for its result;
    the orchestrator presses Allow on each card. Reports when each call began and when its result
    arrived (wall clock), keyed by request id, so the orchestrator can time press → result across
    processes.

    The calls alternate ``turn_on`` / ``turn_off``: each approved call changes the light, as an
    approved action normally does.
    """
    results: dict[str, float] = {}
    started: dict[str, float] = {}
    pending: list[str] = []
    async with connect(
        spec["url"],
        token=spec["token"],
        ca=spec["ca"],
        reconnect=False,
        on_pending=lambda params: _announce(pending, params["request_id"]),
    ) as gw:
        with trio.fail_after(spec.get("limit", 600)):
            for i in range(spec["asks"]):
                service = "turn_off" if i % 2 else "turn_on"
                begun = time.time()
                await gw.call(
                    "ha_call_service", domain="light", service=service, entity_id=spec["entity"]
                )
                results[pending[-1]] = time.time()
                started[pending[-1]] = begun
    return {"results": results, "started": started}


def _announce(pending: list[str], request_id: str) -> None:
    """Tell the orchestrator which card is ours (one JSON line on stdout)."""
    pending.append(request_id)
    print(json.dumps({"pending": request_id}), flush=True)


async def run_mcp(spec: dict[str, Any]) -> dict[str, Any]:
    from agentgate.testing.mcp_client import mcp_http_client

    window = Window(spec["start_at"], spec["duration"])
    entity = spec["entity"]
    async with mcp_http_client(spec["mcp_url"], token=spec["tokens"][0], ca=spec["ca"]) as mcp:

        async def call() -> Any:
            result = await mcp.call_tool("ha_get_state", {"entity_id": entity})
            assert not result.is_error, result.content
            return result

        late = max(0.0, time.time() - window.start)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_timer, window)
            for _ in range(spec["in_flight"]):
                nursery.start_soon(_loop, call, window)
    return _result(window, late)


MODES = {
    "gateway": run_gateway,
    "floor": run_floor,
    "echo": run_echo,
    "asks": run_asks,
    "presses": run_presses,
    "mcp": run_mcp,
}


def main() -> None:
    logging.getLogger("agentgate").setLevel(logging.ERROR)  # "gateway closed" at the end
    spec = json.loads(sys.argv[1])
    result = trio.run(MODES[spec["mode"]], spec)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
