"""The audit log as an operator meets it: the real gateway over TLS with the real Telegram
guardian (fake Bot API), the checkpoint arriving silently in the chat, and ``agentgate audit
verify | proof | key | compact`` run as processes, the chat message pasted as it reads."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from agentgate.approvals import Outcome
from agentgate.store import AuditEntry, open_store
from agentgate.testing.fake_homeassistant import FakeHomeAssistant, run_fake_homeassistant
from agentgate.testing.fake_telegram import FakeMessage, FakeTelegram, run_fake_telegram
from agentgate.testing.harness import raw_agent, running_gateway

pytestmark = pytest.mark.slow

TOKEN = "123456:AUDIT-E2E-TOKEN"
CHAT = -1002
ALICE = 111
CEILING = 60
KITCHEN = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with run_fake_telegram(token=TOKEN, chat_id=CHAT) as fake:
        yield fake


@pytest.fixture
async def home() -> AsyncIterator[FakeHomeAssistant]:
    async with run_fake_homeassistant() as fake:
        yield fake


async def agentgate(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    with trio.fail_after(CEILING):
        done = await trio.run_process(
            [sys.executable, "-m", "agentgate", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def checkpoints(tg: FakeTelegram) -> list[FakeMessage]:
    return [m for m in tg.messages.values() if "Audit checkpoint" in m.text]


async def test_the_chat_holds_the_checkpoint_and_verify_reads_it_as_pasted(
    tmp_path: Path, tg: FakeTelegram, home: FakeHomeAssistant
) -> None:
    telegram = {"token": TOKEN, "chat_id": CHAT, "allowed_users": [ALICE], "base_url": tg.base_url}
    with trio.fail_after(CEILING):
        async with (
            running_gateway(tmp_path, home=home, use_telegram=True, telegram=telegram) as gw,
            raw_agent(gw) as agent,
        ):
            await agent.send(
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "tool_request",
                    "params": {"tool": "ha_call_service", "args": KITCHEN},
                }
            )
            card = await tg.wait_for_message(lambda m: any("allow:" in d for _, d in m.buttons))
            data = next(d for _, d in card.buttons if d.startswith("allow:"))
            await tg.press(card.message_id, data, ALICE, first_name="Alice").wait_answer()
            answer = json.loads(await agent.ws.get_message())
            while "id" not in answer:
                answer = json.loads(await agent.ws.get_message())
            request_id = answer["result"]["request_id"]
    # The stop signed a checkpoint and posted it, silently, to the guardians' chat.
    (message,) = checkpoints(tg)
    assert message.silent
    assert message.chat_id == CHAT
    gate = str(tmp_path / "gate.toml")
    code, out, err = await agentgate(
        "audit", "verify", "--config", gate, "--checkpoint", message.text
    )
    assert code == 0, out + err
    assert "completeness: ok: the log holds every event" in out
    # The press, with the user id Telegram vouched for, is one of the request's events.
    code, out, err = await agentgate("audit", "proof", request_id, "--config", gate, "--json")
    assert code == 0, err
    proof = json.loads(out)
    kinds = [p["event"]["type"] for p in proof["proofs"]]
    assert kinds == ["request", "card", "press", "executing", "outcome"]
    press = proof["proofs"][2]["event"]
    assert (press["by"], press["user"]) == (f"Alice ({ALICE})", str(ALICE))
    assert proof["not_yet_covered"] == []
    # The verifier key, as printed, pins the check.
    code, vkey, _ = await agentgate("audit", "key", "--config", gate)
    assert code == 0
    assert vkey.strip().count("+") >= 2
    code, out, _ = await agentgate(
        "audit",
        "verify",
        "--config",
        gate,
        "--key",
        vkey.strip(),
        "--checkpoint",
        "-",
        stdin=message.text.encode(),
    )
    assert code == 0, out
    # Someone truncates the log on the gateway's machine, carefully: the chat still knows.
    db = tmp_path / "agentgate.db"
    shutil.copy(db, tmp_path / "kept.db")
    conn = sqlite3.connect(db)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    last = conn.execute("SELECT MAX(seq) FROM audit_events").fetchone()[0]
    conn.execute("DELETE FROM audit_events WHERE seq = ?", (last,))
    conn.execute("DELETE FROM audit_checkpoints")
    conn.commit()
    conn.close()
    code, out, _ = await agentgate(
        "audit", "verify", "--store", str(db), "--checkpoint", message.text, "--json"
    )
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False
    assert report["first_bad"] is not None


async def test_verify_refuses_bad_input_with_status_2(tmp_path: Path) -> None:
    code, _, err = await agentgate("audit", "verify", "--store", str(tmp_path / "none.db"))
    assert code == 2
    assert "no store at" in err
    db = tmp_path / "old.db"
    sqlite3.connect(db).close()
    code, _, err = await agentgate("audit", "verify", "--store", str(db))
    assert code == 2
    assert "no event log yet" in err
    async with open_store(tmp_path / "a.db", inline=True):
        pass
    code, _, err = await agentgate(
        "audit", "verify", "--store", str(tmp_path / "a.db"), "--checkpoint", "not a note"
    )
    assert code == 2
    assert "no checkpoint found" in err
    code, _, err = await agentgate(
        "audit", "verify", "--store", str(tmp_path / "a.db"), "--key", "nonsense"
    )
    assert code == 2
    code, _, err = await agentgate("audit", "key", "--store", str(tmp_path / "a.db"))
    assert code == 2
    assert "no key yet" in err


async def test_compact_from_the_shell_prunes_old_events_and_verify_goes_on(
    tmp_path: Path, home: FakeHomeAssistant
) -> None:
    # A gateway ran once (the log has its key); then a year of old rows, as if it had run long.
    with trio.fail_after(CEILING):
        async with running_gateway(tmp_path, home=home, tls=False):
            pass
    db = tmp_path / "agentgate.db"
    now = time.time()
    async with open_store(db, inline=True) as store:
        for day in range(30):
            at = now - (30 - day) * 86400
            await store.audit(AuditEntry(at, "pi", f"r{day}", "t", {}, "t()", "allow", "rule"))
            await store.resolve_audit(f"r{day}", Outcome.EXECUTED, resolved_by=None, resolved_at=at)
    gate = str(tmp_path / "gate.toml")
    code, out, err = await agentgate("audit", "compact", "--config", gate)
    assert code == 2
    assert "--keep-days" in err
    code, out, err = await agentgate("audit", "compact", "--config", gate, "--keep-days", "7.5")
    assert code == 0, err
    assert "pruned" in out
    code, out, err = await agentgate("audit", "verify", "--config", gate)
    assert code == 0, out + err
    assert "pruned by a compaction" in out
    code, out, _ = await agentgate("audit", "--config", gate, "--json")
    rows: list[dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
    assert [r["request_id"] for r in rows] == [f"r{day}" for day in range(23, 30)]
    code, out, _ = await agentgate("audit", "compact", "--config", gate, "--keep-days", "7.5")
    assert code == 0
    assert "nothing to prune" in out
