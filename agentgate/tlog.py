"""The audit log's mathematics: canonical event bytes, RFC 9162 Merkle trees, checkpoint notes.

Sans-io: no file, no database, no clock, no signature library (signing is
:mod:`agentgate.auditkey`); :mod:`agentgate.store` appends with it and :mod:`agentgate.verify`
checks with it.

- **Canonical bytes** (:func:`canonical`): JSON canonicalisation per RFC 8785 (JCS): object keys
  sorted by their UTF-16 code units, no whitespace, strings with JCS's minimal escaping, numbers
  as ECMAScript prints them. Three documented departures keep it total, since agents' arguments
  are stored verbatim: integers beyond ±2^53 keep all their digits (JCS would round them to a
  double), a lone surrogate is written as a ``\\uXXXX`` escape (JCS refuses it), and a
  non-finite number is the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``. The stored bytes
  are what is hashed, so verifying never re-encodes anything.
- **Leaves and nodes** (RFC 9162 §2.1.1): a leaf hash is ``SHA-256(0x00 || bytes)``, an inner
  node ``SHA-256(0x01 || left || right)``; the tree of ``n`` leaves splits at the largest power
  of two below ``n``. The root of the empty tree is ``SHA-256("")``.
- **The frontier** of a tree of size ``n`` is the root of each perfect subtree of its binary
  decomposition, largest first (at most 64 hashes): appending a leaf and computing the root
  from it are O(log n), which is how the store keeps the tree without keeping its nodes.
- **The chain**: ``chain(n) = SHA-256(chain(n-1) || leaf(n))`` from 32 zero bytes. Unkeyed, it
  catches accidents and names the first event that changed; the signed checkpoints are what an
  attacker cannot recompute.
- **Checkpoints** are C2SP ``tlog-checkpoint`` bodies (origin, tree size, base64 root hash)
  in a C2SP ``signed-note`` (an Ed25519 signature line per key, the key named and hashed as the
  note format says), so tools that read Go's ``golang.org/x/mod/sumdb/note`` read them too.

Imports: nothing of agentgate (hashlib, base64, json).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

from attrs import frozen

__all__ = [
    "EMPTY_ROOT",
    "ZERO",
    "Canonical",
    "Checkpoint",
    "NoteError",
    "Signature",
    "append",
    "canonical",
    "chain_hash",
    "check_inclusion",
    "find_notes",
    "inclusion_path",
    "key_id",
    "leaf_hash",
    "node_hash",
    "pack",
    "parse_note",
    "parse_vkey",
    "root",
    "unpack",
    "vkey",
]

ZERO = bytes(32)  # the chain hash before the first event
EMPTY_ROOT = hashlib.sha256(b"").digest()
ED25519 = 0x01  # the signed-note signature type of Ed25519

_MAX_EXACT = 2**53


# --------------------------------------------------------------------------- canonical JSON


class Canonical(str):
    """Text that is canonical JSON already (made by :func:`canonical`): :func:`canonical`
    writes it into an enclosing value as it is, not as a string."""


def canonical(value: Any) -> bytes:
    """``value`` as RFC 8785 canonical JSON, UTF-8 (see the module docstring's departures).

    Values JSON cannot hold (a date, a path) are written as their ``str()``; tuples as arrays;
    a :class:`Canonical` text as the JSON it is.
    """
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts).encode("utf-8")


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif type(value) is Canonical:
        out.append(value)
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int):
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, dict):
        items = [(k if type(k) is str else str(k), v) for k, v in value.items()]
        # ASCII keys (nearly all) sort by code point as by UTF-16 code unit: no encoding.
        items.sort(key=_key if all(k.isascii() for k, _ in items) else _utf16_key)
        out.append("{")
        for i, (key, item) in enumerate(items):
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        out.append(_string(str(value)))


def _utf16(key: str) -> bytes:
    # Big-endian UTF-16 bytes compare as the code units do (JCS §3.2.3).
    return key.encode("utf-16-be", "surrogatepass")


def _key(item: tuple[str, Any]) -> str:
    return item[0]


def _utf16_key(item: tuple[str, Any]) -> bytes:
    return _utf16(item[0])


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_ESCAPES["\r"] = "\\r"
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\ud800-\udfff]')


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or f"\\u{ord(char):04x}"


def _string(text: str) -> str:
    if _NEEDS_ESCAPE.search(text) is None:
        return '"' + text + '"'
    return '"' + _NEEDS_ESCAPE.sub(_escape, text) + '"'


def _number(x: float) -> str:
    """ECMAScript's Number::toString (JCS §3.2.2.3), from Python's shortest round-trip digits."""
    if not math.isfinite(x):
        return _string("NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity"))
    if x == 0:
        return "0"
    text = repr(x)
    if "e" not in text:
        # Python writes 1e-4 <= |x| < 1e16 positionally, with the same shortest round-trip
        # digits ECMAScript uses, whose positional range (1e-7 .. 1e21) holds it: only the
        # ".0" of an integral value differs.
        return text[:-2] if text.endswith(".0") else text
    sign, digit_tuple, exponent = Decimal(text).as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple)).rstrip("0") or "0"
    exponent += len("".join(map(str, digit_tuple))) - len(digits)
    k = len(digits)
    n = exponent + k  # x = 0.DIGITS * 10**n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
        text = f"{mantissa}e{'+' if n - 1 >= 0 else '-'}{abs(n - 1)}"
    return ("-" if sign else "") + text


def exact_int(value: int) -> bool:
    """Whether JCS itself would keep this integer exactly (it is within ±2^53)."""
    return -_MAX_EXACT <= value <= _MAX_EXACT


# --------------------------------------------------------------------------- hashes


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def chain_hash(previous: bytes, leaf: bytes) -> bytes:
    return hashlib.sha256(previous + leaf).digest()


def append(frontier: Sequence[bytes], size: int, leaf: bytes) -> list[bytes]:
    """The frontier of the tree of ``size + 1`` leaves, from that of ``size`` leaves."""
    merged = list(frontier)
    node = leaf
    while size & 1:  # each trailing one bit of size: two perfect subtrees become one
        node = node_hash(merged.pop(), node)
        size >>= 1
    merged.append(node)
    return merged


def root(frontier: Sequence[bytes]) -> bytes:
    """The RFC 9162 root hash of the tree whose frontier this is."""
    if not frontier:
        return EMPTY_ROOT
    node = frontier[-1]
    for left in reversed(frontier[:-1]):
        node = node_hash(left, node)
    return node


def pack(frontier: Sequence[bytes]) -> bytes:
    return b"".join(frontier)


def unpack(blob: bytes) -> list[bytes]:
    if len(blob) % 32:
        raise ValueError(f"a frontier is whole 32-byte hashes, not {len(blob)} bytes")
    return [blob[i : i + 32] for i in range(0, len(blob), 32)]


def frontier_ranges(size: int) -> list[tuple[int, int]]:
    """The leaf ranges ``[start, end)`` of a frontier's subtrees, largest first."""
    ranges = []
    start = 0
    for bit in reversed(range(size.bit_length())):
        if size >> bit & 1:
            ranges.append((start, start + (1 << bit)))
            start += 1 << bit
    return ranges


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1): where RFC 9162 splits a tree."""
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_path(index: int, size: int, subtree: Callable[[int, int], bytes]) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of ``size`` leaves (RFC 9162 §2.1.3.1),
    bottom first; ``subtree(start, end)`` is the root hash of the leaves ``[start, end)``."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size}")
    path: list[bytes] = []
    start, end = 0, size
    siblings: list[tuple[int, int]] = []
    while end - start > 1:
        k = _split(end - start)
        if index - start < k:
            siblings.append((start + k, end))
            end = start + k
        else:
            siblings.append((start, start + k))
            start += k
    for lo, hi in reversed(siblings):
        path.append(subtree(lo, hi))
    return path


def check_inclusion(
    index: int, size: int, leaf: bytes, path: Sequence[bytes], expected_root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: whether ``path`` proves leaf ``index`` in the tree of ``size`` leaves
    whose root is ``expected_root``."""
    if not 0 <= index < size:
        return False
    fn, sn, node = index, size - 1, leaf
    for sibling in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            node = node_hash(sibling, node)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            node = node_hash(node, sibling)
        fn >>= 1
        sn >>= 1
    return sn == 0 and node == expected_root


def subtree_root(leaves: Iterable[bytes]) -> bytes:
    """The root of the tree of ``leaves`` (leaf hashes, in order)."""
    frontier: list[bytes] = []
    for size, leaf in enumerate(leaves):
        frontier = append(frontier, size, leaf)
    return root(frontier)


# --------------------------------------------------------------------------- checkpoints


class NoteError(ValueError):
    """Text that is not a checkpoint note (the message says what is wrong)."""


def key_id(name: str, public_key: bytes) -> bytes:
    """The signed-note key hash: the first 4 bytes of SHA-256(name || "\\n" || 0x01 || key)."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public_key).digest()[:4]


def vkey(name: str, public_key: bytes) -> str:
    """The signed-note verifier key: ``NAME+HASH+BASE64(0x01 || key)``."""
    encoded = base64.b64encode(bytes([ED25519]) + public_key).decode()
    return f"{name}+{key_id(name, public_key).hex()}+{encoded}"


def parse_vkey(text: str) -> tuple[str, bytes]:
    """``(name, public key)`` of a verifier key; NoteError if it is not one (or not Ed25519)."""
    parts = text.strip().split("+", 2)  # the key's base64 may hold "+" itself
    if len(parts) != 3 or not parts[0]:
        raise NoteError("a verifier key reads NAME+HASH+KEY")
    name, hash_hex, encoded = parts
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise NoteError("the verifier key's key is not base64") from None
    if len(raw) != 33 or raw[0] != ED25519:
        raise NoteError("the verifier key is not an Ed25519 key")
    public_key = raw[1:]
    if key_id(name, public_key).hex() != hash_hex.lower():
        raise NoteError("the verifier key's hash does not match its name and key")
    return name, public_key


@frozen
class Signature:
    name: str
    key_hash: bytes  # 4 bytes
    signature: bytes  # 64 bytes for Ed25519


@frozen
class Checkpoint:
    """A checkpoint note: its signed body (``origin``, ``size``, ``root``) and signatures."""

    origin: str
    size: int
    root: bytes
    signatures: tuple[Signature, ...] = ()

    @property
    def body(self) -> bytes:
        """The signed text: origin, size and base64 root, one a line."""
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n".encode()

    def text(self) -> str:
        """The whole note: body, a blank line, one ``— NAME BASE64`` line per signature."""
        lines = [
            f"— {s.name} {base64.b64encode(s.key_hash + s.signature).decode()}\n"
            for s in self.signatures
        ]
        return self.body.decode() + "\n" + "".join(lines)

    def signed(self, name: str, public_key: bytes, signature: bytes) -> Checkpoint:
        sig = Signature(name, key_id(name, public_key), signature)
        return Checkpoint(self.origin, self.size, self.root, (*self.signatures, sig))

    def short(self) -> str:
        return f"{self.size} events, root {base64.b64encode(self.root).decode()[:12]}…"


_ORIGIN = re.compile(r"^[^\s+]{1,255}$")
_SIZE = re.compile(r"^(0|[1-9][0-9]{0,18})$")
_ROOT = re.compile(r"^[A-Za-z0-9+/]{43}=$")
_SIG = re.compile(r"^— (\S+) ([A-Za-z0-9+/]+={0,2})$")


def parse_note(text: str) -> Checkpoint:
    """One checkpoint note (NoteError says what is wrong). Text around it is not allowed;
    :func:`find_notes` finds notes inside longer text (a chat message, a witness file)."""
    lines = text.replace("\r\n", "\n").split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    try:
        blank = lines.index("")
    except ValueError:
        raise NoteError("no blank line between the checkpoint and its signatures") from None
    body, signature_lines = lines[:blank], lines[blank + 1 :]
    if len(body) < 3:
        raise NoteError("a checkpoint has an origin, a tree size and a root hash, one a line")
    origin, size, root_b64 = body[:3]
    if not _ORIGIN.match(origin):
        raise NoteError(f"not a log origin: {origin[:60]!r}")
    if not _SIZE.match(size):
        raise NoteError(f"not a tree size: {size[:60]!r}")
    if not _ROOT.match(root_b64):
        raise NoteError(f"not a base64 SHA-256 root hash: {root_b64[:60]!r}")
    if len(body) > 3:  # extension lines: agentgate writes none, and signs none it reads
        raise NoteError("the checkpoint has extension lines agentgate does not know")
    signatures = []
    for line in signature_lines:
        match = _SIG.match(line)
        if match is None:
            raise NoteError(f"not a signature line: {line[:60]!r}")
        raw = base64.b64decode(match.group(2))
        if len(raw) < 5:
            raise NoteError("a signature too short to hold a key hash")
        signatures.append(Signature(match.group(1), raw[:4], raw[4:]))
    if not signatures:
        raise NoteError("the checkpoint is not signed")
    return Checkpoint(origin, int(size), base64.b64decode(root_b64), tuple(signatures))


def find_notes(text: str) -> list[Checkpoint | NoteError]:
    """Every checkpoint note in ``text`` (a pasted chat message, a witness file), in order;
    a passage that looks like a note but is not one is a :class:`NoteError` in its place."""
    lines = text.replace("\r\n", "\n").split("\n")
    found: list[Checkpoint | NoteError] = []
    i = 0
    while i < len(lines):
        # A note starts three lines before its blank line, where a size and a root follow.
        if (
            i + 3 < len(lines)
            and _SIZE.match(lines[i + 1].strip())
            and _ROOT.match(lines[i + 2].strip())
            and lines[i + 3].strip() == ""
        ):
            end = i + 4
            while end < len(lines) and lines[end].strip().startswith("— "):
                end += 1
            origin = lines[i].strip().split()[-1] if lines[i].strip() else ""
            block = [origin, *(line.strip() for line in lines[i + 1 : end])]
            try:
                found.append(parse_note("\n".join(block) + "\n"))
            except NoteError as exc:
                found.append(exc)
            i = end
        else:
            i += 1
    return found


def event_json(body: bytes) -> dict[str, Any]:
    """An event's stored bytes as a dict (ValueError if they are not a JSON object)."""
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("an event is a JSON object")
    return value
