"""The audit log's growth (issue 19, docs/performance.md): size per event, append cost, verify time.

``python -m bench.audit_log DIR [--events 1000000] [--cost 20000] [--durable 300]``

1. **Build** ``DIR/agentgate.db`` (a new store, made by :func:`agentgate.store.open_store`) with
   ``--events`` events written by the gateway's own code (:mod:`agentgate.eventlog`), in the
   gateway's mix: nine requests in ten allowed (a ``request`` and its ``outcome``), one in ten
   asked (``request``, ``card``, ``press``, ``executing``, ``outcome``), each with the arguments
   and a Home Assistant state as its result, and a signed checkpoint every 100 events (the
   ``[audit] checkpoint_every`` default). Batches of 1,000 requests per transaction: this step
   builds the store; it does not time the gateway's commits.
2. **Size**: the file (after a WAL checkpoint) divided by the events, and per table.
3. **Append cost**: in a scratch store, ``--cost`` requests (an allowed one: its row and its
   outcome, each in its own commit, as the gateway writes them) the way the previous version
   wrote them (an ``audit_log`` row, then an ``UPDATE`` of it) and the way this one does
   (:func:`eventlog.open_row` and :func:`eventlog.resolve_rows`), interleaved in blocks of 500 so
   both see the same machine; then ``--durable`` fsync'd commits of each (``synchronous=FULL``).
4. **Verify**: ``agentgate audit verify --store DIR/agentgate.db`` in a subprocess, its wall
   time and peak RSS.

Prints the figures and ``uptime`` before and after: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from agentgate import eventlog
from agentgate.auditkey import create_key
from agentgate.checkpoints import LogSigner, new_origin
from agentgate.store import open_store

CHECKPOINT_EVERY = 100
BATCH = 1000  # requests per transaction while building

ARGS = {"domain": "light", "service": "turn_on", "entity_id": "light.living_room"}
STATE = {
    "entity_id": "light.living_room",
    "state": "on",
    "attributes": {
        "friendly_name": "Living Room Light",
        "brightness": 255,
        "color_mode": "brightness",
        "supported_color_modes": ["brightness"],
    },
    "last_changed": "2026-12-06T05:04:55.123456+00:00",
    "last_updated": "2026-12-06T05:04:55.123456+00:00",
}
RESULT = eventlog.json_text([STATE])


def _row(at: float, request_id: str, decision: str) -> dict[str, Any]:
    return {
        "time": at,
        "kind": "request",
        "agent": "pi",
        "request_id": request_id,
        "tool": "ha_call_service",
        "args": eventlog.json_text(ARGS),
        "signature": "ha_call_service(light.turn_on, light.living_room)",
        "decision": decision,
        "matched": "rule 9: ha_call_service(light.*) (" + decision + ")",
        "via": "ws",
    }


def _request(c: sqlite3.Connection, at: float, n: int) -> None:
    """One request's events, as the gateway appends them."""
    request_id = str(uuid.UUID(int=n))
    asked = n % 10 == 9
    eventlog.open_row(c, _row(at, request_id, "ask" if asked else "allow"))
    by = None
    if asked:
        eventlog.append(
            c, "card", {"request_id": request_id, "message_ref": f"-100123:{n}"}, request_id
        )
        eventlog.append(
            c,
            "press",
            {"request_id": request_id, "action": "allow", "by": "Alex", "user": 4242},
            request_id,
        )
        eventlog.append(c, "executing", {"request_id": request_id, "by": "Alex"}, request_id)
        by = "Alex"
    eventlog.resolve_rows(
        c,
        "request_id=? AND kind='request'",
        (request_id,),
        resolution="executed",
        by=by,
        at=at + 0.05,
        result=RESULT,
        error=None,
    )


async def _new_store(path: Path) -> None:
    async with open_store(path):
        pass


def _connect(path: Path, synchronous: str = "NORMAL") -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


def build(store: Path, events: int) -> dict[str, Any]:
    trio.run(_new_store, store)
    signer = LogSigner(create_key(store.with_name(store.stem + ".audit-key")), new_origin())
    conn = _connect(store)
    began = time.perf_counter()
    at = time.time() - 86400
    n = 0
    conn.execute("BEGIN")
    eventlog.append(conn, "key", {"time": at, "origin": signer.origin, "vkey": signer.vkey})
    signed = 0
    while True:
        size = eventlog.tip(conn).size
        if size >= events:
            break
        for _ in range(BATCH):
            _request(conn, at + n * 0.01, n)
            n += 1
            # As the gateway does: a checkpoint once CHECKPOINT_EVERY events are not covered.
            size = eventlog.tip(conn).size
            if size - signed >= CHECKPOINT_EVERY:
                eventlog.write_checkpoint(conn, signer, at + n * 0.01)
                signed = size
        conn.execute("COMMIT")
        conn.execute("BEGIN")
    eventlog.write_checkpoint(conn, signer, at + n * 0.01)
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - began
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"events": size, "requests": n, "build_s": elapsed}


def sizes(store: Path) -> dict[str, Any]:
    conn = sqlite3.connect(store)
    try:
        events = conn.execute("SELECT COUNT(*) FROM audit_events").fetchone()[0]
        rows = conn.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0]
        checkpoints = conn.execute("SELECT COUNT(*) FROM audit_checkpoints").fetchone()[0]
        try:
            tables = dict(
                conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall()
            )
        except sqlite3.OperationalError:  # SQLite built without dbstat
            tables = {}
    finally:
        conn.close()
    total = store.stat().st_size
    return {
        "file_bytes": total,
        "events": events,
        "rows": rows,
        "checkpoints": checkpoints,
        "bytes_per_event": total / events,
        "bytes_per_request": total / rows,
        "tables": tables,
    }


# The previous version's writes (main before issue 19): the row, then its outcome in place.
_V1_INSERT = (
    "INSERT INTO audit_log (time, kind, agent, request_id, tool, args, signature, decision,"
    " matched, via) VALUES (:time, :kind, :agent, :request_id, :tool, :args, :signature,"
    " :decision, :matched, :via)"
)
_V1_RESOLVE = (
    "UPDATE audit_log SET resolution=?, resolved_by=?, resolved_at=?, result=?, error=?"
    " WHERE request_id=? AND kind='request' AND resolution IS NULL"
)


def _v1_request(conn: sqlite3.Connection, at: float, n: int) -> None:
    request_id = str(uuid.UUID(int=n))
    conn.execute("BEGIN")
    conn.execute(_V1_INSERT, _row(at, request_id, "allow"))
    conn.execute("COMMIT")
    conn.execute("BEGIN")
    conn.execute(_V1_RESOLVE, ("executed", None, at + 0.05, RESULT, None, request_id))
    conn.execute("COMMIT")


def _v2_request(conn: sqlite3.Connection, at: float, n: int) -> None:
    request_id = str(uuid.UUID(int=n))
    conn.execute("BEGIN")
    eventlog.open_row(conn, _row(at, request_id, "allow"))
    conn.execute("COMMIT")
    conn.execute("BEGIN")
    eventlog.resolve_rows(
        conn,
        "request_id=? AND kind='request'",
        (request_id,),
        resolution="executed",
        by=None,
        at=at + 0.05,
        result=RESULT,
        error=None,
    )
    conn.execute("COMMIT")


def append_cost(workdir: Path, requests: int, durable: int) -> dict[str, Any]:
    """µs per request (two commits each), previous version vs events, interleaved."""
    v1_path, v2_path = workdir / "cost-v1.db", workdir / "cost-v2.db"
    for path in (v1_path, v2_path):
        trio.run(_new_store, path)
    out: dict[str, Any] = {}
    for label, synchronous, count, block in (
        ("normal", "NORMAL", requests, 500),
        ("durable", "FULL", durable, 50),
    ):
        v1, v2 = _connect(v1_path, synchronous), _connect(v2_path, synchronous)
        spent = {"v1": 0.0, "v2": 0.0}
        n = 10_000_000 if label == "durable" else 0
        at = time.time()
        done = 0
        while done < count:
            for name, conn, fn in (("v1", v1, _v1_request), ("v2", v2, _v2_request)):
                began = time.perf_counter()
                for i in range(block):
                    fn(conn, at, n + done + i)
                spent[name] += time.perf_counter() - began
            done += block
        v1.close()
        v2.close()
        out[label] = {
            "requests": done,
            "v1_us_per_request": 1e6 * spent["v1"] / done,
            "events_us_per_request": 1e6 * spent["v2"] / done,
        }
    for path in (v1_path, v2_path):
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    return out


def verify_time(store: Path) -> dict[str, Any]:
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "agentgate", "audit", "verify", "--store", str(store)],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "status": done.returncode,
        "verify_s": elapsed,
        "peak_rss_mib": peak,
        "output": done.stdout.strip().splitlines(),
    }


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_log", description=__doc__)
    parser.add_argument("dir", type=Path, help="a new or empty directory (the store goes here)")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--cost", type=int, default=20_000, help="requests timed per version")
    parser.add_argument("--durable", type=int, default=300, help="fsync'd requests per version")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.dir.exists() and any(args.dir.iterdir()):
        parser.error(f"{args.dir} must be a new or empty directory")
    args.dir.mkdir(parents=True, exist_ok=True)
    store = args.dir / "agentgate.db"
    figures: dict[str, Any] = {"uptime_before": _uptime()}
    print(figures["uptime_before"], flush=True)
    figures["build"] = build(store, args.events)
    print(json.dumps(figures["build"]), flush=True)
    figures["size"] = sizes(store)
    print(json.dumps(figures["size"]), flush=True)
    figures["append"] = append_cost(args.dir, args.cost, args.durable)
    print(json.dumps(figures["append"]), flush=True)
    figures["verify"] = verify_time(store)
    print(json.dumps(figures["verify"], ensure_ascii=False), flush=True)
    figures["uptime_after"] = _uptime()
    print(figures["uptime_after"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
    return 0 if figures["verify"]["status"] == 0 else 1


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
