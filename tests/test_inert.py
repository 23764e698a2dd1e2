"""Operator surfaces are inert (``agentgate.inert``): terminal and log stay the operator's."""

from __future__ import annotations

import io
import json
import logging
import unicodedata

import pytest

from agentgate.inert import InertFormatter, inert, inert_json


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[2J", "\\x1b[2J"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("\x07\x7f\x9b", "\\x07\\x7f\\x9b"),
        ("\u202eevil", "\\u202eevil"),
        ("\u2028", "\\u2028"),
        ("\u2066x\u2069", "\\u2066x\\u2069"),
        ("tab\there", "tab\\x09here"),
        ("Küche 🔓", "Küche 🔓"),
    ],
)
def test_inert(raw: str, shown: str) -> None:
    assert inert(raw) == shown


def test_inert_json_is_ascii_and_exact() -> None:
    value = {"tool": "\x1b]0;x\x07\x7f\u202e", "name": "Küche"}
    text = inert_json(value)
    assert text.isascii()
    assert "\x7f" not in text
    assert json.loads(text) == value


def test_the_log_keeps_one_line_per_record() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(InertFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test_inert")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("refused %s", "Mallory\r\nINFO agent pi authorised\x1b[1A")
        try:
            raise ValueError("boom\nINFO forged")
        except ValueError:
            log.exception("failed: %s", "x\ny")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WARNING refused Mallory\\x0d\\x0aINFO agent pi authorised\\x1b[1A"
    assert lines[1] == "ERROR failed: x\\x0ay"
    assert all(line.startswith("  ") for line in lines[2:])  # the traceback, indented
    assert "  ValueError: boom" in lines
    assert "  INFO forged" in lines


def test_every_control_format_and_separator_character_is_escaped() -> None:
    """Not only the well-known ones: Arabic number signs, Egyptian format controls, musical
    symbol format characters and every other code point of those categories."""
    unsafe = [
        chr(code)
        for code in range(0x110000)
        if unicodedata.category(chr(code)) in {"Cc", "Cf", "Cs", "Zl", "Zp"}
    ]
    assert {"\u0600", "\U0001d173", "\U00013430"} <= set(unsafe)
    for char in unsafe:
        shown = inert(f"a{char}b")
        assert shown.isascii(), repr(char)
        assert shown.isprintable(), repr(char)
