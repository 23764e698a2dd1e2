"""``bench.stackfloor``, the benchmarks' stack floor: it answers the SDK as the gateway answers an
allowed ``ha_get_state``, records each call's decision and outcome in SQLite, and stops."""

from __future__ import annotations

import sqlite3
import threading
from functools import partial
from pathlib import Path

import trio

from agentgate.client import connect
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import write_certificates
from bench import procs, stackfloor
from bench.stats import Row, combine

ENTITY = "sensor.living_room_temperature"


async def test_stack_floor_answers_the_sdk_and_records_every_call(
    home: FakeHomeAssistant, tmp_path: Path
) -> None:
    ca, cert, key = write_certificates(tmp_path)
    db = tmp_path / "floor.db"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                partial(stackfloor.serve, str(cert), str(key), home.url, home.token, str(db))
            )
            async with connect(url, token="any", ca=ca, reconnect=False) as gw:
                for _ in range(3):  # one at a time, as in S1
                    data = await gw.call("ha_get_state", entity_id=ENTITY)
                    assert data["entity_id"] == ENTITY
                async with trio.open_nursery() as calls:  # several in flight: a group commit
                    for _ in range(20):
                        calls.start_soon(partial(gw.call, "ha_get_state", entity_id=ENTITY))
            nursery.cancel_scope.cancel()
    # Stopped: its database thread is gone, and every outcome was committed at the latest then.
    assert not any(t.name == "stackfloor-db" for t in threading.enumerate())
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        rows = conn.execute("SELECT entity, decision, outcome FROM calls").fetchall()
    finally:
        conn.close()
    assert rows == [(ENTITY, "allow", "executed")] * 23


def test_stack_floor_process_starts_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    # As the bench runs it: its own process, the fast fake home, stopped with SIGTERM.
    async def one_call(floor: procs.EchoServer) -> None:
        with trio.fail_after(60):
            async with connect(floor.url, token="any", ca=floor.ca, reconnect=False) as gw:
                data = await gw.call("ha_get_state", entity_id=ENTITY)
                assert data["entity_id"] == ENTITY

    with procs.fake_home(fast=True) as home, procs.stack_floor(tmp_path, home) as floor:
        trio.run(one_call, floor)
    assert floor.proc.returncode == 0


def test_several_runs_keep_the_medians_of_the_gateway_against_the_stack_floor() -> None:
    runs = [
        [
            Row(
                "S1 sequential",
                rate,
                "req/s",
                "-",
                None,
                extra={
                    "stack_floor": {
                        "rate": 500.0,
                        "rate_ratio": rate / 500,
                        "cpu_us": 1200.0,
                        "cpu_ratio": cpu_ratio,
                    }
                },
            )
        ]
        for rate, cpu_ratio in ((300.0, 0.6), (400.0, 0.8), (350.0, 0.7))
    ]
    (row,) = combine(runs)
    assert row.extra["stack_floor"] == {
        "rate": 500.0,
        "rate_ratio": 0.7,
        "cpu_us": 1200.0,
        "cpu_ratio": 0.7,
    }
    assert "vs stack 0.70x, CPU 0.70x" in row.note
