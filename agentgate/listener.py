"""The WSS listener: Trio's ``serve_listeners`` and trio-websocket's ``wrap_server_stream``.

Each accepted connection gets ``connect_timeout`` seconds for its TLS handshake and WebSocket
upgrade, and not a moment longer than its peer stays: a connection closed before its upgrade
(TCP only, half a TLS handshake, TLS then close) is dropped at once. (trio-websocket's own
server waits the whole timeout for such a peer, so connect-and-leave could pin one socket, its
TLS state and its buffers per connection for the whole auth deadline.) The peer's departure is
seen by a thin stream wrapper (:class:`_Watched`) that notes when the stream ends; nothing here
reaches into trio-websocket. A connection whose TLS handshake failed is logged with the reason
(:mod:`agentgate.handshakes`, once per address per minute).

Imports: handshakes (Trio, trio-websocket's public API).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Final, NamedTuple

import trio
from trio_websocket import WebSocketRequest, wrap_server_stream

from agentgate.handshakes import Counted, CountingListener, HandshakeLog

__all__ = ["Listening", "serve_websockets"]

Handler = Callable[[WebSocketRequest, str], Awaitable[None]]
"""Called with each upgraded connection's request and its peer's address."""

log = logging.getLogger(__name__)

CLOSE_GRACE: Final = 2.0  # seconds a connection's socket may take to close after its handler


class Listening(NamedTuple):
    """What :func:`serve_websockets` hands to ``nursery.start``."""

    port: int
    listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.abc.Stream]]


class _Watched(trio.abc.Stream):
    """A stream that says when its peer is gone (end of stream, or a broken read)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.ended = trio.Event()
        self.error: BaseException | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except BaseException as exc:
            self.error = exc
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self.ended.set()  # trio-websocket closes the stream itself after a bad request
        await self.inner.aclose()


async def serve_websockets(
    handler: Handler,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    *,
    max_message_size: int,
    connect_timeout: float,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve WebSockets on ``host:port`` (0: a free port) until cancelled; supports
    ``await nursery.start(...)``, which returns the :class:`Listening` port."""
    tcp = await trio.open_tcp_listeners(port, host=host)
    listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.abc.Stream]] = tcp
    if ssl_context is not None:
        listeners = [
            trio.SSLListener(CountingListener(each), ssl_context, https_compatible=True)
            for each in tcp
        ]
    handshakes = HandshakeLog()

    async def connection(stream: trio.abc.Stream) -> None:
        peer = _peer(stream)
        watched = _Watched(stream)
        try:
            async with trio.open_nursery() as nursery:  # the WebSocket's reader task
                request = await _upgrade(nursery, watched, max_message_size, within=connect_timeout)
                try:
                    if request is not None:
                        await handler(request, peer)
                finally:
                    nursery.cancel_scope.cancel()
        except Exception:
            # Nothing one connection does may end the listener: trio-websocket's reader raises
            # ConnectionClosed out of its task when a peer that sent a bad request is gone
            # before the 400 answer can be written, and serve_listeners would pass it on.
            log.debug("connection from %s ended with an error", peer, exc_info=True)
        finally:
            handshakes.ended(stream, watched.error, peer)
            with trio.move_on_after(CLOSE_GRACE):
                await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, connection, listeners)
        task_status.started(Listening(tcp[0].socket.getsockname()[1], listeners))


def _peer(stream: trio.abc.Stream) -> str:
    """The peer's IP address (the failed-auth limiter counts by it)."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, Counted):
        stream = stream.inner
    if isinstance(stream, trio.SocketStream):
        try:
            return str(stream.socket.getpeername()[0])
        except OSError:  # already gone
            return "unknown"
    return repr(stream)


async def _upgrade(
    nursery: trio.Nursery, stream: _Watched, max_message_size: int, *, within: float
) -> WebSocketRequest | None:
    """The connection's WebSocket request, or None: no upgrade in time, or the peer left."""
    request: WebSocketRequest | None = None
    with trio.move_on_after(within):
        async with trio.open_nursery() as race:

            async def upgrade() -> None:
                nonlocal request
                request = await wrap_server_stream(
                    nursery, stream, max_message_size=max_message_size
                )
                race.cancel_scope.cancel()

            async def hang_up() -> None:
                await stream.ended.wait()
                race.cancel_scope.cancel()

            race.start_soon(upgrade)
            race.start_soon(hang_up)
    return request
