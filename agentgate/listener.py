"""The WSS listener: trio-websocket's server, minus one way to hold a socket for nothing.

trio-websocket 0.12 waits the whole ``connect_timeout`` for the HTTP upgrade of every accepted
connection, even when the peer has already gone: a connection closed before its upgrade (TCP
only, half a TLS handshake, TLS then close) kept its socket, its TLS state and its buffers for
the full auth deadline. Opening and dropping connections quickly thus held one file descriptor
each for 10 s, and the churn soak saw the gateway's RSS double (docs/performance.md, soak).

:class:`_Server` is trio-websocket's ``WebSocketServer`` with one change to its per-connection
routine: it stops waiting for the upgrade as soon as the connection's reader has ended. The
routine overrides a private method, so ``pyproject.toml`` keeps trio-websocket below 0.13;
``tests/test_listener.py`` shows the behaviour on a real socket.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest, WebSocketServer
from wsproto import ConnectionType, WSConnection

__all__ = ["serve_websockets"]

Handler = Callable[[WebSocketRequest], Awaitable[None]]


class _Server(WebSocketServer):
    async def _handle_connection(self, stream: trio.abc.Stream) -> None:
        """trio-websocket's own, except that a peer gone before its upgrade is dropped now."""
        async with trio.open_nursery() as nursery:
            connection = WebSocketConnection(
                stream,
                WSConnection(ConnectionType.SERVER),
                message_queue_size=self._message_queue_size,
                max_message_size=self._max_message_size,
                receive_buffer_size=self._receive_buffer_size,
            )
            reader_ended = trio.Event()

            async def read() -> None:
                try:
                    await connection._reader_task()
                finally:
                    reader_ended.set()

            nursery.start_soon(read)
            request: WebSocketRequest | None = None
            with trio.move_on_after(self._connect_timeout):
                async with trio.open_nursery() as race:

                    async def upgrade() -> None:
                        nonlocal request
                        request = await connection._get_request()
                        race.cancel_scope.cancel()

                    async def hang_up() -> None:
                        await reader_ended.wait()
                        race.cancel_scope.cancel()

                    race.start_soon(upgrade)
                    race.start_soon(hang_up)
            if request is None:  # no upgrade in time, or the peer is gone
                nursery.cancel_scope.cancel()
                await trio.aclose_forcefully(stream)
                return
            try:
                await self._handler(request)
            finally:
                with trio.move_on_after(self._disconnect_timeout):
                    await connection.aclose()


async def serve_websockets(
    handler: Handler,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    *,
    max_message_size: int,
    connect_timeout: float,
    disconnect_timeout: float,
    task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Like ``trio_websocket.serve_websocket``; supports ``await nursery.start(...)``."""
    listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]]
    if ssl_context is None:
        listeners = await trio.open_tcp_listeners(port, host=host)
    else:
        listeners = await trio.open_ssl_over_tcp_listeners(
            port, ssl_context, host=host, https_compatible=True
        )
    server = _Server(
        handler,
        listeners,
        max_message_size=max_message_size,
        connect_timeout=connect_timeout,
        disconnect_timeout=disconnect_timeout,
    )
    await server.run(task_status=task_status)
