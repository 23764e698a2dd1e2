"""The WSS listener drops a connection whose peer left before its upgrade, at once.

Real sockets on 127.0.0.1. ``connect_timeout`` is 60 s in these tests, far beyond their
ceilings: trio-websocket's own server holds each such connection (socket, TLS state) for the
whole timeout, which would let anyone pin file descriptors by connecting and leaving.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trustme
from trio.testing import wait_all_tasks_blocked
from trio_websocket import WebSocketRequest, open_websocket_url

from agentgate import listener
from agentgate.listener import Listening, serve_websockets

CEILING = 10
pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _echo(request: WebSocketRequest, peer: str, ticket: object, stream: object) -> None:
    assert peer == "127.0.0.1"
    ws = await request.accept()
    message = await ws.get_message()
    await ws.send_message(f"echo {message}")
    await ws.aclose()


@asynccontextmanager
async def _server(tls: ssl.SSLContext | None) -> AsyncIterator[Listening]:
    async with trio.open_nursery() as nursery:
        server: Listening = await nursery.start(
            lambda task_status: serve_websockets(
                _echo,
                "127.0.0.1",
                0,
                tls,
                max_message_size=1 << 16,
                connect_timeout=60,
                task_status=task_status,
            )
        )
        yield server
        nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def _wait_for_fds(baseline: int) -> None:
    while _open_fds() > baseline:  # noqa: ASYNC110  # an OS counter: nothing to wait on
        await trio.sleep(0.01)


@pytest.mark.parametrize("use_tls", [False, True])
async def test_a_peer_gone_before_its_upgrade_is_dropped_at_once(
    ca: trustme.CA, use_tls: bool
) -> None:
    server_tls, _ = _contexts(ca)
    async with _server(server_tls if use_tls else None) as server:
        with trio.fail_after(CEILING):
            await wait_all_tasks_blocked()  # the server is up and idle: its sockets are open
            baseline = _open_fds()
            for _ in range(30):
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                await stream.send_all(b"\x16\x03\x01" if use_tls else b"GET / HTTP/1.1\r\n")
                await stream.aclose()
            # Each of them would hold its socket for the 60 s connect_timeout before the fix.
            await _wait_for_fds(baseline)


async def test_a_silent_connection_still_waits_for_its_upgrade(ca: trustme.CA) -> None:
    async with _server(None) as server:
        with trio.fail_after(CEILING):
            await wait_all_tasks_blocked()  # the server is up and idle: its sockets are open
            baseline = _open_fds()
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            # The server accepted it and did all it does at once: it now waits for the upgrade.
            await wait_all_tasks_blocked()
            # Our end plus the server's end: a peer that is only slow is not dropped.
            assert _open_fds() >= baseline + 2
            await stream.aclose()
            await _wait_for_fds(baseline)


@pytest.mark.parametrize("use_tls", [False, True])
async def test_a_websocket_still_works(ca: trustme.CA, use_tls: bool) -> None:
    server_tls, client_tls = _contexts(ca)
    async with _server(server_tls if use_tls else None) as server:
        scheme = "wss" if use_tls else "ws"
        with trio.fail_after(CEILING):
            async with open_websocket_url(
                f"{scheme}://127.0.0.1:{server.port}/",
                ssl_context=client_tls if use_tls else None,
            ) as ws:
                await ws.send_message("hello")
                assert await ws.get_message() == "echo hello"


def _bad_request_then_reset(port: int) -> None:
    """Not a WebSocket upgrade, and gone (RST) before the server's 400 can be written."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GARBAGE / HTTP/1.1\r\n\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_bad_requests_neither_end_the_listener_nor_hold_their_sockets() -> None:
    async with _server(None) as server:
        with trio.fail_after(CEILING):
            await wait_all_tasks_blocked()  # the server is up and idle: its sockets are open
            baseline = _open_fds()
            for _ in range(20):
                await trio.to_thread.run_sync(_bad_request_then_reset, server.port)
            # Freed at once, not after the 60 s connect_timeout...
            await _wait_for_fds(baseline)
            # ... and the listener still serves.
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
                await ws.send_message("still here")
                assert await ws.get_message() == "echo still here"


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux keepalive options")
async def test_accepted_sockets_probe_a_silent_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    options: list[tuple[int, int, int, int]] = []
    done = trio.Event()
    keep_alive = listener._keep_alive

    def record(stream: trio.abc.Stream) -> None:
        keep_alive(stream)
        assert isinstance(stream, trio.SocketStream)
        options.append(
            (
                stream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            )
        )
        done.set()

    monkeypatch.setattr(listener, "_keep_alive", record)
    async with _server(None) as server:
        with trio.fail_after(CEILING):
            client = await trio.open_tcp_stream("127.0.0.1", server.port)
            await done.wait()
            await client.aclose()
    (set_options,) = options
    assert set_options[0] != 0
    assert set_options[1:] == (60, 15, 4)  # a silent dead peer is found in about 2 minutes
