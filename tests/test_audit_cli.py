"""``agentgate audit``: the table, filters, JSON lines and its exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
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
    both = threading.Event()
    done = threading.Event()

    def emit(entry: AuditEntry, update: bool) -> None:
        seen.append((entry.request_id, update))
        if len(seen) >= 2:
            both.set()

    thread = threading.Thread(
        target=audit.follow,
        args=(db, audit.Filters(), emit),
        kwargs={"interval": 0.01, "stop": done.is_set},
    )
    thread.start()
    try:
        assert both.wait(10), seen  # a ceiling, not a pace: it returns once both are printed
    finally:
        done.set()
        thread.join(10)
    assert seen == [("r1", False), ("r2", False)]


def test_a_reader_that_goes_away_is_not_a_traceback(tmp_path: Path) -> None:
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


# --- conventions: ISO times, a header on --follow, known decisions, said once -----------------

AGENTGATE = Path(sys.executable).parent / "agentgate"


def test_json_times_are_iso_8601_utc(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--store", str(db), "--json"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["time"] == "2027-01-15T08:00:00.000Z"
    assert first["resolved_at"] == "2027-01-15T08:00:01.000Z"


def test_unknown_decision_is_a_usage_error(db: Path) -> None:
    proc = subprocess.run(
        [str(AGENTGATE), "audit", "--store", str(db), "--decision", "bogus"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "invalid choice: 'bogus'" in proc.stderr
    assert "allow" in proc.stderr


async def test_follow_prints_the_header_first(db: Path) -> None:
    with trio.fail_after(60):
        process = await trio.lowlevel.open_process(
            [str(AGENTGATE), "audit", "--store", str(db), "--follow"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert process.stdout is not None
            out = b""
            while out.count(b"\n") < 4:  # header, rule, two rows
                chunk = await process.stdout.receive_some()
                assert chunk, out
                out += chunk
        finally:
            process.kill()
            await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()
    header, rule, first, second = out.decode().splitlines()[:4]
    assert header.split() == ["time", "(UTC)", "agent", "via", "decision", "request", "outcome"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert first.startswith("2027-01-15 08:00:00  pi ")
    assert "ha_get_state(sensor.t)" in first
    assert "laptop" in second


def test_outcomes_are_said_once() -> None:
    def outcome(**fields: object) -> str:
        base: dict[str, object] = dict(
            time=NOW, agent="pi", request_id="r", tool="t", args={}, signature="t", decision="ask",
            matched="rule 1",
        )  # fmt: skip
        return audit.table_rows([AuditEntry(**{**base, **fields})])[0][-1]  # type: ignore[arg-type]

    denied = outcome(resolution="denied", resolved_by="Alex (4242)",
                     error="denied by the guardian (Alex (4242))")  # fmt: skip
    assert denied == "denied by Alex (4242)"
    timed_out = outcome(resolution="timed_out", error="approval timed out: no decision before")
    assert timed_out == "timed_out: no decision before"
    rejected = outcome(decision="invalid", resolution="rejected", matched="entity_id: forbidden")
    assert rejected == "rejected: entity_id: forbidden"
    assert (
        outcome(resolution="failed", error="entity not found: x") == "failed: entity not found: x"
    )


def test_bare_agentgate_lists_the_commands() -> None:
    proc = subprocess.run([str(AGENTGATE)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    for command in ("serve", "check", "config", "audit", "call", "tools", "pending"):
        assert f"\n    {command}" in proc.stderr
