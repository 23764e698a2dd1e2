"""Connection limits: ``max_connections``, ``max_unauthenticated_per_address``,
``max_connections_per_agent`` (``[limits]``), and running out of file descriptors.

Fast tier over memory streams (the door admits the socket itself and refuses with HTTP 503),
then real sockets: idle TCP sockets from another loopback address (127.0.0.2, so the agents
that must still be served, on 127.0.0.1, are another source), many connections of one agent,
and ``agentgate serve`` in a process whose file-descriptor limit is small.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    wrap_client_stream,
    wrap_server_stream,
)

from agentgate.client import connect
from agentgate.listener import accept_loop
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import DEFAULT_TOKENS, Harness, running_gateway
from agentgate.testing.processes import agent_websocket, spawn, write_gateway_files
from tests.fastgate import FastGateway, authed, call, fast_gateway, reply

CEILING = 60
READ = {"tool": "ha_get_state", "args": {"entity_id": "sensor.temp"}}
SENSOR = "sensor.living_room_temperature"
needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


# -- fast tier ---------------------------------------------------------------------------------


async def test_an_agent_over_its_connection_cap_is_refused_and_others_are_served(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path, limits={"max_connections_per_agent": 3}) as fg:
        held = [await authed(fg, "pi") for _ in range(3)]
        ws = await fg.connect()
        answer = await call(ws, 1, "auth", token=DEFAULT_TOKENS["pi"])
        assert answer["id"] == 1
        assert answer["error"]["code"] == -32006
        assert "max_connections_per_agent = 3" in answer["error"]["message"]
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 1008
        # another agent is served; the refusal was not a failed guess
        laptop = await authed(fg, "laptop")
        assert (await call(laptop, 2, "tool_request", **READ))["result"]["status"] == "executed"
        assert not fg.gateway.door.failed_auth.blocked("gate.test")
        # a connection of pi's ends: pi may connect again
        await held[0].aclose()
        limits = fg.gateway.door.connection_limits
        while limits.of_agent("pi") == 3:
            await limits.released()
        again = await authed(fg, "pi")
        assert (await call(again, 3, "tool_request", **READ))["result"]["status"] == "executed"


async def refused(fg: FastGateway, remote: str) -> ConnectionRejected:
    """Open a WebSocket the gateway refuses before its upgrade; its HTTP answer."""
    server_stream, client_stream = trio.testing.memory_stream_pair()

    async def serve() -> None:
        request = await wrap_server_stream(fg.nursery, server_stream)
        await fg.gateway.door.handle(request, remote)

    fg.nursery.start_soon(serve)
    with pytest.RaisesGroup(ConnectionRejected, flatten_subgroups=True) as info:
        async with trio.open_nursery() as nursery:  # the client's reader raises it here
            await wrap_client_stream(nursery, client_stream, "gate.test", "/")
    rejection = info.value.exceptions[0]
    assert isinstance(rejection, ConnectionRejected)
    return rejection


async def test_unauthenticated_sockets_of_one_address_are_capped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path, limits={"max_unauthenticated_per_address": 2}) as fg:
        first = await fg.connect(remote="10.0.0.1")
        second = await fg.connect(remote="10.0.0.1")
        rejected = await refused(fg, "10.0.0.1")
        assert rejected.status_code == 503
        assert b"are not authenticated yet" in (rejected.body or b"")
        assert (await call(await fg.connect(remote="10.0.0.2"), 1, "list_tools"))["error"]
        # one of the two authenticates: its place is free again
        assert (await call(first, 1, "auth", token=DEFAULT_TOKENS["pi"]))["result"]
        third = await fg.connect(remote="10.0.0.1")
        assert (await call(third, 1, "auth", token=DEFAULT_TOKENS["laptop"]))["result"]
        assert (await call(third, 2, "tool_request", **READ))["result"]["status"] == "executed"
        # the silent one still reaches its auth deadline as before
        assert (await reply(second))["error"]["code"] == -32005


async def test_running_out_of_descriptors_is_logged_once_a_minute_without_traceback(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    class Exhausted(trio.abc.Listener[trio.abc.Stream]):
        """accept() fails with EMFILE for 150 s, then hands out one stream."""

        def __init__(self) -> None:
            self.calls = 0

        async def accept(self) -> trio.abc.Stream:
            self.calls += 1
            await trio.lowlevel.checkpoint()
            if trio.current_time() < 150:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return trio.testing.MemorySendStream()  # type: ignore[return-value]

        async def aclose(self) -> None:
            await trio.lowlevel.checkpoint()

    admitted = trio.Event()

    async def admit(stream: trio.abc.Stream, nursery: trio.Nursery) -> None:
        await trio.lowlevel.checkpoint()
        admitted.set()

    listener = Exhausted()
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop, listener, admit, nursery)
        await admitted.wait()
        nursery.cancel_scope.cancel()
    records = [r for r in caplog.records if r.name.startswith(("agentgate", "trio"))]
    assert [r.exc_info for r in records] == [None, None, None]  # t = 0, 60, 120 s
    assert "EMFILE" in records[0].getMessage()
    assert "more times in the last minute" in records[1].getMessage()
    assert listener.calls > 1000  # it kept trying, every 0.1 s


# -- real sockets ------------------------------------------------------------------------------


async def idle_sockets(port: int, count: int, source: str) -> list[trio.SocketStream]:
    """``count`` TCP sockets from ``source`` to the gateway that never say anything."""
    return [
        await trio.open_tcp_stream("127.0.0.1", port, local_address=source) for _ in range(count)
    ]


class Closed:
    """How many of the watched sockets the gateway closed; ``enough`` once ``expect`` are."""

    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.count = 0
        self.enough = trio.Event()


@asynccontextmanager
async def watched(streams: list[trio.SocketStream], closed: Closed) -> AsyncIterator[None]:
    """Watch ``streams`` for the gateway closing them; close them all when the block ends."""

    async def watch(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # reset: gone as well
            await stream.receive_some(1)  # b"": closed
        closed.count += 1
        if closed.count >= closed.expect:
            closed.enough.set()

    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(watch, stream)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                for stream in streams:
                    await trio.aclose_forcefully(stream)


async def read_as(gw: Harness, agent: str) -> dict[str, Any]:
    async with connect(
        gw.url, token=gw.tokens[agent], ca=gw.ca_path, reconnect=False, collect=False
    ) as sdk:
        data: dict[str, Any] = await sdk.call("ha_get_state", entity_id=SENSOR)
        return data


def refusals(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


async def test_hundreds_of_idle_sockets_from_one_address_hold_eight_places(
    workdir: Path, home: FakeHomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # A long auth deadline: the admitted idle sockets stay for the whole test.
    async with running_gateway(workdir, home=home, gateway={"auth_deadline": 120}) as gw:
        limits = gw.gateway.door.connection_limits
        with trio.fail_after(CEILING):
            streams = await idle_sockets(gw.running.port, 300, "127.0.0.2")
            closed = Closed(300 - 8)
            async with watched(streams, closed):
                await closed.enough.wait()  # all but 8 closed at once
                assert limits.unauthenticated("127.0.0.2") == 8
                assert limits.open == 8
                # another agent, from another address, is served meanwhile
                assert (await read_as(gw, "laptop"))["entity_id"] == SENSOR
        lines = refusals(caplog, "refused a connection from 127.0.0.2")
        assert len(lines) == 1, lines  # once a minute, however many
        assert "max_unauthenticated_per_address = 8" in lines[0]
        assert not [r for r in caplog.records if r.exc_info]


async def test_many_connections_of_one_agent_leave_room_for_the_others(
    workdir: Path, home: FakeHomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_gateway(workdir, home=home) as gw, trio.open_nursery() as nursery:
        outcomes: list[str] = []

        async def one(task_status: trio.TaskStatus[None]) -> None:
            """One connection as pi: held open if accepted, else its refusal is checked."""
            async with agent_websocket(gw.url, gw.client_ssl) as ws:
                auth = {"token": gw.tokens["pi"]}
                await ws.send_message(
                    json.dumps({"jsonrpc": "2.0", "id": 1, "method": "auth", "params": auth})
                )
                answer = json.loads(await ws.get_message())
                if "result" in answer:
                    outcomes.append("held")
                    task_status.started()
                    await trio.sleep_forever()
                assert answer["error"]["code"] == -32006, answer
                assert "max_connections_per_agent = 8" in answer["error"]["message"]
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1008
                outcomes.append("refused")
                task_status.started()

        with trio.fail_after(CEILING):
            for _ in range(40):  # one after the other: each is authenticated, or refused
                await nursery.start(one)
            assert outcomes.count("held") == 8
            assert outcomes.count("refused") == 32
            assert gw.gateway.door.connection_limits.of_agent("pi") == 8
            assert (await read_as(gw, "laptop"))["entity_id"] == SENSOR
            assert not gw.gateway.door.failed_auth.blocked("127.0.0.1")
            nursery.cancel_scope.cancel()
    assert len(refusals(caplog, "agent pi from 127.0.0.1 refused")) == 1


async def test_the_total_cap_refuses_at_once_and_frees_with_the_sockets(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    toml = {"gateway": {"auth_deadline": 120}, "limits": {"max_connections": 10}}
    async with running_gateway(workdir, home=home, **toml) as gw:
        limits = gw.gateway.door.connection_limits
        with trio.fail_after(CEILING):
            sources = [f"127.0.0.{n}" for n in range(2, 7)]  # 5 addresses x 4 sockets
            streams: list[trio.SocketStream] = []
            for source in sources:
                streams += await idle_sockets(gw.running.port, 4, source)
            closed = Closed(20 - 10)
            async with watched(streams, closed):
                await closed.enough.wait()
                assert limits.open == 10
                # full: an agent is refused too (a TCP close before TLS: ConnectionLost)
                with pytest.raises(Exception, match="cannot reach the gateway"):
                    await read_as(gw, "laptop")
            while limits.open:
                await limits.released()
            assert (await read_as(gw, "laptop"))["entity_id"] == SENSOR


@needs_proc
async def test_with_few_descriptors_the_cap_keeps_accept_from_running_out(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    files = write_gateway_files(
        workdir, home=home, gateway={"auth_deadline": 120}, limits={"max_connections": 256}
    )
    serve = shlex.join([sys.executable, "-m", "agentgate", "serve", str(files.config)])
    process = spawn(["sh", "-c", f"ulimit -n 128 && exec {serve}"], workdir / "gateway.log")
    try:
        with trio.fail_after(CEILING):
            line = await process.wait_for_output("listening on ")
            port = int(line.rsplit(":", 1)[1])
            cap_line = await process.wait_for_output("is more than this process's file")
            cap = int(cap_line.split("at most ", 1)[1].split()[0])
            assert 0 < cap < 128
            # 200 idle sockets from 25 addresses: well over what the process can hold
            streams: list[trio.SocketStream] = []
            for n in range(2, 27):
                streams += await idle_sockets(port, 8, f"127.0.0.{n}")
            closed = Closed(len(streams) - cap)
            async with watched(streams, closed):
                await closed.enough.wait()
                assert process.alive()
            url = f"wss://127.0.0.1:{port}/"
            async with connect(url, token=files.tokens["laptop"], ca=files.ca_path) as sdk:
                assert (await sdk.call("ha_get_state", entity_id=SENSOR))["entity_id"] == SENSOR
        output = process.output()
        assert "open files limit: 128" in output
        assert "Traceback" not in output
        assert "cannot accept" not in output  # never out of descriptors
        assert "EMFILE" not in output
    finally:
        process.close()


async def test_the_soft_fd_limit_is_raised_to_the_hard_one(
    workdir: Path, home: FakeHomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"needs a finite hard limit above 1024 (it is {hard})")
    caplog.set_level(logging.INFO)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        async with running_gateway(workdir, home=home):
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert refusals(caplog, f"open files limit raised from 1024 to {hard}")
