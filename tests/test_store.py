"""The store on its own: append-only audit, group commit, queued results (handed out once, or
listed until acknowledged)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from agentgate.approvals import TRANSITIONS, Outcome, State
from agentgate.store import AUDIT_RESULT_LIMIT, AuditEntry, PendingRow, StoreUnavailable, open_store

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


class OneAtATime:
    """The store's connection, failing any statement that starts while another one runs (on
    another thread): the worker thread and the loop must never share it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.overlaps = 0
        self.threads: set[int] = set()

    def execute(self, sql: str, *args: Any) -> Any:
        if not self._lock.acquire(blocking=False):
            self.overlaps += 1
            raise sqlite3.OperationalError("the connection is in use by another thread")
        try:
            self.threads.add(threading.get_ident())
            return self._conn.execute(sql, *args)
        finally:
            self._lock.release()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_one_batch_holds_the_connection_at_a_time(tmp_path: Path) -> None:
    # As served: normal commits on the loop (in the caller's task when the store is free),
    # durable ones in the worker thread; whoever commits, batches never overlap.
    async with open_store(tmp_path / "a.db") as store:
        conn = OneAtATime(store._conn)
        store._conn = conn  # type: ignore[assignment]

        async def write(i: int) -> None:
            await store.audit(entry(f"r{i}"), durable=i % 3 == 0)
            await trio.lowlevel.checkpoint()
            await store.resolve_audit(
                f"r{i}", Outcome.EXECUTED, resolved_by=None, resolved_at=NOW, wait=i % 2 == 0
            )

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(300):
                    nursery.start_soon(write, i)
                    if i % 7 == 0:
                        await trio.lowlevel.checkpoint()
        store._conn = conn._conn
        rows = await store.audit_rows()
    assert conn.overlaps == 0
    assert len(conn.threads) == 2  # the loop's and the worker's
    assert len(rows) == 300
    assert store.synced < 100  # 100 durable writes, fewer fsyncs


async def test_a_wait_for_appended_events_ends_at_its_count(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_store(tmp_path / "a.db", inline=True) as store:
        ended: list[int] = []

        async def wait(count: int) -> None:
            await store.wait_appended(count)
            ended.append(store.appended)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, 3)
            nursery.start_soon(wait, 2)
            with trio.move_on_after(1):  # gives up: no longer a waiter
                await store.wait_appended(100)
            assert len(store._append_waiters) == 2
            for i in range(3):
                await store.audit(entry(f"r{i}"))
                await trio.testing.wait_all_tasks_blocked()
                assert ended == [2, 3][: max(0, i)]
        assert store._append_waiters == []
        await store.wait_appended(3)  # reached already: returns at once


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
            await store.wait_checkpointed(store.commits)
        # the main file alone (no WAL) holds the rows
        copy = tmp_path / "copy.db"
        copy.write_bytes(path.read_bytes())
        conn = sqlite3.connect(copy)
        try:
            assert conn.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0] == 20
        finally:
            conn.close()


async def test_an_idle_store_sets_no_timer_and_checkpoints_after_a_commit(
    tmp_path: Path,
) -> None:
    """The background WAL checkpoint waits for a commit, not for a clock: an idle store wakes
    nothing; a commit after any idle stretch is still checkpointed."""
    path = tmp_path / "a.db"
    async with open_store(path, checkpoint_every=0.05) as store:
        for round_ in range(2):
            await store.audit(entry(f"r{round_}"))
            with trio.fail_after(10):
                await store.wait_checkpointed(store.commits)
            await trio.testing.wait_all_tasks_blocked()
            assert trio.lowlevel.current_statistics().seconds_to_next_deadline == float("inf")
            assert store.checkpointed == store.commits


class _FailingCommit:
    """A sqlite3 connection whose ``COMMIT`` fails (a disk that fills up or dies at the end of a
    transaction); every other statement runs for real."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.failed = 0

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.strip().upper() == "COMMIT":
            self.failed += 1
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.mark.parametrize("inline", [True, False])
async def test_a_failing_commit_of_one_write_is_reported(tmp_path: Path, inline: bool) -> None:
    # A batch of one takes the path without savepoints: its COMMIT failing must still fail it.
    sync = "normal" if inline else "full"
    async with open_store(tmp_path / "a.db", synchronous=sync, inline=inline) as store:
        failing = _FailingCommit(store._conn)
        store._conn = failing  # type: ignore[assignment]
        with pytest.raises(StoreUnavailable, match="disk I/O error"):
            await store.audit(entry("r1"))
        assert failing.failed == 1
        store._conn = failing._conn
        assert await store.audit_rows() == []  # rolled back: nothing claims to be written
        await store.audit(entry("r2"))  # the store is still usable
        assert [r.request_id for r in await store.audit_rows()] == ["r2"]


@pytest.mark.parametrize("inline", [True, False])
async def test_a_failing_commit_of_many_writes_fails_each(tmp_path: Path, inline: bool) -> None:
    sync = "normal" if inline else "full"
    async with open_store(tmp_path / "a.db", synchronous=sync, inline=inline) as store:
        failing = _FailingCommit(store._conn)
        store._conn = failing  # type: ignore[assignment]
        outcomes: list[str] = []

        async def write(request_id: str) -> None:
            try:
                await store.audit(entry(request_id))
                outcomes.append("ok")
            except StoreUnavailable:
                outcomes.append("failed")

        # Posted writes join the commit of the awaited ones: one batch of many.
        for i in range(3):
            await store.resolve_audit(
                f"p{i}", Outcome.EXECUTED, resolved_by=None, resolved_at=NOW, wait=False
            )
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(write, f"r{i}")
        assert outcomes == ["failed"] * 5
        assert failing.failed >= 1
        store._conn = failing._conn
        assert await store.audit_rows() == []


def _mount_small_tmpfs(where: Path) -> str | None:
    """Mount a 512 KiB tmpfs at ``where``; None if done, else why it cannot be."""
    if os.geteuid() != 0:
        return "mounting a size-limited tmpfs needs root"
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}"
    return None


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a small filesystem of its own (filled up by the test)."""
    where = tmp_path / "small-fs"
    why = _mount_small_tmpfs(where)
    if why is not None:
        pytest.skip(why)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(directory: Path) -> None:
    """Write a file until the filesystem holding ``directory`` has no room left."""
    chunk = b"\0" * 4096
    with contextlib.suppress(OSError), (directory / "filler").open("wb", buffering=0) as f:
        while True:
            f.write(chunk)


async def test_a_full_disk_fails_writes_closed_and_loses_nothing_reported_written(
    full_disk: Path,
) -> None:
    path = full_disk / "agentgate.db"
    reported: list[str] = []  # writes the store said were committed
    refused: list[str] = []
    async with open_store(path, inline=True) as store:
        await store.audit(entry("before"))
        reported.append("before")
        _fill(full_disk)
        for i in range(50):  # the WAL grows with every commit: it soon needs a page more
            try:
                await store.audit(entry(f"r{i}"))
            except StoreUnavailable as exc:
                refused.append(f"r{i}: {exc}")
            else:
                reported.append(f"r{i}")
        (full_disk / "filler").unlink()
        await store.audit(entry("after"))  # room again: writes go on
        reported.append("after")
    async with open_store(path, inline=True) as store:
        rows = [r.request_id for r in await store.audit_rows()]
    # Every write reported committed is there after a reopen, and only those.
    assert rows == reported
    assert refused, "the disk never filled up"
    assert all("database or disk is full" in why for why in refused), refused


def pending_row(request_id: str) -> PendingRow:
    return PendingRow(
        request_id, "pi", 1, "t", {}, "t", "rule", None, None, NOW, NOW + 60, State.PENDING
    )


async def test_every_state_change_the_store_makes_is_in_the_table(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with open_store(path, inline=True) as store:
        moves: list[tuple[str, str]] = []
        # Record every state change the store's own methods make, as SQL sees it.
        store._conn.execute("CREATE TEMP TABLE moves (old TEXT, new TEXT)")
        store._conn.execute(
            "CREATE TEMP TRIGGER record_moves AFTER UPDATE OF state ON pending_requests"
            " WHEN NEW.state != OLD.state"
            " BEGIN INSERT INTO moves VALUES (OLD.state, NEW.state); END"
        )
        done = {"entry": {}, "decided_by": "g", "at": NOW, "delivered": False}
        for request_id in ("executed", "denied", "twice"):
            await store.add_pending(entry(request_id, "ask"), pending_row(request_id))
        assert await store.begin_execution("executed", "g", NOW)
        assert not await store.begin_execution("executed", "g", NOW)
        assert await store.finish_pending("executed", Outcome.EXECUTED, **done)  # type: ignore[arg-type]
        assert not await store.begin_execution("executed", "g", NOW)  # done stays done
        assert await store.finish_pending("denied", Outcome.DENIED, **done)  # type: ignore[arg-type]
        assert await store.finish_pending("twice", Outcome.TIMED_OUT, **done)  # type: ignore[arg-type]
        assert not await store.finish_pending("twice", Outcome.EXECUTED, **done)  # type: ignore[arg-type]
        moves = [tuple(r) for r in store._conn.execute("SELECT old, new FROM moves")]
        assert moves == [
            ("pending", "executing"),
            ("executing", "done"),
            ("pending", "done"),
            ("pending", "done"),
        ]
        for old, new in moves:
            assert State(new) in TRANSITIONS[State(old)]
        rows = {r.request_id: r for r in await store.audit_rows()}
        assert rows["twice"].resolution is Outcome.TIMED_OUT  # the second finish wrote nothing


@pytest.mark.parametrize("old", list(State))
@pytest.mark.parametrize("new", list(State))
async def test_sql_refuses_a_state_change_not_in_the_table(
    tmp_path: Path, old: State, new: State
) -> None:
    async with open_store(tmp_path / "a.db", inline=True) as store:
        await store.add_pending(entry("p", "ask"), pending_row("p"))
        conn = store._conn
        conn.execute("DROP TRIGGER pending_transitions")  # to put the row in ``old`` first
        conn.execute("UPDATE pending_requests SET state=?", (old,))
    async with open_store(tmp_path / "a.db", inline=True) as store:  # the trigger is back
        change = partial(
            store._conn.execute, "UPDATE pending_requests SET state=? WHERE request_id='p'", (new,)
        )
        if old == new or new in TRANSITIONS[old]:
            change()
        else:
            with pytest.raises(sqlite3.IntegrityError, match="not in the table"):
                change()


@pytest.mark.parametrize("inline", [True, None], ids=["inline", "as-served"])
async def test_each_commit_runs_at_the_level_it_asks_for(
    tmp_path: Path, inline: bool | None
) -> None:
    # The level is switched only when the kind of commit changes (a run of durable commits pays
    # no PRAGMA): a durable commit is always FULL (2), any other NORMAL (1), whatever came before.
    def level(c: sqlite3.Connection) -> int:
        return int(c.execute("PRAGMA synchronous").fetchone()[0])

    kinds = [True, True, False, True, False, False, True]
    with trio.fail_after(20):
        async with open_store(tmp_path / "a.db", inline=inline) as store:
            levels = [await store._do(level, durable=durable) for durable in kinds]
    assert levels == [2 if durable else 1 for durable in kinds]
