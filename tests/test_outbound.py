"""The outgoing HTTP transport: each request leaves in one write, and HTTP still works.

Fast tier: :class:`OneWriteStream` over a recording stream. Real sockets: httpx with the
transport against a Trio server on 127.0.0.1, plain and over TLS, reading what arrives.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpcore
import httpx
import pytest
import trio
import trustme

from agentgate.outbound import FLUSH_AT, OneWriteStream, one_write_transport


class Recording(httpcore.AsyncNetworkStream):
    def __init__(self, replies: list[bytes] | None = None) -> None:
        self.events: list[tuple[str, object]] = []
        self.replies = replies or [b"reply"]

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        self.events.append(("read", timeout))
        return self.replies.pop(0) if self.replies else b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        self.events.append(("write", (buffer, timeout)))

    async def aclose(self) -> None:
        self.events.append(("close", None))

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        self.events.append(("tls", server_hostname))
        return Recording()

    def get_extra_info(self, info: str) -> object:
        return {"is_readable": False}.get(info)


async def test_writes_wait_for_the_first_read_and_leave_as_one() -> None:
    inner = Recording()
    stream = OneWriteStream(inner)
    await stream.write(b"POST / HTTP/1.1\r\n\r\n", timeout=5.0)
    await stream.write(b"", timeout=5.0)  # h11's end of a Content-Length body
    await stream.write(b'{"a": 1}', timeout=6.0)
    assert inner.events == []
    assert await stream.read(100, timeout=7.0) == b"reply"
    assert inner.events == [
        ("write", (b'POST / HTTP/1.1\r\n\r\n{"a": 1}', 6.0)),
        ("read", 7.0),
    ]
    await stream.read(100)  # nothing pending: nothing written
    assert [kind for kind, _ in inner.events] == ["write", "read", "read"]


async def test_a_large_body_is_written_without_waiting_for_a_read() -> None:
    inner = Recording()
    stream = OneWriteStream(inner)
    await stream.write(b"head")
    await stream.write(b"x" * FLUSH_AT)
    assert inner.events == [("write", (b"head" + b"x" * FLUSH_AT, None))]


async def test_a_failed_write_still_reads_the_answer_as_httpcore_does() -> None:
    class HungUp(Recording):
        async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
            raise httpcore.WriteError("connection reset by peer")

    inner = HungUp([b"HTTP/1.1 413 Payload Too Large\r\n\r\n"])
    stream = OneWriteStream(inner)
    await stream.write(b"POST / HTTP/1.1\r\n\r\n" + b"x" * 100)
    assert await stream.read(100) == b"HTTP/1.1 413 Payload Too Large\r\n\r\n"


async def test_closing_drops_what_was_never_sent() -> None:
    inner = Recording()
    stream = OneWriteStream(inner)
    await stream.write(b"half a request")
    await stream.aclose()
    assert inner.events == [("close", None)]


async def test_tls_wraps_the_encrypted_stream_and_extra_info_passes_through() -> None:
    inner = Recording()
    stream = OneWriteStream(inner)
    tls = await stream.start_tls(ssl.create_default_context(), "ha.local")
    assert isinstance(tls, OneWriteStream)
    assert inner.events == [("tls", "ha.local")]
    assert stream.get_extra_info("is_readable") is False


# -- real sockets ---------------------------------------------------------------------------


@asynccontextmanager
async def server(chunks: list[bytes], tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """An HTTP/1.1 server on 127.0.0.1 that records every chunk it receives, answers
    ``{"seen": <bytes of the request>}`` and keeps the connection open."""

    async def serve(stream: trio.abc.Stream) -> None:
        buffer = b""
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                chunks.append(data)
                buffer += data
                head, sep, rest = buffer.partition(b"\r\n\r\n")
                if not sep:
                    continue
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(rest) < length:
                    continue
                buffer = rest[length:]
                body = json.dumps({"seen": len(head) + 4 + length}).encode()
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )

    async with trio.open_nursery() as nursery:
        if tls is None:
            listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        else:
            listeners = await nursery.start(
                partial(trio.serve_ssl_over_tcp, serve, 0, tls, host="127.0.0.1")
            )
        listener = listeners[0]
        tcp = listener.transport_listener if isinstance(listener, trio.SSLListener) else listener
        yield tcp.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("secure", [False, True], ids=["http", "https"])
async def test_a_request_arrives_in_one_piece_and_the_connection_is_reused(secure: bool) -> None:
    chunks: list[bytes] = []
    server_tls: ssl.SSLContext | None = None
    client_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if secure:
        ca = trustme.CA()
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(server_tls)
        ca.configure_trust(client_tls)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with trio.fail_after(10):
        async with server(chunks, server_tls) as port:
            transport = one_write_transport(verify=client_tls, limits=limits)
            scheme = "https" if secure else "http"
            async with httpx.AsyncClient(
                base_url=f"{scheme}://127.0.0.1:{port}", transport=transport
            ) as client:
                for service in ("turn_on", "turn_off"):
                    body = {"entity_id": "light.kitchen", "service": service}
                    reply = await client.post(f"/api/services/light/{service}", json=body)
                    assert reply.status_code == 200
                    request = chunks[-1]
                    # head and body in the one chunk the server read
                    assert request.startswith(f"POST /api/services/light/{service} ".encode())
                    assert request.endswith(json.dumps(body, separators=(",", ":")).encode())
                    assert reply.json() == {"seen": len(request)}
                assert len(chunks) == 2  # two requests, two reads, one connection
