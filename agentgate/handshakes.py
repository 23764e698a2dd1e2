"""Failed TLS handshakes, explained in the gateway's log (and to a client that spoke plain HTTP).

An agent that does not trust the certificate, dials a name the certificate does not hold, or
uses ``ws://`` on the TLS port never gets far enough to send a request: without this module
the gateway would say nothing at all. The listener wraps each accepted TCP stream in a
:class:`Counted` stream (below TLS), and when a connection ends before its TLS handshake
completed it asks :meth:`HandshakeLog.ended` to log why, at most once per address per minute:

- plain HTTP on the TLS port: the client gets ``400`` with "this is a TLS port: use wss://"
  in plain text before the socket closes (so its own error says what to do);
- a TLS alert from the client (``unknown ca``, ``bad certificate``, ...): the client refused
  the certificate; the alert names why;
- the client hung up in the middle of the handshake: most clients do that when they refuse
  the certificate without saying so (Python's ``ssl`` with Trio, for one).

A socket that sends nothing at all (a port check, a health check) is not a failed handshake.

Imports: nothing of agentgate (Trio, ssl).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Final

import trio

__all__ = ["Counted", "CountingListener", "HandshakeLog", "handshake_failure"]

log = logging.getLogger("agentgate.listener")

EVERY: Final = 60.0  # seconds: one line per address per minute
MAX_ADDRESSES: Final = 4096  # addresses remembered; a scan of many cannot grow this without bound
_PLAIN_HTTP_BODY: Final = b"this is a TLS port of agentgate: use wss://, not ws://\n"
PLAIN_HTTP_ANSWER: Final = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)
_HTTP_METHODS: Final = (b"GET ", b"POST", b"HEAD", b"PUT ", b"OPTI", b"DELE", b"PATC", b"CONN")

# OpenSSL's reasons for the alerts a client sends when it refuses a certificate.
_ALERTS: Final = {
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust this certificate (alert: unknown CA):"
    " give it the CA certificate (agentgate call --ca FILE, ca= in the SDK)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client refused the certificate (alert: bad certificate;"
    " is the name it dialled in the certificate's subjectAltName?)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client says the certificate has expired: renew it",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client refused the certificate (alert: certificate"
    " unknown; does it trust its CA, and is the name it dialled in the certificate?)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the client offers no TLS version the gateway accepts (1.2+)",
    "NO_SHARED_CIPHER": "the client offers no cipher the gateway accepts",
    "UNSUPPORTED_PROTOCOL": "the client offers no TLS version the gateway accepts (1.2+)",
    "WRONG_VERSION_NUMBER": "the client did not speak TLS",
    "HTTP_REQUEST": "plain HTTP on the TLS port: the client must use wss://, not ws://",
}


class Counted(trio.abc.Stream):
    """A TCP stream that counts what it received; a first chunk that is plain HTTP is answered
    ``400 use wss://`` and ends the stream (the TLS layer above then fails its handshake)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.received = 0
        self.plain_http = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if self.received == 0 and data[:4] in _HTTP_METHODS:
            self.plain_http = True
            self.received += len(data)
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.inner.send_all(PLAIN_HTTP_ANSWER)
            return b""
        self.received += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class CountingListener(trio.abc.Listener[trio.abc.Stream]):
    """Hands out each accepted stream as a :class:`Counted` one."""

    def __init__(self, inner: trio.abc.Listener[trio.abc.Stream]) -> None:
        self.inner = inner

    async def accept(self) -> Counted:
        return Counted(await self.inner.accept())

    async def aclose(self) -> None:
        await self.inner.aclose()


def handshake_failure(stream: trio.abc.Stream, error: BaseException | None) -> str | None:
    """Why the TLS handshake of a connection that has ended did not complete, or None (it
    completed, the client sent nothing at all, or the stream is not TLS)."""
    if not isinstance(stream, trio.SSLStream):
        return None
    counted = stream.transport_stream
    if not isinstance(counted, Counted) or counted.received == 0:
        return None
    try:
        stream.version()
        return None  # the handshake completed: whatever ended it is not a TLS matter
    except trio.NeedHandshakeError:
        pass
    if counted.plain_http:
        return _ALERTS["HTTP_REQUEST"] + " (answered 400)"
    cause = error
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLError):
        reason = str(cause.reason or "")
        return _ALERTS.get(reason, f"TLS error: {reason or cause}")
    return (
        "the client hung up during the TLS handshake (it most likely refused the certificate:"
        " does it trust its CA, and is the name it dialled in the certificate?)"
    )


class HandshakeLog:
    """Logs each failed handshake, at most once per address per ``every`` seconds."""

    def __init__(self, *, every: float = EVERY, now: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.now = now
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def ended(self, stream: trio.abc.Stream, error: BaseException | None, peer: str) -> None:
        """Call when a connection that never upgraded has ended."""
        why = handshake_failure(stream, error)
        if why is None:
            return
        now = self.now()
        last = self._last.get(peer)
        if last is not None and now - last < self.every:
            self._quiet[peer] = self._quiet.get(peer, 0) + 1
            return
        if len(self._last) >= MAX_ADDRESSES:
            self._forget(now)
        self._last[peer] = now
        quiet = self._quiet.pop(peer, 0)
        more = f" ({quiet} more from this address in the last minute)" if quiet else ""
        log.info("TLS handshake from %s failed: %s%s", peer, why, more)

    def _forget(self, now: float) -> None:
        for peer, at in list(self._last.items()):
            if now - at >= self.every:
                del self._last[peer]
                self._quiet.pop(peer, None)
        while len(self._last) >= MAX_ADDRESSES:  # all recent: forget the oldest
            peer = next(iter(self._last))
            del self._last[peer]
            self._quiet.pop(peer, None)
