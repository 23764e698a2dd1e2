"""Ed25519 signatures for the audit log: OpenSSL's, through the libcrypto already in the process.

Python's ``ssl`` and ``hashlib`` modules link OpenSSL's libcrypto, which has signed Ed25519 since
1.1.1. Where this process has it mapped (Linux: ``/proc/self/maps``), keys and signatures go
through its public EVP interface (``EVP_PKEY_new_raw_private_key``, ``EVP_DigestSign``, ...)
with :mod:`ctypes`: the library is in memory already, so this costs the gateway nothing, where
``cryptography``'s own copy of OpenSSL (a 15 MB extension) costs it about 8 MiB of resident
memory (docs/performance.md, S7). Before the first use, the binding must reproduce RFC 8032's
first test vector (public key, signature, and a verification that fails on a changed byte);
otherwise, and where no libcrypto is mapped (macOS, a Python with OpenSSL linked in statically,
OpenSSL older than 1.1.1), ``cryptography`` does the same work. Ed25519 signatures are
deterministic: both give the same bytes for the same key and message (tests/test_ed25519.py).

Imports: nothing of agentgate.
"""

from __future__ import annotations

import ctypes
import functools
import os
import ssl  # noqa: F401  (loads _ssl, and with it the libcrypto looked for below)
import weakref
from pathlib import Path
from typing import Final, Protocol

__all__ = ["SigningKey", "backend_name", "new_seed", "signing_key", "verify"]

SEED_SIZE: Final = 32
_SIGNATURE_SIZE: Final = 64
_EVP_PKEY_ED25519: Final = 1087  # NID_ED25519 in OpenSSL's obj_mac.h
_OPENSSL_1_1_1: Final = 0x10101000

# RFC 8032, section 7.1, TEST 1: the empty message.
_KAT_SEED: Final = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
_KAT_PUBLIC: Final = bytes.fromhex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
)
_KAT_SIGNATURE: Final = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


class SigningKey(Protocol):
    """A private key: ``public`` is its raw 32-byte public key."""

    public: bytes

    def sign(self, message: bytes) -> bytes: ...


class _Backend(Protocol):
    name: str

    def signing_key(self, seed: bytes) -> SigningKey: ...

    def verify(self, public: bytes, message: bytes, signature: bytes) -> bool: ...


def new_seed() -> bytes:
    """A new private key's 32 random bytes (RFC 8032: the key *is* 32 random bytes)."""
    return os.urandom(SEED_SIZE)


def signing_key(seed: bytes) -> SigningKey:
    """The key whose 32-byte seed is ``seed`` (ValueError if it is not 32 bytes)."""
    if len(seed) != SEED_SIZE:
        raise ValueError(f"an Ed25519 key is {SEED_SIZE} bytes, not {len(seed)}")
    return _backend().signing_key(seed)


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``message`` by ``public``."""
    if len(public) != SEED_SIZE or len(signature) != _SIGNATURE_SIZE:
        return False
    return _backend().verify(public, message, signature)


def backend_name() -> str:
    """``"libcrypto"`` (the process's OpenSSL) or ``"cryptography"``: which one signs here."""
    return _backend().name


@functools.cache
def _backend() -> _Backend:
    return _openssl() or _Cryptography()


# --- the process's libcrypto ---------------------------------------------------------------


def _mapped_libcrypto() -> str | None:
    """The path of the libcrypto this process has mapped (``ssl`` loads it), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[5:]
                if path and Path(path[0].strip()).name.startswith("libcrypto.so"):
                    return path[0].strip()
    except OSError:
        return None
    return None


class _OpenSSL:
    name = "libcrypto"

    def __init__(self, lib: ctypes.CDLL) -> None:
        ptr, size, buf, status = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_int
        size_p = ctypes.POINTER(ctypes.c_size_t)
        prototypes: dict[str, tuple[list[type], type | None]] = {
            "EVP_PKEY_new_raw_private_key": ([status, ptr, buf, size], ptr),
            "EVP_PKEY_new_raw_public_key": ([status, ptr, buf, size], ptr),
            "EVP_PKEY_get_raw_public_key": ([ptr, buf, size_p], status),
            "EVP_PKEY_free": ([ptr], None),
            "EVP_MD_CTX_new": ([], ptr),
            "EVP_MD_CTX_free": ([ptr], None),
            "EVP_DigestSignInit": ([ptr, ptr, ptr, ptr, ptr], status),
            "EVP_DigestSign": ([ptr, buf, size_p, buf, size], status),
            "EVP_DigestVerifyInit": ([ptr, ptr, ptr, ptr, ptr], status),
            "EVP_DigestVerify": ([ptr, buf, size, buf, size], status),
            "ERR_clear_error": ([], None),
        }
        for name, (argtypes, restype) in prototypes.items():
            function = getattr(lib, name)  # AttributeError: not this OpenSSL
            function.argtypes = argtypes
            function.restype = restype
        self.lib = lib

    def _pkey(self, public: bool, raw: bytes) -> int:
        new = (
            self.lib.EVP_PKEY_new_raw_public_key
            if public
            else self.lib.EVP_PKEY_new_raw_private_key
        )
        pkey: int | None = new(_EVP_PKEY_ED25519, None, raw, len(raw))
        if not pkey:
            self.lib.ERR_clear_error()
            raise ValueError("OpenSSL refused the Ed25519 key")
        return pkey

    def signing_key(self, seed: bytes) -> SigningKey:
        return _OpenSSLKey(self, self._pkey(False, seed))

    def sign(self, pkey: int, message: bytes) -> bytes:
        lib = self.lib
        ctx = lib.EVP_MD_CTX_new()
        if not ctx:
            raise MemoryError("OpenSSL: EVP_MD_CTX_new failed")
        try:
            out = ctypes.create_string_buffer(_SIGNATURE_SIZE)
            length = ctypes.c_size_t(_SIGNATURE_SIZE)
            if (
                lib.EVP_DigestSignInit(ctx, None, None, None, pkey) != 1
                or lib.EVP_DigestSign(ctx, out, ctypes.byref(length), message, len(message)) != 1
                or length.value != _SIGNATURE_SIZE
            ):
                lib.ERR_clear_error()
                raise RuntimeError("OpenSSL could not sign with the Ed25519 key")
            return out.raw
        finally:
            lib.EVP_MD_CTX_free(ctx)

    def public_of(self, pkey: int) -> bytes:
        out = ctypes.create_string_buffer(SEED_SIZE)
        length = ctypes.c_size_t(SEED_SIZE)
        if (
            self.lib.EVP_PKEY_get_raw_public_key(pkey, out, ctypes.byref(length)) != 1
            or length.value != SEED_SIZE
        ):
            self.lib.ERR_clear_error()
            raise RuntimeError("OpenSSL could not give the Ed25519 public key")
        return out.raw

    def verify(self, public: bytes, message: bytes, signature: bytes) -> bool:
        lib = self.lib
        try:
            pkey = self._pkey(True, public)
        except ValueError:
            return False
        ctx = lib.EVP_MD_CTX_new()
        try:
            if not ctx:
                raise MemoryError("OpenSSL: EVP_MD_CTX_new failed")
            ok: bool = (
                lib.EVP_DigestVerifyInit(ctx, None, None, None, pkey) == 1
                and lib.EVP_DigestVerify(ctx, signature, len(signature), message, len(message)) == 1
            )
            if not ok:
                lib.ERR_clear_error()
            return ok
        finally:
            lib.EVP_MD_CTX_free(ctx)
            lib.EVP_PKEY_free(pkey)


class _OpenSSLKey:
    __slots__ = ("__weakref__", "_openssl", "_pkey", "public")

    def __init__(self, openssl: _OpenSSL, pkey: int) -> None:
        # Freed with this object, whatever path drops it.
        weakref.finalize(self, openssl.lib.EVP_PKEY_free, pkey)
        self._openssl = openssl
        self._pkey = pkey
        self.public = openssl.public_of(pkey)

    def sign(self, message: bytes) -> bytes:
        return self._openssl.sign(self._pkey, message)


def _openssl() -> _OpenSSL | None:
    """The binding to the mapped libcrypto, once it passed the known answers; or None."""
    path = _mapped_libcrypto()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)  # already loaded: dlopen only counts another reference
        version = lib.OpenSSL_version_num
        version.argtypes = []
        version.restype = ctypes.c_ulong
        if version() < _OPENSSL_1_1_1:
            return None
        openssl = _OpenSSL(lib)
        key = openssl.signing_key(_KAT_SEED)
        known = (
            key.public == _KAT_PUBLIC
            and key.sign(b"") == _KAT_SIGNATURE
            and openssl.verify(_KAT_PUBLIC, b"", _KAT_SIGNATURE)
            and not openssl.verify(_KAT_PUBLIC, b"\0", _KAT_SIGNATURE)
        )
    except (AttributeError, OSError, ValueError, RuntimeError, MemoryError):
        return None
    return openssl if known else None


# --- cryptography --------------------------------------------------------------------------


class _Cryptography:
    name = "cryptography"

    def __init__(self) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric import ed25519

        self._ed25519 = ed25519
        self._invalid = InvalidSignature

    def signing_key(self, seed: bytes) -> SigningKey:
        return _CryptographyKey(self._ed25519.Ed25519PrivateKey.from_private_bytes(seed))

    def verify(self, public: bytes, message: bytes, signature: bytes) -> bool:
        try:
            self._ed25519.Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        except (self._invalid, ValueError):
            return False
        return True


class _CryptographyKey:
    __slots__ = ("_private", "public")

    def __init__(self, private: object) -> None:
        self._private = private
        self.public = private.public_key().public_bytes_raw()  # type: ignore[attr-defined]

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)  # type: ignore[attr-defined,no-any-return]
