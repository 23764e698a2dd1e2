"""The WSS listener: an accept loop of its own and trio-websocket's ``wrap_server_stream``.

Each accepted socket first takes its place in the connection limits
(:class:`~agentgate.limits.ConnectionLimits`: ``max_connections`` in all,
``max_unauthenticated_per_address`` while its TLS and WebSocket handshakes run); over a limit
it is closed at once, before any TLS work, and the refusal is logged once per address and
minute. The gateway raises its soft file-descriptor limit to the hard one at start and keeps
``max_connections`` below what that allows, so ``accept`` does not run out of descriptors;
if it does all the same (``EMFILE``: something else holds them), the loop waits a moment and
says so once a minute, without a traceback (``trio.serve_listeners`` would log one every
100 ms).

Each accepted connection gets ``connect_timeout`` seconds for its TLS handshake and WebSocket
upgrade, and not a moment longer than its peer stays: a connection closed before its upgrade
(TCP only, half a TLS handshake, TLS then close) is dropped at once. (trio-websocket's own
server waits the whole timeout for such a peer, so connect-and-leave could pin one socket, its
TLS state and its buffers per connection for the whole auth deadline.) The peer's departure is
seen by a thin stream wrapper (:class:`Watched`) that notes when the stream ends; nothing here
reaches into trio-websocket. The same wrapper lets a connection's writer send the replies
queued together in one write (:meth:`Watched.gathered`). A connection whose TLS handshake
failed is logged with the reason (:mod:`agentgate.handshakes`, once per address per minute).

Imports: limits, handshakes (Trio, trio-websocket's public API).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final, NamedTuple

import trio
from trio_websocket import WebSocketRequest, wrap_server_stream

from agentgate.handshakes import Counted, CountingListener, HandshakeLog
from agentgate.limits import ConnectionLimits, OverLimit, Throttle, Ticket

__all__ = ["Listening", "Watched", "raise_fd_limit", "serve_websockets"]

Handler = Callable[[WebSocketRequest, str, Ticket, "Watched"], Awaitable[None]]
"""Called with each upgraded connection's request, its peer's address, its ticket and the
stream under it (whose :meth:`Watched.gathered` sends several frames in one write)."""

log = logging.getLogger(__name__)

CLOSE_GRACE: Final = 2.0  # seconds a connection's socket may take to close after its handler
ACCEPT_RETRY: Final = 0.1  # seconds between accepts while the process is out of descriptors
# accept(2) errors that mean "the process or the system is out of something", not "this peer"
_CAPACITY: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# Descriptors kept free for everything that is not an agent's socket and opens after start:
# Home Assistant's and Telegram's connections, the store's checkpoints, worker threads, logs.
RESERVED_FDS: Final = 64
# Keepalive probes after 60 s of silence, every 15 s, 4 unanswered: a dead peer in ~2 min.
KEEPALIVE: Final = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4))


class Listening(NamedTuple):
    """What :func:`serve_websockets` hands to ``nursery.start``."""

    port: int
    listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.abc.Stream]]


class Watched(trio.abc.Stream):
    """A stream that says when its peer is gone (end of stream, or a broken read), and that can
    gather writes: what is written inside :meth:`gathered` leaves in one ``send_all``, so
    replies queued together cost one TLS write and one system call, not one each."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.ended = trio.Event()
        self.error: BaseException | None = None
        self._gathered: list[bytes | bytearray | memoryview] | None = None
        # A gathered write goes out after trio-websocket's own send lock is released: this one
        # keeps it from overlapping a write that trio-websocket started meanwhile.
        self._writing = trio.StrictFIFOLock()

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
        if self._gathered is not None:
            self._gathered.append(data)
            return
        async with self._writing:
            await self.inner.send_all(data)

    @asynccontextmanager
    async def gathered(self) -> AsyncIterator[None]:
        """Writes made in the block (by any task, in their order) are sent together as it ends,
        even when it ends with an error (not when cancelled)."""
        gathered: list[bytes | bytearray | memoryview] = []
        self._gathered = gathered
        try:
            yield
        finally:
            self._gathered = None
            if gathered:
                async with self._writing:
                    await self.inner.send_all(b"".join(gathered))

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
    limits: ConnectionLimits | None = None,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve WebSockets on ``host:port`` (0: a free port) until cancelled; supports
    ``await nursery.start(...)``, which returns the :class:`Listening` port.

    ``limits``: the connection limits every accepted socket is admitted against (default:
    none); its ``max_connections`` is lowered to what the file descriptors allow.
    """
    limits = limits if limits is not None else ConnectionLimits()
    allowed = raise_fd_limit() - _fds_in_use() - RESERVED_FDS
    configured = limits.max_connections
    if limits.limit_to(allowed):
        log.warning(
            "max_connections = %.0f is more than this process's file descriptors allow: at"
            " most %d connections at once (raise the hard limit, e.g. LimitNOFILE= in the"
            " systemd unit, or lower max_connections)",
            configured,
            limits.max_connections,
        )
    tcp = await trio.open_tcp_listeners(port, host=host)
    listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.abc.Stream]] = tcp
    if ssl_context is not None:
        listeners = [
            trio.SSLListener(CountingListener(each), ssl_context, https_compatible=True)
            for each in tcp
        ]
    refusals = Throttle()
    handshakes = HandshakeLog()

    async def connection(stream: trio.abc.Stream, peer: str, ticket: Ticket) -> None:
        watched = Watched(stream)
        try:
            async with trio.open_nursery() as nursery:  # the WebSocket's reader task
                request = await _upgrade(nursery, watched, max_message_size, within=connect_timeout)
                try:
                    if request is not None:
                        await handler(request, peer, ticket, watched)
                finally:
                    nursery.cancel_scope.cancel()
        except Exception:
            # Nothing one connection does may end the listener: trio-websocket's reader raises
            # ConnectionClosed out of its task when a peer that sent a bad request is gone
            # before the 400 answer can be written.
            log.debug("connection from %s ended with an error", peer, exc_info=True)
        finally:
            handshakes.ended(stream, watched.error, peer)
            try:
                with trio.move_on_after(CLOSE_GRACE):
                    await trio.aclose_forcefully(stream)
            finally:
                ticket.close()

    async def admit(stream: trio.abc.Stream, nursery: trio.Nursery) -> None:
        peer = _peer(stream)
        try:
            ticket = limits.admit(peer)
        except OverLimit as over:
            # Refused before any TLS work: the socket is closed at once.
            await trio.aclose_forcefully(stream)
            if refusals.allow(over.key):
                missed = refusals.take_suppressed(over.key)
                more = f" ({missed} more in the last minute)" if missed else ""
                log.warning("refused a connection from %s: %s%s", peer, over, more)
            return
        _keep_alive(stream)
        nursery.start_soon(connection, stream, peer, ticket)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, admit, nursery)
        task_status.started(Listening(tcp[0].socket.getsockname()[1], listeners))


async def accept_loop(
    listener: trio.abc.Listener[trio.abc.Stream],
    admit: Callable[[trio.abc.Stream, trio.Nursery], Awaitable[None]],
    nursery: trio.Nursery,
    *,
    throttle: Throttle | None = None,
) -> None:
    """Accept on ``listener`` until cancelled; ``admit`` each stream (it starts the
    connection's task in ``nursery`` or closes the stream). Out of descriptors (or memory),
    wait ``ACCEPT_RETRY`` and try again, saying so once a minute."""
    throttle = throttle or Throttle()
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY:
                    raise
                if throttle.allow("accept"):
                    missed = throttle.take_suppressed("accept")
                    log.error(
                        "cannot accept connections: %s (%s)%s; retrying every %.1f s",
                        errno.errorcode.get(exc.errno or 0, exc.errno),
                        os.strerror(exc.errno or 0),
                        f", {missed} more times in the last minute" if missed else "",
                        ACCEPT_RETRY,
                    )
                await trio.sleep(ACCEPT_RETRY)
                continue
            await admit(stream, nursery)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the soft limit now."""
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to raise
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open files limit from %d to %d: %s", soft, target, exc)
            return int(soft)
        log.info("open files limit raised from %d to %d (the hard limit)", soft, target)
        return int(target)
    limit = target if soft == resource.RLIM_INFINITY else soft
    log.info("open files limit: %d", limit)
    return int(limit)


def _nr_open() -> int:
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1 << 20


def _fds_in_use() -> int:
    for where in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(where))
        except OSError:
            continue
    return RESERVED_FDS  # cannot tell: assume as many again as the reserve


def _keep_alive(stream: trio.abc.Stream) -> None:
    """TCP keepalive on an accepted socket: a peer that vanished without closing (a network
    cut, a device switched off) is found within about two minutes of silence, so its socket
    stops counting towards ``max_connections_per_agent`` and the other limits."""
    stream = _socket_stream(stream)
    if not isinstance(stream, trio.SocketStream):
        return
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in KEEPALIVE:
        if hasattr(socket, name):  # Linux names; other systems keep their own defaults
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        try:
            stream.setsockopt(level, option, value)
        except OSError:  # already gone, or not supported: the limits still hold
            return


def _socket_stream(stream: trio.abc.Stream) -> trio.abc.Stream:
    """The TCP stream under TLS and the handshake counter."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, Counted):
        stream = stream.inner
    return stream


def _peer(stream: trio.abc.Stream) -> str:
    """The peer's IP address (the failed-auth limiter counts by it)."""
    stream = _socket_stream(stream)
    if isinstance(stream, trio.SocketStream):
        try:
            return str(stream.socket.getpeername()[0])
        except OSError:  # already gone
            return "unknown"
    return repr(stream)


async def _upgrade(
    nursery: trio.Nursery, stream: Watched, max_message_size: int, *, within: float
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
