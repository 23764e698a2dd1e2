"""The stack's floor: the least an allowed read must do on the prescribed stack, in one process.

``python -m bench.stackfloor CERT KEY HA_URL HA_TOKEN DB`` serves WSS on a free port of
127.0.0.1 and prints its URL. It speaks just enough of agentgate's protocol for the SDK
(``agentgate.client.connect``, the client S1 uses) to drive it: ``auth`` and
``get_pending_results`` are answered at once, and every ``tool_request`` does, with none of
agentgate's own code, what the gateway's allowed ``ha_get_state`` must:

1. read the request frame (trio-websocket over TLS, a server context like the gateway's) and
   ``json.loads`` it;
2. commit a decision row in SQLite (WAL, ``synchronous = FULL``: an fsync of the WAL) in one
   long-lived worker thread, handed over as the gateway's store hands a durable commit (a
   queue put; the answer wakes the loop through ``run_sync_soon``). Nothing executes before
   its decision is on disk: the gateway's durability guarantee, kept here;
3. ``GET /api/states/<entity>`` from the fast home with a bare ``httpx.AsyncClient`` of the
   executor's shape (10 connections, 10 slots on a ``trio.CapacityLimiter``) and parse it;
4. record the outcome as the gateway does: an ``UPDATE`` that joins the next commit (the next
   request's decision, or a flush within 50 ms), not waited for;
5. answer a result frame (``json.dumps`` of the executed result, the state as ``data``).

Left out, because they are agentgate's choices rather than the stack's: policy, rate limits,
request ids as UUIDs, the audit log's hash chain and its events, savepoints per operation in
a group commit, the ``synchronous`` switch around durable commits, a task per request (each
connection has :data:`HANDLERS` long-lived tasks reading frames in turn instead: up to that
many requests in flight), request validation beyond reading the three fields it needs.
Commits that queue while one runs share the next (group commit), so the floor holds at 100 in
flight too.

:func:`bench.procs.stack_floor` starts it; the client is a :mod:`bench.load` worker in
``gateway`` mode (the SDK, as in S1).
"""

from __future__ import annotations

import json
import queue
import signal
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
import trio
import trio_websocket

MAX_MESSAGE = 1024 * 1024  # the gateway's default max_message_size
HANDLERS = 100  # tasks per connection taking frames in turn: requests in flight at most
SLOTS = 10  # the executor's: httpx.Limits(max_connections=10) and a 10-slot limiter
POST_FLUSH = 0.05  # as the gateway's store: an outcome waits at most this long for a commit

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    tool TEXT NOT NULL,
    entity TEXT NOT NULL,
    decision TEXT NOT NULL,
    outcome TEXT,
    result BLOB
)
"""


class Worker:
    """One long-lived thread running blocking calls in order (the gateway store's ``_Worker``:
    a queue put to hand a call over, ``run_sync_soon`` to wake the waiting task)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="stackfloor-db", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    async def run(self, fn: Callable[[], Any]) -> Any:
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        answer: list[tuple[Any, BaseException | None]] = []

        def job() -> None:
            try:
                answer.append((fn(), None))
            except BaseException as exc:
                answer.append((None, exc))
            token.run_sync_soon(trio.lowlevel.reschedule, task)

        self._jobs.put(job)
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        result, error = answer[0]
        if error is not None:
            raise error
        return result

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()


class Ledger:
    """Decision rows committed durably before their call runs; outcome rows that join the next
    commit. A caller commits at once when no commit runs; otherwise its row waits for the next
    one, with everything else that queued meanwhile (one fsync for all)."""

    def __init__(self, conn: sqlite3.Connection, worker: Worker) -> None:
        self._conn = conn
        self._worker = worker
        self._decisions: list[tuple[tuple[float, str, str], list[int]]] = []
        self._outcomes: list[tuple[str, bytes, int]] = []
        self._busy = False
        self._queued = trio.Event()  # something waits to be committed
        self._wakeup = trio.Event()  # ... and a caller waits for it
        self._batch_done = trio.Event()

    def _commit(
        self,
        decisions: list[tuple[tuple[float, str, str], list[int]]],
        outcomes: list[tuple[str, bytes, int]],
    ) -> None:
        """In the worker thread: one transaction, its commit fsync'd (``synchronous=FULL``)."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if outcomes:
                conn.executemany("UPDATE calls SET outcome=?, result=? WHERE id=?", outcomes)
            for (at, tool, entity), into in decisions:
                cursor = conn.execute(
                    "INSERT INTO calls (at, tool, entity, decision) VALUES (?, ?, ?, 'allow')",
                    (at, tool, entity),
                )
                into.append(cursor.lastrowid or 0)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def _settle(self) -> None:
        decisions, self._decisions = self._decisions, []
        outcomes, self._outcomes = self._outcomes, []
        self._busy = True
        try:
            await self._worker.run(partial(self._commit, decisions, outcomes))
        finally:
            self._busy = False
            self._batch_done.set()
            self._batch_done = trio.Event()

    async def decide(self, tool: str, entity: str) -> int:
        """The decision row, on disk before this returns; its row id."""
        into: list[int] = []
        self._decisions.append(((time.time(), tool, entity), into))
        if not self._busy:
            await self._settle()
        else:
            self._queued.set()
            self._wakeup.set()
            while not into:
                await self._batch_done.wait()
        return into[0]

    async def flush(self) -> None:
        """Commit the outcomes still waiting (at shutdown)."""
        while self._busy:
            await self._batch_done.wait()
        if self._decisions or self._outcomes:
            await self._settle()

    def resolve(self, row: int, result: bytes) -> None:
        """The outcome row: joins the next commit (nobody waits for it)."""
        self._outcomes.append(("executed", result, row))
        self._queued.set()

    async def run(self) -> None:
        """Commit what queued while a commit ran, and outcomes nobody committed in time."""
        while True:
            await self._queued.wait()
            with trio.move_on_after(POST_FLUSH):
                await self._wakeup.wait()
            self._queued, self._wakeup = trio.Event(), trio.Event()
            while self._busy:
                await self._batch_done.wait()
            if self._decisions or self._outcomes:
                await self._settle()


def open_db(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # every commit here carries a decision: fsync'd
    conn.execute(SCHEMA)
    return conn


class Floor:
    """The per-request path; one per process, shared by its connections."""

    def __init__(self, ledger: Ledger, client: httpx.AsyncClient) -> None:
        self.ledger = ledger
        self.client = client
        self.slots = trio.CapacityLimiter(SLOTS)
        self.urls: dict[str, httpx.URL] = {}  # parsed once per entity, as the executor does

    async def tool_request(self, rpc_id: Any, params: dict[str, Any]) -> str:
        tool = params["tool"]
        entity = params["args"]["entity_id"]
        row = await self.ledger.decide(tool, entity)
        url = self.urls.get(entity)
        if url is None:
            url = self.urls[entity] = self.client.build_request("GET", f"/api/states/{entity}").url
        async with self.slots:
            reply = await self.client.get(url)
        reply.raise_for_status()
        data = reply.json()
        self.ledger.resolve(row, reply.content)
        result = {"status": "executed", "request_id": str(row), "data": data}
        return json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": result})

    async def handle(self, ws: trio_websocket.WebSocketConnection) -> None:
        """Take frames in turn with the connection's other handlers, answer each."""
        while True:
            message = json.loads(await ws.get_message())
            rpc_id, method = message.get("id"), message.get("method")
            if method == "tool_request":
                answer = await self.tool_request(rpc_id, message["params"])
            elif method == "auth":
                answer = json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": rpc_id,
                        "result": {"status": "authenticated", "agent": "bench"},
                    }
                )
            elif method == "get_pending_results":
                answer = json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": {"results": []}})
            else:
                answer = json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": rpc_id,
                        "error": {"code": -32601, "message": "not in the floor"},
                    }
                )
            await ws.send_message(answer)

    async def connection(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(HANDLERS):
                    nursery.start_soon(self.handle, ws)
        except* trio_websocket.ConnectionClosed:
            pass  # the client is done


async def serve(
    cert: str,
    key: str,
    ha_url: str,
    ha_token: str,
    db: str,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started`` gets the URL."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # as the gateway's
    context.load_cert_chain(cert, key)
    worker = Worker()
    conn = await worker.run(partial(open_db, db))
    ledger = Ledger(conn, worker)
    limits = httpx.Limits(
        max_connections=SLOTS, max_keepalive_connections=SLOTS, keepalive_expiry=30
    )
    try:
        async with (
            httpx.AsyncClient(
                base_url=ha_url,
                headers={"Authorization": f"Bearer {ha_token}"},
                limits=limits,
                follow_redirects=False,
            ) as client,
            trio.open_nursery() as nursery,
        ):
            floor = Floor(ledger, client)
            nursery.start_soon(ledger.run)
            server = await nursery.start(
                partial(
                    trio_websocket.serve_websocket,
                    floor.connection,
                    "127.0.0.1",
                    0,
                    context,
                    max_message_size=MAX_MESSAGE,
                )
            )
            task_status.started(f"wss://127.0.0.1:{server.port}/")
    finally:
        with trio.CancelScope(shield=True):
            await ledger.flush()
            await worker.run(conn.close)
        worker.stop()


async def _main(argv: list[str]) -> None:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve, *argv))
        print(url, flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


if __name__ == "__main__":
    trio.run(_main, sys.argv[1:6])
