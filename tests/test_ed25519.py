"""agentgate.ed25519: the process's libcrypto and ``cryptography`` sign alike, and the binding
falls back to ``cryptography`` whenever it cannot be trusted."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentgate import ed25519

# RFC 8032, section 7.1, TESTS 1-3: (secret key, public key, message, signature).
RFC8032 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]

needs_libcrypto = pytest.mark.skipif(
    ed25519._openssl() is None, reason="no libcrypto mapped in this process (not Linux?)"
)


@pytest.fixture
def fresh_backend() -> Iterator[None]:
    ed25519._backend.cache_clear()
    yield
    ed25519._backend.cache_clear()


def _backends() -> list[ed25519._Backend]:
    found: list[ed25519._Backend] = [ed25519._Cryptography()]
    openssl = ed25519._openssl()
    if openssl is not None:
        found.append(openssl)
    return found


@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032)
def test_both_backends_give_rfc8032s_answers(
    secret: str, public: str, message: str, signature: str
) -> None:
    for backend in _backends():
        key = backend.signing_key(bytes.fromhex(secret))
        assert key.public.hex() == public, backend.name
        assert key.sign(bytes.fromhex(message)).hex() == signature, backend.name
        assert backend.verify(key.public, bytes.fromhex(message), bytes.fromhex(signature))


@needs_libcrypto
def test_libcrypto_and_cryptography_sign_alike() -> None:
    openssl, reference = ed25519._openssl(), ed25519._Cryptography()
    assert openssl is not None
    for size in (0, 1, 31, 32, 64, 65, 1000, 100_000):
        seed, message = os.urandom(32), os.urandom(size)
        ours, theirs = openssl.signing_key(seed), reference.signing_key(seed)
        assert ours.public == theirs.public
        signature = ours.sign(message)
        assert signature == theirs.sign(message)  # Ed25519 is deterministic
        assert reference.verify(ours.public, message, signature)
        assert openssl.verify(ours.public, message, signature)


@pytest.mark.parametrize("backend", _backends(), ids=lambda b: b.name)
def test_verify_refuses_what_was_not_signed(backend: ed25519._Backend) -> None:
    key = backend.signing_key(os.urandom(32))
    other = backend.signing_key(os.urandom(32))
    signature = key.sign(b"checkpoint")
    assert backend.verify(key.public, b"checkpoint", signature)
    assert not backend.verify(key.public, b"checkpoinT", signature)
    assert not backend.verify(other.public, b"checkpoint", signature)
    for at in (0, 31, 32, 63):
        bad = bytearray(signature)
        bad[at] ^= 1
        assert not backend.verify(key.public, b"checkpoint", bytes(bad))
    assert not backend.verify(b"\xff" * 32, b"checkpoint", signature)


def test_module_functions_check_sizes() -> None:
    key = ed25519.signing_key(bytes(32))
    signature = key.sign(b"x")
    assert ed25519.verify(key.public, b"x", signature)
    assert not ed25519.verify(key.public[:31], b"x", signature)
    assert not ed25519.verify(key.public, b"x", signature[:63])
    assert not ed25519.verify(key.public, b"x", signature + b"\0")
    with pytest.raises(ValueError, match="32 bytes"):
        ed25519.signing_key(bytes(31))
    assert len(ed25519.new_seed()) == 32
    assert ed25519.new_seed() != ed25519.new_seed()


@needs_libcrypto
def test_libcrypto_is_used_where_mapped(fresh_backend: None) -> None:
    assert sys.platform == "linux"
    assert ed25519.backend_name() == "libcrypto"
    assert not hasattr(ed25519.signing_key(bytes(32)), "__dict__")  # one per key; kept small


def test_no_libcrypto_falls_back_to_cryptography(
    fresh_backend: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ed25519, "_mapped_libcrypto", lambda: None)
    assert ed25519.backend_name() == "cryptography"
    key = ed25519.signing_key(bytes.fromhex(RFC8032[0][0]))
    assert key.sign(b"").hex() == RFC8032[0][3]


@needs_libcrypto
def test_a_library_without_the_functions_falls_back(
    fresh_backend: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    libc = next(
        line.split()[5]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if len(line.split()) > 5 and Path(line.split()[5]).name.startswith("libc.so")
    )
    monkeypatch.setattr(ed25519, "_mapped_libcrypto", lambda: libc)
    assert ed25519._openssl() is None
    assert ed25519.backend_name() == "cryptography"


@needs_libcrypto
def test_a_binding_that_fails_the_known_answer_is_not_used(
    fresh_backend: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = bytearray(ed25519._KAT_SIGNATURE)
    wrong[5] ^= 0x20
    monkeypatch.setattr(ed25519, "_KAT_SIGNATURE", bytes(wrong))
    assert ed25519._openssl() is None
    assert ed25519.backend_name() == "cryptography"
