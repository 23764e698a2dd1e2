"""asyncio transport: wsproto over ``asyncio.open_connection`` (no extra dependency).

One reader task per connection, writes serialized by a lock (``write()`` is synchronous, so
frames never interleave; the lock only orders ``drain()``).

Imports: client._base, client._core, client._diagnose, errors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, cast

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import ProtocolError

from agentgate.client._base import Gateway, Options, PendingHook, Target, logger
from agentgate.client._core import MAX_MESSAGE_BYTES, Completed, is_fatal
from agentgate.client._diagnose import diagnose
from agentgate.errors import AgentgateError, ConnectionLost

_CLOSE_GRACE = 2.0
_READ_CHUNK = 65536


class _Closed(Exception):
    """The WebSocket is closed (by either side, or the TCP stream ended)."""


class _Socket:
    """A minimal WebSocket client connection: wsproto driven by asyncio streams."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: WSConnection
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._ws = ws
        self._lock = asyncio.Lock()
        self._pending: list[Any] = []  # wsproto events received but not consumed yet
        self._parts: list[str] = []
        self._size = 0

    @classmethod
    async def open(cls, target: Target) -> _Socket:
        reader, writer = await asyncio.open_connection(
            target.host,
            target.port,
            ssl=target.ssl_context,
            server_hostname=target.host if target.ssl_context else None,
        )
        sock = cls(reader, writer, WSConnection(ConnectionType.CLIENT))
        try:
            writer.write(sock._ws.send(Request(host=target.host_header, target=target.resource)))
            await writer.drain()
            while True:
                for event in await sock._events():
                    if isinstance(event, AcceptConnection):
                        return sock
                    if isinstance(event, RejectConnection):
                        body = b""
                        while event.has_body:  # up to RejectData(body_finished)
                            found = [e for e in await sock._events() if isinstance(e, RejectData)]
                            body += b"".join(e.data for e in found)
                            if any(e.body_finished for e in found) or len(body) > 4096:
                                break
                        raise ConnectionLost(
                            f"the gateway rejected the WebSocket: {event.status_code}",
                            data={"status": event.status_code, "body": body.decode("replace")},
                        )
        except BaseException:
            sock.abort()
            raise

    async def _events(self) -> list[Any]:
        if self._pending:
            events, self._pending = self._pending, []
            return events
        data = await self._reader.read(_READ_CHUNK)
        self._ws.receive_data(data or None)
        events = list(self._ws.events())
        if not data and not events:
            raise _Closed("the gateway closed the TCP connection")
        return events

    async def send(self, text: str) -> None:
        if self._ws.state is not ConnectionState.OPEN:
            raise _Closed("the connection is closing")
        self._writer.write(self._ws.send(Message(data=text)))
        async with self._lock:
            await self._writer.drain()

    async def receive(self) -> str:
        """The next complete text message; raises ``_Closed`` or ``ConnectionLost``."""
        while True:
            events = await self._events()
            for index, event in enumerate(events):
                if isinstance(event, TextMessage):
                    self._size += len(event.data)
                    if self._size > MAX_MESSAGE_BYTES:
                        await self.close(1009, "message too big")
                        raise ConnectionLost("the gateway sent a message above the size cap")
                    self._parts.append(event.data)
                    if event.message_finished:
                        text = "".join(self._parts)
                        self._parts, self._size = [], 0
                        self._pending = events[index + 1 :] + self._pending
                        return text
                elif isinstance(event, BytesMessage):
                    await self.close(1003, "text frames only")
                    raise ConnectionLost("the gateway sent a binary frame")
                elif isinstance(event, Ping):
                    self._writer.write(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if self._ws.state is ConnectionState.REMOTE_CLOSING:
                        self._writer.write(self._ws.send(event.response()))
                    raise _Closed(f"closed by the gateway: {event.code} {event.reason or ''}")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Polite close (bounded), then release the socket whatever happened."""
        try:
            async with asyncio.timeout(_CLOSE_GRACE):
                if self._ws.state is ConnectionState.OPEN:
                    self._writer.write(self._ws.send(CloseConnection(code=code, reason=reason)))
                    await self._writer.drain()
                self._writer.close()
                await self._writer.wait_closed()
        except (OSError, TimeoutError, ProtocolError):
            self.abort()

    def abort(self) -> None:
        self._writer.transport.abort()


class AsyncioGateway(Gateway):
    """The asyncio transport of :class:`~agentgate.client.Gateway`."""

    def __init__(self, options: Options) -> None:
        super().__init__(options, asyncio.Lock())
        self._sock: _Socket | None = None
        self._changed = asyncio.Event()
        self._fatal: AgentgateError | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    async def _rpc(
        self, method: str, params: dict[str, Any] | None, on_pending: PendingHook | None = None
    ) -> Any:
        while self._sock is None:
            if self._fatal is not None:
                raise type(self._fatal)(self._fatal.message, data=self._fatal.data)
            await self._changed.wait()
        sock = self._sock
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        rpc_id, text = self._core.begin(method, params, future, on_pending)
        try:
            # On failure the reader notices the broken socket and fails this call.
            with contextlib.suppress(_Closed, OSError):
                await sock.send(text)
            return await future
        finally:
            if not future.done():
                self._core.abandon(rpc_id)

    def _resolve(self, event: Completed[Any]) -> None:
        future = cast("asyncio.Future[Any]", event.waiter)
        if future.done():
            return
        if event.error is not None:
            future.set_exception(event.error)
        else:
            future.set_result(event.result)

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        task = asyncio.get_running_loop().create_task(fn(*args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finish(self, error: AgentgateError) -> None:
        self._fatal = error
        self._changed.set()

    # -- connections ------------------------------------------------------------------------

    async def handshake(self) -> _Socket:
        """Connect and authenticate under the handshake deadline; errors are raised."""
        target = self._options.target
        try:
            async with asyncio.timeout(self._options.handshake_timeout):
                sock = await _Socket.open(target)
                try:
                    self.agent = await self._handshake(sock.send, sock.receive)
                except BaseException:
                    await sock.close(1000)
                    raise
                return sock
        except (OSError, TimeoutError, _Closed, ProtocolError, ConnectionLost) as exc:
            if isinstance(exc, _Closed):
                exc = ConnectionLost(str(exc), data={"reason": "closed"})
            raise await diagnose(
                exc,
                url=target.url,
                host=target.host,
                port=target.port,
                secure=target.ssl_context is not None,
                within=self._options.handshake_timeout,
                run_sync=asyncio.to_thread,
            ) from exc

    async def supervise(self, sock: _Socket) -> None:
        """Serve ``sock``; then reconnect with backoff until cancelled or refused."""
        try:
            await self._reconnect_loop(sock)
        except Exception as exc:  # a bug here must not hang callers waiting to reconnect
            logger.exception("reconnect loop failed")
            self._finish(ConnectionLost(f"SDK reconnect loop failed: {exc!r}"))

    async def _reconnect_loop(self, sock: _Socket) -> None:
        attempt = 0
        while True:
            await self._serve(sock)
            if not self._options.reconnect:
                self._finish(ConnectionLost("connection lost (reconnect is off)"))
                return
            while True:
                await asyncio.sleep(self._options.backoff.delay(attempt, self._options.rng))
                attempt += 1
                try:
                    sock = await self.handshake()
                except AgentgateError as exc:
                    if is_fatal(exc):
                        logger.error("reconnect refused, giving up: %s", exc)
                        self._finish(exc)
                        return
                    logger.warning("reconnect attempt %d failed: %s", attempt, exc)
                    continue
                attempt = 0
                break

    async def _serve(self, sock: _Socket) -> None:
        self._sock = sock
        self._changed.set()
        self._changed = asyncio.Event()
        logger.info("connected to %s as %r", self._options.target.url, self.agent)
        self._connected()
        try:
            while True:
                try:
                    text = await sock.receive()
                except _Closed as exc:
                    logger.warning("%s", exc)
                    return
                except (OSError, ProtocolError) as exc:
                    logger.warning("connection error: %r", exc)
                    return
                try:
                    event = self._core.receive(text)
                except ConnectionLost as exc:
                    logger.error("%s; dropping the connection", exc.message)
                    await sock.close(1002, "protocol error")
                    return
                self._dispatch(event)
        except ConnectionLost as exc:
            logger.error("%s", exc.message)
        finally:
            self._sock = None
            for future, error in self._core.lose_all("connection to the gateway lost"):
                if not future.done():
                    future.set_exception(error)
            await sock.close()

    async def aclose(self) -> None:
        """Acknowledge what was handed out, stop reconnecting, close the socket, cancel
        callbacks (bounded)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_GRACE):
                await self._flush_acknowledgements()
        self._finish(ConnectionLost("the client is closed"))
        tasks = [t for t in (self._supervisor, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


@contextlib.asynccontextmanager
async def open_asyncio_gateway(options: Options) -> AsyncIterator[Gateway]:
    """Connect, authenticate and yield an :class:`AsyncioGateway`; close everything on exit."""
    gateway = AsyncioGateway(options)
    sock = await gateway.handshake()
    gateway._supervisor = asyncio.get_running_loop().create_task(gateway.supervise(sock))
    try:
        yield gateway
    finally:
        await gateway.aclose()
