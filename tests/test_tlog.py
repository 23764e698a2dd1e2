"""The audit log's mathematics against the published references: RFC 8785's number vectors and
key order, RFC 6962/9162's Merkle roots and inclusion proofs (Certificate Transparency's test
vectors), and the C2SP signed-note format."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentgate import tlog
from agentgate.auditkey import KeyFileError, create_key, load_key, verify_signature

# RFC 8785 Appendix B: IEEE 754 bit patterns and their ECMAScript text.
JCS_NUMBERS = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "text"), JCS_NUMBERS)
def test_numbers_are_written_as_rfc_8785_says(bits: str, text: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert tlog.canonical(value) == text.encode()


def test_keys_sort_by_utf16_code_units_and_strings_escape_minimally() -> None:
    # RFC 8785 §3.2.3's example: code units, not code points (the emoji sorts before U+FB33).
    value = {
        "\u20ac": 1,
        "\r": 2,
        "\ufb33": 3,
        "1": 4,
        "\U0001f600": 5,
        "\u0080": 6,
        "\u00f6": 7,
    }
    text = tlog.canonical(value).decode()
    order = list(json.loads(text))
    assert order == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert tlog.canonical({"a": 'q"\\\b\f\n\r\t\x01\x7f€'}) == (
        '{"a":"q\\"\\\\\\b\\f\\n\\r\\t\\u0001\x7f€"}'.encode()
    )
    assert tlog.canonical([True, False, None, 1, 1.5, "x"]) == b'[true,false,null,1,1.5,"x"]'


def test_what_jcs_cannot_hold_is_written_deterministically() -> None:
    assert tlog.canonical(2**64) == b"18446744073709551616"  # every digit kept
    assert tlog.canonical(float("nan")) == b'"NaN"'
    assert tlog.canonical(float("-inf")) == b'"-Infinity"'
    assert tlog.canonical("\ud800x") == b'"\\ud800x"'  # a lone surrogate, escaped
    assert tlog.canonical({"when": (1, 2)}) == b'{"when":[1,2]}'


def _ecmascript(x: float) -> str:
    """Number::toString from its definition (ECMA-262 §6.1.6.1.20), for finite non-zero x:
    the shortest digits that round-trip (Python's repr finds them), then the layout."""
    _, digit_tuple, exponent = Decimal(repr(abs(x))).as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    n = exponent + len("".join(map(str, digit_tuple)))
    k = len(digits)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        text = (
            digits if k == 1 else digits[0] + "." + digits[1:]
        ) + f"e{'+' if e >= 0 else '-'}{abs(e)}"
    return ("-" if x < 0 else "") + text


@given(
    st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(min_value=1e-8, max_value=1e22)
    | st.integers(-(2**60), 2**60).map(float)
    | st.sampled_from([1e-7, 1e-6, 1e-5, 1e-4, 9.999e-5, 1e15, 1e16, 1e21, 1e20, 123e18, 0.5])
)
def test_every_number_is_written_as_ecmascript_would(x: float) -> None:
    expected = "0" if x == 0 else _ecmascript(x)
    assert tlog.canonical(x) == expected.encode()
    assert tlog.canonical(-x) == ("0" if x == 0 else _ecmascript(-x)).encode()


@given(st.dictionaries(st.text(), st.integers(), max_size=8))
def test_keys_sort_by_utf16_code_units_whatever_they_hold(value: dict[str, int]) -> None:
    order = list(json.loads(tlog.canonical(value)))
    assert order == sorted(value, key=lambda k: k.encode("utf-16-be", "surrogatepass"))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_canonical_text_is_stable_through_a_parse(value: object) -> None:
    # audit_log holds canonical text; replaying the events parses and writes it again.
    once = tlog.canonical(value)
    assert tlog.canonical(json.loads(once)) == once


# Certificate Transparency's test vectors (RFC 6962 = RFC 9162 §2.1 hashing).
CT_INPUTS = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
CT_LEAVES = [tlog.leaf_hash(data) for data in CT_INPUTS]


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 as written: the reference the frontier is checked against."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return tlog.node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def test_the_frontier_gives_the_reference_roots() -> None:
    frontier: list[bytes] = []
    assert tlog.root(frontier).hex() == CT_ROOTS[0]
    for size, leaf in enumerate(CT_LEAVES):
        frontier = tlog.append(frontier, size, leaf)
        assert tlog.root(frontier).hex() == CT_ROOTS[size + 1]
        assert len(frontier) == bin(size + 1).count("1")


@pytest.mark.parametrize(("index", "size", "path"), CT_INCLUSION)
def test_inclusion_proofs_are_the_reference_ones(index: int, size: int, path: list[str]) -> None:
    def subtree(start: int, end: int) -> bytes:
        return _mth(CT_LEAVES[start:end])

    made = tlog.inclusion_path(index, size, subtree)
    assert [h.hex() for h in made] == path
    root = bytes.fromhex(CT_ROOTS[size])
    assert tlog.check_inclusion(index, size, CT_LEAVES[index], made, root)
    assert not tlog.check_inclusion(index, size, CT_LEAVES[index - 1], made, root)
    assert not tlog.check_inclusion(index ^ 1, size, CT_LEAVES[index], made, root)


@given(st.integers(1, 70), st.data())
def test_every_leaf_proves_into_every_tree(size: int, data: st.DataObject) -> None:
    leaves = [tlog.leaf_hash(bytes([i, i * 7 % 256])) for i in range(size)]
    frontier: list[bytes] = []
    for n, leaf in enumerate(leaves):
        frontier = tlog.append(frontier, n, leaf)
    assert tlog.root(frontier) == _mth(leaves)
    index = data.draw(st.integers(0, size - 1))
    path = tlog.inclusion_path(index, size, lambda a, b: _mth(leaves[a:b]))
    assert tlog.check_inclusion(index, size, leaves[index], path, tlog.root(frontier))
    # The frontier's ranges are the perfect subtrees of the size's binary decomposition.
    ranges = tlog.frontier_ranges(size)
    assert [_mth(leaves[a:b]) for a, b in ranges] == frontier


def test_a_checkpoint_note_round_trips_and_its_signature_verifies(tmp_path: Path) -> None:
    key = create_key(tmp_path / "k.audit-key")
    assert (tmp_path / "k.audit-key").stat().st_mode & 0o777 == 0o600
    origin = "agentgate/0123456789abcdef"
    signed = key.sign(tlog.Checkpoint(origin, 8, bytes.fromhex(CT_ROOTS[8])), origin)
    text = signed.text()
    lines = text.split("\n")
    assert lines[:4] == [origin, "8", base64.b64encode(bytes.fromhex(CT_ROOTS[8])).decode(), ""]
    assert lines[4].startswith(f"— {origin} ")
    parsed = tlog.parse_note(text)
    assert parsed == signed
    sig = parsed.signatures[0]
    assert sig.key_hash == tlog.key_id(origin, key.public)
    assert verify_signature(key.public, parsed.body, sig.signature)
    assert not verify_signature(key.public, parsed.body.replace(b"\n8\n", b"\n9\n"), sig.signature)
    # The verifier key is the signed-note format: name+hash+base64(0x01 || key).
    assert tlog.parse_vkey(key.vkey(origin)) == (origin, key.public)


def test_the_key_file_is_the_pkcs8_pem_everyone_reads_and_nothing_else_loads(
    tmp_path: Path,
) -> None:
    # agentgate writes its key file without cryptography's serialization module (memory): the
    # same bytes that module, and openssl, read and write.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    made = create_key(tmp_path / "made")
    theirs = serialization.load_pem_private_key((tmp_path / "made").read_bytes(), password=None)
    assert isinstance(theirs, ed25519.Ed25519PrivateKey)
    assert theirs.public_key().public_bytes_raw() == made.public
    assert load_key(tmp_path / "made").public == made.public

    def write(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    other = ed25519.Ed25519PrivateKey.generate()
    pkcs8 = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert load_key(write("theirs", pkcs8)).public == other.public_key().public_bytes_raw()
    encrypted = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    an_rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    refused = {
        "encrypted": (encrypted, "encrypted"),
        "rsa": (an_rsa_key, "not an Ed25519 key"),
        "garbage": (b"\xff\xfe not a key", "not a PEM file"),
        "text": (b"hello", "not a PEM private key"),
        "damaged": (pkcs8.replace(pkcs8.splitlines()[1], b"!!!!"), "not an Ed25519 key"),
        "empty": (b"", "not a PEM private key"),
    }
    for name, (data, why) in refused.items():
        with pytest.raises(KeyFileError, match=why):
            load_key(write(name, data))


def test_notes_are_found_in_a_chat_message_or_a_file() -> None:
    origin = "agentgate/00"
    root = base64.b64encode(bytes(32)).decode()
    sig = base64.b64encode(bytes(68)).decode()
    note = f"{origin}\n12\n{root}\n\n— {origin} {sig}\n"
    message = f"🧾 Audit checkpoint: 12 events\n\n{note}"
    found = tlog.find_notes(message + "\n" + note.replace("12", "13", 1) + "\ntrailing words")
    assert [n.size for n in found if isinstance(n, tlog.Checkpoint)] == [12, 13]
    assert tlog.find_notes("nothing here\n") == []
    with pytest.raises(tlog.NoteError, match="no blank line"):
        tlog.parse_note(f"{origin}\n12\n{root}\n\n")
    with pytest.raises(tlog.NoteError, match="not a signature line"):
        tlog.parse_note(f"{origin}\n12\n{root}\n\nunsigned\n")
    broken = tlog.find_notes(f"{origin}\n12\n{root}\n\n— {origin} !!\n")
    assert len(broken) == 1
    assert isinstance(broken[0], tlog.NoteError)
