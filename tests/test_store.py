"""The store on its own: append-only audit, group commit, queued results (handed out once, or
listed until acknowledged)."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from agentgate.store import AUDIT_RESULT_LIMIT, AuditEntry, PendingRow, open_store

NOW = 1_800_000_000.0


def entry(request_id: str, decision: str = "allow") -> AuditEntry:
    return AuditEntry(
        NOW,
        "pi",
        request_id,
        "ha_get_state",
        {"entity_id": "sensor.t"},
        "ha_get_state(sensor.t)",
        decision,
        "rule 0",
    )


async def test_file_is_private_and_audit_rows_are_append_only(tmp_path: Path) -> None:
    path = tmp_path / "data" / "agentgate.db"
    async with open_store(path) as store:
        await store.audit(entry("r1"))
        await store.resolve_audit("r1", "executed", resolved_by=None, resolved_at=NOW)
        await store.resolve_audit("r1", "failed", resolved_by=None, resolved_at=NOW)  # no-op
        [row] = await store.audit_rows()
        assert (row.decision, row.resolution) == ("allow", "executed")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit_log")
    with pytest.raises(sqlite3.DatabaseError, match="original columns"):
        conn.execute("UPDATE audit_log SET decision = 'deny'")
    conn.close()


async def test_concurrent_writers_share_commits(tmp_path: Path) -> None:
    # With fsync per commit (synchronous = "full", in the worker thread), concurrent writers
    # share a commit. (With "normal" each commit is cheap and runs in the caller's task.)
    async with open_store(tmp_path / "a.db", synchronous="full") as store:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(store.audit, entry(f"r{i}"))
        assert len(await store.audit_rows()) == 200
        assert store.commits < 200  # group commit: fewer transactions than writes


async def test_posted_writes_join_the_next_commit_or_are_flushed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_store(tmp_path / "a.db", inline=True) as store:
        await store.audit(entry("r1"))
        commits = store.commits
        await store.resolve_audit("r1", "executed", resolved_by=None, resolved_at=NOW, wait=False)
        await store.audit(entry("r2"))  # carries the posted resolution in the same commit
        assert store.commits == commits + 1
        await store.resolve_audit("r2", "executed", resolved_by=None, resolved_at=NOW, wait=False)
        await trio.sleep(1)  # nobody else writes: flushed on its own, shortly (fake clock)
        assert store.commits == commits + 2
        assert [r.resolution for r in await store.audit_rows()] == ["executed", "executed"]


async def test_posted_writes_are_not_lost_at_close(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with open_store(path) as store:
        await store.audit(entry("r1"))
        await store.resolve_audit("r1", "executed", resolved_by=None, resolved_at=NOW, wait=False)
    async with open_store(path) as store:
        assert [r.resolution for r in await store.audit_rows()] == ["executed"]


async def test_a_failing_operation_does_not_sink_its_batch(tmp_path: Path) -> None:
    async with open_store(tmp_path / "a.db", inline=True) as store:
        pending = PendingRow(
            "p1", "pi", 1, "t", {}, "t", "rule", None, None, NOW, NOW + 60, "pending"
        )
        results: list[object] = []

        async def add() -> None:
            try:
                await store.add_pending(entry("p1", "ask"), pending)
                results.append("ok")
            except Exception as exc:
                results.append(type(exc).__name__)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(add)
            nursery.start_soon(add)  # the same primary key: this one fails alone
            nursery.start_soon(store.audit, entry("other"))
        assert sorted(map(str, results)) == ["StoreUnavailable", "ok"]
        assert {r.request_id for r in await store.audit_rows()} == {"p1", "other"}


async def test_queued_results_are_handed_out_once(tmp_path: Path) -> None:
    async with open_store(tmp_path / "a.db", inline=True) as store:
        pending = PendingRow(
            "p1", "pi", "x", "t", {}, "t", "rule", None, None, NOW, NOW + 60, "pending"
        )
        await store.add_pending(entry("p1", "ask"), pending)
        assert await store.begin_execution("p1", "g", NOW)
        assert not await store.begin_execution("p1", "g", NOW)  # exactly once
        await store.finish_pending(
            "p1", "executed", decided_by="g", at=NOW, entry={"request_id": "p1"}, delivered=False
        )
        assert await store.queued_count("pi") == 1
        assert await store.take_queued("pi") == [{"request_id": "p1"}]
        assert await store.take_queued("pi") == []
        await store.mark_undelivered("p1")
        assert await store.take_queued("pi") == [{"request_id": "p1"}]


async def test_listed_results_stay_queued_until_acknowledged(tmp_path: Path) -> None:
    async with open_store(tmp_path / "a.db", inline=True) as store:
        for request_id, agent in (("p1", "pi"), ("p2", "pi"), ("l1", "laptop")):
            pending = PendingRow(
                request_id, agent, 1, "t", {}, "t", "rule", None, None, NOW, NOW + 60, "pending"
            )
            await store.add_pending(entry(request_id, "ask"), pending)
            await store.finish_pending(
                request_id,
                "denied",
                decided_by="g",
                at=NOW,
                entry={"request_id": request_id},
                delivered=False,
            )
        first = await store.list_queued("pi")
        assert first == [{"request_id": "p1"}, {"request_id": "p2"}]
        assert await store.list_queued("pi") == first  # listing hands nothing out
        # another agent's id, an unknown one and a repeated one change nothing else
        assert await store.acknowledge_queued("pi", ["l1", "nope", "p1", "p1"]) == 1
        assert await store.list_queued("pi", acknowledge=["p1"]) == [{"request_id": "p2"}]
        assert await store.list_queued("pi", acknowledge=["p2"]) == []
        assert await store.take_queued("laptop") == [{"request_id": "l1"}]
        assert await store.queued_count("pi") == 0


async def test_long_results_are_cut_in_the_audit_log(tmp_path: Path) -> None:
    async with open_store(tmp_path / "a.db", inline=True) as store:
        await store.audit(entry("r1"))
        huge = [{"entity_id": f"sensor.s{i}", "state": "x" * 50} for i in range(500)]
        await store.resolve_audit("r1", "executed", resolved_by=None, resolved_at=NOW, result=huge)
        [row] = await store.audit_rows()
        assert row.result["truncated"] is True
        assert len(row.result["excerpt"]) == AUDIT_RESULT_LIMIT


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with open_store(path):
        pass
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(Exception, match="newer than this agentgate"):
        async with open_store(path):
            pass


async def test_a_failing_single_write_leaves_the_store_usable(tmp_path: Path) -> None:
    async with open_store(tmp_path / "a.db") as store:
        pending = PendingRow(
            "p1", "pi", 1, "t", {}, "t", "rule", None, None, NOW, NOW + 60, "pending"
        )
        await store.add_pending(entry("p1", "ask"), pending)
        with pytest.raises(Exception, match="audit log unavailable"):
            await store.add_pending(entry("p1", "ask"), pending)
        await store.audit(entry("after"))
        assert [r.request_id for r in await store.audit_rows()] == ["p1", "after"]


async def test_wal_is_checkpointed_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with open_store(path, checkpoint_every=0.05) as store:
        for i in range(20):
            await store.audit(entry(f"r{i}"))
        with trio.fail_after(10):
            while True:  # the main file alone (no WAL) must hold the rows once checkpointed
                copy = tmp_path / f"copy-{store.commits}.db"
                copy.write_bytes(path.read_bytes())
                conn = sqlite3.connect(copy)
                try:
                    count = conn.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0]
                except sqlite3.OperationalError:  # not even the schema checkpointed yet
                    count = 0
                conn.close()
                if count == 20:
                    break
                await trio.sleep(0.05)
