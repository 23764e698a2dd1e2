"""The audit log's signing key: an Ed25519 key in a file beside the store, and signatures.

The key file is PKCS#8 PEM (``openssl pkey -in FILE -pubout`` reads it), created at the
gateway's first start with mode 0600 and never overwritten: a key file that is missing or not
the one the log names makes the gateway refuse to start rather than sign with another key.

This is the one module that imports ``cryptography``, and only its Ed25519: the gateway imports
it when it opens the audit log, the command line only for ``audit key`` and ``audit verify``.
The key file's PEM is read and written here rather than by ``cryptography``'s serialization
module, which would cost the gateway another ~1.2 MiB of resident memory for one fixed
48-byte structure (docs/performance.md, S7).

Imports: tlog.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agentgate import tlog

__all__ = ["AuditKey", "KeyFileError", "create_key", "load_key", "verify_signature"]


class KeyFileError(Exception):
    """The key file cannot be used; the message names the file and why."""


# An Ed25519 private key as PKCS#8 (RFC 8410): this DER prefix, then the 32-byte seed. It is the
# whole of what ``openssl genpkey -algorithm ed25519`` and cryptography's PKCS8 writer produce.
_PKCS8_PREFIX: Final = bytes.fromhex("302e020100300506032b657004220420")
_PEM_BEGIN: Final = "-----BEGIN PRIVATE KEY-----"
_PEM_END: Final = "-----END PRIVATE KEY-----"


def _pem(seed: bytes) -> bytes:
    body = base64.encodebytes(_PKCS8_PREFIX + seed).decode("ascii")
    return f"{_PEM_BEGIN}\n{body}{_PEM_END}\n".encode("ascii")


def _seed(data: bytes) -> bytes:
    """The 32-byte seed of a PEM PKCS#8 Ed25519 key; ValueError saying why not."""
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError("not a PEM file") from None
    if "ENCRYPTED" in text:
        raise ValueError("the key is encrypted; agentgate needs it without a password")
    if not (text.startswith(_PEM_BEGIN) and text.endswith(_PEM_END)):
        raise ValueError(f"not a PEM private key ({_PEM_BEGIN} ... {_PEM_END})")
    try:
        der = binascii.a2b_base64(text[len(_PEM_BEGIN) : -len(_PEM_END)], strict_mode=False)
    except binascii.Error as exc:
        raise ValueError(f"its base64 is damaged ({exc})") from None
    if len(der) != len(_PKCS8_PREFIX) + 32 or not der.startswith(_PKCS8_PREFIX):
        raise ValueError(
            "not an Ed25519 key (PKCS#8, as openssl genpkey -algorithm ed25519 writes)"
        )
    return der[len(_PKCS8_PREFIX) :]


class AuditKey:
    """A loaded signing key. ``public`` is the raw 32-byte Ed25519 public key."""

    def __init__(self, private: Ed25519PrivateKey, path: Path) -> None:
        self._private = private
        self.path = path
        self.public = private.public_key().public_bytes_raw()

    def vkey(self, name: str) -> str:
        """The verifier key under ``name`` (the log's origin): ``NAME+HASH+KEY``."""
        return tlog.vkey(name, self.public)

    def sign(self, checkpoint: tlog.Checkpoint, name: str) -> tlog.Checkpoint:
        """``checkpoint`` with this key's signature under ``name`` added."""
        return checkpoint.signed(name, self.public, self._private.sign(checkpoint.body))


def create_key(path: Path) -> AuditKey:
    """Make a new key file at ``path`` (mode 0600, its directory created); never replaces one
    (FileExistsError)."""
    private = Ed25519PrivateKey.generate()
    pem = _pem(private.private_bytes_raw())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return AuditKey(private, path)


def load_key(path: Path) -> AuditKey:
    """The key in ``path`` (made private, 0600, if it was readable by others)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no audit key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the audit key: {exc.strerror}") from exc
    try:
        private = Ed25519PrivateKey.from_private_bytes(_seed(data))
    except ValueError as exc:
        raise KeyFileError(f"{path}: cannot be the audit key: {exc}") from exc
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return AuditKey(private, path)


def verify_signature(public_key: bytes, body: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature of ``body``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, body)
    except (InvalidSignature, ValueError):
        return False
    return True
