"""Replies queued together leave in one write: ``listener.Watched.gathered`` and the
connection's writer (fast tier, memory streams)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked
from trio_websocket import wrap_client_stream, wrap_server_stream

from agentgate.connection import GATHER_FRAMES, Frame, _gather
from agentgate.listener import Watched
from tests.fastgate import DEFAULT_TOKENS, call, fast_gateway, reply
from tests.test_gateway_fast import HeldReads

CEILING = 10


class Recording(trio.abc.Stream):
    """Records every ``send_all``; ``gate`` (when set) holds each one until it is set."""

    def __init__(self, inner: trio.abc.Stream | None = None) -> None:
        self.inner = inner
        self.writes: list[bytes] = []
        self.gate: trio.Event | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.writes.append(bytes(data))
        if self.inner is not None:
            await self.inner.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.inner is None:
            await trio.sleep_forever()
        return await self.inner.receive_some(max_bytes)  # type: ignore[union-attr]

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        if self.inner is not None:
            await self.inner.aclose()


async def test_writes_in_a_gathered_block_leave_together_in_their_order() -> None:
    inner = Recording()
    stream = Watched(inner)
    with trio.fail_after(CEILING):
        async with stream.gathered():
            await stream.send_all(b"a")
            await stream.send_all(b"b")
            assert inner.writes == []
        assert inner.writes == [b"ab"]
        await stream.send_all(b"c")  # after the block: at once, on its own
    assert inner.writes == [b"ab", b"c"]


async def test_a_gathered_write_never_overlaps_nor_overtakes_another() -> None:
    inner = Recording()
    inner.gate = trio.Event()
    stream = Watched(inner)

    go_on = trio.Event()

    async def gather() -> None:
        async with stream.gathered():
            await stream.send_all(b"2")
            await go_on.wait()  # another task writes meanwhile: gathered too
        await stream.send_all(b"4")

    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, b"1")  # in progress: the socket is full
            await wait_all_tasks_blocked()
            nursery.start_soon(gather)
            await wait_all_tasks_blocked()
            nursery.start_soon(stream.send_all, b"3")
            await wait_all_tasks_blocked()
            go_on.set()  # the block ends while "1" is still being written
            await wait_all_tasks_blocked()
            assert inner.writes == []
            inner.gate.set()
    assert inner.writes == [b"1", b"23", b"4"]


async def test_what_was_gathered_is_sent_when_the_block_fails_not_when_cancelled() -> None:
    inner = Recording()
    stream = Watched(inner)
    with trio.fail_after(CEILING):
        with pytest.raises(RuntimeError):
            await _fail_while_gathering(stream)
        assert inner.writes == [b"close frame"]
        with trio.CancelScope() as scope:
            async with stream.gathered():
                await stream.send_all(b"never")
                scope.cancel()
        await stream.send_all(b"after")
    assert inner.writes == [b"close frame", b"after"]


async def _fail_while_gathering(stream: Watched) -> None:
    async with stream.gathered():
        await stream.send_all(b"close frame")
        raise RuntimeError("the next reply could not be encoded")


async def test_replies_that_hand_out_queued_results_are_written_alone() -> None:
    send, receive = trio.open_memory_channel[Frame](1000)
    for frame in [("b", ()), ("c", ("r1",)), ("d", ())]:
        send.send_nowait(frame)
    frames: list[Frame] = [("a", ())]
    carried = _gather(receive, frames)
    assert frames == [("a", ()), ("b", ())]
    assert carried == ("c", ("r1",))
    alone = [carried]
    assert _gather(receive, alone) is None  # it carries results: nothing joins it
    assert alone == [("c", ("r1",))]
    for n in range(2 * GATHER_FRAMES):
        send.send_nowait((str(n), ()))
    bounded: list[Frame] = [("first", ())]
    assert _gather(receive, bounded) is None
    assert len(bounded) == GATHER_FRAMES


async def test_replies_ready_together_leave_in_fewer_writes_than_replies(tmp_path: Path) -> None:
    home = HeldReads()
    async with fast_gateway(tmp_path, home=home) as fg:
        server_side, client_side = trio.testing.memory_stream_pair()
        socket = Recording(server_side)
        stream = Watched(socket)

        async def serve() -> None:
            request = await wrap_server_stream(fg.nursery, stream)
            await fg.gateway.door.handle(request, None, stream=stream)

        with trio.fail_after(CEILING):
            fg.nursery.start_soon(serve)
            ws = await wrap_client_stream(fg.nursery, client_side, "gate.test", "/")
            assert (await call(ws, 0, "auth", token=DEFAULT_TOKENS["pi"]))["result"]
            before = len(socket.writes)
            for n in range(1, 31):
                request = {"tool": "ha_get_state", "args": {"entity_id": "sensor.temp"}}
                frame = {"jsonrpc": "2.0", "id": n, "method": "tool_request", "params": request}
                await ws.send_message(json.dumps(frame))
            await wait_all_tasks_blocked()
            home.release.set()  # the shared read answers them all at once
            answers = [await reply(ws) for _ in range(30)]
        assert sorted(a["id"] for a in answers) == list(range(1, 31))
        assert all(a["result"]["data"]["state"] == "21" for a in answers)
        assert len(socket.writes) - before < 30
