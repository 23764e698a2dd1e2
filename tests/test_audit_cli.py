"""``agentgate audit``: the table, filters, JSON lines and its exit codes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import trio

from agentgate import audit
from agentgate.cli import main
from agentgate.store import AuditEntry, open_store

NOW = 1_800_000_000.0


async def _fill(path: Path) -> None:
    async with open_store(path, inline=True) as store:
        await store.audit(
            AuditEntry(
                NOW,
                "pi",
                "r1",
                "ha_get_state",
                {"entity_id": "sensor.t"},
                "ha_get_state(sensor.t)",
                "allow",
                "rule 0: ha_get_state(sensor.*) (allow)",
            )
        )
        await store.resolve_audit("r1", "executed", resolved_by=None, resolved_at=NOW + 1)
        await store.audit(
            AuditEntry(
                NOW + 60,
                "laptop",
                "r2",
                "ha_call_service",
                {"domain": "lock", "service": "unlock", "entity_id": "lock.front_door"},
                "ha_call_service(lock.unlock, lock.front_door)",
                "deny",
                "rule 10",
                resolution="denied",
                resolved_at=NOW + 60,
            )
        )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "agentgate.db"
    trio.run(_fill, path)
    return path


def test_table_shows_every_row(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--store", str(db)]) == 0
    out = capsys.readouterr().out
    assert "time (UTC)" in out
    assert "ha_get_state(sensor.t)" in out
    assert "executed" in out
    assert "ha_call_service(lock.unlock, lock.front_door)" in out


def test_filters_and_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--store", str(db), "--agent", "laptop", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["r2"]
    assert main(["audit", "--store", str(db), "--decision", "allow", "--json"]) == 0
    assert [json.loads(x)["agent"] for x in capsys.readouterr().out.splitlines()] == ["pi"]
    assert main(["audit", "--store", str(db), "--tool", "nope"]) == 0
    assert "no audit rows match" in capsys.readouterr().out


def test_since(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit.parse_since("10m", now=NOW) == NOW - 600
    assert audit.parse_since("2027-01-15T00:00:00") == 1_799_971_200.0
    assert main(["audit", "--store", str(db), "--since", "2027-01-15T08:00:30", "--json"]) == 0
    assert [json.loads(x)["request_id"] for x in capsys.readouterr().out.splitlines()] == ["r2"]


def test_usage_errors_exit_2(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--store", str(tmp_path / "none.db")]) == 2
    assert "no store" in capsys.readouterr().err
    assert main(["audit", "--store", str(db), "--since", "yesterday"]) == 2
    assert "--since" in capsys.readouterr().err
    assert main(["audit", "--config", str(tmp_path / "missing.toml")]) == 2


def test_follow_prints_new_rows_and_resolutions(db: Path) -> None:
    seen: list[tuple[str | None, bool]] = []
    done = threading.Event()

    def emit(entry: AuditEntry, update: bool) -> None:
        seen.append((entry.request_id, update))

    thread = threading.Thread(
        target=audit.follow,
        args=(db, audit.Filters(), emit),
        kwargs={"interval": 0.01, "stop": done.is_set},
    )
    thread.start()
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    done.set()
    thread.join(10)
    assert seen == [("r1", False), ("r2", False)]


def test_a_reader_that_goes_away_is_not_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    async def fill(path: Path) -> None:
        async with open_store(path, inline=True) as store:
            for i in range(3000):
                await store.audit(
                    AuditEntry(
                        NOW + i,
                        "pi",
                        f"r{i}",
                        "ha_get_state",
                        {"entity_id": "sensor.t"},
                        "ha_get_state(sensor.t)",
                        "allow",
                        "rule 0",
                    )
                )

    path = tmp_path / "big.db"
    trio.run(fill, path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentgate", "audit", "--store", str(path), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.read(10)  # like `| head -c 10`: read a little, then hang up
    proc.stdout.close()
    status = proc.wait(timeout=60)
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert status == 0
    assert "Traceback" not in stderr
