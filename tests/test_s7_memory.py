"""Idle footprint of ``agentgate serve`` (bench S7): what serve imports, and shared TLS contexts.

Import checks run in a fresh interpreter (a subprocess): this test process has long since
imported everything.
"""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

import pytest
import trustme

from agentgate.config import client_ssl_context
from tests.fresh import fresh_python


def test_serve_path_leaves_other_commands_modules_unloaded() -> None:
    # What `agentgate serve` with Telegram and Home Assistant imports before it runs.
    seen = fresh_python(
        "import json, sys\n"
        "from agentgate.cli import build_parser\n"
        "build_parser().parse_args(['serve', 'gate.toml'])\n"
        "from agentgate.serve import run_serve\n"
        "from agentgate._compat import import_telegram_without_passport\n"
        "import_telegram_without_passport()\n"
        "import agentgate.services.homeassistant\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    modules = set(seen)
    unwanted = {
        "agentgate.audit",
        "agentgate.cli_agent",
        "agentgate.client",
        "agentgate.demo",
        "agentgate.demo_phone",
        "agentgate.testing",
        "cryptography",
        "getpass",
        "trustme",
    }
    assert modules & unwanted == set()
    assert {"agentgate.gateway", "agentgate.guardian.telegram", "telegram.ext"} <= modules


def test_serve_imports_httpx_without_its_command_line_client_or_http2(tmp_path: Path) -> None:
    # `agentgate serve` as run (its configuration missing: it stops after the imports).
    seen = fresh_python(
        "import json, sys\n"
        "from agentgate.cli import main\n"
        f"status = main(['serve', {str(tmp_path / 'missing.toml')!r}])\n"
        "import httpcore\n"  # as the first client does
        "print(json.dumps({'status': status, 'loaded': sorted(sys.modules)}))\n"
    )
    assert seen["status"] == 2
    loaded = set(seen["loaded"])
    assert {"httpx", "agentgate.gateway"} <= loaded
    assert loaded & {"httpx._main", "click", "pygments", "h2", "hpack"} == set()


def test_the_audit_key_loads_only_cryptographys_ed25519() -> None:
    # The gateway then opens its audit log: Ed25519 from cryptography, and no more of it than
    # that (its serialization module, and PTB's Passport ciphers, stay unloaded: memory).
    seen = fresh_python(
        "import json, sys\n"
        "from agentgate.serve import run_serve\n"
        "from agentgate._compat import import_telegram_without_passport\n"
        "import_telegram_without_passport()\n"
        "import agentgate.checkpoints\n"
        "from telegram._passport import credentials\n"
        "print(json.dumps({'passport': credentials.CRYPTO_INSTALLED,"
        " 'loaded': sorted(m for m in sys.modules if m.startswith('cryptography'))}))\n"
    )
    assert seen["passport"] is False
    loaded = set(seen["loaded"])
    assert "cryptography.hazmat.primitives.asymmetric.ed25519" in loaded
    assert "cryptography.hazmat.primitives.serialization" not in loaded
    assert "cryptography.hazmat.primitives.ciphers" not in loaded


def test_https_clients_share_one_verified_context() -> None:
    first = client_ssl_context("https://homeassistant.example:8123")
    second = client_ssl_context("https://api.telegram.org")
    assert first is second
    assert first.verify_mode == ssl.CERT_REQUIRED
    assert first.check_hostname
    assert first.cert_store_stats()["x509_ca"] > 0  # httpx's default: certifi's bundle


def test_https_context_follows_ssl_cert_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    context = client_ssl_context("https://homeassistant.local")
    assert context is client_ssl_context("HTTPS://other.local")
    assert context.cert_store_stats()["x509_ca"] == 1  # exactly that CA, as httpx would
    monkeypatch.delenv("SSL_CERT_FILE")
    assert client_ssl_context("https://homeassistant.local") is not context


def test_plain_http_context_trusts_nothing() -> None:
    # No TLS is negotiated for an http:// origin; if it ever were, it must fail closed.
    context = client_ssl_context("http://homeassistant.local:8123")
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 0
    assert context.get_ca_certs() == []


def _handshake(client_context: ssl.SSLContext, ca: trustme.CA) -> None:
    """A TLS handshake with a server holding a ``ca``-issued cert, in memory (no sockets)."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("homeassistant.local").configure_cert(server_context)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(c_in, c_out, server_hostname="homeassistant.local")
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client.version() is not None and server.version() is not None:
            return
    raise AssertionError("handshake did not finish")


def test_plain_http_context_fails_closed_on_tls() -> None:
    ca = trustme.CA()
    trusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(trusting)
    _handshake(trusting, ca)  # the harness works with a context that trusts the CA
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(client_ssl_context("http://homeassistant.local"), ca)
