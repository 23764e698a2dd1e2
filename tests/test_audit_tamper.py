"""Tampering with the audit log, each way detected by ``agentgate audit verify`` with the first
bad event named: a field edited, an event deleted, two events swapped, the tail truncated
(against the checkpoint the chat holds), the checkpoint key replaced, the whole store replaced by
an older copy, every hash recomputed after an edit, the rows ``agentgate audit`` shows edited.

The attacker here can write the store and its key file (triggers are no obstacle: they are
dropped); what they cannot reach is a checkpoint already posted to the guardians' chat.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from agentgate import eventlog, tlog
from agentgate.auditkey import AuditKey, create_key, load_key
from agentgate.checkpoints import LogSigner
from tests.fastgate import FastGateway, authed, call, fast_gateway
from tests.test_audit_log import a_day_of_use, check
from tests.test_audit_log import events as events_of

CEILING = 20


async def _used(workdir: Path) -> FastGateway:
    with trio.fail_after(CEILING):
        async with fast_gateway(workdir, audit={"checkpoint_every": 4}) as fg:
            await a_day_of_use(fg)
            await fg.gateway.shutdown()
    return fg


@pytest.fixture
async def log(tmp_path: Path) -> tuple[Path, str]:
    """A store after a day of use, and the last checkpoint the chat received (its text)."""
    fg = await _used(tmp_path)
    return tmp_path / "agentgate.db", fg.guardian.silent[-1]


def _open(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")  # the attacker's first move
    return conn


def _size(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0])
    finally:
        conn.close()


def rewrite(
    db: Path,
    edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    *,
    key: AuditKey | None = None,
) -> None:
    """A careful attacker: change the events, then recompute every hash, the tip and the rows
    ``agentgate audit`` shows; with ``key``, re-sign the stored checkpoints with it (the key
    event renamed to match)."""
    conn = _open(db)
    bodies = [json.loads(r[0]) for r in conn.execute("SELECT body FROM audit_events ORDER BY seq")]
    sizes = [int(r[0]) for r in conn.execute("SELECT size FROM audit_checkpoints ORDER BY size")]
    bodies = edit(bodies)
    origin = next(b["origin"] for b in bodies if b["type"] == "key")
    signer = None
    if key is not None:
        signer = LogSigner(key, origin)
        for body in bodies:
            if body["type"] == "key":
                body["vkey"] = signer.vkey
    conn.execute("BEGIN")
    conn.execute("DELETE FROM audit_events")
    conn.execute("DELETE FROM audit_log")
    conn.execute("UPDATE audit_tip SET size = 0, chain = zeroblob(32), frontier = x''")
    for body in bodies:
        fields = {k: v for k, v in body.items() if k not in ("v", "seq", "type")}
        eventlog.append(conn, body["type"], fields, body.get("request_id"))
    columns = (*eventlog.ROW_COLUMNS, "seq")
    for row in eventlog.replay_rows(
        iter(
            json.loads(r[0])
            for r in conn.execute("SELECT body FROM audit_events ORDER BY seq").fetchall()
        )
    ):
        marks = ", ".join("?" * len(columns))
        conn.execute(
            f"INSERT INTO audit_log ({', '.join(columns)}) VALUES ({marks})",
            tuple(row[k] for k in columns),
        )
    if signer is not None:
        conn.execute("DELETE FROM audit_checkpoints")
        frontier: list[bytes] = []
        leaves = [bytes(r[0]) for r in conn.execute("SELECT leaf FROM audit_events ORDER BY seq")]
        for n, leaf in enumerate(leaves):
            frontier = tlog.append(frontier, n, leaf)
            if n + 1 in sizes:
                note = signer(eventlog.Tip(n + 1, b"", tuple(frontier)))
                conn.execute(
                    "INSERT INTO audit_checkpoints VALUES (?, ?, 0, ?)",
                    (n + 1, note.root, note.text()),
                )
    conn.execute("COMMIT")
    conn.close()


async def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "agentgate", "audit", "verify", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_the_untouched_log_verifies_also_from_the_command_line(log: tuple[Path, str]) -> None:
    db, chat = log
    done = await _cli("--store", str(db), "--checkpoint", chat)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert "integrity:    ok" in done.stdout.decode()
    assert "completeness: ok: the log holds every event" in done.stdout.decode()


async def test_a_field_edited_is_named(log: tuple[Path, str]) -> None:
    db, _ = log
    conn = _open(db)
    seq = conn.execute(
        "SELECT seq FROM audit_events WHERE type = 'press' AND body LIKE '%\"deny\"%'"
    ).fetchone()[0]
    conn.execute(
        "UPDATE audit_events SET body = replace(body, '\"deny\"', '\"allow\"') WHERE seq = ?",
        (seq,),
    )
    conn.close()
    report = check(db)
    assert not report.ok
    assert report.first_bad == str(seq)
    assert f"event {seq} was changed" in report.integrity[0]
    done = await _cli("--store", str(db))
    assert done.returncode == 1
    assert f"first bad event: {seq}" in done.stdout.decode()


async def test_an_event_deleted_is_named(log: tuple[Path, str]) -> None:
    db, _ = log
    conn = _open(db)
    conn.execute("DELETE FROM audit_events WHERE seq = 5")
    conn.close()
    report = check(db)
    assert report.first_bad == "5"
    assert "event 5 is missing" in report.integrity[0]


async def test_two_events_swapped_are_named(log: tuple[Path, str]) -> None:
    db, _ = log
    conn = _open(db)
    conn.execute("UPDATE audit_events SET seq = -1 WHERE seq = 4")
    conn.execute("UPDATE audit_events SET seq = 4 WHERE seq = 6")
    conn.execute("UPDATE audit_events SET seq = 6 WHERE seq = -1")
    conn.close()
    report = check(db)
    assert report.first_bad == "4"
    assert "event 4 is out of place (its bytes say event 6)" in report.integrity[0]


async def test_a_truncated_tail_is_caught_against_the_chat(log: tuple[Path, str]) -> None:
    db, chat = log
    size = _size(db)
    keep = size - 3
    # Carefully: the last events, their rows and the checkpoints covering them go; the tip is
    # moved back. Nothing in the store can tell.
    rewrite(db, lambda bodies: bodies[:keep])
    conn = _open(db)
    conn.execute("DELETE FROM audit_checkpoints WHERE size > ?", (keep,))
    conn.close()
    alone = check(db)
    assert alone.ok, alone.text()  # the store alone cannot tell: this is why a witness exists
    report = check(db, chat)
    assert not report.ok
    assert report.integrity == []
    assert f"events {keep}..{size - 1} were removed" in report.completeness[0]
    assert report.first_bad == f"{keep} (missing)"
    done = await _cli("--store", str(db), "--checkpoint", chat)
    assert done.returncode == 1
    assert "completeness: FAILED" in done.stdout.decode()


async def test_a_careless_truncation_is_caught_by_the_stores_own_checkpoints(
    log: tuple[Path, str],
) -> None:
    db, _ = log
    size = _size(db)
    rewrite(db, lambda bodies: bodies[: size - 3])  # the signed checkpoints left in place
    report = check(db)
    assert f"events {size - 3}..{size - 1} were removed" in report.completeness[0]


async def test_every_hash_recomputed_after_an_edit_is_caught_by_the_signatures(
    log: tuple[Path, str],
) -> None:
    db, chat = log

    def edit(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for body in bodies:
            if body["type"] == "request" and body.get("decision") == "deny":
                body["decision"] = "allow"  # the lock was never refused
        return bodies

    rewrite(db, edit)
    report = check(db, chat)
    assert not report.ok
    assert any("not what checkpoint" in p for p in report.integrity)
    assert any("the log was rewritten" in p for p in report.integrity)
    assert report.first_bad is not None
    assert report.first_bad.startswith("in ")  # a range: the hashes alone no longer tell


async def test_a_replaced_key_file_is_caught(log: tuple[Path, str]) -> None:
    db, _ = log
    key = db.with_name("agentgate.audit-key")
    key.unlink()
    create_key(key)
    report = check(db)
    assert not report.ok
    assert "is not the key the log names" in report.integrity[0]
    assert report.first_bad is None  # every event is intact: the key file is what changed
    done = await _cli("--store", str(db))
    assert done.returncode == 1
    assert "first bad event: none: every event hashes, chains and sits in its place" in (
        done.stdout.decode()
    )


async def test_a_log_rewritten_and_re_signed_with_a_new_key_is_caught_by_the_chat(
    log: tuple[Path, str],
) -> None:
    db, chat = log
    original = load_key(db.with_name("agentgate.audit-key"))
    key = db.with_name("agentgate.audit-key")
    key.unlink()
    new = create_key(key)

    def edit(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [b for b in bodies if b["type"] != "guardian"]  # the freeze never happened

    size = _size(db)
    rewrite(db, edit, key=new)
    alone = check(db)
    assert alone.ok, alone.text()  # consistent in itself: key, events, checkpoints
    report = check(db, chat)
    assert not report.ok
    assert "not signed by this log's key" in report.integrity[0]
    # The chat's checkpoint says the log had more events: where the rewrite began, to a range.
    assert f"events {_size(db)}..{size - 1} were removed" in report.completeness[0]
    assert report.first_bad == f"in 0..{_size(db)}"
    origin = tlog.find_notes(chat)[0].origin  # type: ignore[union-attr]
    pinned = check(db, pinned=(original.vkey(origin),))
    assert not pinned.ok  # the key recorded at the first start tells too
    assert "not signed by the log's key" in pinned.integrity[0]


async def test_the_chats_checkpoints_narrow_down_where_a_rewrite_began(
    log: tuple[Path, str],
) -> None:
    db, _ = log
    conn = sqlite3.connect(db)
    held = [(int(s), str(n)) for s, n in conn.execute("SELECT size, note FROM audit_checkpoints")]
    conn.close()  # every checkpoint, as the chat (or a witness file) kept them
    assert len(held) >= 3
    changed = next(
        b["seq"] for b in events_of(db) if b["type"] == "request" and b.get("decision") == "deny"
    )

    def edit(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        bodies[changed]["decision"] = "allow"
        return bodies

    rewrite(db, edit)  # every hash recomputed, and the store's own checkpoints dropped
    conn = _open(db)
    conn.execute("DELETE FROM audit_checkpoints")
    conn.close()
    report = check(db, *(note for _, note in held))
    vouched = max((size for size, _ in held if size <= changed), default=0)
    first_wrong = min(size for size, _ in held if size > changed)
    assert vouched > 0
    assert report.first_bad == f"in {vouched}..{first_wrong - 1}"
    assert f"an event in {vouched}..{first_wrong - 1}" in report.integrity[0]


async def test_the_store_replaced_by_an_older_copy_is_caught(tmp_path: Path) -> None:
    db = tmp_path / "agentgate.db"
    fg = await _used(tmp_path)
    shutil.copy(db, tmp_path / "yesterday.db")
    with trio.fail_after(CEILING):
        async with fast_gateway(tmp_path, audit={"checkpoint_every": 4}) as fg:
            ws = await authed(fg)
            await call(ws, 1, "tool_request", tool="ha_get_state", args={"entity_id": "sensor.x"})
            await fg.gateway.shutdown()
    chat = fg.guardian.silent[-1]
    shutil.copy(tmp_path / "yesterday.db", db)
    for side in ("-wal", "-shm"):
        db.with_name(db.name + side).unlink(missing_ok=True)
    assert check(db).ok  # an older log is a fine log in itself
    report = check(db, chat)
    assert not report.ok
    assert "the store replaced by an older copy" in report.completeness[0]
    assert report.first_bad == f"{_size(db)} (missing)"  # the first event the copy lacks
    done = await _cli("--store", str(db), "--checkpoint", chat)
    assert done.returncode == 1
    assert f"first bad event: {_size(db)} (missing)" in done.stdout.decode()


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        ("UPDATE audit_events SET leaf = 'text' WHERE seq = 3", "event 3 was changed"),
        ("UPDATE audit_events SET chain = 7 WHERE seq = 3", "event 3 does not chain"),
        ("UPDATE audit_events SET body = X'FF00' WHERE seq = 3", "event 3 is not a JSON object"),
        ("UPDATE audit_tip SET size = 'x'", "tip record (size x)"),
        ("UPDATE audit_checkpoints SET root = 'x'", "its columns differ from its note"),
        ("UPDATE audit_checkpoints SET size = 'x'", "size is not a number ('x')"),
        (
            "INSERT INTO audit_compactions VALUES (2, X'00', X'01', 0)",
            "compaction record is damaged",
        ),
        ("UPDATE audit_log SET args = X'FF' WHERE id = 1", "audit_log row 1 was changed"),
    ],
)
async def test_columns_of_the_wrong_type_are_reported_not_a_traceback(
    log: tuple[Path, str], edit: str, said: str
) -> None:
    db, chat = log
    conn = _open(db)
    conn.execute(edit)
    conn.close()
    done = await _cli("--store", str(db), "--checkpoint", chat)
    out = done.stdout.decode()
    assert done.returncode == 1, out + done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()
    assert said in out


async def test_what_the_store_says_reaches_the_terminal_inert(log: tuple[Path, str]) -> None:
    db, _ = log
    conn = _open(db)
    body = conn.execute("SELECT body FROM audit_events WHERE seq = 0").fetchone()[0]
    forged = json.loads(body)
    forged["origin"] = "agentgate/\x1b]2;owned\x07\u009b2J"  # a title, a clear screen
    text = tlog.canonical(forged).decode()
    conn.execute("UPDATE audit_events SET body = ? WHERE seq = 0", (text,))
    conn.close()
    done = await _cli("--store", str(db))
    assert done.returncode == 1
    assert b"\x1b" not in done.stdout
    assert "\x9b" not in done.stdout.decode()
    assert "\\x9b" in done.stdout.decode()  # shown, escaped


async def test_rows_of_audit_log_edited_are_caught(log: tuple[Path, str]) -> None:
    db, _ = log
    conn = _open(db)
    row = conn.execute("SELECT id FROM audit_log WHERE decision = 'deny'").fetchone()[0]
    conn.execute("UPDATE audit_log SET resolution = 'executed' WHERE id = ?", (row,))
    conn.close()
    report = check(db)
    assert not report.ok
    assert f"audit_log row {row} was changed" in report.integrity[0]
    assert report.first_bad == f"row {row}"
