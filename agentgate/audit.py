"""``agentgate audit``: read the audit log from the store, as a table or as JSON lines.

The reader opens the SQLite file read-only, so it is safe next to a running gateway (WAL lets
readers and the writer work at once). ``--follow`` polls for new rows and for resolutions of rows
already shown, the way ``tail -f`` would if rows never changed.

Every field that came from outside (tool names, arguments, guardians' display names) is made
inert before it reaches the terminal (:mod:`agentgate.inert`).

Imports: store (read-only), inert.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import attrs

from agentgate.inert import inert, inert_json
from agentgate.store import AuditEntry, audit_entries, read_only, select_audit

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """``10m``, ``2h``, ``1d`` ago, or an ISO 8601 time (UTC unless it says otherwise)."""
    now = time.time() if now is None else now
    match = _RELATIVE.match(text.strip())
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since: expected a duration like 10m, 2h, 1d or an ISO time, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@attrs.frozen
class Filters:
    agent: str | None = None
    tool: str | None = None
    decision: str | None = None
    since: float | None = None


def query(conn: sqlite3.Connection, filters: Filters, *, after_id: int = 0) -> list[AuditEntry]:
    return select_audit(conn, **attrs.asdict(filters), after_id=after_id)


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _what(e: AuditEntry) -> str:
    if e.kind == "guardian":
        return e.matched or ""
    if e.signature:
        return e.signature
    return f"{e.tool} {json.dumps(e.args, ensure_ascii=False, default=str)}"


def _outcome(e: AuditEntry) -> str:
    text = e.resolution or "-"
    if e.resolved_by:
        text += f" by {e.resolved_by}"
    if e.error:
        text += f": {e.error}"
    return text


COLUMNS = ("time (UTC)", "agent", "via", "decision", "request", "outcome")


def table_rows(entries: list[AuditEntry]) -> list[tuple[str, ...]]:
    """Each row's cells, made inert: agents and Telegram users choose most of this text."""
    return [
        tuple(
            inert(cell)
            for cell in (_when(e.time), e.agent, e.via or "-", e.decision, _what(e), _outcome(e))
        )
        for e in entries
    ]


def format_table(entries: list[AuditEntry], *, width: int = 60) -> str:
    """A readable table; long requests and outcomes are cut to ``width`` characters."""
    rows = [
        tuple(c if len(c) <= width else c[: width - 1] + "…" for c in row)
        for row in table_rows(entries)
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(COLUMNS, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def to_json(entry: AuditEntry) -> dict[str, Any]:
    return attrs.asdict(entry)


def follow(
    path: Path,
    filters: Filters,
    emit: Callable[[AuditEntry, bool], None],
    *,
    interval: float = 0.5,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Emit matching rows as they are appended, then again (``update=True``) once resolved."""
    conn = read_only(path)
    last = 0
    unresolved: dict[int, AuditEntry] = {}
    try:
        while not stop():
            for entry in query(conn, filters, after_id=last):
                assert entry.id is not None
                last = entry.id
                emit(entry, False)
                if entry.resolution is None and entry.kind == "request":
                    unresolved[entry.id] = entry
            if unresolved:
                marks = ",".join("?" * len(unresolved))
                rows = conn.execute(
                    f"SELECT * FROM audit_log WHERE id IN ({marks}) AND resolution IS NOT NULL",
                    list(unresolved),
                ).fetchall()
                for entry in audit_entries(rows):
                    assert entry.id is not None
                    unresolved.pop(entry.id, None)
                    emit(entry, True)
            time.sleep(interval)
    finally:
        conn.close()


def print_entries(entries: list[AuditEntry], *, as_json: bool, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if as_json:
        for entry in entries:
            print(inert_json(to_json(entry)), file=out)
    elif entries:
        print(format_table(entries), file=out)
    else:
        print("(no audit rows match)", file=out)
