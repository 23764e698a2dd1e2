"""Trio transport: trio-websocket, one reader task, one writer task draining an outbox.

Imports: client._base, client._core, client._diagnose, client._groups, errors.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any, cast

import trio
import trio_websocket

from agentgate.client._base import Gateway, Options, PendingHook, Target, logger
from agentgate.client._core import MAX_MESSAGE_BYTES, Completed, is_fatal
from agentgate.client._diagnose import diagnose
from agentgate.client._groups import collapse_groups
from agentgate.errors import AgentgateError, ConnectionLost

_CLOSE_GRACE = 2.0  # seconds for a polite close handshake when leaving


class _Slot:
    """One waiting call: an event plus the outcome."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: AgentgateError | None = None


@contextmanager
def _map_transport_errors(url: str) -> Iterator[None]:
    """Foreign transport errors become ``ConnectionLost`` (raised ``from`` the original)."""
    try:
        yield
    except (
        OSError,
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        trio.TooSlowError,
        trio_websocket.HandshakeError,
        trio_websocket.ConnectionClosed,
    ) as exc:
        raise ConnectionLost(f"cannot reach the gateway at {url}: {exc!r}") from exc


class _Ended(trio.abc.Stream):
    """A stream that says when its peer is gone: the WebSocket upgrade must not wait for an
    answer that cannot come (trio-websocket's client would wait the whole handshake timeout)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.ended = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except BaseException:
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
        await self.inner.aclose()


async def _upgrade(
    nursery: trio.Nursery, stream: _Ended, target: Target
) -> trio_websocket.WebSocketConnection:
    """The WebSocket upgrade, or ConnectionLost as soon as the gateway hangs up instead."""
    ws: trio_websocket.WebSocketConnection | None = None
    async with trio.open_nursery() as race:

        async def upgrade() -> None:
            nonlocal ws
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,  # type: ignore[arg-type]
                target.host_header,
                target.resource,
                max_message_size=MAX_MESSAGE_BYTES,
            )
            race.cancel_scope.cancel()

        async def hang_up() -> None:
            await stream.ended.wait()
            race.cancel_scope.cancel()

        race.start_soon(upgrade)
        race.start_soon(hang_up)
    if ws is None:
        raise ConnectionLost(
            "the gateway closed the connection before the WebSocket upgrade",
            data={"reason": "closed"},
        )
    return ws


async def _open_stream(target: Target) -> trio.abc.Stream:
    if target.ssl_context is None:
        return await trio.open_tcp_stream(target.host, target.port)
    stream = await trio.open_ssl_over_tcp_stream(
        target.host, target.port, ssl_context=target.ssl_context, https_compatible=True
    )
    try:
        # Handshake now: inside trio-websocket's reader a TLS failure would only show up as
        # a handshake that never completes.
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


class TrioGateway(Gateway):
    """The Trio transport of :class:`~agentgate.client.Gateway`."""

    def __init__(self, options: Options, nursery: trio.Nursery) -> None:
        super().__init__(options, trio.Lock())
        self._nursery = nursery
        self._outbox: trio.MemorySendChannel[str] | None = None
        self._changed = trio.Event()  # set when connected or when the client is finished
        self._fatal: AgentgateError | None = None
        self._ws: trio_websocket.WebSocketConnection | None = None

    @property
    def connected(self) -> bool:
        return self._outbox is not None

    # -- calls ------------------------------------------------------------------------------

    async def _rpc(
        self, method: str, params: dict[str, Any] | None, on_pending: PendingHook | None = None
    ) -> Any:
        while self._outbox is None:
            if self._fatal is not None:
                raise type(self._fatal)(self._fatal.message, data=self._fatal.data)
            await self._changed.wait()
        slot = _Slot()
        rpc_id, text = self._core.begin(method, params, slot, on_pending)
        try:
            # Unbounded outbox: never blocks, so a cancelled caller cannot tear a frame in
            # half; the writer task owns the socket.
            self._outbox.send_nowait(text)
            await slot.done.wait()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            data = {"rpc_id": rpc_id, "method": method}
            raise ConnectionLost("connection to the gateway lost", data=data) from None
        finally:
            if not slot.done.is_set():
                self._core.abandon(rpc_id)
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _resolve(self, event: Completed[Any]) -> None:
        slot = cast(_Slot, event.waiter)
        slot.result, slot.error = event.result, event.error
        slot.done.set()

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        self._nursery.start_soon(fn, *args)

    def _fail_all(self, reason: str) -> None:
        for slot, error in self._core.lose_all(reason):
            slot.error = error
            slot.done.set()

    def _finish(self, error: AgentgateError) -> None:
        """No more connections: every present and future call raises ``error``."""
        self._fatal = error
        self._changed.set()

    async def aclose(self) -> None:
        """Acknowledge what was handed out, stop reconnecting and close the connection
        politely (bounded, shielded)."""
        with trio.move_on_after(_CLOSE_GRACE, shield=True):
            await self._flush_acknowledgements()
        self._finish(ConnectionLost("the client is closed"))
        if self._ws is not None:
            # while the reader still runs, so the close handshake can complete
            with trio.move_on_after(_CLOSE_GRACE, shield=True):
                await self._ws.aclose()

    # -- connections ------------------------------------------------------------------------

    async def supervise(self, *, task_status: trio.TaskStatus[None]) -> None:
        """First connection (its errors go to ``connect()``), then reconnect until cancelled."""
        await self._connection(task_status=task_status)
        try:
            await self._reconnect_loop()
        except Exception as exc:  # a bug here must not hang callers waiting to reconnect
            logger.exception("reconnect loop failed")
            self._finish(ConnectionLost(f"SDK reconnect loop failed: {exc!r}"))

    async def _reconnect_loop(self) -> None:
        attempt = 0
        while self._options.reconnect and self._fatal is None:
            await trio.sleep(self._options.backoff.delay(attempt, self._options.rng))
            attempt += 1
            try:
                await self._connection()
            except AgentgateError as exc:
                if is_fatal(exc):
                    logger.error("reconnect refused, giving up: %s", exc)
                    self._finish(exc)
                    return
                logger.warning("reconnect attempt %d failed: %s", attempt, exc)
                continue
            attempt = 0
        if self._fatal is None:
            self._finish(ConnectionLost("connection lost (reconnect is off)"))

    async def _connection(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """One connection: handshake (its errors are raised), then serve it.

        ``task_status.started()`` once authenticated; after that this returns (never raises)
        when the connection is gone, having failed the calls in flight.
        """
        target = self._options.target
        serving = False
        stream: trio.abc.Stream | None = None
        try:
            with collapse_groups():
                async with trio.open_nursery() as nursery:
                    ws: trio_websocket.WebSocketConnection | None = None
                    try:
                        with _map_transport_errors(target.url):
                            with trio.fail_after(self._options.handshake_timeout):
                                # We own the stream (not connect_websocket_url) so that a
                                # failed handshake cannot leak the socket.
                                stream = await _open_stream(target)
                                ws = await _upgrade(nursery, _Ended(stream), target)
                                self.agent = await self._handshake(ws.send_message, ws.get_message)
                        outbox, inbox = trio.open_memory_channel[str](math.inf)
                        nursery.start_soon(self._writer, ws, inbox)
                        self._outbox, self._ws = outbox, ws
                        self._changed.set()
                        self._changed = trio.Event()
                        serving = True
                        task_status.started()
                        logger.info("connected to %s as %r", target.url, self.agent)
                        self._connected()
                        await self._reader(ws)
                    finally:
                        if self._outbox is not None:
                            self._outbox.close()
                        self._outbox = self._ws = None
                        self._fail_all("connection to the gateway lost")
                        with trio.move_on_after(_CLOSE_GRACE, shield=True):
                            if ws is not None:
                                await ws.aclose()
                            if stream is not None:
                                await trio.aclose_forcefully(stream)
                        nursery.cancel_scope.cancel()
        except Exception as exc:
            if serving:
                logger.exception("connection ended with an unexpected error")
                return
            explained = await diagnose(
                exc,
                url=target.url,
                host=target.host,
                port=target.port,
                secure=target.ssl_context is not None,
                within=self._options.handshake_timeout,
                run_sync=partial(trio.to_thread.run_sync, abandon_on_cancel=True),
            )
            if explained is exc:
                raise
            raise explained from exc

    async def _reader(self, ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                if self._fatal is None:  # not our own aclose()
                    logger.warning("gateway closed the connection: %s", exc.reason)
                else:
                    logger.debug("connection closed: %s", exc.reason)
                return
            try:
                event = self._core.receive(message)
            except ConnectionLost as exc:
                logger.error("%s; dropping the connection", exc.message)
                await ws.aclose(1002, "protocol error")
                return
            self._dispatch(event)

    async def _writer(
        self,
        ws: trio_websocket.WebSocketConnection,
        inbox: trio.MemoryReceiveChannel[str],
    ) -> None:
        async with inbox:
            async for text in inbox:
                try:
                    await ws.send_message(text)
                except trio_websocket.ConnectionClosed:
                    return  # the reader sees the close and ends the connection


@asynccontextmanager
async def open_trio_gateway(options: Options) -> AsyncIterator[Gateway]:
    """Connect, authenticate and yield a :class:`TrioGateway`; close everything on exit."""
    with collapse_groups():
        async with trio.open_nursery() as nursery:
            gateway = TrioGateway(options, nursery)
            await nursery.start(gateway.supervise)
            try:
                yield gateway
            finally:
                await gateway.aclose()
                nursery.cancel_scope.cancel()
