"""``agentgate audit``: read the audit log from the store, as a table or as JSON lines.

The reader opens the SQLite file read-only, so it is safe next to a running gateway (WAL lets
readers and the writer work at once). ``--follow`` polls for new rows and for resolutions of rows
already shown, the way ``tail -f`` would if rows never changed.

Every field that came from outside (tool names, arguments, guardians' display names) is made
inert before it reaches the terminal (:mod:`agentgate.inert`).

Imports: store (read-only), approvals (the outcomes), inert.
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

from agentgate.approvals import Outcome
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


# What an error message says again after its resolution: "denied by X: denied by the guardian
# (X)" reads "denied by X"; "timed_out: approval timed out: why" reads "timed_out: why".
_RESTATED = {
    "denied": ("denied by the guardian", "denied by policy"),
    "timed_out": ("approval timed out",),
    "shutdown": ("gateway shutting down",),
    "failed": ("execution failed",),
    "unknown": ("outcome unknown",),
}


def _outcome(e: AuditEntry) -> str:
    text = e.resolution or "-"
    if e.resolved_by:
        text += f" by {e.resolved_by}"
    detail = e.error or ""
    for said in _RESTATED.get(e.resolution or "", ()):
        if detail.startswith(said):
            detail = detail[len(said) :].lstrip(": ")
    if e.resolved_by and detail in (f"({e.resolved_by})", e.resolved_by):
        detail = ""
    if not detail and e.resolution == "rejected" and e.kind == "request":
        detail = e.matched or ""  # why it was refused: the row has no other place for it
    after = e.result.get("state_after") if isinstance(e.result, dict) else None
    if e.resolution is Outcome.UNKNOWN and isinstance(after, dict) and after:
        now = ", ".join(f"{entity}: {state}" for entity, state in after.items())
        detail = f"{detail} — now: {now}" if detail else f"now: {now}"
    return f"{text}: {detail}" if detail else text


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


def iso(t: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC with milliseconds: ``2026-12-04T19:16:50.123Z``."""
    if t is None:
        return None
    moment = datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


def to_json(entry: AuditEntry) -> dict[str, Any]:
    """One row for ``--json``: every field, its times in ISO 8601 UTC."""
    row = attrs.asdict(entry)
    row["time"], row["resolved_at"] = iso(entry.time), iso(entry.resolved_at)
    return row


FOLLOW_WIDTHS = (19, 12, 9, 8, 56)
"""Column widths of ``--follow`` (rows arrive one by one: they cannot be measured first);
the outcome takes the rest of the line."""


def follow_line(cells: tuple[str, ...], mark: str = "") -> str:
    """One ``--follow`` line: fixed-width columns, long cells cut."""
    parts = []
    for cell, width in zip(cells, FOLLOW_WIDTHS, strict=False):
        cell = cell if len(cell) <= width else cell[: width - 1] + "…"
        parts.append(cell.ljust(width))
    parts.append(cells[len(FOLLOW_WIDTHS)] if len(cells) > len(FOLLOW_WIDTHS) else "")
    return (mark + "  ".join(parts)).rstrip()


def follow_header() -> str:
    """The header of ``--follow``, then the rule under it."""
    rule = (*("-" * w for w in FOLLOW_WIDTHS), "-" * 20)
    return follow_line(COLUMNS) + "\n" + follow_line(rule)


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
