"""``kill -9`` in the middle of appending to the audit log, and of checkpointing, leaves a log
that verifies: every event whole or absent, every checkpoint (stored or in the witness file)
one the log still satisfies. A restart then goes on with the same log."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from agentgate import tlog
from agentgate.store import read_only
from agentgate.verify import Given, verify

REPO = Path(__file__).resolve().parent.parent
CEILING = 60

pytestmark = pytest.mark.slow


async def _kill_after(db: Path, witness: Path, mode: str, events: int) -> int | None:
    """Run the writer until it reports ``events``, then SIGKILL it (mid-write: it never waits;
    with ``checkpoint``, once it says it is inside a checkpoint's transaction: the size it was
    signing)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.audit_writer", str(db), str(witness), mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    seen = 0
    signing = mode != "checkpoint"
    buffer = b""
    try:
        while seen < events or not signing:
            chunk = await process.stdout.receive_some()
            assert chunk, "the writer ended early"
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.startswith(b"events "):
                    seen = int(line.split()[1])
            # The last thing it said, and nothing after: it is inside a checkpoint's transaction.
            signing = mode != "checkpoint" or (
                seen >= events
                and buffer == b""
                and lines[-1:] != []
                and lines[-1].startswith(b"signing ")
            )
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
        await process.stdout.aclose()
    assert process.returncode == -signal.SIGKILL
    return int(lines[-1].split()[1]) if mode == "checkpoint" else None


def _verify(db: Path, witness: Path) -> None:
    given = [Given("witness", n) for n in tlog.find_notes(witness.read_text())]
    conn = read_only(db)
    try:
        report = verify(conn, store=str(db), given=given, key_file=db.with_name("a.audit-key"))
    finally:
        conn.close()
    assert report.ok, report.text()
    assert report.size > 0
    assert report.checkpoints > 0


@pytest.mark.parametrize("mode", ["append", "checkpoint"])
async def test_kill_9_mid_write_leaves_a_log_that_verifies(tmp_path: Path, mode: str) -> None:
    db, witness = tmp_path / "a.db", tmp_path / "witness.txt"
    with trio.fail_after(CEILING):
        for events in (60, 400, 700):  # three kills, each a restart on the same log
            signing = await _kill_after(db, witness, mode, events)
            _verify(db, witness)
            if signing is not None:  # killed with that checkpoint's transaction open
                conn = read_only(db)
                try:
                    sizes = {r[0] for r in conn.execute("SELECT size FROM audit_checkpoints")}
                finally:
                    conn.close()
                assert signing not in sizes
                assert f"\n{signing}\n" not in witness.read_text()
