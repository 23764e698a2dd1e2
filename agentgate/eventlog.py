"""The audit log as events: an append-only, hash-chained Merkle log inside the store's SQLite file.

Every fact is a new row of ``audit_events``, never an update: a request with its decision and
what decided it, a card sent, a guardian's press, an approval's move to executing, an outcome,
a grant, a freeze, a reload, an undo, the log's key, a compaction. Triggers refuse ``UPDATE``
on the table, and ``DELETE`` outside a recorded compaction's pruned range.

Each event has a sequence number (its leaf index, from 0), its bytes (canonical JSON, see
:mod:`agentgate.tlog`), a leaf hash and a chain hash. ``audit_tip`` holds the tree's frontier,
so an append reads one row and writes two, inside the caller's transaction: an event is
committed (and made durable) exactly with the rows it describes. A transaction of the store
holds the tip in memory (:func:`hold`): one read and one write of ``audit_tip`` for all the
events it appends, the same bytes as appending them one by one. Signed checkpoints
(``audit_checkpoints``) are written by :mod:`agentgate.checkpoints`.

``audit_log`` — what ``agentgate audit`` shows, one row per request — is derived from the
events: each row is written in the same transaction as its events, and :func:`replay_rows`
rebuilds it from them alone, which is what ``agentgate audit verify`` compares it with. Its
``args`` and ``result`` are the canonical JSON the events hold.

Event types, and the fields each holds beside ``v`` (the format, 1), ``seq`` and ``type``:

- ``request``, ``guardian``, ``undo``: a row of ``audit_log`` opened (``row`` is its id; the
  row's fields, nulls left out). ``guardian`` rows are the guardians' and the operator's own
  acts (grant, revoke, freeze, unfreeze, vote, refused, reload).
- ``outcome``: how a row ended (``row``, ``request_id``, ``resolution``, ``by``, ``time``,
  ``result``, ``error``).
- ``card``: an approval's card was sent (``request_id``, ``message_ref``, ``target``).
- ``press``: a guardian pressed a button on a card (``request_id``, ``action``, ``by``, and
  ``user``: the guardian's identity as Telegram authenticated it).
- ``executing``: an approval moved to executing (``request_id``, ``by``).
- ``migrated``: a row written before the log existed, sealed as it stood (``row``: its columns).
- ``key``: the key that signs this log's checkpoints (``origin``, ``vkey``, ``reason``).
- ``compaction``: the events before ``cut`` were pruned (``cut``, ``root``: the pruned range's
  root, ``chain``: the chain hash at ``cut - 1``, ``keep_days``, ``by``).

Imports: tlog.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterator, Mapping
from typing import Any, Final, Protocol

from attrs import frozen

from agentgate import tlog

__all__ = [
    "ROW_COLUMNS",
    "SCHEMA",
    "Compaction",
    "CompactionRefused",
    "Signer",
    "Tip",
    "append",
    "compact",
    "drop_held",
    "held",
    "hold",
    "install",
    "log_key",
    "open_row",
    "prune",
    "replay_rows",
    "resolve_rows",
    "restore_held",
    "seal_legacy",
    "tip",
    "write_checkpoint",
    "write_held",
]

FORMAT: Final = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_events (
    seq         INTEGER PRIMARY KEY,               -- the leaf index, from 0
    type        TEXT NOT NULL,
    request_id  TEXT,
    body        TEXT NOT NULL,                     -- canonical JSON: the leaf's bytes (UTF-8)
    leaf        BLOB NOT NULL,                     -- SHA-256(0x00 || body)
    chain       BLOB NOT NULL                      -- SHA-256(chain of seq - 1 || leaf)
);
CREATE INDEX IF NOT EXISTS audit_events_request ON audit_events(request_id)
    WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS audit_events_meta ON audit_events(type)
    WHERE type IN ('key', 'compaction');

CREATE TABLE IF NOT EXISTS audit_tip (             -- the tree as of the last event
    id          INTEGER PRIMARY KEY CHECK (id = 0),
    size        INTEGER NOT NULL,
    chain       BLOB NOT NULL,
    frontier    BLOB NOT NULL                      -- tlog.pack(): the perfect subtrees' roots
);
INSERT OR IGNORE INTO audit_tip (id, size, chain, frontier) VALUES (0, 0, zeroblob(32), x'');

CREATE TABLE IF NOT EXISTS audit_checkpoints (
    size        INTEGER NOT NULL,
    root        BLOB NOT NULL,
    time        REAL NOT NULL,
    note        TEXT NOT NULL                      -- the signed note (C2SP tlog-checkpoint)
);

CREATE TABLE IF NOT EXISTS audit_compactions (
    cut         INTEGER PRIMARY KEY,               -- events before this were pruned
    chain       BLOB NOT NULL,                     -- the chain hash of event cut - 1
    frontier    BLOB NOT NULL,                     -- the tree of the first cut events
    time        REAL NOT NULL
);

CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events
WHEN OLD.seq >= (SELECT COALESCE(MAX(cut), 0) FROM audit_compactions)
BEGIN SELECT RAISE(ABORT, 'audit events are append-only (only a compaction prunes)'); END;
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_compactions_no_change BEFORE UPDATE ON audit_compactions
BEGIN SELECT RAISE(ABORT, 'compactions are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_compactions_no_delete BEFORE DELETE ON audit_compactions
BEGIN SELECT RAISE(ABORT, 'compactions are append-only'); END;
"""

# audit_log's own triggers in this version: its rows keep their event's seq, and a row is
# deleted only with its events, by a compaction.
_ROW_TRIGGERS: Final = {
    "audit_no_delete": (
        "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit_log"
        " WHEN OLD.seq IS NULL OR OLD.seq >= (SELECT COALESCE(MAX(cut), 0) FROM audit_compactions)"
        " BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END"
    ),
    "audit_keep_seq": (
        "CREATE TRIGGER audit_keep_seq BEFORE UPDATE OF seq ON audit_log"
        " WHEN OLD.seq IS NOT NULL"
        " BEGIN SELECT RAISE(ABORT, 'audit_log rows keep their original columns'); END"
    ),
}

ROW_COLUMNS: Final = (
    "id",
    "time",
    "kind",
    "agent",
    "request_id",
    "tool",
    "args",
    "signature",
    "decision",
    "matched",
    "resolution",
    "resolved_by",
    "resolved_at",
    "result",
    "error",
    "via",
)
"""``audit_log``'s columns as a ``migrated`` event keeps them (``seq`` is the event's own)."""

OPENINGS: Final = frozenset({"request", "guardian", "undo"})


def json_text(value: Any) -> tlog.Canonical | None:
    """``value`` as the canonical JSON text ``audit_log`` and the events both hold."""
    if value is None:
        return None
    return tlog.Canonical(tlog.canonical(value).decode("utf-8"))


def install(conn: sqlite3.Connection) -> None:
    """The event tables, and ``audit_log``'s ``seq`` column and triggers (idempotent; replaces
    only what differs, so opening an up-to-date store writes nothing)."""
    conn.executescript(SCHEMA)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(audit_log)")}
    if "seq" not in columns:
        conn.execute("ALTER TABLE audit_log ADD COLUMN seq INTEGER")
    for name, wanted in _ROW_TRIGGERS.items():
        row = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type='trigger' AND name=?", (name,)
        ).fetchone()
        if row is None or row[0] != wanted:
            conn.executescript(f"DROP TRIGGER IF EXISTS {name}; {wanted};")


# --------------------------------------------------------------------------- appending


@frozen
class Tip:
    size: int
    chain: bytes
    frontier: tuple[bytes, ...]

    @property
    def root(self) -> bytes:
        return tlog.root(self.frontier)


# Tips held by a transaction (:func:`hold`): read from ``audit_tip`` at its first use, written
# back once, before the commit (:func:`write_held`). None until read. A connection runs one
# transaction at a time, so the connection is the key.
_held: dict[sqlite3.Connection, Tip | None] = {}


def hold(c: sqlite3.Connection) -> None:
    """From now until :func:`write_held` or :func:`drop_held`, the transaction open on ``c``
    keeps the tip in memory: one read and one write of ``audit_tip`` however many events it
    appends (the events and the tip written are those appending one by one would write)."""
    _held[c] = None


def held(c: sqlite3.Connection) -> Tip | None:
    """The held tip as it stands (a savepoint's mark: :func:`restore_held`); None if unread."""
    return _held.get(c)


def restore_held(c: sqlite3.Connection, mark: Tip | None) -> None:
    """Back to ``mark`` (after a ``ROLLBACK TO`` the savepoint taken at it)."""
    if c in _held:
        _held[c] = mark


def write_held(c: sqlite3.Connection) -> None:
    """Write the held tip to ``audit_tip`` if events were appended, and stop holding it.
    Before ``COMMIT``; raises what the ``UPDATE`` raises (the transaction must not commit)."""
    now = _held.pop(c, None)
    if now is not None:
        _write_tip(c, now)


def drop_held(c: sqlite3.Connection) -> None:
    """Stop holding the tip without writing it (the transaction is rolled back)."""
    _held.pop(c, None)


def _read_tip(c: sqlite3.Connection) -> Tip:
    row = c.execute("SELECT size, chain, frontier FROM audit_tip WHERE id = 0").fetchone()
    return Tip(int(row[0]), bytes(row[1]), tuple(tlog.unpack(bytes(row[2]))))


def _write_tip(c: sqlite3.Connection, now: Tip) -> None:
    c.execute(
        "UPDATE audit_tip SET size = ?, chain = ?, frontier = ? WHERE id = 0",
        (now.size, now.chain, tlog.pack(now.frontier)),
    )


def tip(c: sqlite3.Connection) -> Tip:
    if c in _held:
        now = _held[c]
        if now is None:
            now = _held[c] = _read_tip(c)
        return now
    return _read_tip(c)


def append(
    c: sqlite3.Connection, type_: str, fields: Mapping[str, Any], request_id: str | None = None
) -> int:
    """Append one event (inside the caller's transaction); its sequence number."""
    before = tip(c)
    size = before.size
    body = {"v": FORMAT, "seq": size, "type": type_}
    body.update((k, v) for k, v in fields.items() if v is not None)
    data = tlog.canonical(body)
    leaf = tlog.leaf_hash(data)
    chained = tlog.chain_hash(before.chain, leaf)
    c.execute(
        "INSERT INTO audit_events (seq, type, request_id, body, leaf, chain) VALUES (?,?,?,?,?,?)",
        (size, type_, request_id, data.decode("utf-8"), leaf, chained),
    )
    grown = Tip(size + 1, chained, tuple(tlog.append(before.frontier, size, leaf)))
    if c in _held:
        _held[c] = grown
    else:
        _write_tip(c, grown)
    return size


def open_row(c: sqlite3.Connection, row: Mapping[str, Any]) -> int:
    """Insert an ``audit_log`` row and the event that opens it (type: the row's ``kind``); the
    row's id. ``args`` and ``result`` are :func:`json_text` values."""
    seq = tip(c).size
    columns = [k for k in ROW_COLUMNS if k != "id"]
    cur = c.execute(
        f"INSERT INTO audit_log ({', '.join(columns)}, seq)"
        f" VALUES ({', '.join('?' * (len(columns) + 1))})",
        (*(row.get(k) for k in columns), seq),
    )
    row_id = int(cur.lastrowid or 0)
    fields = {k: v for k, v in row.items() if k != "kind"}
    appended = append(c, str(row["kind"]), {"row": row_id, **fields}, row.get("request_id"))
    assert appended == seq
    return row_id


def resolve_rows(
    c: sqlite3.Connection,
    where: str,
    params: tuple[Any, ...],
    *,
    resolution: str,
    by: str | None,
    at: float,
    result: tlog.Canonical | None,
    error: str | None,
) -> int:
    """Record the outcome of every unresolved ``audit_log`` row matching ``where``: an
    ``outcome`` event each, and the row's resolution columns. How many."""
    rows = c.execute(
        f"SELECT id, request_id FROM audit_log WHERE ({where}) AND resolution IS NULL", params
    ).fetchall()
    for row_id, request_id in rows:
        append(
            c,
            "outcome",
            {
                "time": at,
                "row": row_id,
                "request_id": request_id,
                "resolution": resolution,
                "by": by,
                "result": result,
                "error": error,
            },
            request_id,
        )
        c.execute(
            "UPDATE audit_log SET resolution=?, resolved_by=?, resolved_at=?, result=?, error=?"
            " WHERE id=?",
            (resolution, by, at, result, error, row_id),
        )
    return len(rows)


def seal_legacy(c: sqlite3.Connection) -> int:
    """Seal every ``audit_log`` row that has no event yet (a store written before the log
    existed) as a ``migrated`` event, oldest first. How many."""
    rows = c.execute(
        f"SELECT {', '.join(ROW_COLUMNS)} FROM audit_log WHERE seq IS NULL ORDER BY id"
    ).fetchall()
    for values in rows:
        row = {k: v for k, v in zip(ROW_COLUMNS, values, strict=True) if v is not None}
        request_id = row.get("request_id")
        fields = {"time": row.get("time"), "request_id": request_id, "row": row}
        seq = append(c, "migrated", fields, request_id)
        c.execute("UPDATE audit_log SET seq = ? WHERE id = ?", (seq, row["id"]))
    return len(rows)


# --------------------------------------------------------------------------- checkpoints


class Signer(Protocol):
    """What signs checkpoints (:class:`agentgate.checkpoints.LogSigner`): the log's origin,
    its verifier key, and a signed checkpoint of a tip."""

    origin: str
    vkey: str

    def __call__(self, tip: Tip) -> tlog.Checkpoint: ...


def write_checkpoint(
    c: sqlite3.Connection, sign: Signer | Any, at: float
) -> tlog.Checkpoint | None:
    """Sign the tip and keep the note (inside the caller's transaction); None, and nothing
    written, when the latest checkpoint covers every event already."""
    now = tip(c)
    last = c.execute("SELECT MAX(size) FROM audit_checkpoints").fetchone()[0]
    if now.size == 0 or (last is not None and last >= now.size):
        return None
    checkpoint: tlog.Checkpoint = sign(now)
    c.execute(
        "INSERT INTO audit_checkpoints (size, root, time, note) VALUES (?, ?, ?, ?)",
        (now.size, now.root, at, checkpoint.text()),
    )
    return checkpoint


# --------------------------------------------------------------------------- compaction


class CompactionRefused(Exception):
    """The range a compaction would prune does not verify: nothing was pruned."""


@frozen
class Compaction:
    cut: int  # the first event kept
    pruned: int  # events pruned by this compaction
    root: bytes  # the root of the first ``cut`` events
    checkpoint: tlog.Checkpoint | None


PRUNE_BATCH: Final = 5000  # rows deleted per transaction, so writers wait little


def base(c: sqlite3.Connection) -> tuple[int, bytes, list[bytes]]:
    """Where the stored events begin: ``(cut, chain of cut - 1, frontier of the first cut
    events)`` of the latest compaction, or ``(0, ZERO, [])``."""
    row = c.execute(
        "SELECT cut, chain, frontier FROM audit_compactions ORDER BY cut DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return 0, tlog.ZERO, []
    return int(row[0]), bytes(row[1]), tlog.unpack(bytes(row[2]))


def compact(
    c: sqlite3.Connection,
    before: float,
    *,
    sign: Signer,
    at: float,
    by: str,
    keep_days: float,
) -> Compaction | None:
    """Record the pruning of every event before the first ``audit_log`` row at or after
    ``before`` (unix time), or before the first request still open: the range is checked first
    (its leaves and chain recomputed), then a ``compaction`` event keeps its root and chain
    hash, ``audit_compactions`` its frontier, and a signed checkpoint covers the event, all in
    the caller's transaction. The rows themselves go with :func:`prune`. None when there is
    nothing to prune."""
    start, chain, frontier = base(c)
    row = c.execute(
        "SELECT MIN(seq) FROM audit_log WHERE time >= ? AND seq IS NOT NULL", (before,)
    ).fetchone()
    end = tip(c).size if row[0] is None else int(row[0])
    # A request still open (an approval waiting, a call executing) keeps its row, and so every
    # event after it: its outcome must find the row it ends.
    waiting = c.execute(
        "SELECT MIN(seq) FROM audit_log WHERE resolution IS NULL AND kind != 'guardian'"
        " AND seq IS NOT NULL"
    ).fetchone()[0]
    if waiting is not None:
        end = min(end, int(waiting))
    if end <= start:
        return None
    expected = start
    for seq, body, leaf, stored_chain in c.execute(
        "SELECT seq, body, leaf, chain FROM audit_events WHERE seq >= ? AND seq < ? ORDER BY seq",
        (start, end),
    ):
        computed = tlog.leaf_hash(body.encode("utf-8"))
        chain = tlog.chain_hash(chain, computed)
        if seq != expected or computed != bytes(leaf) or chain != bytes(stored_chain):
            raise CompactionRefused(
                f"event {expected} does not verify (run agentgate audit verify): nothing pruned"
            )
        frontier = tlog.append(frontier, seq, computed)
        expected += 1
    if expected != end:
        raise CompactionRefused(f"event {expected} is missing: nothing pruned")
    pruned_root = tlog.root(frontier)
    append(
        c,
        "compaction",
        {
            "time": at,
            "cut": end,
            "root": b64(pruned_root),
            "chain": b64(chain),
            "pruned": end - start,
            "keep_days": keep_days,
            "by": by,
            "origin": sign.origin,
            "vkey": sign.vkey,
        },
    )
    c.execute(
        "INSERT INTO audit_compactions (cut, chain, frontier, time) VALUES (?, ?, ?, ?)",
        (end, chain, tlog.pack(frontier), at),
    )
    checkpoint = write_checkpoint(c, sign, at)
    return Compaction(end, end - start, pruned_root, checkpoint)


def prune(c: sqlite3.Connection, cut: int) -> int:
    """Delete up to :data:`PRUNE_BATCH` events (and ``audit_log`` rows) before ``cut``, which a
    compaction recorded; how many events went (0: done)."""
    rows = c.execute(
        "DELETE FROM audit_log WHERE id IN"
        " (SELECT id FROM audit_log WHERE seq < ? ORDER BY seq LIMIT ?)",
        (cut, PRUNE_BATCH),
    ).rowcount
    events = c.execute(
        "DELETE FROM audit_events WHERE seq IN"
        " (SELECT seq FROM audit_events WHERE seq < ? ORDER BY seq LIMIT ?)",
        (cut, PRUNE_BATCH),
    ).rowcount
    return rows + events


# --------------------------------------------------------------------------- reading


def log_key(c: sqlite3.Connection) -> tuple[str, str] | None:
    """``(origin, vkey)`` the log names last (a ``key`` event, or a ``compaction``, which
    restates it), or None for a log without a key yet."""
    row = c.execute(
        "SELECT body FROM audit_events WHERE type IN ('key', 'compaction')"
        " ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    body = tlog.event_json(row[0].encode("utf-8"))
    return str(body.get("origin")), str(body.get("vkey"))


def latest(c: sqlite3.Connection, type_: str) -> dict[str, Any] | None:
    """The body of the latest event of ``type_`` (``key`` or ``compaction``), or None."""
    row = c.execute(
        "SELECT body FROM audit_events WHERE type = ? ORDER BY seq DESC LIMIT 1", (type_,)
    ).fetchone()
    return None if row is None else tlog.event_json(row[0].encode("utf-8"))


def replay_rows(events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``audit_log`` rebuilt from events (bodies in order): each row once it is final, as a
    dict of :data:`ROW_COLUMNS` plus ``seq``. A row is final when it is resolved or when no
    later event can change it (a guardian's); the others are yielded at the end."""
    open_rows: dict[int, dict[str, Any]] = {}
    for body in events:
        kind = body.get("type")
        if kind in OPENINGS:
            row = {k: body.get(k) for k in ROW_COLUMNS}
            row["id"], row["kind"], row["seq"] = body.get("row"), kind, body.get("seq")
            row["args"], row["result"] = _text(body.get("args")), _text(body.get("result"))
        elif kind == "migrated":
            row = dict.fromkeys(ROW_COLUMNS)
            sealed = body.get("row")
            row.update(sealed if isinstance(sealed, dict) else {})
            row["seq"] = body.get("seq")
        elif kind == "outcome":
            row_id = body.get("row")
            target = open_rows.pop(row_id, None) if isinstance(row_id, int) else None
            if target is not None:  # None: its row was pruned by a compaction
                target.update(
                    resolution=body.get("resolution"),
                    resolved_by=body.get("by"),
                    resolved_at=body.get("time"),
                    result=_text(body.get("result")),
                    error=body.get("error"),
                )
                yield target
            continue
        else:
            continue
        # A row that no later event can change is final now: a guardian's, or one resolved
        # when it was written.
        row_id = row.get("id")
        if row.get("kind") == "guardian" or row.get("resolution") is not None:
            yield row
        elif isinstance(row_id, int):
            open_rows[row_id] = row
        else:  # not a row id: yielded as it is, for the comparison to name it
            yield row
    yield from open_rows.values()


def _text(value: Any) -> str | None:
    return None if value is None else tlog.canonical(value).decode("utf-8")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
