"""The audit log's signing key: an Ed25519 key in a file beside the store, and signatures.

The key file is PKCS#8 PEM (``openssl pkey -in FILE -pubout`` reads it), created at the
gateway's first start with mode 0600 and never overwritten: a key file that is missing or not
the one the log names makes the gateway refuse to start rather than sign with another key.

This is the one module that imports ``cryptography`` (its Ed25519); the gateway imports it when
it opens the audit log, the command line only for ``audit key`` and ``audit verify``. The cost
in memory is in docs/performance.md.

Imports: tlog.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agentgate import tlog

__all__ = ["AuditKey", "KeyFileError", "create_key", "load_key", "verify_signature"]


class KeyFileError(Exception):
    """The key file cannot be used; the message names the file and why."""


class AuditKey:
    """A loaded signing key. ``public`` is the raw 32-byte Ed25519 public key."""

    def __init__(self, private: Ed25519PrivateKey, path: Path) -> None:
        self._private = private
        self.path = path
        self.public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

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
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
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
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM private key without a password ({exc})") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
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
