"""The transport of agentgate's outgoing HTTP (Home Assistant, the Telegram Bot API).

httpcore writes an HTTP/1.1 request in pieces: the head, then each chunk of the body, every
piece a separate ``send()`` with a scheduling point between them. The server cannot answer before
the body arrives, so a busy gateway made Home Assistant wait for the second half of every
service call, and each extra ``send()`` costs ~0.1 ms of CPU on a small VM
(docs/performance.md, S5). Here the pieces of a request are gathered and leave in one write
when httpcore starts reading the answer (or once 64 KiB are waiting).

This is sound because an HTTP/1.1 client never reads before its request is complete: httpcore
writes the whole request, then reads the response. The transport is only used for plain
HTTP/1.1 connections (no HTTP/2); requests through a proxy use httpx's own transports.
"""

# ruff: noqa: ASYNC109  # httpcore's stream interface takes ``timeout`` arguments

from __future__ import annotations

import ssl
from collections.abc import Iterable
from contextlib import suppress
from typing import Any

import httpcore
import httpx

__all__ = ["one_write_transport"]

FLUSH_AT = 64 * 1024  # bytes gathered before they are written anyway (large uploads)


def one_write_transport(
    *, verify: ssl.SSLContext, limits: httpx.Limits
) -> httpx.AsyncHTTPTransport:
    """An HTTP/1.1 transport for ``httpx.AsyncClient(transport=...)`` that writes each request
    in one piece. Runs under Trio (the gateway's event loop)."""
    transport = httpx.AsyncHTTPTransport(verify=verify, limits=limits)
    # httpx 0.28 (pinned) has no network_backend argument; its transport sends every request
    # through this one pool, so the pool is replaced by the same pool with our backend.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=verify,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=_OneWriteBackend(httpcore.TrioBackend()),
    )
    return transport


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
