"""Text from outside, made inert for the operator's terminal and log.

Agents choose tool names, arguments and JSON member names; Telegram users choose their display
names. Printed raw, an ESC sequence rewrites the terminal (erases rows, retitles the window), a
CR or LF forges a log line, and bidi controls reorder what is shown. :func:`inert` escapes every
such character: every character of Unicode's control (Cc), format (Cf: bidi controls, zero
widths, tags, Arabic number signs ...), surrogate (Cs) and line/paragraph separator (Zl, Zp)
categories. JSON output uses ``ensure_ascii`` plus :func:`inert_json` for DEL.

Imports: nothing of agentgate.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from typing import Any, Final

__all__ = ["InertFormatter", "inert", "inert_json"]

_UNSAFE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def inert(text: str) -> str:
    """``text`` with every control, format and separator character shown escaped."""
    if text.isascii() and text.isprintable():  # the common case: nothing to look at
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in text)


def inert_json(value: Any) -> str:
    """One line of JSON that is safe on a terminal: ASCII only, DEL escaped too."""
    return json.dumps(value, ensure_ascii=True, default=str).replace("\x7f", "\\u007f")


class InertFormatter(logging.Formatter):
    """A log formatter whose messages cannot forge lines or drive the terminal.

    The message is passed through :func:`inert`; a traceback keeps its lines, each indented,
    so that nothing in an exception's text can pass for a log line of its own.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        record.message = inert(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message

    def formatException(self, ei: Any) -> str:
        text = super().formatException(ei)
        return "\n".join("  " + inert(line) for line in text.split("\n"))

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("  " + inert(line) for line in stack_info.split("\n"))
