"""``make demo`` cannot rot: the demo runs here as users run it, as a subprocess.

``--auto`` end to end (TLS and ``--insecure``), a guardian who presses Deny on the keyboard
(stdin is a pipe here, a TTY for a person), and the key reader on its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from agentgate.demo_phone import KeyReader

CEILING = 60  # seconds per demo run; it takes ~3 s

DEMO = [sys.executable, "-m", "agentgate.demo"]
AUDIT = [sys.executable, "-m", "agentgate", "audit"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    env["NO_COLOR"] = "1"
    return env


async def run_demo(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(CEILING):
        return await trio.run_process(
            [*DEMO, *args],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=_env(),
        )


def assert_audit_table(out: str) -> None:
    assert "time (UTC)" in out
    table = out[out.index("time (UTC)") :]
    assert "allow     ha_get_state(sensor.living_room_temperature)" in table
    assert "ask       ha_call_service(light.turn_on, light.living_room)" in table
    assert "undo      ha_call_service(light.turn_on, light.living_room)" in table
    assert "deny      ha_call_service(lock.unlock, lock.front_door)" in table
    assert "deny      ha_call_service(scene.apply, light.living_room, lock.front_door)" in table


@pytest.mark.slow
async def test_the_unattended_demo_behaves_as_expected() -> None:
    done = await run_demo("--auto")
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, out + err
    assert "listening on wss://127.0.0.1:" in out
    assert "allowed by policy, executed at once: 21.5 °C" in out
    assert "🛡 Approval needed" in out  # the card, as the phone drew it
    assert "[ ✅ Allow ]" in out
    assert "Alex presses Allow" in out
    assert "approved by the guardian and executed: light.living_room is now on" in out
    assert "✅ Executed by Alex (4242)" in out  # the card edit
    assert "light.living_room: on" in out
    assert "Alex presses ↩ Undo" in out  # scene 3: the guardian changes their mind
    assert "↩ Undone by Alex (4242)" in out
    assert "undone by the guardian: light.living_room is off again" in out
    assert "denied by policy (rule " in out
    assert "the door stays locked" in out
    assert "the lock is in the call's signature" in out  # the back way, through a scene
    assert "executed by Alex (4242)" in out  # the audit row of the approved ask
    assert_audit_table(out)
    assert "integrity: ok; completeness against the chat: ok" in out  # verified, as a user would
    assert "everything behaved as expected" in out
    assert "\x1b[" not in out  # no colours without a TTY
    assert "Traceback" not in out + err


@pytest.mark.slow
async def test_the_insecure_demo_says_so_loudly() -> None:
    done = await run_demo("--auto", "--insecure", "--pause", "0")
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, out + err
    assert "listening on ws://127.0.0.1:" in out
    assert "WITHOUT TLS" in out
    assert "INSECURE" in out
    assert_audit_table(out)


@pytest.mark.slow
async def test_a_guardian_at_the_keyboard_can_deny() -> None:
    """The interactive demo: wait for the card, press ``d``; the light stays off."""
    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                partial(
                    trio.run_process,
                    DEMO,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    check=False,
                    env=_env(),
                )
            )
            assert process.stdin is not None
            assert process.stdout is not None
            seen = b""
            while b"Your move:" not in seen:
                chunk = await process.stdout.receive_some()
                assert chunk, seen.decode()
                seen += chunk
            await process.stdin.send_all(b"x")  # not a button: ignored, with a hint
            await process.stdin.send_all(b"d")
            while chunk := await process.stdout.receive_some():
                seen += chunk
            await process.stdin.aclose()
    out = seen.decode()
    assert process.returncode == 0, out
    assert "'x' is not a button" in out
    assert "Alex presses Deny" in out
    assert "denied by the guardian (Alex (4242))" in out
    assert "denied by the guardian (denied by" not in out  # said once
    assert "❌ Denied by Alex (4242)" in out
    assert "nothing to undo: the light was not turned on" in out
    assert "denied by policy (rule " in out
    assert "everything behaved as expected" in out


@pytest.mark.slow
async def test_the_demo_keeps_what_it_wrote_for_agentgate_audit_verify(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    done = await run_demo("--auto", "--pause", "0", "--keep", str(kept))
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, out + err
    assert f"kept in {kept}" in out
    assert {"agentgate.db", "agentgate.audit-key", "checkpoints.txt"} <= {
        p.name for p in kept.iterdir()
    }
    with trio.fail_after(CEILING):
        store, witness = str(kept / "agentgate.db"), str(kept / "checkpoints.txt")
        verified = await trio.run_process(
            [*AUDIT, "verify", "--store", store, "--checkpoint", witness],
            capture_stdout=True,
            check=False,
        )
    assert verified.returncode == 0, verified.stdout.decode()
    assert b"completeness: ok: the log holds every event" in verified.stdout
    again = await run_demo("--auto", "--keep", str(kept))  # not over a kept store
    assert again.returncode == 2
    assert b"must be a new or empty directory" in again.stderr


async def test_key_reader_reads_single_keys_until_eof() -> None:
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"A d\nh")
        os.close(write_end)
        keys = KeyReader(read_end)
        with trio.fail_after(5):
            assert [await keys.get() for _ in range(4)] == ["a", "d", "h", None]
        assert keys.eof
    finally:
        os.close(read_end)


@pytest.mark.slow
async def test_the_mcp_demo_goes_through_agentgate_mcp() -> None:
    done = await run_demo("--auto", "--mcp")
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, out + err
    assert "MCP client connected to agentgate mcp (stdio)" in out
    assert "MCP progress: waiting for the guardian's approval" in out
    assert "Agent: pi (via MCP)" in out
    assert "isError: denied by policy: ha_call_service(lock.unlock, lock.front_door)" in out
    assert "mcp-stdio  allow     ha_get_state(sensor.living_room_temperature)" in out
    assert "demo finished: everything behaved as expected." in out
