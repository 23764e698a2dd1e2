"""The transport of agentgate's outgoing HTTP (Home Assistant, the Telegram Bot API).

httpcore writes an HTTP/1.1 request in pieces: the head, then each chunk of the body, every
piece a separate ``send()`` with a scheduling point between them. The server cannot answer
before the body arrives, so each extra ``send()`` costs the gateway a wake-up and the server a
wait. Here the pieces of a request are gathered and leave in one write when httpcore starts
reading the answer (or once 64 KiB are waiting).

This is sound because an HTTP/1.1 client never reads before its request is complete: httpcore
writes the whole request, then reads the response. :class:`OneWriteTransport` is a public
``httpx.AsyncBaseTransport`` over a public ``httpcore.AsyncConnectionPool`` with its own
``network_backend``: plain HTTP/1.1 (no HTTP/2, no proxy; requests through a proxy use httpx's
own transports). httpcore's exceptions become httpx's, as httpx's own transport maps them.

Imports: nothing of agentgate (httpx, httpcore's public API).
"""

# ruff: noqa: ASYNC109  # httpcore's stream interface takes ``timeout`` arguments

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Final

import httpcore
import httpx

__all__ = ["OneWriteTransport", "one_write_transport"]

FLUSH_AT: Final = 64 * 1024  # bytes gathered before they are written anyway (large uploads)

# httpcore's exceptions, most specific first, and the httpx exception each one becomes.
_ERRORS: Final[tuple[tuple[type[Exception], type[httpx.TransportError]], ...]] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextmanager
def _mapped(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for theirs, ours in _ERRORS:
            if isinstance(exc, theirs):
                raise ours(str(exc), request=request) from exc
        raise


def one_write_transport(*, verify: ssl.SSLContext, limits: httpx.Limits) -> OneWriteTransport:
    """An HTTP/1.1 transport for ``httpx.AsyncClient(transport=...)`` that writes each request
    in one piece. Runs under Trio (the gateway's event loop)."""
    return OneWriteTransport(verify=verify, limits=limits)


class OneWriteTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface over an httpcore pool whose streams write in one piece."""

    def __init__(self, *, verify: ssl.SSLContext, limits: httpx.Limits) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=verify,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_OneWriteBackend(httpcore.TrioBackend()),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(request.stream, httpx.AsyncByteStream):
            raise TypeError("OneWriteTransport needs an async request body")
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _mapped(request):
            response = await self._pool.handle_async_request(core)
        if not isinstance(response.stream, Iterable) and not hasattr(response.stream, "__aiter__"):
            raise TypeError("httpcore answered without a body stream")
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response, request),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


class _Body(httpx.AsyncByteStream):
    """A response body from httpcore, with its errors mapped as httpx's."""

    def __init__(self, response: httpcore.Response, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped(self._request):
            async for part in self._response.aiter_stream():
                yield part

    async def aclose(self) -> None:
        with _mapped(self._request):
            await self._response.aclose()


class _OneWriteBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(
            host,
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )
        return OneWriteStream(stream)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(
            path,
            timeout=timeout,
            socket_options=socket_options,
        )
        return OneWriteStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class OneWriteStream(httpcore.AsyncNetworkStream):
    """A network stream whose writes wait for the next read (or :data:`FLUSH_AT` bytes)."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._pending: list[bytes] = []
        self._size = 0
        self._timeout: float | None = None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._pending.append(buffer)
        self._size += len(buffer)
        self._timeout = timeout
        if self._size >= FLUSH_AT:
            await self.flush()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._pending:
            # What httpcore does when it cannot finish writing a request: read anyway. The
            # server may have answered (and hung up) already; the read shows it, or fails.
            with suppress(httpcore.WriteError):
                await self.flush()
        return await self._inner.read(max_bytes, timeout)

    async def flush(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        await self._inner.write(data, self._timeout)

    async def aclose(self) -> None:
        self._pending.clear()  # a request that failed half-way is never sent
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self._pending:  # never the case: TLS starts before any HTTP is written
            await self.flush()
        stream = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return OneWriteStream(stream)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)
