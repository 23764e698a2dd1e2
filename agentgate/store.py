"""The store: one SQLite file holding the audit log, pending approvals, queued results, grants,
two-person votes and undo snapshots.

Why it looks like this:

- **Fail closed.** Every decision row is committed before anything executes; a write that fails
  raises :class:`StoreUnavailable` (an ``ExecutionFailed``, -32004) and the caller executes nothing.
- **Durable before execute.** The row that lets a call run (an allowed call's decision, an
  approval's move to ``executing``) is written with ``durable=True``: its commit waits for an
  fsync of the WAL (``synchronous = FULL`` for that transaction), so after a power cut a call is
  either recorded as started or was never sent. Other writes may stay ``normal``: a power cut
  can lose the last of them, never one that preceded an execution (the fsync of a durable
  commit also covers every commit before it in the WAL).
- **Where SQLite runs.** With ``synchronous = "full"`` every commit waits for an fsync, so
  commits run in the store's own worker thread (one long-lived thread: a hand-off to it is a
  queue put and the loop's wake-up, cheaper than ``trio.to_thread``'s per call). With
  ``"normal"`` (the default) a WAL commit is a few ``write()`` calls, cheaper than the thread
  hop it would cost, so commits run on the event loop, except durable ones, whose fsync runs in
  the worker thread (the loop never waits for a disk); WAL checkpoints go to a Trio worker
  thread on a connection of their own.
- **Group commit.** Callers enqueue operations. When no batch holds the connection, the caller
  commits what is queued at once, in its own task; otherwise one writer task runs everything
  that queued meanwhile in a single transaction once the connection is free (each operation
  under its own SAVEPOINT, so one failing operation does not sink the others) and then wakes
  every caller. Under load, N concurrent requests share one fsync instead of paying N: durable
  writes that arrive while an fsync runs share the next one.
- **An audit log you can prove.** Every audit fact is an event appended to a hash-chained
  Merkle log (:mod:`agentgate.eventlog`) in the same transaction as the rows it describes, so
  an event that precedes an execution is fsync'd with it. ``audit_log`` (one row per request,
  what ``agentgate audit`` shows) is derived from the events; triggers refuse to change its
  rows' original columns or delete them, and refuse any change to an event.
- **Keys.** Approvals are keyed by a gateway-generated UUID (``request_id``), never by the agent's
  JSON-RPC id, which is stored only to echo it back.
- **Migrations are additive.** Columns and tables added since the first schema are added when a
  store is opened (``_migrate``); an older agentgate still reads a newer store's old columns.
  Schema version 2 (the event log) seals a version 1 store's audit rows as its first events
  when it is opened; an agentgate that knows only version 1 refuses the store.

Imports: approvals (the states), errors, eventlog, tlog.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import queue
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import attrs
import trio
from attrs import frozen

from agentgate import eventlog, tlog
from agentgate.approvals import (
    TRANSITIONS,
    UNDO_TRANSITIONS,
    Outcome,
    State,
    UndoState,
    sources,
    undo_sources,
)
from agentgate.errors import ExecutionFailed

T = TypeVar("T")
log = logging.getLogger(__name__)

POST_FLUSH = 0.05  # seconds a posted write may wait for a commit to join
POST_BACKLOG = 256  # posted writes that wake the writer at once

SCHEMA_VERSION = 2  # 2: the event log (agentgate.eventlog)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);

CREATE TABLE IF NOT EXISTS audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    time        REAL NOT NULL,
    kind        TEXT NOT NULL DEFAULT 'request',   -- request | guardian
    agent       TEXT NOT NULL,
    request_id  TEXT,
    tool        TEXT,
    args        TEXT,                              -- JSON, every argument
    signature   TEXT,
    decision    TEXT NOT NULL,                     -- allow | deny | ask | invalid | limited | ...
    matched     TEXT,                              -- what decided it
    resolution  TEXT,                              -- an approvals.Outcome
    resolved_by TEXT,
    resolved_at REAL,
    result      TEXT,                              -- JSON summary of the data
    error       TEXT
);
CREATE INDEX IF NOT EXISTS audit_request ON audit_log(request_id);
CREATE INDEX IF NOT EXISTS audit_time ON audit_log(time);

CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

CREATE TRIGGER IF NOT EXISTS audit_keep_original
BEFORE UPDATE OF time, kind, agent, request_id, tool, args, signature, decision, matched
ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log rows keep their original columns'); END;

CREATE TABLE IF NOT EXISTS pending_requests (
    request_id  TEXT PRIMARY KEY,
    agent       TEXT NOT NULL,
    rpc_id      TEXT NOT NULL,                     -- JSON of the agent's id, echoed back
    tool        TEXT NOT NULL,
    args        TEXT NOT NULL,
    signature   TEXT NOT NULL,
    matched     TEXT NOT NULL,
    target      TEXT,
    message_ref TEXT,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    state       TEXT NOT NULL,                     -- pending | executing | done
    outcome     TEXT,                              -- an approvals.Outcome
    decided_by  TEXT,
    queued      TEXT,                              -- JSON result entry while waiting for the agent
    delivered   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS pending_state ON pending_requests(state);
CREATE INDEX IF NOT EXISTS pending_queued ON pending_requests(agent, delivered);

CREATE TABLE IF NOT EXISTS grants (
    grant_id    TEXT PRIMARY KEY,
    agent       TEXT NOT NULL,
    signature   TEXT NOT NULL,
    granted_by  TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    revoked_by  TEXT,
    revoked_at  REAL
);

CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE IF NOT EXISTS approval_votes (      -- two-person approval: who pressed Allow
    request_id  TEXT NOT NULL,
    voter       TEXT NOT NULL,                     -- the guardian's identity (Telegram user id)
    voter_name  TEXT NOT NULL,                     -- as the card and the audit log show it
    at          REAL NOT NULL,
    PRIMARY KEY (request_id, voter)
);

CREATE TABLE IF NOT EXISTS undo_snapshots (      -- what an Undo would put back (agentgate.undo)
    request_id   TEXT PRIMARY KEY,
    agent        TEXT NOT NULL,
    tool         TEXT NOT NULL,
    args         TEXT NOT NULL,
    signature    TEXT NOT NULL,
    decided_by   TEXT,                             -- the guardian who allowed it; NULL: policy
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,                    -- the end of the undo window
    before       TEXT NOT NULL,                    -- JSON: entity -> {state, attributes}
    after        TEXT NOT NULL,                    -- JSON: the same, as the call left them
    message_refs TEXT NOT NULL DEFAULT '[]',       -- JSON: the approval card (and copies)
    state        TEXT NOT NULL,                    -- an approvals.UndoState
    undone_by    TEXT,
    undone_at    REAL,
    detail       TEXT
);
CREATE INDEX IF NOT EXISTS undo_open ON undo_snapshots(state, expires_at);

-- "Always allow" counts a signature's approvals per agent: only asks need this index.
CREATE INDEX IF NOT EXISTS audit_asks ON audit_log(agent, signature, time) WHERE decision = 'ask';
"""


class StoreUnavailable(ExecutionFailed):
    """The store could not be written: nothing executes (fail closed)."""

    default_message = "audit log unavailable: nothing was executed"


@frozen
class AuditEntry:
    time: float
    agent: str
    request_id: str | None
    tool: str | None
    args: dict[str, Any] | None
    signature: str | None
    decision: str
    matched: str | None
    kind: str = "request"
    resolution: Outcome | None = None
    resolved_by: str | None = None
    resolved_at: float | None = None
    result: Any = None
    error: str | None = None
    id: int | None = None
    via: str | None = None  # the front door: ws, mcp-stdio, mcp-http (None: before doors)

    @classmethod
    def guardian(
        cls, time: float, decision: str, what: str, by: str, request_id: str | None = None
    ) -> AuditEntry:
        """A guardian's act (a grant, a vote, a freeze, a reload...): ``what`` it was about."""
        return cls(
            time=time,
            kind="guardian",
            agent="-",
            request_id=request_id,
            tool=None,
            args=None,
            signature=None,
            decision=decision,
            matched=what,
            resolved_by=by,
        )


@frozen
class PendingRow:
    request_id: str
    agent: str
    rpc_id: Any
    tool: str
    args: dict[str, Any]
    signature: str
    matched: str
    target: str | None
    message_ref: str | None
    created_at: float
    expires_at: float
    state: State
    outcome: Outcome | None = None
    decided_by: str | None = None
    via: str | None = None
    quorum: int = 1  # Allow presses needed (a rule's approvals: N)
    quota: str | None = None  # asked because this quota was used up ("20 per hour")


@frozen
class UndoRow:
    """An executed call Undo can put back: the states before and after it (``before`` and
    ``after``: entity id -> ``{"state", "attributes"}``, the attributes :mod:`agentgate.undo`
    restores)."""

    request_id: str
    agent: str
    tool: str
    args: dict[str, Any]
    signature: str
    decided_by: str | None
    created_at: float
    expires_at: float
    before: dict[str, Any]
    after: dict[str, Any]
    message_refs: tuple[str, ...] = ()
    state: UndoState = UndoState.AVAILABLE
    undone_by: str | None = None
    undone_at: float | None = None
    detail: str | None = None


@frozen
class History:
    """A signature's asks for one agent in a window: approved (by a guardian) and denied."""

    approved: int
    denied: int


@frozen
class ResultRow:
    """An approval's outcome as :meth:`Store.result_of` reads it: ``entry`` (the queued-result
    entry of docs/protocol.md) is None while the approval is still open."""

    request_id: str
    expires_at: float
    entry: dict[str, Any] | None


@frozen
class GrantRow:
    grant_id: str
    agent: str
    signature: str
    granted_by: str
    created_at: float
    expires_at: float


def _json(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


AUDIT_RESULT_LIMIT = 4096
"""Characters of a service result kept in the audit log; longer results are cut and marked."""


def _result_json(value: Any) -> tlog.Canonical | None:
    """A result for the audit log: canonical JSON, or a marked excerpt if it is longer than
    the limit."""
    text = eventlog.json_text(value)
    if text is None or len(text) <= AUDIT_RESULT_LIMIT:
        return text
    excerpt = {"truncated": True, "length": len(text), "excerpt": text[:AUDIT_RESULT_LIMIT]}
    return eventlog.json_text(excerpt)


def _unjson(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class _Worker:
    """The one thread that runs the store's blocking calls (a commit with its fsync, closing),
    one at a time and in order. Handing a call to it costs a queue put and, for the answer,
    the loop's wake-up: less than ``trio.to_thread`` (a thread cache, a limiter and a
    cancellable wait per call). The waiting task cannot be cancelled, as the call under it
    cannot be: a started commit always finishes and wakes its callers."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the worker thread; its result, or what it raised."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="agentgate-store", daemon=True)
            self._thread.start()
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        answer: list[Any] = []

        def job() -> None:
            try:
                answer.append((fn(), None))
            except BaseException as exc:  # carried back to the waiting task, raised there
                answer.append((None, exc))
            token.run_sync_soon(trio.lowlevel.reschedule, task)

        self._jobs.put(job)
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        result, error = answer[0]
        if error is not None:
            raise error
        return result  # type: ignore[no-any-return]

    def stop(self) -> None:
        """The thread ends after the calls handed to it so far."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None


@attrs.define
class _Op(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    detached: bool = False  # nobody waits: failures are logged by the writer
    durable: bool = False  # committed with an fsync before its caller goes on
    then: Callable[[], None] | None = None  # called once it is committed or failed (post)
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


class Store:
    """Async facade over the SQLite file; see the module docstring. Use :func:`open_store`."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        inline: bool = False,
        synchronous: str = "FULL",
        threads: bool = True,
    ) -> None:
        self._conn = conn
        self._inline = inline  # commits on the event loop thread (see the module docstring)
        self._full = synchronous.upper() == "FULL"  # every commit is fsync'd already
        self._at_full = self._full  # the connection's synchronous setting is FULL now
        # Durable commits of an inline store go to a worker thread (False: no threads at all,
        # for deterministic tests).
        self._threads = threads
        self._worker = _Worker()
        self._queue: list[_Op[Any]] = []
        self._busy = False  # a batch runs in the worker thread: it holds the connection
        self._queued = trio.Event()  # something is in the queue
        self._wakeup = trio.Event()  # ... and somebody waits for it: commit now
        self._closed = False
        # Request ids of queued results on their way to their agent (a frame, an MCP answer):
        # listings skip them until their delivery is recorded (mark_delivered) or given up
        # (release), so one is not handed out twice meanwhile.
        self.telling: set[str] = set()
        self.commits = 0  # transactions committed (group commit makes this < operations)
        self.synced = 0  # of which committed with an fsync (durable)
        self.checkpointed = 0  # commits the last background WAL checkpoint covered
        self._batch_done = trio.Event()  # set (and renewed) after each batch the writer ran
        self._checkpoint = trio.Event()  # set (and renewed) after each background checkpoint
        self.appended = 0  # audit events appended (or posted) since the store was opened
        # wait_appended()'s waiters, as a heap of (count, number, event): each is woken once,
        # when ``appended`` reaches its count, not at every event.
        self._append_waiters: list[tuple[int, int, trio.Event]] = []
        self._append_waits = 0  # waiters so far (ties in the heap never compare events)

    async def wait_checkpointed(self, commits: int) -> None:
        """Return once a background WAL checkpoint has covered the first ``commits`` commits
        (the database file then holds them without its WAL); the caller's deadline bounds it."""
        while self.checkpointed < commits:
            await self._checkpoint.wait()

    async def wait_committed(self, commits: int) -> None:
        """Return once ``commits`` transactions have committed; the caller's deadline bounds it.
        Timers that only have work after a commit wait here, so an idle gateway is not woken."""
        while self.commits < commits:
            await self._batch_done.wait()

    def _appended(self, count: int) -> None:
        """``count`` audit events were appended (or posted): wakes :meth:`wait_appended`."""
        if count:
            self.appended += count
            waiters = self._append_waiters
            while waiters and waiters[0][0] <= self.appended:
                heapq.heappop(waiters)[2].set()

    async def wait_appended(self, count: int) -> None:
        """Return once ``appended`` reaches ``count``; the caller's deadline bounds it."""
        if self.appended >= count:
            return
        event = trio.Event()
        self._append_waits += 1
        waiter = (count, self._append_waits, event)
        heapq.heappush(self._append_waiters, waiter)
        try:
            await event.wait()
        finally:
            if not event.is_set():  # given up (its deadline): no longer waiting
                self._append_waiters.remove(waiter)
                heapq.heapify(self._append_waiters)

    def _checkpoint_done(self, commits: int) -> None:
        self.checkpointed = commits
        self._checkpoint.set()
        self._checkpoint = trio.Event()

    # -- the writer ---------------------------------------------------------------------------

    async def run(self) -> None:
        """The writer task: run queued operations in batches, one transaction per batch.

        Posted writes (nobody waits for them) do not wake the writer: they join the next
        commit somebody waits for, or are flushed after at most ``POST_FLUSH`` seconds.
        """
        while True:
            await self._queued.wait()
            with trio.move_on_after(POST_FLUSH):
                await self._wakeup.wait()
            self._queued, self._wakeup = trio.Event(), trio.Event()
            while self._busy:  # a caller's own batch holds the connection: the rest follows it
                await self._batch_done.wait()
            batch, self._queue = self._queue, []
            if batch:
                await self._settle(batch)

    async def _settle(self, batch: list[_Op[Any]]) -> None:
        """Commit ``batch`` and wake its callers: on this thread (inline, not durable) or in the
        worker thread. Cannot be cancelled: a started batch always finishes and wakes."""
        durable = any(op.durable for op in batch)
        if self._inline and not (durable and self._threads):
            self._commit(batch, durable=durable)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._busy = True
        try:
            await self._worker.run(partial(self._run_batch, batch, durable=durable))
        except Exception as exc:
            self._fail(batch, exc)
        finally:
            self._busy = False
        self._wake(batch)
        self._batch_ran()

    def _commit(self, batch: list[_Op[Any]], *, durable: bool = False) -> None:
        """Run a batch on this thread and wake its callers (inline mode)."""
        try:
            self._run_batch(batch, durable=durable)
        except Exception as exc:
            self._fail(batch, exc)
        self._wake(batch)
        self._batch_ran()

    def _batch_ran(self) -> None:
        self._batch_done.set()
        self._batch_done = trio.Event()

    @staticmethod
    def _fail(batch: list[_Op[Any]], exc: Exception) -> None:
        """An unexpected failure of a whole batch: fail it closed; the writer keeps serving."""
        log.exception("store batch failed")
        for op in batch:
            if op.error is None:
                op.error = StoreUnavailable(f"audit log unavailable ({exc}): nothing was executed")

    @staticmethod
    def _wake(batch: list[_Op[Any]]) -> None:
        for op in batch:
            op.done.set()
            if op.detached and op.error is not None:
                log.error("store write failed: %s", op.error)
            if op.then is not None:
                op.then()

    def _run_batch(self, batch: list[_Op[Any]], *, durable: bool = False) -> None:
        """One transaction for the batch. Every step can fail (``BEGIN``, a statement,
        ``COMMIT``): whatever fails, each operation not committed gets an error (fail closed).
        ``durable``: the commit waits for an fsync of the WAL."""
        if not self._full and durable != self._at_full:
            # Switched only when the kind of batch changes: a run of durable batches (every
            # allowed call's decision) pays no PRAGMA at all.
            try:
                self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._at_full = durable
            except sqlite3.Error as exc:
                if durable:
                    for op in batch:
                        op.error = exc
                    return
                # Still FULL: this batch is fsync'd too, never less durable than asked.
        committed = self._transaction(batch)
        if committed:
            self.commits += 1
            self.synced += durable or self._full

    def _transaction(self, batch: list[_Op[Any]]) -> bool:
        """True once committed; False with each operation's error set."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for op in batch:
                op.error = exc
            return False
        # The audit log's tip is read once and written once for the whole batch.
        eventlog.hold(conn)
        try:
            return self._in_transaction(conn, batch)
        finally:
            eventlog.drop_held(conn)  # written already if it committed

    @staticmethod
    def _in_transaction(conn: sqlite3.Connection, batch: list[_Op[Any]]) -> bool:
        if len(batch) == 1:  # nothing to isolate it from: no savepoint
            op = batch[0]
            try:
                op.result = op.fn(conn)
            except Exception as exc:
                op.error = exc
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                return False
        else:
            for op in batch:
                mark = eventlog.held(conn)
                try:
                    conn.execute("SAVEPOINT op")
                    op.result = op.fn(conn)
                    conn.execute("RELEASE op")
                except Exception as exc:  # one failing op must not sink the batch
                    op.error = exc
                    try:
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                    except sqlite3.Error as undone:
                        # Its writes may still be there: the held tip would not match them.
                        for other in batch:
                            if other.error is None:
                                other.error = undone
                        with suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                        return False
                    eventlog.restore_held(conn, mark)  # its events are rolled back
        try:
            eventlog.write_held(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:  # a full or failing disk: nothing of the batch is written
            for op in batch:
                if op.error is None:
                    op.error = exc
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return False
        return True

    async def _do(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        """Run ``fn`` in a committed transaction; ``durable``: fsync'd before this returns."""
        if self._closed:
            raise StoreUnavailable("audit log unavailable: the store is closed")
        op: _Op[T] = _Op(fn, durable=durable)
        self._queue.append(op)
        if not self._busy:
            # Nobody holds the connection: commit now, in this task, with whatever else is
            # queued (no hand-off to the writer task; a durable batch still goes to the worker
            # thread for its fsync).
            batch, self._queue = self._queue, []
            await self._settle(batch)
        else:
            # The writer commits it, with whatever else queues meanwhile, once the batch that
            # holds the connection now is done.
            self._queued.set()
            self._wakeup.set()
            await op.done.wait()
        if op.error is not None:
            if isinstance(op.error, sqlite3.Error):
                raise StoreUnavailable(
                    f"audit log unavailable ({op.error}): nothing was executed"
                ) from op.error
            raise op.error
        return op.result  # type: ignore[no-any-return]

    def post(
        self, fn: Callable[[sqlite3.Connection], Any], *, then: Callable[[], None] | None = None
    ) -> None:
        """Queue a write nobody waits for (it joins the next group commit; failures are logged);
        ``then`` is called once it is committed or has failed.

        Only for records that follow an already committed decision, like a resolution: the
        reply to the agent need not wait for them.
        """
        if self._closed:
            log.error("store closed: a write was dropped")
            if then is not None:
                then()
            return
        self._queue.append(_Op(fn, detached=True, then=then))
        self._queued.set()
        if len(self._queue) >= POST_BACKLOG:
            self._wakeup.set()

    # -- audit --------------------------------------------------------------------------------

    async def audit(self, entry: AuditEntry, *, durable: bool = False) -> int:
        """Append an audit row (committed before this returns); return its id.

        ``durable``: on disk (fsync'd) before this returns, as the decision that lets a call
        run must be."""
        row_id = await self._do(lambda c: _insert_audit(c, entry), durable=durable)
        self._appended(1)
        return row_id

    async def settle_interrupted(self, at: float, error: str) -> int:
        """At start: allowed calls whose outcome was never recorded (the gateway stopped, or
        died, while they executed) are recorded as ``unknown``. Returns how many."""

        def fn(c: sqlite3.Connection) -> int:
            return eventlog.resolve_rows(
                c,
                "kind='request' AND decision='allow'",
                (),
                resolution=Outcome.UNKNOWN,
                by=None,
                at=at,
                result=None,
                error=error,
            )

        settled = await self._do(fn)
        self._appended(settled)
        return settled

    async def resolve_audit(
        self,
        request_id: str,
        resolution: Outcome,
        *,
        resolved_by: str | None,
        resolved_at: float,
        result: Any = None,
        error: str | None = None,
        wait: bool = True,
        kind: str = "request",
    ) -> None:
        """Record how a request ended; ``wait=False`` queues it without waiting (see post).
        ``kind``: the row's kind (``undo`` for an Undo's own row)."""
        # Encoded (and cut) now: a queued write must not hold on to a large result.
        text = _result_json(result)

        def fn(c: sqlite3.Connection) -> None:
            eventlog.resolve_rows(
                c,
                "request_id=? AND kind=?",
                (request_id, kind),
                resolution=resolution,
                by=resolved_by,
                at=resolved_at,
                result=text,
                error=error,
            )

        if wait:
            await self._do(fn)
        else:
            self.post(fn)
        self._appended(1)

    async def append_event(
        self, type_: str, fields: dict[str, Any], request_id: str | None = None
    ) -> int:
        """Append an event that no row of ``audit_log`` shows (a ``key``, say); its number."""
        seq = await self._do(lambda c: eventlog.append(c, type_, fields, request_id))
        self._appended(1)
        return seq

    async def log_key(self) -> tuple[str, str] | None:
        """``(origin, vkey)`` the audit log names last, or None (no key yet)."""
        return await self._do(eventlog.log_key)

    async def write_checkpoint(self, sign: eventlog.Signer, at: float) -> tlog.Checkpoint | None:
        """Sign the log's tip with ``sign`` and keep the note, in one transaction; None (and
        nothing written) when the latest checkpoint already covers every event."""
        return await self._do(lambda c: eventlog.write_checkpoint(c, sign, at))

    async def compact(
        self,
        before: float,
        *,
        sign: eventlog.Signer,
        at: float,
        by: str,
        keep_days: float,
    ) -> eventlog.Compaction | None:
        """Prune the events older than ``before`` (see :func:`agentgate.eventlog.compact`):
        the audited, signed record in one transaction, then the deletion in bounded ones."""
        done = await self._do(
            lambda c: eventlog.compact(c, before, sign=sign, at=at, by=by, keep_days=keep_days)
        )
        if done is None:
            return None
        self._appended(1)
        while await self._do(lambda c: eventlog.prune(c, done.cut)):
            await trio.lowlevel.checkpoint()
        return done

    async def audit_rows(
        self,
        *,
        agent: str | None = None,
        tool: str | None = None,
        decision: str | None = None,
        since: float | None = None,
        after_id: int = 0,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        return await self._do(
            partial(
                select_audit,
                agent=agent,
                tool=tool,
                decision=decision,
                since=since,
                after_id=after_id,
                limit=limit,
            )
        )

    # -- pending approvals --------------------------------------------------------------------

    async def add_pending(self, entry: AuditEntry, pending: PendingRow) -> None:
        """Record the ask decision and its pending row in one transaction."""

        def fn(c: sqlite3.Connection) -> None:
            _insert_audit(c, entry)
            c.execute(
                "INSERT INTO pending_requests (request_id, agent, rpc_id, tool, args, signature,"
                " matched, target, message_ref, created_at, expires_at, state, via, quorum, quota)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    pending.request_id,
                    pending.agent,
                    _json(pending.rpc_id) or "null",
                    pending.tool,
                    _json(pending.args),
                    pending.signature,
                    pending.matched,
                    pending.target,
                    pending.message_ref,
                    pending.created_at,
                    pending.expires_at,
                    State.PENDING,
                    pending.via,
                    pending.quorum,
                    pending.quota,
                ),
            )

        await self._do(fn)
        self._appended(1)

    async def set_message_ref(
        self, request_id: str, message_ref: str, target: str | None, at: float | None = None
    ) -> None:
        """The approval's card was sent as ``message_ref`` (a ``card`` event, at ``at``)."""

        def fn(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE pending_requests SET message_ref=?, target=? WHERE request_id=?",
                (message_ref, target, request_id),
            )
            fields = {"time": at, "request_id": request_id, "message_ref": message_ref}
            eventlog.append(c, "card", {**fields, "target": target}, request_id)

        await self._do(fn)
        self._appended(1)

    def post_press(
        self, request_id: str, action: str, *, by: str, user: str | None, at: float
    ) -> None:
        """A guardian pressed ``action`` on ``request_id``'s card: a ``press`` event (posted:
        it joins the next commit, before anything the press lets run)."""
        fields = {"time": at, "request_id": request_id, "action": action, "by": by}
        self.post(lambda c: eventlog.append(c, "press", {**fields, "user": user}, request_id))
        self._appended(1)

    async def pending_row(self, request_id: str) -> PendingRow | None:
        """One approval, open or done (None: no approval has that id)."""

        def fn(c: sqlite3.Connection) -> PendingRow | None:
            row = c.execute(
                "SELECT * FROM pending_requests WHERE request_id=?", (request_id,)
            ).fetchone()
            return None if row is None else _pending_from_row(row)

        return await self._do(fn)

    async def open_pending(self) -> list[PendingRow]:
        """Every approval not yet done (``pending`` or ``executing``), oldest first."""

        def fn(c: sqlite3.Connection) -> list[PendingRow]:
            rows = c.execute(
                "SELECT * FROM pending_requests WHERE state != ? ORDER BY created_at",
                (State.DONE,),
            ).fetchall()
            return [_pending_from_row(r) for r in rows]

        return await self._do(fn)

    async def begin_execution(self, request_id: str, decided_by: str, at: float) -> bool:
        """Move an approval from ``pending`` to ``executing``; False if it was not pending.

        This is the exactly-once gate: the transition happens at most once per approval, and a
        crash while ``executing`` is reported as an unknown outcome, never executed again. It is
        fsync'd before this returns, so it survives a power cut too.
        """

        def fn(c: sqlite3.Connection) -> bool:
            if not _move(c, request_id, State.EXECUTING, decided_by=decided_by):
                return False
            fields = {"time": at, "request_id": request_id, "by": decided_by}
            eventlog.append(c, "executing", fields, request_id)
            return True

        began = await self._do(fn, durable=True)  # on disk before the call is sent
        self._appended(began)
        return began

    async def finish_pending(
        self,
        request_id: str,
        outcome: Outcome,
        *,
        decided_by: str | None,
        at: float,
        entry: dict[str, Any],
        delivered: bool,
        result: Any = None,
        error: str | None = None,
    ) -> bool:
        """Close an approval: its outcome, the audit resolution, and the result entry.

        ``entry`` is a queued-result entry (docs/protocol.md); if ``delivered`` is False it waits
        in the agent's queue: handed out once by ``take_queued``, or listed by ``list_queued``
        until ``acknowledge_queued``. False (and nothing written) if the approval was already
        done.
        """

        def fn(c: sqlite3.Connection) -> bool:
            if not _move(
                c,
                request_id,
                State.DONE,
                outcome=outcome,
                queued=_json(entry),
                delivered=1 if delivered else 0,
                decided_by=decided_by,
            ):
                return False
            eventlog.resolve_rows(
                c,
                "request_id=? AND kind='request'",
                (request_id,),
                resolution=outcome,
                by=decided_by,
                at=at,
                result=text,
                error=error,
            )
            return True

        text = _result_json(result)
        finished = await self._do(fn)
        self._appended(finished)
        return finished

    def mark_delivered(self, request_ids: Iterable[str]) -> None:
        """These results reached their agent: they leave its queue, and listings stop skipping
        them once that is committed. Posted (see :meth:`post`): if the write is lost, the result
        is handed out again (at least once)."""
        ids = list(request_ids)
        rows = [(request_id, State.DONE) for request_id in ids]
        self.post(
            lambda c: c.executemany(
                "UPDATE pending_requests SET delivered=1 WHERE request_id=? AND state=?", rows
            ),
            then=lambda: self.telling.difference_update(ids),
        )

    def release(self, request_ids: Iterable[str]) -> None:
        """These results did not reach their agent: they stay queued, listed again from now."""
        self.telling.difference_update(request_ids)

    async def mark_undelivered(self, request_id: str) -> None:
        await self._do(
            lambda c: c.execute(
                "UPDATE pending_requests SET delivered=0 WHERE request_id=? AND state=?",
                (request_id, State.DONE),
            )
        )

    async def queued_count(self, agent: str) -> int:
        def fn(c: sqlite3.Connection) -> int:
            row = c.execute(
                "SELECT COUNT(*) FROM pending_requests WHERE agent=? AND state=? AND delivered=0",
                (agent, State.DONE),
            ).fetchone()
            return int(row[0])

        return await self._do(fn)

    async def take_queued(self, agent: str) -> list[dict[str, Any]]:
        """Hand out this agent's queued results, each exactly once (atomically)."""

        def fn(c: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = _queued_rows(c, agent, self.telling)
            c.executemany(
                "UPDATE pending_requests SET delivered=1 WHERE request_id=?",
                [(r["request_id"],) for r in rows],
            )
            return [json.loads(r["queued"]) for r in rows if r["queued"]]

        return await self._do(fn)

    async def hand_out(self, agent: str) -> list[dict[str, Any]]:
        """List this agent's queued results that are not on their way already, and count them
        as on their way (:attr:`telling`) until :meth:`mark_delivered` or :meth:`release`."""

        ids: list[str] = []

        def fn(c: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = [r for r in _queued_rows(c, agent, self.telling) if r["queued"]]
            ids[:] = [r["request_id"] for r in rows]
            self.telling.update(ids)  # now: a listing later in this batch must skip them
            return [json.loads(r["queued"]) for r in rows]

        try:
            return await self._do(fn)
        except BaseException:
            self.release(ids)
            raise

    async def list_queued(
        self, agent: str, *, acknowledge: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        """Acknowledge ``acknowledge`` (see :meth:`acknowledge_queued`), then list what is still
        queued for ``agent``, oldest first, leaving it queued: one transaction."""
        ids = list(acknowledge)

        def fn(c: sqlite3.Connection) -> list[dict[str, Any]]:
            _acknowledge(c, agent, ids)
            rows = _queued_rows(c, agent, self.telling)
            return [json.loads(r["queued"]) for r in rows if r["queued"]]

        return await self._do(fn)

    async def acknowledge_queued(self, agent: str, request_ids: Iterable[str]) -> int:
        """The agent has these results: they leave its queue. Ids that are not queued for
        ``agent`` (unknown, another agent's, already acknowledged) are ignored. Returns how many
        left the queue."""
        ids = list(request_ids)
        return await self._do(lambda c: _acknowledge(c, agent, ids))

    async def result_of(self, agent: str, request_id: str) -> ResultRow | None:
        """The outcome of one of ``agent``'s approvals (None: unknown, or another agent's).

        A final outcome read here counts as delivered: it leaves the agent's queue, and reading
        it again returns the same entry.
        """

        def fn(c: sqlite3.Connection) -> ResultRow | None:
            row = c.execute(
                "SELECT state, queued, expires_at FROM pending_requests"
                " WHERE request_id=? AND agent=?",
                (request_id, agent),
            ).fetchone()
            if row is None:
                return None
            if row["state"] != State.DONE or not row["queued"]:
                return ResultRow(request_id, row["expires_at"], None)
            c.execute("UPDATE pending_requests SET delivered=1 WHERE request_id=?", (request_id,))
            return ResultRow(request_id, row["expires_at"], json.loads(row["queued"]))

        return await self._do(fn)

    # -- grants and settings ------------------------------------------------------------------

    async def add_grant(self, grant: GrantRow) -> None:
        await self._do(
            lambda c: c.execute(
                "INSERT INTO grants (grant_id, agent, signature, granted_by, created_at,"
                " expires_at) VALUES (?,?,?,?,?,?)",
                attrs.astuple(grant),
            )
        )

    async def replace_grant(self, grant: GrantRow, *, by: str) -> list[str]:
        """Add ``grant`` and revoke every active grant of the same agent and signature in the
        same transaction (it supersedes them); their ids."""

        def fn(c: sqlite3.Connection) -> list[str]:
            old = [
                str(r[0])
                for r in c.execute(
                    "SELECT grant_id FROM grants WHERE agent=? AND signature=?"
                    " AND revoked_at IS NULL AND expires_at > ?",
                    (grant.agent, grant.signature, grant.created_at),
                )
            ]
            c.executemany(
                "UPDATE grants SET revoked_by=?, revoked_at=? WHERE grant_id=?",
                [(by, grant.created_at, grant_id) for grant_id in old],
            )
            c.execute(
                "INSERT INTO grants (grant_id, agent, signature, granted_by, created_at,"
                " expires_at) VALUES (?,?,?,?,?,?)",
                attrs.astuple(grant),
            )
            return old

        return await self._do(fn)

    async def active_grants(self, now: float) -> list[GrantRow]:
        def fn(c: sqlite3.Connection) -> list[GrantRow]:
            rows = c.execute(
                "SELECT grant_id, agent, signature, granted_by, created_at, expires_at FROM grants"
                " WHERE revoked_at IS NULL AND expires_at > ? ORDER BY created_at",
                (now,),
            ).fetchall()
            return [GrantRow(*r) for r in rows]

        return await self._do(fn)

    async def revoke_grant(self, grant_id: str, by: str, at: float) -> bool:
        def fn(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "UPDATE grants SET revoked_by=?, revoked_at=? WHERE grant_id=? AND revoked_at IS"
                " NULL",
                (by, at, grant_id),
            )
            return cur.rowcount == 1

        return await self._do(fn)

    # -- "Always allow" and quotas: counted from the audit log ---------------------------------

    async def history(self, agent: str, signature: str, since: float) -> History:
        """How often ``agent``'s asks for ``signature`` since ``since`` were approved by a
        guardian (executed, failed or unknown, with who decided) and denied."""

        def fn(c: sqlite3.Connection) -> History:
            row = c.execute(
                "SELECT"
                " SUM(resolution IN ('executed', 'failed', 'unknown') AND resolved_by IS NOT NULL),"
                " SUM(resolution = 'denied')"
                " FROM audit_log WHERE decision = 'ask' AND agent=? AND signature=? AND time >= ?",
                (agent, signature, since),
            ).fetchone()
            return History(int(row[0] or 0), int(row[1] or 0))

        return await self._do(fn)

    async def allowed_since(self, since: float) -> list[tuple[float, str, str]]:
        """``(time, agent, signature)`` of every call allowed without a human since ``since``
        (decision ``allow``: by a rule or a grant), oldest first: what quotas count."""

        def fn(c: sqlite3.Connection) -> list[tuple[float, str, str]]:
            rows = c.execute(
                "SELECT time, agent, signature FROM audit_log"
                " WHERE time >= ? AND decision = 'allow' AND kind = 'request' ORDER BY id",
                (since,),
            ).fetchall()
            return [(float(r[0]), str(r[1]), str(r[2])) for r in rows if r[2] is not None]

        return await self._do(fn)

    # -- two-person approval ----------------------------------------------------------------

    async def add_vote(
        self, request_id: str, voter: str, voter_name: str, at: float
    ) -> tuple[str, ...]:
        """Record one guardian's Allow (once per guardian); the names of every voter so far,
        in the order they voted."""

        def fn(c: sqlite3.Connection) -> tuple[str, ...]:
            c.execute(
                "INSERT OR IGNORE INTO approval_votes (request_id, voter, voter_name, at)"
                " VALUES (?,?,?,?)",
                (request_id, voter, voter_name, at),
            )
            return _votes(c, request_id)

        return await self._do(fn)

    async def votes(self, request_id: str) -> tuple[tuple[str, str], ...]:
        """``(voter, voter_name)`` of every Allow recorded for ``request_id``, in order."""

        def fn(c: sqlite3.Connection) -> tuple[tuple[str, str], ...]:
            rows = c.execute(
                "SELECT voter, voter_name FROM approval_votes WHERE request_id=?"
                " ORDER BY at, rowid",
                (request_id,),
            ).fetchall()
            return tuple((str(r[0]), str(r[1])) for r in rows)

        return await self._do(fn)

    # -- undo ---------------------------------------------------------------------------------

    def post_undo(self, row: UndoRow) -> None:
        """Record an undoable call's snapshot (posted: it follows the committed decision)."""
        values = _undo_values(row)
        self.post(
            lambda c: c.execute(
                f"INSERT OR IGNORE INTO undo_snapshots ({_UNDO_COLUMNS})"
                f" VALUES ({','.join('?' * len(values))})",
                values,
            )
        )

    async def add_undo(self, row: UndoRow) -> None:
        values = _undo_values(row)
        await self._do(
            lambda c: c.execute(
                f"INSERT OR IGNORE INTO undo_snapshots ({_UNDO_COLUMNS})"
                f" VALUES ({','.join('?' * len(values))})",
                values,
            )
        )

    async def undo_row(self, request_id: str) -> UndoRow | None:
        def fn(c: sqlite3.Connection) -> UndoRow | None:
            row = c.execute(
                "SELECT * FROM undo_snapshots WHERE request_id=?", (request_id,)
            ).fetchone()
            return None if row is None else _undo_from_row(row)

        return await self._do(fn)

    async def open_undos(self, now: float) -> list[UndoRow]:
        """Undoable calls whose window is still open, newest first."""

        def fn(c: sqlite3.Connection) -> list[UndoRow]:
            rows = c.execute(
                "SELECT * FROM undo_snapshots WHERE state=? AND expires_at > ?"
                " ORDER BY created_at DESC",
                (UndoState.AVAILABLE, now),
            ).fetchall()
            return [_undo_from_row(r) for r in rows]

        return await self._do(fn)

    async def move_undo(
        self,
        request_id: str,
        to: UndoState,
        *,
        by: str | None = None,
        at: float | None = None,
        detail: str | None = None,
    ) -> bool:
        """Move an undo to ``to`` from a state :data:`~agentgate.approvals.UNDO_TRANSITIONS`
        allows; False if it is in none of them. ``UNDOING`` is the exactly-once gate: it is
        fsync'd before this returns, so a restore is never sent twice, even across a power cut.
        """

        def fn(c: sqlite3.Connection) -> bool:
            allowed = sorted(undo_sources(to))
            cur = c.execute(
                "UPDATE undo_snapshots SET state=?, undone_by=COALESCE(?, undone_by),"
                " undone_at=COALESCE(?, undone_at), detail=COALESCE(?, detail)"
                f" WHERE request_id=? AND state IN ({','.join('?' * len(allowed))})",
                (to, by, at, detail, request_id, *allowed),
            )
            return cur.rowcount == 1

        return await self._do(fn, durable=to is UndoState.UNDOING)

    async def begin_undo(self, request_id: str, *, by: str, at: float, entry: AuditEntry) -> bool:
        """The exactly-once gate of an Undo: ``AVAILABLE → UNDOING`` and its audit row in one
        transaction, fsync'd before this returns (a restore is never sent twice, even across
        a power cut). False, and nothing written, if it was not available."""

        def fn(c: sqlite3.Connection) -> bool:
            allowed = sorted(undo_sources(UndoState.UNDOING))
            cur = c.execute(
                "UPDATE undo_snapshots SET state=?, undone_by=?, undone_at=?"
                f" WHERE request_id=? AND state IN ({','.join('?' * len(allowed))})",
                (UndoState.UNDOING, by, at, request_id, *allowed),
            )
            if cur.rowcount != 1:
                return False
            _insert_audit(c, entry)
            return True

        began = await self._do(fn, durable=True)
        self._appended(began)
        return began

    async def interrupted_undos(self) -> list[str]:
        """Undos a stop cut short (``UNDOING``) become ``FAILED``: never run again. Their ids."""

        def fn(c: sqlite3.Connection) -> list[str]:
            ids = [
                str(r[0])
                for r in c.execute(
                    "SELECT request_id FROM undo_snapshots WHERE state=?", (UndoState.UNDOING,)
                )
            ]
            c.executemany(
                "UPDATE undo_snapshots SET state=?, detail=? WHERE request_id=?",
                [
                    (UndoState.FAILED, "interrupted: the gateway stopped while it ran", rid)
                    for rid in ids
                ],
            )
            return ids

        return await self._do(fn)

    async def get_setting(self, key: str) -> str | None:
        def fn(c: sqlite3.Connection) -> str | None:
            row = c.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
            return None if row is None else str(row[0])

        return await self._do(fn)

    async def set_setting(self, key: str, value: str) -> None:
        await self._do(
            lambda c: c.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )
        )

    async def close(self) -> None:
        self._closed = True
        with trio.CancelScope(shield=True):
            while self._busy:
                await self._batch_done.wait()
            pending, self._queue = self._queue, []
            if pending:  # what was accepted is written, never dropped
                await self._settle(pending)
            if self._inline and not self._threads:
                self._conn.close()
            else:
                await self._worker.run(self._conn.close)
                self._worker.stop()


def _move(
    c: sqlite3.Connection, request_id: str, to: State, *, decided_by: str | None, **columns: Any
) -> bool:
    """Move an approval to ``to`` from a state :data:`~agentgate.approvals.TRANSITIONS` allows;
    False if it is in none of them. ``decided_by`` is kept if one was recorded already."""
    allowed = sorted(sources(to))
    assigned = "".join(f", {name}=?" for name in columns)
    cur = c.execute(
        f"UPDATE pending_requests SET state=?, decided_by=COALESCE(decided_by, ?){assigned}"
        f" WHERE request_id=? AND state IN ({','.join('?' * len(allowed))})",
        (to, decided_by, *columns.values(), request_id, *allowed),
    )
    return cur.rowcount == 1


def _transitions_trigger(
    name: str = "pending_transitions",
    table: str = "pending_requests",
    transitions: Any = TRANSITIONS,
    what: str = "approval",
) -> str:
    """A trigger refusing any state change the table does not list (a bug, caught in SQL)."""
    allowed = ", ".join(
        f"'{source}>{target}'" for source, targets in transitions.items() for target in targets
    )
    return (
        f"CREATE TRIGGER {name} BEFORE UPDATE OF state ON {table}"
        f" WHEN NEW.state != OLD.state AND OLD.state || '>' || NEW.state NOT IN ({allowed})"
        f" BEGIN SELECT RAISE(ABORT, '{what} state change not in the table'); END"
    )


def _install_transitions_trigger(conn: sqlite3.Connection) -> None:
    """The triggers of this version's tables (replaced only if they differ: no write
    otherwise): approvals' states, and undos'."""
    for name, wanted in (
        ("pending_transitions", _transitions_trigger()),
        (
            "undo_transitions",
            _transitions_trigger("undo_transitions", "undo_snapshots", UNDO_TRANSITIONS, "undo"),
        ),
    ):
        row = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type='trigger' AND name=?", (name,)
        ).fetchone()
        if row is not None and row[0] == wanted:
            continue
        conn.executescript(f"DROP TRIGGER IF EXISTS {name}; {wanted};")


def _insert_audit(c: sqlite3.Connection, e: AuditEntry) -> int:
    """An ``audit_log`` row and the event that opens it (:func:`agentgate.eventlog.open_row`)."""
    return eventlog.open_row(
        c,
        {
            "time": e.time,
            "kind": e.kind,
            "agent": e.agent,
            "request_id": e.request_id,
            "tool": e.tool,
            "args": eventlog.json_text(e.args),
            "signature": e.signature,
            "decision": e.decision,
            "matched": e.matched,
            "resolution": e.resolution,
            "resolved_by": e.resolved_by,
            "resolved_at": e.resolved_at,
            "result": _result_json(e.result),
            "error": e.error,
            "via": e.via,
        },
    )


def _queued_rows(c: sqlite3.Connection, agent: str, skip: set[str]) -> list[sqlite3.Row]:
    rows = c.execute(
        "SELECT request_id, queued FROM pending_requests"
        " WHERE agent=? AND state=? AND delivered=0 ORDER BY created_at",
        (agent, State.DONE),
    ).fetchall()
    return [r for r in rows if r["request_id"] not in skip] if skip else rows


def _acknowledge(c: sqlite3.Connection, agent: str, request_ids: list[str]) -> int:
    acknowledged = 0
    for request_id in dict.fromkeys(request_ids):  # each id once, whatever the agent repeats
        cur = c.execute(
            "UPDATE pending_requests SET delivered=1"
            " WHERE request_id=? AND agent=? AND state=? AND delivered=0",
            (request_id, agent, State.DONE),
        )
        acknowledged += cur.rowcount
    return acknowledged


def select_audit(
    c: sqlite3.Connection,
    *,
    agent: str | None = None,
    tool: str | None = None,
    decision: str | None = None,
    since: float | None = None,
    after_id: int = 0,
    limit: int | None = None,
) -> list[AuditEntry]:
    """Audit rows after ``after_id`` matching every filter given, oldest first."""
    where: list[str] = ["id > ?"]
    params: list[object] = [after_id]
    for column, value in (("agent", agent), ("tool", tool), ("decision", decision)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append("time >= ?")
        params.append(since)
    sql = f"SELECT * FROM audit_log WHERE {' AND '.join(where)} ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [_audit_from_row(r) for r in c.execute(sql, params).fetchall()]


def _audit_from_row(r: sqlite3.Row) -> AuditEntry:
    return AuditEntry(
        id=r["id"],
        time=r["time"],
        kind=r["kind"],
        agent=r["agent"],
        request_id=r["request_id"],
        tool=r["tool"],
        args=_unjson(r["args"]),
        signature=r["signature"],
        decision=r["decision"],
        matched=r["matched"],
        resolution=None if r["resolution"] is None else Outcome(r["resolution"]),
        resolved_by=r["resolved_by"],
        resolved_at=r["resolved_at"],
        result=_unjson(r["result"]),
        error=r["error"],
        via=r["via"] if "via" in r.keys() else None,  # noqa: SIM118 - a store not yet migrated
    )


def _pending_from_row(r: sqlite3.Row) -> PendingRow:
    return PendingRow(
        request_id=r["request_id"],
        agent=r["agent"],
        rpc_id=json.loads(r["rpc_id"]),
        tool=r["tool"],
        args=json.loads(r["args"]),
        signature=r["signature"],
        matched=r["matched"],
        target=r["target"],
        message_ref=r["message_ref"],
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        state=State(r["state"]),
        outcome=None if r["outcome"] is None else Outcome(r["outcome"]),
        decided_by=r["decided_by"],
        via=r["via"],
        quorum=r["quorum"],
        quota=r["quota"],
    )


_UNDO_COLUMNS = (
    "request_id, agent, tool, args, signature, decided_by, created_at, expires_at, before,"
    " after, message_refs, state, undone_by, undone_at, detail"
)


def _undo_values(row: UndoRow) -> tuple[Any, ...]:
    return (
        row.request_id,
        row.agent,
        row.tool,
        _json(row.args),
        row.signature,
        row.decided_by,
        row.created_at,
        row.expires_at,
        _json(row.before),
        _json(row.after),
        _json(list(row.message_refs)),
        row.state,
        row.undone_by,
        row.undone_at,
        row.detail,
    )


def _undo_from_row(r: sqlite3.Row) -> UndoRow:
    return UndoRow(
        request_id=r["request_id"],
        agent=r["agent"],
        tool=r["tool"],
        args=json.loads(r["args"]),
        signature=r["signature"],
        decided_by=r["decided_by"],
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        before=json.loads(r["before"]),
        after=json.loads(r["after"]),
        message_refs=tuple(json.loads(r["message_refs"] or "[]")),
        state=UndoState(r["state"]),
        undone_by=r["undone_by"],
        undone_at=r["undone_at"],
        detail=r["detail"],
    )


def _votes(c: sqlite3.Connection, request_id: str) -> tuple[str, ...]:
    rows = c.execute(
        "SELECT voter_name FROM approval_votes WHERE request_id=? ORDER BY at, rowid",
        (request_id,),
    ).fetchall()
    return tuple(str(r[0]) for r in rows)


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Create the file 0600 before SQLite does, so no other user can ever read it.
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, stat.S_IRUSR | stat.S_IWUSR)
        os.close(fd)
    else:
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        _refuse_newer(conn, path)  # before anything is written to a store this cannot read
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.executescript(_SCHEMA)
        _add_via(conn)
        _migrate(conn)
        _install_transitions_trigger(conn)
        eventlog.install(conn)
        _upgrade(conn, path)
    except BaseException:
        conn.close()
        raise
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.chmod(side, stat.S_IRUSR | stat.S_IWUSR)
    return conn


def _refuse_newer(conn: sqlite3.Connection, path: Path) -> None:
    """A store written by a newer agentgate is refused, untouched (a downgrade)."""
    known = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
    ).fetchone()
    row = known and conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    if row and row[0] is not None and row[0] > SCHEMA_VERSION:
        raise StoreUnavailable(
            f"{path}: store schema version {row[0]} is newer than this agentgate"
            f" ({SCHEMA_VERSION}): a downgrade is not possible; upgrade agentgate, or restore"
            " the backup taken before the upgrade"
        )


def _upgrade(conn: sqlite3.Connection, path: Path) -> None:
    """A new store gets this version; a version 1 store's audit rows are sealed as the log's
    first events, with the version, in one transaction (a crash midway leaves version 1)."""
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    if row[0] is not None and row[0] >= SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        sealed = eventlog.seal_legacy(conn)
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    if sealed:
        log.warning(
            "%s: upgraded to schema version %d: %d audit row(s) sealed as the audit log's first"
            " events",
            path,
            SCHEMA_VERSION,
            sealed,
        )


def _add_via(conn: sqlite3.Connection) -> None:
    """Additive migration: which front door each request came through (a store made before
    the column keeps working with older and newer agentgate alike; its old rows say NULL)."""
    for table in ("audit_log", "pending_requests"):
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if "via" not in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN via TEXT")
    conn.execute(
        "CREATE TRIGGER IF NOT EXISTS audit_keep_via BEFORE UPDATE OF via ON audit_log"
        " BEGIN SELECT RAISE(ABORT, 'audit_log rows keep their original columns'); END"
    )


def _migrate(conn: sqlite3.Connection) -> None:
    """Additive migration: a pending approval's quorum (two-person approval) and the quota that
    asked it. Old rows read as one approval and no quota, which is what they were."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(pending_requests)")}
    if "quorum" not in columns:
        conn.execute("ALTER TABLE pending_requests ADD COLUMN quorum INTEGER NOT NULL DEFAULT 1")
    if "quota" not in columns:
        conn.execute("ALTER TABLE pending_requests ADD COLUMN quota TEXT")


async def _checkpoints(store: Store, path: Path, every: float) -> None:
    """Move WAL pages into the database file from a worker thread, off the event loop."""
    conn: sqlite3.Connection | None = None
    done = 0
    try:
        while True:
            await store.wait_committed(done + 1)
            await trio.sleep(every)
            done = store.commits
            if conn is None:
                conn = await trio.to_thread.run_sync(
                    partial(sqlite3.connect, path, isolation_level=None, check_same_thread=False)
                )
            try:
                await trio.to_thread.run_sync(conn.execute, "PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                log.warning("WAL checkpoint failed (will retry): %s", exc)
            else:
                store._checkpoint_done(done)
    finally:
        if conn is not None:
            conn.close()


@asynccontextmanager
async def open_store(
    path: Path | str,
    *,
    synchronous: str = "normal",
    inline: bool | None = None,
    checkpoint_every: float = 1.0,
) -> AsyncIterator[Store]:
    """Open (creating if needed) the store at ``path`` and run its writer task.

    ``synchronous``: ``"normal"`` (WAL commits survive a crash or ``kill -9`` of the process;
    durable ones, a power cut too) or ``"full"`` (every commit fsync'd: survives a power cut).
    ``inline`` (default: with ``"normal"``) runs commits on the event loop thread (durable ones
    in a worker thread), with WAL checkpoints every ``checkpoint_every`` seconds in a worker
    thread; ``inline=True`` given explicitly keeps SQLite's own checkpoints and uses no thread
    at all, durable commits included (deterministic tests).
    """
    synchronous = synchronous.upper()
    if synchronous not in {"FULL", "NORMAL"}:
        raise ValueError("synchronous must be full or normal")
    background_checkpoints = inline is None and synchronous == "NORMAL"
    threads = inline is None or not inline  # inline=True given explicitly: no thread at all
    if inline is None:
        inline = synchronous == "NORMAL"
    if inline and not threads:
        conn = _connect(Path(path), synchronous)
    else:
        conn = await trio.to_thread.run_sync(_connect, Path(path), synchronous)
    if background_checkpoints:
        conn.execute("PRAGMA wal_autocheckpoint=0")
    store = Store(conn, inline=inline, synchronous=synchronous, threads=threads)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run)
            if background_checkpoints:
                nursery.start_soon(_checkpoints, store, Path(path), checkpoint_every)
            try:
                yield store
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await store.close()


def read_only(path: Path | str) -> sqlite3.Connection:
    """A read-only connection for operator tools (``agentgate audit``)."""
    uri = f"file:{Path(path).resolve()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def read_active_grants(path: Path | str, now: float) -> list[GrantRow]:
    """The active grants, read-only (``agentgate grants``)."""
    conn = read_only(path)
    try:
        rows = conn.execute(
            "SELECT grant_id, agent, signature, granted_by, created_at, expires_at FROM grants"
            " WHERE revoked_at IS NULL AND expires_at > ? ORDER BY created_at",
            (now,),
        ).fetchall()
    finally:
        conn.close()
    return [GrantRow(*r) for r in rows]


def revoke_grant_offline(path: Path | str, grant_id: str, by: str, at: float) -> bool:
    """Revoke a grant while no gateway runs (``agentgate grants --revoke``): the grant row and
    its audit row in one transaction; the next start loads what is still active."""
    conn = _connect(Path(path), "FULL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(
            "SELECT agent, signature FROM grants WHERE grant_id=? AND revoked_at IS NULL"
            " AND expires_at > ?",
            (grant_id, at),
        ).fetchone()
        if row is None:
            conn.execute("ROLLBACK")
            return False
        conn.execute(
            "UPDATE grants SET revoked_by=?, revoked_at=? WHERE grant_id=?", (by, at, grant_id)
        )
        _insert_audit(
            conn,
            AuditEntry.guardian(
                at, "revoke", f"{row['agent']}: {row['signature']} ({grant_id})", by
            ),
        )
        conn.execute("COMMIT")
        return True
    finally:
        conn.close()


def compact_offline(
    path: Path | str,
    before: float,
    *,
    sign: eventlog.Signer,
    at: float,
    by: str,
    keep_days: float,
) -> eventlog.Compaction | None:
    """``agentgate audit compact``: :func:`agentgate.eventlog.compact` on a connection of its
    own (a running gateway's writes wait for it, bounded by SQLite's busy timeout), then the
    pruning in bounded transactions."""
    conn = _connect(Path(path), "FULL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = eventlog.compact(conn, before, sign=sign, at=at, by=by, keep_days=keep_days)
            conn.execute("COMMIT")
        except BaseException:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        if done is not None:
            while True:
                conn.execute("BEGIN IMMEDIATE")
                deleted = eventlog.prune(conn, done.cut)
                conn.execute("COMMIT")
                if not deleted:
                    break
        return done
    finally:
        conn.close()


def audit_entries(rows: Iterable[sqlite3.Row]) -> list[AuditEntry]:
    return [_audit_from_row(r) for r in rows]
