"""``agentgate serve`` as a real process: kill -9 and restart, SIGTERM, a broken config.

The gateway runs as ``python -m agentgate serve gate.toml`` (TLS, the real Telegram guardian);
the fake home and the fake Bot API run in this process, so the test can press buttons and read
the home's call log. Every process is killed when its block ends, whatever happens.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio_websocket

from agentgate.gateway import SHUTDOWN_BOUND
from agentgate.store import AuditEntry, audit_entries, read_only
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.fake_telegram import FakeMessage, FakeTelegram, run_fake_telegram
from agentgate.testing.processes import (
    GatewayFiles,
    GatewayProcess,
    agent_websocket,
    gateway_process,
    serve_argv,
    write_gateway_files,
)

pytestmark = pytest.mark.slow

TOKEN = "123456:PROCESS-GUARDIAN-TOKEN"
CHAT = -1001
ALICE = 111
CEILING = 60
APPROVAL_TIMEOUT = 6

KITCHEN_ON = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}
BEDROOM_ON = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}


class Agent:
    """A raw JSON-RPC agent over trio-websocket that sorts frames by kind."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.replies: dict[Any, dict[str, Any]] = {}
        self.pending: dict[Any, str] = {}  # rpc_id -> request_id
        self.results_pending: list[int] = []

    async def _read_one(self) -> None:
        frame = json.loads(await self.ws.get_message())
        if "id" in frame:
            self.replies[frame["id"]] = frame
        elif frame.get("method") == "approval_pending":
            self.pending[frame["params"]["rpc_id"]] = frame["params"]["request_id"]
        elif frame.get("method") == "results_pending":
            self.results_pending.append(frame["params"]["count"])

    async def send(self, rpc_id: Any, method: str, params: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.ws.send_message(json.dumps(message))

    async def reply(self, rpc_id: Any) -> dict[str, Any]:
        while rpc_id not in self.replies:
            await self._read_one()
        return self.replies.pop(rpc_id)

    async def ask(self, rpc_id: Any, args: dict[str, Any]) -> str:
        await self.send(rpc_id, "tool_request", {"tool": "ha_call_service", "args": args})
        while rpc_id not in self.pending:
            assert rpc_id not in self.replies, self.replies[rpc_id]
            await self._read_one()
        return self.pending[rpc_id]

    async def notified(self) -> int:
        """Wait for the next ``results_pending`` notification; return its count."""
        while not self.results_pending:
            await self._read_one()
        return self.results_pending.pop(0)

    async def collect(self, rpc_id: Any) -> list[dict[str, Any]]:
        await self.send(rpc_id, "get_pending_results")
        results: list[dict[str, Any]] = (await self.reply(rpc_id))["result"]["results"]
        return results


@asynccontextmanager
async def agent_of(gw: GatewayProcess, files: GatewayFiles) -> AsyncIterator[Agent]:
    async with agent_websocket(gw.url, files.client_ssl()) as ws:
        agent = Agent(ws)
        await agent.send("auth", "auth", {"token": files.tokens["pi"]})
        assert (await agent.reply("auth"))["result"]["status"] == "authenticated"
        yield agent


def gateway_files(workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram) -> GatewayFiles:
    return write_gateway_files(
        workdir,
        home=home,
        telegram={
            "token": TOKEN,
            "chat_id": CHAT,
            "allowed_users": [ALICE],
            "base_url": tg.base_url,
        },
        gateway={"approval_timeout": APPROVAL_TIMEOUT},
    )


async def card_of(tg: FakeTelegram, request_id: str) -> FakeMessage:
    return await tg.wait_for_message(lambda m: f"allow:{request_id}" in [d for _, d in m.buttons])


async def edited(tg: FakeTelegram, card: FakeMessage, text: str) -> FakeMessage:
    return await tg.wait_for_message(lambda m: m.message_id == card.message_id and text in m.text)


def posts(home: FakeHomeAssistant, entity_id: str) -> int:
    """How many service calls the fake home executed for ``entity_id``."""
    return sum(
        1
        for method, path, body in home.calls
        if method == "POST"
        and path.startswith("/api/services/")
        and isinstance(body, dict)
        and body.get("entity_id") == entity_id
    )


def message_refs(files: GatewayFiles) -> list[str]:
    """The message references of the cards recorded in the store so far."""
    conn = read_only(files.store)
    try:
        rows = conn.execute("SELECT message_ref FROM pending_requests").fetchall()
    finally:
        conn.close()
    return [r["message_ref"] for r in rows if r["message_ref"]]


def cards_sent(tg: FakeTelegram) -> list[dict[str, Any]]:
    return [p for p in tg.calls_to("sendMessage") if "allow:" in json.dumps(p)]


def audit(files: GatewayFiles) -> list[AuditEntry]:
    conn = read_only(files.store)
    try:
        return audit_entries(conn.execute("SELECT * FROM audit_log ORDER BY id"))
    finally:
        conn.close()


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with run_fake_telegram(token=TOKEN, chat_id=CHAT) as fake:
        yield fake


async def test_kill_9_then_restart_keeps_every_approval(
    tmp_path: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    files = gateway_files(tmp_path / "gate", home, tg)
    with trio.fail_after(CEILING):
        async with gateway_process(files) as first, agent_of(first, files) as agent:
            kitchen = await agent.ask(1, KITCHEN_ON)
            bedroom = await agent.ask(2, BEDROOM_ON)
            kitchen_card = await card_of(tg, kitchen)
            bedroom_card = await card_of(tg, bedroom)
            # Both cards recorded in the store (else the restart would send them again).
            # The store is another process's file: there is nothing to wait on but the file.
            while len(await trio.to_thread.run_sync(message_refs, files)) < 2:  # noqa: ASYNC110
                await trio.sleep(0.02)
            first.kill()  # kill -9 with both cards shown and the agent connected
            assert await first.wait() == -9
        restarted_at = time.time()

        async with gateway_process(files) as second:
            # A press on a card sent by the killed process: executed once, queued.
            press = tg.press(kitchen_card.message_id, f"allow:{kitchen}", ALICE)
            assert (await press.wait_answer()).text == "approved"
            queued_card = await edited(tg, kitchen_card, "result queued")
            assert "executed: light.kitchen: on" in queued_card.text
            assert home.state("light.kitchen")["state"] == "on"

            async with agent_of(second, files) as agent:
                assert await agent.notified() == 1  # announced at connect
                (entry,) = await agent.collect("collect-1")
                assert (entry["request_id"], entry["rpc_id"], entry["status"]) == (
                    kitchen,
                    1,
                    "executed",
                )
                assert entry["signature"] == "ha_call_service(light.turn_on, light.kitchen)"
                assert [s["entity_id"] for s in entry["data"]] == ["light.kitchen"]
                assert await agent.collect("collect-2") == []  # handed out once

                # The other approval is still pending and times out on its original deadline.
                assert tg.messages[bedroom_card.message_id].edits == 0
                assert await agent.notified() == 1
                (timed_out,) = await agent.collect("collect-3")
                assert (timed_out["request_id"], timed_out["rpc_id"]) == (bedroom, 2)
                assert timed_out["status"] == "timed_out"
                assert timed_out["error"]["code"] == -32002
                assert await agent.collect("collect-4") == []
            await edited(tg, bedroom_card, "Timed out")
            assert len(cards_sent(tg)) == 2  # the old cards were used, none sent again
            second.terminate()
            assert await second.wait() == 0

    rows = {r.request_id: r for r in audit(files) if r.decision == "ask"}
    assert (rows[kitchen].resolution, rows[kitchen].resolved_by) == ("executed", "Guardian (111)")
    bedroom_row = rows[bedroom]
    assert bedroom_row.resolution == "timed_out"
    assert bedroom_row.resolved_at is not None
    # Its deadline was the persisted one, not one restarted with the process.
    assert bedroom_row.resolved_at < restarted_at + APPROVAL_TIMEOUT
    assert bedroom_row.resolved_at >= bedroom_row.time + APPROVAL_TIMEOUT - 0.5
    assert posts(home, "light.kitchen") == 1
    assert posts(home, "light.bedroom") == 0
    assert home.state("light.bedroom")["state"] == "off"


async def test_sigterm_keeps_a_pending_approval_for_the_next_start(
    tmp_path: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    # A planned restart (systemctl restart) no longer throws the approval away: it resumes,
    # as after kill -9, and its card's Allow executes it exactly once.
    files = write_gateway_files(
        tmp_path / "gate",
        home=home,
        telegram={
            "token": TOKEN,
            "chat_id": CHAT,
            "allowed_users": [ALICE],
            "base_url": tg.base_url,
        },
        gateway={"approval_timeout": 60},
    )
    with trio.fail_after(CEILING):
        async with gateway_process(files) as gw, agent_of(gw, files) as agent:
            request_id = await agent.ask("pending", KITCHEN_ON)
            card = await card_of(tg, request_id)
            # The card's ref is in another process's store: nothing to wait on but the file.
            while not await trio.to_thread.run_sync(message_refs, files):  # noqa: ASYNC110
                await trio.sleep(0.02)
            gw.terminate()
            stopping = trio.current_time()
            error = (await agent.reply("pending"))["error"]
            assert error["code"] == -32007
            assert error["data"]["request_id"] == request_id
            assert error["data"]["pending"] is True  # its result will be queued
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await agent.notified()
            assert closed.value.reason.code == 1001
            assert await gw.wait() == 0
            assert trio.current_time() - stopping <= SHUTDOWN_BOUND  # the gateway's own bound
            restarting = await edited(tg, card, "Gateway restarting")
            assert restarting.buttons == []  # a press while it is down could not be answered
            assert restarting.edits == 1
            assert "stopped cleanly" in gw.output()
        (row,) = [r for r in audit(files) if r.request_id == request_id]
        assert (row.decision, row.resolution) == ("ask", None)  # still open

        async with gateway_process(files) as second:
            back = await tg.wait_for_message(
                lambda m: m.message_id == card.message_id and m.edits == 2
            )
            assert f"allow:{request_id}" in [data for _, data in back.buttons]
            assert "Approval needed" in back.text
            press = tg.press(card.message_id, f"allow:{request_id}", ALICE)
            assert (await press.wait_answer()).text == "approved"
            done = await edited(tg, card, "result queued")
            assert "executed: light.kitchen: on" in done.text
            async with agent_of(second, files) as agent:
                (entry,) = await agent.collect("collect")
                assert (entry["request_id"], entry["rpc_id"], entry["status"]) == (
                    request_id,
                    "pending",
                    "executed",
                )
            second.terminate()
            assert await second.wait() == 0
    (row,) = [r for r in audit(files) if r.request_id == request_id]
    assert (row.resolution, row.resolved_by) == ("executed", "Guardian (111)")
    assert posts(home, "light.kitchen") == 1  # exactly once
    assert len(cards_sent(tg)) == 1  # the same card throughout


async def test_sigterm_with_cancel_pending_resolves_it_as_shutdown(
    tmp_path: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    files = gateway_files(tmp_path / "gate", home, tg)
    with trio.fail_after(CEILING):
        async with (
            gateway_process(files, extra=["--cancel-pending"]) as gw,
            agent_of(gw, files) as agent,
        ):
            request_id = await agent.ask("pending", KITCHEN_ON)
            card = await card_of(tg, request_id)
            gw.terminate()
            stopping = trio.current_time()
            error = (await agent.reply("pending"))["error"]
            assert error["code"] == -32007
            assert error["data"]["request_id"] == request_id
            assert "pending" not in error["data"]
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await agent.notified()  # nothing else comes: the socket closes
            assert closed.value.reason.code == 1001
            assert await gw.wait() == 0
            assert trio.current_time() - stopping <= SHUTDOWN_BOUND  # the gateway's own bound
            shut = await edited(tg, card, "Gateway shutting down")
            assert shut.buttons == []
            assert "stopped cleanly" in gw.output()
    (row,) = [r for r in audit(files) if r.request_id == request_id]
    assert (row.decision, row.resolution) == ("ask", "shutdown")
    assert posts(home, "light.kitchen") == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[gateway\nlisten = ", "gate.toml"),
        ('[gateway]\nlisten = "127.0.0.1:0"\napproval_timeout = "soon"\n', "approval_timeout"),
    ],
)
async def test_broken_config_exits_2(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "gate.toml"
    config.write_text(text)
    with trio.fail_after(CEILING):
        done = await trio.run_process(
            serve_argv(config, insecure=True), capture_stdout=True, capture_stderr=True, check=False
        )
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert expected in stderr
    assert stderr.startswith("agentgate: ")
    assert "Traceback" not in stderr


@pytest.mark.parametrize("refused", ["telegram token", "telegram chat", "home token"])
async def test_a_refused_token_or_chat_at_start_up_exits_2(
    tmp_path: Path, home: FakeHomeAssistant, tg: FakeTelegram, refused: str
) -> None:
    telegram = {"token": TOKEN, "chat_id": CHAT, "allowed_users": [ALICE], "base_url": tg.base_url}
    if refused == "telegram token":
        telegram["token"] = "654321:NOT-THE-BOT-TOKEN"
    elif refused == "telegram chat":
        telegram["chat_id"] = -4242  # a chat the bot was never added to
    wrong_home = SimpleNamespace(url=home.url, token="not-the-home-token")
    files = write_gateway_files(
        tmp_path / "gate", home=wrong_home if refused == "home token" else home, telegram=telegram
    )
    with trio.fail_after(CEILING):
        done = await trio.run_process(
            serve_argv(files.config), capture_stdout=True, capture_stderr=True, check=False
        )
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    key = {
        "telegram token": "guardian.telegram.token",
        "telegram chat": "guardian.telegram.chat_id",
        "home token": "services.homeassistant.token",
    }[refused]
    assert f"agentgate: {files.config}: {key}: " in stderr
    assert "Traceback" not in stderr
    assert "NOT-THE-BOT-TOKEN" not in stderr
    assert "not-the-home-token" not in stderr
