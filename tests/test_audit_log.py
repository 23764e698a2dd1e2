"""The audit log you can prove (fast tier): every fact an event, append-only, derived rows,
signed checkpoints on schedule and at a stop, witnessed; the key; upgrades and downgrades;
retention by compaction.

The tampering itself is in ``test_audit_tamper.py``, crashes in ``test_audit_crash.py``.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agentgate import eventlog, tlog
from agentgate import store as store_module
from agentgate.approvals import Outcome
from agentgate.auditkey import create_key
from agentgate.checkpoints import LogSigner
from agentgate.config import ConfigError
from agentgate.guardian import Action
from agentgate.store import SCHEMA_VERSION, AuditEntry, StoreUnavailable, open_store, read_only
from agentgate.verify import Given, verify
from tests.fastgate import FastGateway, authed, call, fast_gateway

CEILING = 20
LIGHT = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}
LOCK = {"domain": "lock", "service": "unlock", "entity_id": "lock.front_door"}


def events(db: Path) -> list[dict[str, Any]]:
    conn = read_only(db)
    try:
        return [
            json.loads(r[0]) for r in conn.execute("SELECT body FROM audit_events ORDER BY seq")
        ]
    finally:
        conn.close()


def check(db: Path, *given: str, pinned: tuple[str, ...] = ()) -> Any:
    """``verify`` on ``db``, with checkpoints given as text (a chat message, say)."""
    conn = read_only(db)
    try:
        notes = [
            Given(f"given {n}", note) for n, t in enumerate(given) for note in tlog.find_notes(t)
        ]
        return verify(
            conn,
            store=str(db),
            given=notes,
            pinned=pinned,
            key_file=db.with_name(db.stem + ".audit-key"),
        )
    finally:
        conn.close()


async def ask(fg: FastGateway, ws: Any, rpc_id: int, action: str) -> dict[str, Any]:
    """An ask for the bedroom light, decided by ``action``; the agent's answer."""
    async with trio.open_nursery() as nursery:
        answer: dict[str, Any] = {}

        async def request() -> None:
            answer.update(
                await call(ws, rpc_id, "tool_request", tool="ha_call_service", args=LIGHT)
            )

        nursery.start_soon(request)
        shown = await fg.guardian.wait_for_card(len(fg.guardian.cards) + 1)
        await fg.guardian.press(shown.card.request_id, action)
    return answer


async def a_day_of_use(fg: FastGateway) -> dict[str, str]:
    """A read, an approved ask, a denied ask, a policy deny, a grant, a freeze: request ids."""
    ws = await authed(fg)
    read = await call(ws, 1, "tool_request", tool="ha_get_state", args={"entity_id": "sensor.temp"})
    approved = await ask(fg, ws, 2, "allow")
    denied = await ask(fg, ws, 3, "deny")
    lock = await call(ws, 4, "tool_request", tool="ha_call_service", args=LOCK)
    granted = await ask(fg, ws, 5, "grant")
    await fg.gateway.controls.set_frozen(True, "test guardian (1)")
    await fg.gateway.controls.set_frozen(False, "test guardian (1)")
    await fg.gateway.broker.idle()
    return {
        "read": read["result"]["request_id"],
        "approved": approved["result"]["request_id"],
        "denied": denied["error"]["data"]["request_id"],
        "lock": lock["error"]["data"]["request_id"],
        "granted": granted["result"]["request_id"],
    }


async def test_every_fact_is_an_event_linked_by_its_request(tmp_path: Path) -> None:
    with trio.fail_after(CEILING):
        async with fast_gateway(tmp_path) as fg:
            ids = await a_day_of_use(fg)
            await fg.gateway.shutdown()
    log = events(tmp_path / "agentgate.db")
    by_request: dict[str, list[str]] = {}
    for event in log:
        if "request_id" in event:
            by_request.setdefault(event["request_id"], []).append(event["type"])
    assert by_request[ids["read"]] == ["request", "outcome"]
    assert by_request[ids["approved"]] == ["request", "card", "press", "executing", "outcome"]
    assert by_request[ids["denied"]] == ["request", "card", "press", "outcome"]
    assert by_request[ids["lock"]] == ["request"]  # denied by policy: decided and ended at once
    assert by_request[ids["granted"]] == ["request", "card", "press", "executing", "outcome"]
    guardian = [(e["decision"], e.get("resolved_by")) for e in log if e["type"] == "guardian"]
    assert guardian == [
        ("grant", "test guardian (1)"),
        ("freeze", "test guardian (1)"),
        ("unfreeze", "test guardian (1)"),
    ]
    assert log[0]["type"] == "key"  # a new log names its key first
    assert [e["seq"] for e in log] == list(range(len(log)))
    press = next(e for e in log if e["type"] == "press" and e["request_id"] == ids["denied"])
    assert (press["action"], press["by"]) == ("deny", "test guardian (1)")
    # audit_log is what the events say, and the whole log verifies.
    report = check(tmp_path / "agentgate.db")
    assert report.ok, report.text()
    assert report.rows == 8  # five requests, three guardian rows
    assert report.latest_checkpoint == len(log)  # the stop signed every event


async def test_an_undo_a_revoked_grant_and_a_reload_are_events_too(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from agentgate.reload import Reloader
    from tests.test_guardian_kit import KITCHEN_ON, fake_home, gateway
    from tests.test_guardian_kit import ask as ask_kitchen

    async with gateway(tmp_path, fake_home()) as fg:  # its own ceiling, after the start
        ws = await authed(fg)
        undone = await ask_kitchen(fg, ws, 1, KITCHEN_ON)
        assert await fg.guardian.press(undone, "allow") == "approved"
        await fg.guardian.wait_for_update(undone)
        assert (await fg.guardian.press(undone, "undo", "Alex (42)")).startswith("undone")
        granted = await ask_kitchen(fg, ws, 2, KITCHEN_ON)
        await fg.guardian.press(granted, "grant")
        await fg.gateway.broker.idle()
        (grant,) = await fg.gateway.controls.grants()
        assert await fg.gateway.controls.revoke_grant(grant.grant_id, "Alex (42)")
        assert (await Reloader(fg.gateway, insecure=True).reload("SIGHUP")).ok
        await fg.gateway.broker.idle()
        await fg.gateway.shutdown()
    log = events(tmp_path / "agentgate.db")
    kinds = [(e["type"], e.get("decision")) for e in log if e["type"] in ("undo", "guardian")]
    assert kinds == [("undo", "undo"), ("guardian", "grant"), ("guardian", "revoke"),
                     ("guardian", "reload")]  # fmt: skip
    undo = [e["type"] for e in log if e.get("request_id") == undone]
    assert undo == ["request", "card", "press", "executing", "outcome", "undo", "outcome"]
    report = check(tmp_path / "agentgate.db")
    assert report.ok, report.text()


async def test_a_press_names_the_guardian_telegram_authenticated(tmp_path: Path) -> None:
    with trio.fail_after(CEILING):
        async with fast_gateway(tmp_path) as fg:
            ws = await authed(fg)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: call(ws, 1, "tool_request", tool="ha_call_service", args=LIGHT)
                )
                shown = await fg.guardian.wait_for_card()
                # As the Telegram guardian calls it: the name as shown, the user id it verified.
                await fg.gateway.controls.decide(
                    shown.card.request_id,
                    Action.ALLOW,
                    "Alex (4242)",
                    message_ref=shown.ref,
                    voter="4242",
                )
    press = next(e for e in events(tmp_path / "agentgate.db") if e["type"] == "press")
    assert (press["by"], press["user"], press["action"]) == ("Alex (4242)", "4242", "allow")


async def test_events_and_checkpoints_refuse_updates_and_deletes(tmp_path: Path) -> None:
    with trio.fail_after(CEILING):
        async with fast_gateway(tmp_path) as fg:
            await a_day_of_use(fg)
            await fg.gateway.shutdown()
    conn = sqlite3.connect(tmp_path / "agentgate.db")
    try:
        for sql in (
            "UPDATE audit_events SET body = body WHERE seq = 1",
            "UPDATE audit_events SET seq = 100 WHERE seq = 1",
            "DELETE FROM audit_events WHERE seq = 1",
            "UPDATE audit_checkpoints SET size = 1",
            "DELETE FROM audit_checkpoints",
            "DELETE FROM audit_log",
            "UPDATE audit_log SET seq = 99",
            "UPDATE audit_log SET agent = 'someone else'",
        ):
            with pytest.raises(sqlite3.IntegrityError, match=r"append-only|original columns"):
                conn.execute(sql)
    finally:
        conn.close()


def test_no_code_path_changes_an_event() -> None:
    # Beside the triggers (which would fail any suite that tried): the only statements of the
    # package that touch events or checkpoints insert them, but for a compaction's prune.
    package = Path(__file__).resolve().parent.parent / "agentgate"
    writes = re.compile(
        r"\b(UPDATE|DELETE\s+FROM|REPLACE\s+INTO|INSERT\s+OR\s+REPLACE\s+INTO)\s+"
        r"(audit_events|audit_checkpoints|audit_compactions)\b",
        re.IGNORECASE,
    )
    found = [
        (path.name, match.group(0))
        for path in sorted(package.rglob("*.py"))
        for match in writes.finditer(path.read_text(encoding="utf-8"))
    ]
    assert found == [("eventlog.py", "DELETE FROM audit_events")]  # eventlog.prune


async def test_checkpoints_every_n_events_or_minutes_and_at_the_stop(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(
        tmp_path, audit={"checkpoint_every": 5, "checkpoint_minutes": 10}
    ) as fg:
        audit = fg.gateway.audit
        assert audit is not None
        ws = await authed(fg)
        for i in range(6):  # two events each: the decision, then the outcome
            await call(
                ws, i, "tool_request", tool="ha_get_state", args={"entity_id": "sensor.temp"}
            )
        await trio.sleep(1)
        first = audit.latest
        assert first is not None
        assert first.size >= 5  # five events: signed without waiting for the minutes
        # The rest are signed within the minutes; then, quiet, nothing new is signed.
        await trio.sleep(10 * 60 + 1)
        second = audit.latest
        assert second is not None
        assert second.size == len(events(tmp_path / "agentgate.db"))
        await trio.sleep(3600)
        assert audit.latest is second
        # One more request: signed within the minutes, not before.
        await call(ws, 99, "tool_request", tool="ha_get_state", args={"entity_id": "sensor.temp"})
        await trio.sleep(1)
        assert audit.latest is second
        await trio.sleep(10 * 60)
        assert audit.latest.size == second.size + 2
        await call(ws, 100, "tool_request", tool="ha_get_state", args={"entity_id": "sensor.temp"})
        await fg.gateway.shutdown()
        assert audit.latest.size == second.size + 4  # the stop signed the last events
    # The chat got them too, silently, at most one a minute (the newest covers the rest).
    posted = [tlog.find_notes(text)[0] for text in fg.guardian.silent]
    assert posted[-1] == audit.latest
    sizes = [n.size for n in posted]
    assert sizes == sorted(set(sizes))  # each newer than the last
    assert sizes[-3:] == [second.size, second.size + 2, second.size + 4]
    assert check(tmp_path / "agentgate.db", *fg.guardian.silent).ok


async def test_each_checkpoint_is_appended_to_the_witness_file(tmp_path: Path) -> None:
    witness = tmp_path / "elsewhere" / "checkpoints.txt"
    with trio.fail_after(CEILING):
        async with fast_gateway(
            tmp_path, audit={"checkpoint_every": 4, "witness_file": str(witness)}
        ) as fg:
            await a_day_of_use(fg)
            await fg.gateway.shutdown()
    notes = [n for n in tlog.find_notes(witness.read_text()) if isinstance(n, tlog.Checkpoint)]
    conn = read_only(tmp_path / "agentgate.db")
    stored = [r[0] for r in conn.execute("SELECT size FROM audit_checkpoints ORDER BY size")]
    conn.close()
    assert len(stored) >= 3
    assert [n.size for n in notes] == stored  # every checkpoint, in order
    assert stored[-1] == len(events(tmp_path / "agentgate.db"))  # the stop signed the last
    assert witness.stat().st_mode & 0o777 == 0o600
    report = check(tmp_path / "agentgate.db", witness.read_text())
    assert report.ok, report.text()
    assert len(report.given) == len(stored)


async def test_witness_none_posts_nothing_to_the_chat(tmp_path: Path) -> None:
    with trio.fail_after(CEILING):
        async with fast_gateway(tmp_path, audit={"witness": "none"}) as fg:
            await a_day_of_use(fg)
            await fg.gateway.shutdown()
    assert fg.guardian.silent == []
    assert check(tmp_path / "agentgate.db").latest_checkpoint is not None


async def test_the_key_is_made_once_kept_private_and_checked_at_every_start(
    tmp_path: Path,
) -> None:
    key = tmp_path / "agentgate.audit-key"
    with trio.fail_after(CEILING):
        async with fast_gateway(tmp_path) as fg:
            first = fg.gateway.audit.signer.vkey  # type: ignore[union-attr]
            await fg.gateway.shutdown()
        assert key.stat().st_mode & 0o777 == 0o600
        async with fast_gateway(tmp_path) as fg:  # the same key, the same log
            assert fg.gateway.audit.signer.vkey == first  # type: ignore[union-attr]
            await fg.gateway.shutdown()
        keys = [e for e in events(tmp_path / "agentgate.db") if e["type"] == "key"]
        assert [e["vkey"] for e in keys] == [first]
        # Another key in its place: the gateway refuses to sign with it.
        key.unlink()
        create_key(key)
        with pytest.raises(ConfigError, match=r"audit\.key: .* is not the key this audit log"):
            async with fast_gateway(tmp_path):
                pass
        # No key at all: refused too (a new key would sign a log it never saw).
        key.unlink()
        with pytest.raises(ConfigError, match=r"audit\.key: .*no audit key file.*restore"):
            async with fast_gateway(tmp_path):
                pass
    assert not key.exists()


async def test_audit_log_rows_are_rebuilt_from_the_events_alone(tmp_path: Path) -> None:
    with trio.fail_after(CEILING):
        async with fast_gateway(tmp_path) as fg:
            await a_day_of_use(fg)
            await fg.gateway.shutdown()
    conn = read_only(tmp_path / "agentgate.db")
    try:
        columns = ", ".join((*eventlog.ROW_COLUMNS, "seq"))
        table = [tuple(r) for r in conn.execute(f"SELECT {columns} FROM audit_log ORDER BY id")]
        rebuilt = sorted(
            (
                tuple(row[k] for k in (*eventlog.ROW_COLUMNS, "seq"))
                for row in eventlog.replay_rows(iter(events(tmp_path / "agentgate.db")))
            ),
            key=lambda r: r[0],
        )
    finally:
        conn.close()
    assert rebuilt == table


# -- upgrades and downgrades ------------------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL,
    kind TEXT NOT NULL DEFAULT 'request', agent TEXT NOT NULL, request_id TEXT,
    tool TEXT, args TEXT, signature TEXT, decision TEXT NOT NULL, matched TEXT,
    resolution TEXT, resolved_by TEXT, resolved_at REAL, result TEXT, error TEXT, via TEXT);
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TABLE pending_requests (
    request_id TEXT PRIMARY KEY, agent TEXT NOT NULL, rpc_id TEXT NOT NULL,
    tool TEXT NOT NULL, args TEXT NOT NULL, signature TEXT NOT NULL,
    matched TEXT NOT NULL, target TEXT, message_ref TEXT, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, state TEXT NOT NULL, outcome TEXT, decided_by TEXT,
    queued TEXT, delivered INTEGER NOT NULL DEFAULT 0, via TEXT);
INSERT INTO audit_log (time, agent, request_id, tool, args, signature, decision, matched,
    resolution, resolved_at, result, via)
    VALUES (1.5, 'pi', 'r1', 'ha_get_state', '{"entity_id": "sensor.temp"}',
    'ha_get_state(sensor.temp)', 'allow', 'rule 0', 'executed', 1.75, '{"state": "21"}', 'ws');
INSERT INTO audit_log (time, agent, request_id, tool, args, signature, decision, matched)
    VALUES (2.0, 'pi', 'r2', 'ha_call_service', '{"domain": "light"}', 'x', 'ask', 'rule 1');
INSERT INTO audit_log (time, kind, agent, decision, matched, resolved_by)
    VALUES (3.0, 'guardian', '-', 'freeze', 'all agents', 'Alex (4242)');
"""


async def test_a_version_1_store_is_upgraded_with_its_rows_sealed_first(tmp_path: Path) -> None:
    db = tmp_path / "agentgate.db"
    old = sqlite3.connect(db)
    old.executescript(V1_SCHEMA)
    before = [tuple(r) for r in old.execute("SELECT * FROM audit_log ORDER BY id")]
    old.close()
    with trio.fail_after(CEILING):
        async with fast_gateway(tmp_path) as fg:
            rows = await fg.gateway.store.audit_rows()
            assert [(r.request_id, r.decision) for r in rows] == [
                ("r1", "allow"),
                ("r2", "ask"),
                (None, "freeze"),
            ]
            await fg.gateway.shutdown()
    log = events(db)
    assert [e["type"] for e in log[:3]] == ["migrated"] * 3
    assert [e["row"]["id"] for e in log[:3]] == [1, 2, 3]
    assert log[0]["row"]["args"] == '{"entity_id": "sensor.temp"}'  # sealed as it was
    assert log[3]["type"] == "key"
    conn = read_only(db)
    try:
        versions = [tuple(r) for r in conn.execute("SELECT version FROM schema_version")]
        assert versions == [(SCHEMA_VERSION,)]
        after = [tuple(r)[:16] for r in conn.execute("SELECT * FROM audit_log ORDER BY id")]
    finally:
        conn.close()
    assert after[:3] == [row[:16] for row in before]  # the rows themselves are untouched
    report = check(db)
    assert report.ok, report.text()
    # The ask still open before the upgrade was interrupted: settled as an outcome event.
    assert any(e["type"] == "outcome" and e["row"] == 1 for e in log) is False


async def test_a_newer_store_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "agentgate.db"
    async with open_store(db, inline=True):
        pass
    conn = sqlite3.connect(db)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    schema = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    conn.close()
    with pytest.raises(StoreUnavailable, match=r"newer than this agentgate.*downgrade"):
        async with open_store(db, inline=True):
            pass
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema
    conn.close()


# The last commit before the event log: its store.py is "today's version" of the issue.
BEFORE_THE_LOG = "be65a86"


def _old_store_source() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["git", "-C", str(repo), "show", f"{BEFORE_THE_LOG}:agentgate/store.py"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout if done.returncode == 0 else None


@pytest.mark.slow
async def test_the_previous_version_refuses_an_upgraded_store(tmp_path: Path) -> None:
    source = _old_store_source()
    if source is None:
        pytest.skip(f"commit {BEFORE_THE_LOG} is not in this checkout")
    (tmp_path / "old_store.py").write_text(source)
    db = tmp_path / "agentgate.db"
    script = (
        "import sys, trio\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import old_store\n"
        "async def main():\n"
        "    async with old_store.open_store(sys.argv[1], inline=True) as store:\n"
        "        await store.audit(old_store.AuditEntry(1.0, 'pi', 'r1', 't', {}, 's', 'allow',"
        " 'rule'))\n"
        "trio.run(main)\n"
    )
    # Today's version writes a store; this version upgrades it; today's then refuses it.
    command = [sys.executable, "-c", script, str(db)]
    with trio.fail_after(60):
        first = await trio.run_process(command, capture_stderr=True, check=False)
    assert first.returncode == 0, first.stderr
    async with open_store(db, inline=True) as store:
        assert [r.request_id for r in await store.audit_rows()] == ["r1"]
    sealed = events(db)
    assert [(e["type"], e["row"]["request_id"]) for e in sealed] == [("migrated", "r1")]
    report = check(db)
    assert report.integrity == [], report.text()  # no key and no checkpoint yet: no completeness
    with trio.fail_after(60):
        again = await trio.run_process(command, capture_stderr=True, check=False)
    assert again.returncode != 0
    assert b"schema version 2 is newer than this agentgate (1)" in again.stderr


# -- retention ------------------------------------------------------------------------------


async def test_a_compaction_prunes_old_events_and_the_log_still_verifies(tmp_path: Path) -> None:
    db = tmp_path / "agentgate.db"
    signer = LogSigner(create_key(tmp_path / "agentgate.audit-key"), "agentgate/test")
    async with open_store(db, inline=True) as store:
        await store.append_event("key", {"origin": signer.origin, "vkey": signer.vkey})
        for day in range(10):
            await store.audit(
                AuditEntry(day * 86400.0, "pi", f"r{day}", "t", {"day": day}, "t()", "allow", "r")
            )
            await store.resolve_audit(
                f"r{day}", Outcome.EXECUTED, resolved_by=None, resolved_at=day * 86400.0 + 1
            )
            if day == 4:
                early = await store.write_checkpoint(signer, day * 86400.0)
        before = await store.write_checkpoint(signer, 10 * 86400.0)
        assert early is not None
        assert before is not None
        done = await store.compact(
            6.5 * 86400, sign=signer, at=10 * 86400.0, by="test", keep_days=3.5
        )
        assert done is not None
        assert done.checkpoint is not None
        assert done.cut == 1 + 7 * 2  # the key, then two events a day for days 0..6
        rows = await store.audit_rows()
        assert [r.request_id for r in rows] == ["r7", "r8", "r9"]
        again = await store.compact(6.5 * 86400, sign=signer, at=10 * 86400.0, by="x", keep_days=1)
        assert again is None  # nothing left to prune
    report = check(db, early.text(), before.text())
    assert report.ok, report.text()
    assert report.first == done.cut
    assert any("before the pruned range" in note for note in report.notes)
    assert any("were pruned" in note for note in report.notes)
    kinds = [e["type"] for e in events(db)]
    assert kinds[-1] == "compaction"
    assert len(kinds) == 3 * 2 + 1


async def test_a_compaction_stops_before_a_request_still_open(tmp_path: Path) -> None:
    db = tmp_path / "agentgate.db"
    signer = LogSigner(create_key(tmp_path / "agentgate.audit-key"), "agentgate/test")
    async with open_store(db, inline=True) as store:
        await store.append_event("key", {"origin": signer.origin, "vkey": signer.vkey})
        for day in range(6):
            await store.audit(
                AuditEntry(day * 86400.0, "pi", f"r{day}", "t", {}, "t()", "ask", "r")
            )
            if day != 2:  # r2's approval is still waiting
                await store.resolve_audit(
                    f"r{day}", Outcome.EXECUTED, resolved_by="Alex", resolved_at=day * 86400.0
                )
        done = await store.compact(4.5 * 86400, sign=signer, at=6 * 86400.0, by="t", keep_days=1)
        assert done is not None
        assert done.cut == 1 + 2 * 2  # the key, r0 and r1: r2 keeps its row and all after it
        await store.resolve_audit(
            "r2", Outcome.TIMED_OUT, resolved_by=None, resolved_at=6 * 86400.0 + 1
        )
        rows = {r.request_id: r.resolution for r in await store.audit_rows()}
        assert rows == {"r2": "timed_out", "r3": "executed", "r4": "executed", "r5": "executed"}
        again = await store.compact(4.5 * 86400, sign=signer, at=7 * 86400.0, by="t", keep_days=1)
        assert again is not None  # now r2 and r3 go too
    assert any(e["type"] == "outcome" and e["request_id"] == "r2" for e in events(db))
    report = check(db)
    assert report.ok, report.text()


async def test_a_prefix_removed_without_a_signed_compaction_is_caught(tmp_path: Path) -> None:
    db = tmp_path / "agentgate.db"
    signer = LogSigner(create_key(tmp_path / "agentgate.audit-key"), "agentgate/test")
    async with open_store(db, inline=True) as store:
        await store.append_event("key", {"origin": signer.origin, "vkey": signer.vkey})
        for day in range(4):
            await store.audit(
                AuditEntry(day * 86400.0, "pi", f"r{day}", "t", {}, "t()", "deny", "r")
            )
        await store.write_checkpoint(signer, 5 * 86400.0)
    # Someone records a "compaction" by hand and deletes the first events: no event says so.
    conn = sqlite3.connect(db)
    _, _, frontier = eventlog.base(conn)
    leaves = [bytes(r[0]) for r in conn.execute("SELECT leaf FROM audit_events ORDER BY seq")]
    chains = [bytes(r[0]) for r in conn.execute("SELECT chain FROM audit_events ORDER BY seq")]
    for n, leaf in enumerate(leaves[:3]):
        frontier = tlog.append(frontier, n, leaf)
    conn.execute(
        "INSERT INTO audit_compactions VALUES (3, ?, ?, 0)", (chains[2], tlog.pack(frontier))
    )
    conn.execute("DELETE FROM audit_log WHERE seq < 3")
    conn.execute("DELETE FROM audit_events WHERE seq < 3")
    conn.commit()
    conn.close()
    report = check(db)
    assert not report.ok
    assert "no compaction event" in report.text()


def _tables(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = read_only(db)
    try:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
            for table in ("audit_events", "audit_tip", "audit_log")
        }
    finally:
        conn.close()


async def test_a_batch_writes_the_log_appending_one_by_one_would(tmp_path: Path) -> None:
    # A batch holds the tip in memory (one read, one write); a failing operation's events go
    # with its savepoint. The same operations, one transaction each with the tip read and
    # written per event, leave byte-identical events, tip and rows.
    entries = [
        AuditEntry(
            time=1_700_000_000.0 + i,
            agent="agent",
            request_id=f"r{i}",
            tool="ha_get_state",
            args={"entity_id": f"sensor.s{i}", "ü": [i, None, 1.5]},
            signature=f"ha_get_state(sensor.s{i})",
            decision="allow",
            matched="allow sensors",
            via="ws",
        )
        for i in range(4)
    ]

    def resolve(i: int) -> Any:
        def fn(c: sqlite3.Connection) -> None:
            eventlog.resolve_rows(
                c,
                "request_id=? AND kind='request'",
                (f"r{i}",),
                resolution=Outcome.EXECUTED,
                by=None,
                at=1_700_000_100.0 + i,
                result=eventlog.json_text({"state": "21.5", "n": i}),
                error=None,
            )

        return fn

    def fails_after_appending(c: sqlite3.Connection) -> None:
        eventlog.append(c, "card", {"request_id": "r9", "target": "x"}, "r9")
        raise sqlite3.OperationalError("disk I/O error")

    def opens(i: int) -> Any:
        return lambda c: store_module._insert_audit(c, entries[i])

    steps = [
        opens(0),
        opens(1),
        resolve(0),
        fails_after_appending,
        opens(2),
        resolve(1),
        opens(3),
        resolve(2),
    ]

    # One by one: a transaction per step, eventlog unheld (the tip read and written per event).
    async with open_store(tmp_path / "one.db", inline=True):
        pass
    conn = sqlite3.connect(tmp_path / "one.db", isolation_level=None)
    try:
        for step in steps:
            conn.execute("BEGIN IMMEDIATE")
            try:
                step(conn)
            except sqlite3.OperationalError:
                conn.execute("ROLLBACK")
            else:
                conn.execute("COMMIT")
    finally:
        conn.close()

    # Batched: every step in one transaction of the store (posted, then the last one waited).
    with trio.fail_after(CEILING):
        async with open_store(tmp_path / "batch.db", inline=True) as store:
            commits = store.commits
            for step in steps[:-1]:
                store.post(step)
            await store._do(steps[-1])
            assert store.commits == commits + 1  # one transaction for all of them

    one, batch = _tables(tmp_path / "one.db"), _tables(tmp_path / "batch.db")
    assert len(one["audit_events"]) == 4 + 3
    assert batch == one
    assert check(tmp_path / "batch.db").ok
