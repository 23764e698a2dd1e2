"""TLS mistakes explained on both sides: what the agent is told, what the gateway logs.

A real gateway over TLS whose certificate holds ``gate.example`` and ``localhost`` (not
127.0.0.1), a second one run ``--insecure``; the SDK under Trio and under asyncio (in a worker
thread with its own loop), ``agentgate call`` in a subprocess, and raw sockets for the server's
side.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from agentgate.client import ConnectionLost, connect
from agentgate.client._diagnose import certificate_names, subject_alt_names
from agentgate.handshakes import PLAIN_HTTP_ANSWER, HandshakeLog
from agentgate.testing.harness import Harness, running_gateway

pytestmark = pytest.mark.slow

CEILING = 30
HANDSHAKE = 8.0  # the SDK's handshake timeout here: every answer below must come well before


@pytest.fixture
async def gate(tmp_path: Path) -> AsyncIterator[Harness]:
    workdir = tmp_path / "gate"
    workdir.mkdir()
    ca = trustme.CA()
    cert = ca.issue_cert("gate.example", "localhost")
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(workdir / "gate.crt"))
    cert.private_key_pem.write_to_path(str(workdir / "gate.key"))
    async with running_gateway(workdir, home=None) as gw:
        yield gw


@pytest.fixture
async def plain(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_gateway(tmp_path / "plain", home=None, tls=False) as gw:
        yield gw


def _cases(gw: Harness, plain: Harness) -> dict[str, tuple[str, Path | None]]:
    port = gw.running.port
    return {
        "untrusted": (f"wss://localhost:{port}/", None),
        "hostname": (f"wss://127.0.0.1:{port}/", gw.ca_path),
        "tls_port": (f"ws://127.0.0.1:{port}/", None),
        "not_tls": (f"wss://127.0.0.1:{plain.running.port}/", None),
        "refused": ("wss://127.0.0.1:1/", None),
    }


EXPECTED = {
    "untrusted": (
        "tls_untrusted",
        "certificate not trusted (unable to get local issuer certificate): pass ca=FILE",
    ),
    "hostname": ("tls_hostname", "the certificate is for gate.example, localhost, not 127.0.0.1"),
    "tls_port": ("tls_port", "this is a TLS port: use wss://127.0.0.1:"),
    "not_tls": ("not_tls", "does not speak TLS"),
    "refused": ("refused", "nothing accepts connections on 127.0.0.1:1"),
}


async def _attempt(url: str, token: str, ca: Path | None) -> ConnectionLost:
    with pytest.raises(ConnectionLost) as info:
        async with connect(url, token=token, ca=ca, reconnect=False, handshake_timeout=HANDSHAKE):
            pass
    return info.value


@pytest.mark.parametrize("case", list(EXPECTED))
async def test_sdk_says_what_is_wrong_under_trio(gate: Harness, plain: Harness, case: str) -> None:
    url, ca = _cases(gate, plain)[case]
    with trio.fail_after(HANDSHAKE / 2):  # explained at once, never by the handshake timeout
        error = await _attempt(url, gate.tokens["pi"], ca)
    reason, text = EXPECTED[case]
    assert error.data["reason"] == reason
    assert text in error.message
    assert error.message.startswith(f"cannot reach the gateway at {url}: ")


@pytest.mark.parametrize("case", list(EXPECTED))
async def test_sdk_says_what_is_wrong_under_asyncio(
    gate: Harness, plain: Harness, case: str
) -> None:
    url, ca = _cases(gate, plain)[case]

    def run() -> ConnectionLost:
        return asyncio.run(_attempt(url, gate.tokens["pi"], ca))

    with trio.fail_after(HANDSHAKE / 2):
        error = await trio.to_thread.run_sync(run)
    reason, text = EXPECTED[case]
    assert error.data["reason"] == reason
    assert text in error.message


async def test_cli_says_pass_ca(gate: Harness) -> None:
    """``agentgate call`` in a subprocess: exit 3, one line with the CLI's own flag."""
    argv = [str(Path(sys.executable).parent / "agentgate"), "call", "ha_get_states"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTGATE_", "SSL_CERT"))}
    env["AGENTGATE_TOKEN"] = gate.tokens["pi"]
    port = gate.running.port
    expected = {
        f"wss://localhost:{port}/": "connection failed: cannot reach the gateway at"
        f" wss://localhost:{port}/: certificate not trusted (unable to get local issuer"
        " certificate): pass --ca FILE (the gateway's certificate, or the CA that signed it)"
        " or set SSL_CERT_FILE",
        f"ws://127.0.0.1:{port}/": "this is a TLS port: use wss://127.0.0.1:",
    }
    for url, needle in expected.items():
        with trio.fail_after(CEILING):
            proc = await trio.run_process(
                [*argv, "--url", url],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        err = proc.stderr.decode()
        assert proc.returncode == 3, err
        (line,) = err.splitlines()
        assert needle in line


# --- the gateway's side -------------------------------------------------------------------------


async def _tls_client_hangs_up(port: int) -> None:
    """A TLS client that refuses the certificate and leaves, as Python's ``ssl`` under Trio
    does (no alert reaches the server)."""
    with pytest.raises(ConnectionLost):
        async with connect(f"wss://localhost:{port}/", token="x" * 20, reconnect=False):
            pass


class _Seen(logging.Handler):
    """Sets an event when a record containing ``needle`` is logged (in the Trio thread)."""

    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle
        self.event = trio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.needle in message:
            self.messages.append(message)
            self.event.set()


async def test_gateway_logs_a_failed_handshake_with_its_reason(
    gate: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    seen = _Seen("TLS handshake")
    logger = logging.getLogger("agentgate.listener")
    logger.addHandler(seen)
    try:
        with caplog.at_level(logging.INFO, logger="agentgate"), trio.fail_after(CEILING):
            # A port check that sends nothing is not a failed handshake...
            with socket.create_connection(("127.0.0.1", gate.running.port)):
                pass
            # ...a client that refuses the certificate is.
            await _tls_client_hangs_up(gate.running.port)
            await seen.event.wait()
    finally:
        logger.removeHandler(seen)
    assert seen.messages == [
        "TLS handshake from 127.0.0.1 failed: the client hung up during the TLS handshake (it"
        " most likely refused the certificate: does it trust its CA, and is the name it dialled"
        " in the certificate?)"
    ]


async def test_plain_http_on_the_tls_port_is_answered_use_wss(gate: Harness) -> None:
    with trio.fail_after(CEILING):
        stream = await trio.open_tcp_stream("127.0.0.1", gate.running.port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
    assert answer == PLAIN_HTTP_ANSWER
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.endswith(b"use wss://, not ws://\n")


class _Stream:
    """Just enough of an SSLStream over a Counted stream for :class:`HandshakeLog`."""


def test_handshake_log_is_bounded_in_time_and_size(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from agentgate import handshakes

    clock = [1000.0]
    book = HandshakeLog(now=lambda: clock[0])
    monkeypatch.setattr(handshakes, "handshake_failure", lambda stream, error: "a reason")
    monkeypatch.setattr(handshakes, "MAX_ADDRESSES", 3)
    stream: Any = _Stream()
    with caplog.at_level(logging.INFO, logger="agentgate"):
        book.ended(stream, None, "10.0.0.1")
        book.ended(stream, None, "10.0.0.1")
        book.ended(stream, None, "10.0.0.1")
        clock[0] += 60
        book.ended(stream, None, "10.0.0.1")
        for n in range(2, 10):
            book.ended(stream, None, f"10.0.0.{n}")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == [
        "TLS handshake from 10.0.0.1 failed: a reason",
        "TLS handshake from 10.0.0.1 failed: a reason (2 more from this address in the last"
        " minute)",
    ]
    assert len(messages) == 10
    assert len(book._last) <= 3


# --- the names a certificate holds --------------------------------------------------------------


def test_subject_alt_names_from_der(tmp_path: Path) -> None:
    cert = trustme.CA().issue_cert("gate.example", "localhost", "127.0.0.1", "::1")
    pem = cert.cert_chain_pems[0].bytes().decode()
    der = ssl.PEM_cert_to_DER_cert(pem)
    assert subject_alt_names(der) == ["gate.example", "localhost", "127.0.0.1", "::1"]
    assert subject_alt_names(b"") == []
    assert subject_alt_names(der[:-200]) == [] or subject_alt_names(der[:-200])  # never raises


async def test_certificate_names_reads_them_without_trusting(gate: Harness) -> None:
    with trio.fail_after(CEILING):
        names = await trio.to_thread.run_sync(
            certificate_names, "127.0.0.1", gate.running.port, 5.0
        )
    assert names == ["gate.example", "localhost"]
