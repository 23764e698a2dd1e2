"""The SDK and acknowledged delivery, against the REAL gateway (Trio and asyncio).

A program sees each queued result exactly once: the SDK collects in acknowledged mode,
acknowledges only what it has handed to the program, and drops what the gateway lists again.
Runs like ``tests/test_sdk_contract.py``: the gateway in the test's Trio run, the SDK under
Trio or in an asyncio loop in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from pathlib import Path
from typing import Any

import pytest
import sniffio
import trio
import trio_websocket

from agentgate.client import Backoff, Gateway, connect
from agentgate.client._core import Completed
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import RawAgent, client_ssl_context
from tests.client_contract import STEP, GwFactory, PendingLog, deadline
from tests.test_sdk_contract import LIBRARIES, RealGateway, real_gateway, run_case

pytestmark = pytest.mark.slow

LIGHT = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}


@pytest.fixture
async def gate(workdir: Path, home: FakeHomeAssistant) -> Any:
    async with real_gateway(workdir, home) as gateway:
        yield gateway


class _Event:
    """An event of whichever library runs the case."""

    def __init__(self) -> None:
        trio_run = sniffio.current_async_library() == "trio"
        self._event: trio.Event | asyncio.Event = trio.Event() if trio_run else asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


def collections_seen(gw: Gateway) -> _Event:
    """An event set once a reply to ``get_pending_results`` has buffered a new result (the
    SDK has it; the program has not seen it)."""
    collected = _Event()
    dispatch = gw._dispatch

    def spy(event: Any) -> None:
        dispatch(event)
        collection = isinstance(event, Completed) and event.method == "get_pending_results"
        if collection and event.error is None and event.result:
            collected.set()

    gw._dispatch = spy  # type: ignore[method-assign]  # observation only
    return collected


async def queue_while_connected(gw_factory: GwFactory, home: Any) -> str:
    """Another connection of the agent asks and leaves; the guardian allows: the result is
    queued, and the agent's live connections hear ``results_pending``."""
    pending = PendingLog()
    async with gw_factory(on_pending=pending, reconnect=False) as asking, deadline(STEP):

        async def ask() -> None:
            await asking.call("ha_call_service", **LIGHT)

        if sniffio.current_async_library() == "trio":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                params = await pending.wait()
                nursery.cancel_scope.cancel()
        else:
            task = asyncio.ensure_future(ask())
            params = await pending.wait()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await home.press(params["request_id"], "allow")
    return str(params["request_id"])


@LIBRARIES
async def test_leaving_connect_mid_collection_loses_nothing(
    library: str, gate: RealGateway
) -> None:
    """The known loss: a background collection (set off by ``results_pending``) has the
    result, the program leaves ``connect()`` before asking for it. It must not be gone."""

    async def case(gw_factory: GwFactory, home: Any) -> None:
        async with deadline(3 * STEP):
            async with gw_factory() as gw:
                collected = collections_seen(gw)
                request_id = await queue_while_connected(gw_factory, home)
                await collected.wait()
                # leaving now: the SDK holds the result, the program never asked for it
            async with gw_factory() as gw:
                (entry,) = await gw.pending_results()
                assert entry["request_id"] == request_id
                assert entry["status"] == "executed"
                assert await gw.pending_results() == []
            async with gw_factory() as gw:
                assert await gw.pending_results() == []  # acknowledged when handed out

    await run_case(library, gate, case)
    assert await gate.running.gateway.store.queued_count("pi") == 0


@LIBRARIES
async def test_a_result_is_seen_once_across_a_gateway_restart(
    library: str, gate: RealGateway
) -> None:
    """Collected (not handed out), connection lost, listed again on the next connection:
    the program gets it once."""

    async def case(gw_factory: GwFactory, home: Any) -> None:
        fast = Backoff(initial=0.1, maximum=0.5)
        async with deadline(3 * STEP), gw_factory(backoff=fast) as gw:
            collected = collections_seen(gw)
            request_id = await queue_while_connected(gw_factory, home)
            await collected.wait()
            await home.restart_gateway()  # a crash: nothing was acknowledged
            # the new connection lists the same result again (it was never acknowledged);
            # pending_results' own collection waits for that connection
            (entry,) = await gw.pending_results()
            assert entry["request_id"] == request_id
            assert await gw.pending_results() == []

    await run_case(library, gate, case)
    assert await gate.running.gateway.store.queued_count("pi") == 0


async def test_an_old_style_client_is_unchanged(gate: RealGateway) -> None:
    """A raw client that never sends ``ack``: each result handed out once, as before."""
    factory = functools.partial(connect, gate.url, token=gate.token, ca=gate.ca_path)

    class Home:
        async def press(self, request_id: str, decision: str) -> None:
            await gate.press(request_id, decision)

    with trio.fail_after(3 * STEP):
        request_id = await queue_while_connected(factory, Home())
        await gate.guardian.wait_for_update(request_id)
        async with trio_websocket.open_websocket_url(
            gate.url, ssl_context=client_ssl_context(gate.ca_path)
        ) as ws:
            agent = RawAgent(ws)
            await agent.call("auth", {"token": gate.token})
            first = await agent.call("get_pending_results")
            assert [r["request_id"] for r in first["result"]["results"]] == [request_id]
            assert (await agent.call("get_pending_results"))["result"] == {"results": []}
