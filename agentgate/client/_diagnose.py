"""Why a connection to the gateway could not be made, said with what to do about it.

Both transports hand the exception that ended a failed connection to :func:`diagnose`, which
returns the :class:`ConnectionLost` an agent gets: a message that names the cause and the fix,
and ``data["reason"]`` (one of :data:`REASONS`; ``data["detail"]`` holds the TLS library's own
words where it has some) so a caller can say it its own way, as ``agentgate call`` does with
``--ca``. A certificate whose names do not include the host dialled is looked at once more, on a
second connection that does not verify it, to say which names it does hold.

Imports: errors (stdlib ssl and socket for the look at the certificate).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

from agentgate.errors import AgentgateError, ConnectionLost

__all__ = ["REASONS", "certificate_names", "diagnose", "subject_alt_names"]

REASONS: Final = (
    "tls_untrusted",  # the certificate does not chain to a trusted CA
    "tls_hostname",  # the certificate does not name the host dialled
    "tls_expired",  # or not yet valid
    "not_tls",  # wss:// to a port that does not speak TLS
    "tls_port",  # ws:// to the gateway's TLS port
    "refused",  # nothing listens there
    "dns",  # the host name does not resolve
    "timeout",  # no answer within the handshake timeout
    "rejected",  # the HTTP upgrade was refused
    "closed",  # the connection closed before the upgrade
    "unreachable",  # anything else
)

RunSync = Callable[..., Awaitable[Any]]
"""``trio.to_thread.run_sync`` or ``asyncio.to_thread``: runs the blocking look at the
certificate off the event loop."""

# OpenSSL's X509_V_ERR_* codes that have their own explanation.
_HOSTNAME_MISMATCH: Final = 62
_IP_ADDRESS_MISMATCH: Final = 64
_EXPIRED: Final = 10
_NOT_YET_VALID: Final = 9
_NOT_TLS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"}
)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the members of any exception group among them."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)


def _first(exc: BaseException, kind: type[BaseException]) -> Any:
    return next((e for e in _causes(exc) if isinstance(e, kind)), None)


async def diagnose(
    exc: BaseException,
    *,
    url: str,
    host: str,
    port: int,
    secure: bool,
    within: float,
    run_sync: RunSync,
) -> BaseException:
    """The error an agent should get for ``exc``, which ended a connection attempt.

    An :class:`AgentgateError` other than :class:`ConnectionLost` (e.g. a refused token) is
    returned as it is; everything else becomes a :class:`ConnectionLost` that says why.
    ``within`` is the handshake timeout: what a timeout message names, and the bound of the
    second look at a certificate.
    """
    if isinstance(exc, AgentgateError) and not isinstance(exc, ConnectionLost):
        return exc
    if isinstance(exc, ConnectionLost) and exc.__cause__ is None and not exc.data:
        return exc  # the SDK's own words already (e.g. a frame it cannot accept)
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    reason, message, detail = "unreachable", "", ""
    verify = _first(exc, ssl.SSLCertVerificationError)
    tls = _first(exc, ssl.SSLError)
    rejected = _rejection(exc)
    if verify is not None:
        detail = str(verify.verify_message or verify.reason or verify)
        code = verify.verify_code
        if code in (_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH):
            reason = "tls_hostname"
            try:
                names = await run_sync(certificate_names, host, port, within)
            except (OSError, ValueError):
                names = []
            held = f"for {', '.join(names)}, not {host}" if names else f"not for {host}"
            message = (
                f"the certificate is {held}: connect with a name it holds, or give the"
                f" gateway a certificate whose subjectAltName holds {host}"
            )
        elif code in (_EXPIRED, _NOT_YET_VALID):
            reason = "tls_expired"
            message = (
                f"the gateway's certificate is not valid now ({detail}): renew it on the"
                " gateway, or check this device's clock"
            )
        else:
            reason = "tls_untrusted"
            message = (
                f"certificate not trusted ({detail}): pass ca=FILE (the gateway's"
                " certificate, or the CA that signed it) or set SSL_CERT_FILE"
            )
    elif tls is not None and str(tls.reason) in _NOT_TLS and secure:
        reason, detail = "not_tls", str(tls.reason)
        message = (
            f"{where} does not speak TLS: is it the gateway's port? A gateway run with"
            " --insecure (loopback only) speaks ws://"
        )
    elif rejected is not None:
        status, body = rejected
        if b"use wss://" in body:
            reason = "tls_port"
            message = f"this is a TLS port: use wss://{where}/"
        else:
            reason = "rejected"
            text = body.decode("utf-8", "replace").strip()[:200]
            message = f"the WebSocket upgrade was refused: HTTP {status}" + (
                f" ({text})" if text else ""
            )
    elif _first(exc, socket.gaierror) is not None:
        reason = "dns"
        error = _first(exc, socket.gaierror)
        detail = str(error.strerror or error)
        message = (
            f"cannot resolve {host} ({detail}): the name must resolve on this device (DNS,"
            " /etc/hosts), or use the gateway's IP address (the certificate must hold it)"
        )
    elif _first(exc, ConnectionRefusedError) is not None:
        reason = "refused"
        message = f"nothing accepts connections on {where}: is the gateway running, on this port?"
    elif any(type(e).__name__ in ("TooSlowError", "TimeoutError") for e in _causes(exc)):
        reason = "timeout"
        message = f"no answer from {where} within {within:g} s (a firewall, or the wrong address?)"
    elif isinstance(exc, ConnectionLost) and exc.data.get("reason") == "closed":
        reason = "closed"
        if not secure:
            try:
                names = await run_sync(certificate_names, host, port, within)
            except (OSError, ValueError, ssl.SSLError):
                names = None
            if names is not None:
                reason, message = "tls_port", f"this is a TLS port: use wss://{where}/"
        message = message or f"{where} closed the connection before the WebSocket upgrade"
    else:
        leaf = next((e for e in _causes(exc) if e is not exc and not e.__cause__), exc)
        message = f"{type(leaf).__name__}: {leaf}" if str(leaf) else repr(leaf)
    data = {"reason": reason}
    if detail:
        data["detail"] = detail
    return ConnectionLost(f"cannot reach the gateway at {url}: {message}", data=data)


def _rejection(exc: BaseException) -> tuple[int, bytes] | None:
    """``(status, body)`` of a refused HTTP upgrade (trio-websocket's ``ConnectionRejected``,
    or the asyncio transport's ConnectionLost carrying them)."""
    for cause in _causes(exc):
        status = getattr(cause, "status_code", None)
        if isinstance(status, int) and type(cause).__name__ == "ConnectionRejected":
            body = getattr(cause, "body", None) or b""
            return status, bytes(body)
        if isinstance(cause, ConnectionLost) and "status" in cause.data:
            return int(cause.data["status"]), str(cause.data.get("body", "")).encode()
    return None


# --- the names a certificate holds -----------------------------------------------------------


def certificate_names(host: str, port: int, timeout: float) -> list[str]:
    """The names in the subjectAltName of the certificate served at ``host:port``, read on
    a connection that verifies nothing and sends nothing (blocking: run it in a thread)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    server_name = None if _is_ip(host) else host
    with (
        socket.create_connection((host, port), timeout=timeout) as sock,
        context.wrap_socket(sock, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    return subject_alt_names(der or b"")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_SAN_OID: Final = b"\x06\x03\x55\x1d\x11"  # 2.5.29.17, subjectAltName


def _der_item(data: bytes, at: int) -> tuple[int, int, int]:
    """``(tag, start of content, end of content)`` of the DER item at ``at``."""
    tag, length = data[at], data[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[at : at + count], "big")
        at += count
    if at + length > len(data):
        raise ValueError("truncated DER")
    return tag, at, at + length


def subject_alt_names(der: bytes) -> list[str]:
    """DNS names and IP addresses of a DER certificate's subjectAltName extension."""
    at = der.find(_SAN_OID)
    if at < 0:
        return []
    try:
        tag, start, end = _der_item(der, at + len(_SAN_OID))
        if tag == 0x01:  # "critical"
            tag, start, end = _der_item(der, end)
        if tag != 0x04:  # the extension's value: an OCTET STRING holding GeneralNames
            return []
        tag, start, end = _der_item(der, start)
        names: list[str] = []
        while start < end:
            tag, begin, stop = _der_item(der, start)
            if tag == 0x82:  # dNSName
                names.append(der[begin:stop].decode("ascii", "replace"))
            elif tag == 0x87:  # iPAddress
                names.append(str(ipaddress.ip_address(der[begin:stop])))
            start = stop
    except (IndexError, ValueError):
        return []
    return names
