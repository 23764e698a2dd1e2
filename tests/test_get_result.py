"""Fast tier: ``get_result`` (the outcome of one request by id) and ``via`` (which front door a
request came through), over memory streams on a fake clock."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection

from agentgate.guardian.card import render_card
from agentgate.store import open_store
from agentgate.testing.harness import DEFAULT_TOKENS
from tests.fastgate import FastGateway, authed, call, fast_gateway, reply

LIGHT_ON = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}


async def ask(fg: FastGateway, ws: WebSocketConnection, rpc_id: int) -> str:
    """Send an ask; return its request_id once its card is out."""
    message = {
        "jsonrpc": "2.0",
        "id": rpc_id,
        "method": "tool_request",
        "params": {"tool": "ha_call_service", "args": LIGHT_ON},
    }
    await ws.send_message(json.dumps(message))
    shown = await fg.guardian.wait_for_card(len(fg.guardian.cards) + 1)
    return shown.card.request_id


async def test_get_result_waits_for_the_decision_and_reads_it_again_and_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        asking = await authed(fg)
        request_id = await ask(fg, asking, 1)
        await asking.aclose()  # the agent goes away: the outcome will be queued
        ws = await authed(fg)
        pending = await call(ws, 2, "get_result", request_id=request_id, wait=5)
        assert pending["result"]["status"] == "pending"
        assert pending["result"]["request_id"] == request_id
        assert pending["result"]["expires_at"] > 0

        async def press_later() -> None:
            await trio.sleep(30)
            await fg.guardian.press(request_id, "allow")

        fg.nursery.start_soon(press_later)
        start = trio.current_time()
        done = await call(ws, 3, "get_result", request_id=request_id, wait=120)
        assert 30 <= trio.current_time() - start < 120  # it returned with the decision
        entry = done["result"]
        assert entry["status"] == "executed"
        assert entry["request_id"] == request_id
        assert entry["rpc_id"] == 1
        assert entry["data"][0]["state"] == "on"
        again = await call(ws, 4, "get_result", request_id=request_id)
        assert again["result"] == entry
        queued = await call(ws, 5, "get_pending_results")
        assert queued["result"]["results"] == []  # reading it delivered it
        assert len(fg.home.service_calls) == 1  # reading ran nothing


async def test_get_result_is_only_for_the_agents_own_requests(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        pi = await authed(fg, "pi")
        request_id = await ask(fg, pi, 1)
        laptop = await authed(fg, "laptop")
        for params, wanted in [
            ({"request_id": request_id}, "unknown request"),
            ({"request_id": "no-such-id"}, "unknown request"),
            ({"request_id": 3}, "request_id"),
            ({"request_id": request_id, "wait": -1}, "wait"),
            ({"request_id": request_id, "wait": True}, "wait"),
            ({"request_id": request_id, "more": 1}, "unexpected"),
            ({}, "request_id"),
        ]:
            answer = await call(laptop, 9, "get_result", **params)
            assert answer["error"]["code"] == -32602, params
            assert wanted in answer["error"]["message"]
        await fg.guardian.press(request_id, "deny")
        denied = await reply(pi)
        assert denied["error"]["code"] == -32001
        entry = (await call(pi, 2, "get_result", request_id=request_id))["result"]
        assert entry["status"] == "denied"
        assert entry["error"]["code"] == -32001


async def _auth(fg: FastGateway, **params: Any) -> WebSocketConnection:
    ws = await fg.connect()
    answer = await call(ws, 0, "auth", token=DEFAULT_TOKENS["pi"], **params)
    assert answer["result"]["agent"] == "pi"
    return ws


@pytest.mark.parametrize(
    ("client", "via"), [(None, "ws"), ("mcp-stdio", "mcp-stdio"), ("something-else", "ws")]
)
async def test_via_comes_from_the_auth_client_member(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, client: str | None, via: str
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await _auth(fg, **({} if client is None else {"client": client}))
        read = await call(
            ws, 1, "tool_request", tool="ha_get_state", args={"entity_id": "sensor.temp"}
        )
        assert read["result"]["status"] == "executed"
        request_id = await ask(fg, ws, 2)
        card = fg.guardian.cards[request_id].card
        assert card.via == via
        shown = render_card(card, now=time.time())
        assert ("(via MCP)" in shown) == (via == "mcp-stdio")
        rows = await fg.gateway.store.audit_rows(agent="pi")
        assert [(r.decision, r.via) for r in rows] == [("allow", via), ("ask", via)]


async def test_a_store_made_before_via_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (1);
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL,
            kind TEXT NOT NULL DEFAULT 'request', agent TEXT NOT NULL, request_id TEXT,
            tool TEXT, args TEXT, signature TEXT, decision TEXT NOT NULL, matched TEXT,
            resolution TEXT, resolved_by TEXT, resolved_at REAL, result TEXT, error TEXT);
        INSERT INTO audit_log (time, agent, decision) VALUES (1.0, 'pi', 'allow');
        CREATE TABLE pending_requests (
            request_id TEXT PRIMARY KEY, agent TEXT NOT NULL, rpc_id TEXT NOT NULL,
            tool TEXT NOT NULL, args TEXT NOT NULL, signature TEXT NOT NULL,
            matched TEXT NOT NULL, target TEXT, message_ref TEXT, created_at REAL NOT NULL,
            expires_at REAL NOT NULL, state TEXT NOT NULL, outcome TEXT, decided_by TEXT,
            queued TEXT, delivered INTEGER NOT NULL DEFAULT 0);
        """
    )
    old.close()
    async with open_store(path, inline=True) as store:
        rows = await store.audit_rows()
        assert [(r.agent, r.via) for r in rows] == [("pi", None)]
    check = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="original columns"):
        check.execute("UPDATE audit_log SET via='ws'")
    check.close()
