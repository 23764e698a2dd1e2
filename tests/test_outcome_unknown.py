"""Outcome unknown: a call that was sent but whose answer never came may have run.

It is recorded as ``unknown`` (never ``failed``, never retried), answered -32004 with
``data.outcome = "unknown"`` and the entity's state read back in ``data.state_after``; the card
says "outcome unknown — now: <state>"; a queued result's status is ``unknown``; so is an
approval that a crash interrupted while it executed. Fast tier: memory streams, MockTransport.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing

from agentgate.approvals import Outcome
from agentgate.audit import format_table
from agentgate.gateway import SHUTDOWN_BOUND
from agentgate.guardian import CardUpdate, Status
from agentgate.guardian.card import render_resolution
from agentgate.pipeline import INTERRUPTED
from agentgate.store import AuditEntry
from agentgate.testing.fake_telegram import telegram_visible_text
from tests.fastgate import MockHome, authed, call, fast_gateway, reply
from tests.test_card import card

LIGHT_ON = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}
ALLOW_LIGHTS = """\
rules:
  - pattern: "ha_call_service(light.*)"
    action: allow
  - pattern: "ha_call_service(switch.*)"
    action: ask
  - pattern: "ha_get_state(*)"
    action: allow
"""


class LosingHome(MockHome):
    """Runs every service call, then loses its answer (as a read timeout)."""

    def handler(self, request: httpx.Request) -> httpx.Response:
        answer = super().handler(request)
        if request.method == "POST":
            raise httpx.ReadTimeout("timed out", request=request)
        return answer


def tool_request(rpc_id: Any, tool: str, args: dict[str, Any]) -> str:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": rpc_id,
            "method": "tool_request",
            "params": {"tool": tool, "args": args},
        }
    )


async def test_an_allowed_call_without_its_answer_is_unknown(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = LosingHome()
    async with fast_gateway(tmp_path, home=home, policy=ALLOW_LIGHTS) as fg:
        ws = await authed(fg)
        answer = await call(ws, 1, "tool_request", tool="ha_call_service", args=LIGHT_ON)
        error = answer["error"]
        assert error["code"] == -32004
        assert error["message"].startswith("outcome unknown: ")
        assert error["data"]["outcome"] == "unknown"
        assert error["data"]["state_after"] == {"light.bedroom": "on"}  # it did run
        assert error["data"]["signature"] == "ha_call_service(light.turn_on, light.bedroom)"
        [row] = await fg.gateway.store.audit_rows()  # read after the queued resolution
        assert (row.decision, row.resolution) == ("allow", Outcome.UNKNOWN)
        assert row.result == {"state_after": {"light.bedroom": "on"}}
        assert "now: light.bedroom: on" in format_table([row], width=500)
    assert len(home.service_calls) == 1  # never retried


async def test_an_approved_call_without_its_answer_is_unknown_on_the_card(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = LosingHome()
    home.states["switch.fan"] = {"entity_id": "switch.fan", "state": "off", "attributes": {}}
    fan = {"domain": "switch", "service": "turn_on", "entity_id": "switch.fan"}
    async with fast_gateway(tmp_path, home=home, policy=ALLOW_LIGHTS) as fg:
        ws = await authed(fg)
        await ws.send_message(tool_request(1, "ha_call_service", fan))
        shown = await fg.guardian.wait_for_card()
        assert await fg.guardian.press(shown.card.request_id, "allow") == "approved"
        error = (await reply(ws))["error"]
        assert error["code"] == -32004
        assert error["data"]["outcome"] == "unknown"
        assert error["data"]["state_after"] == {"switch.fan": "on"}
        update = await fg.guardian.wait_for_update(shown.card.request_id)
        assert update.status is Status.UNKNOWN
        assert update.detail.startswith("outcome unknown — now: switch.fan: on (")
        text = telegram_visible_text(render_resolution(shown.card, update, now=0))
        assert "outcome unknown — now: switch.fan: on" in text
        await fg.gateway.broker.idle()
        rows = await fg.gateway.store.audit_rows()
        assert [(r.decision, r.resolution) for r in rows] == [("ask", Outcome.UNKNOWN)]
    assert len(home.service_calls) == 1


async def test_a_queued_unknown_outcome_says_so(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = LosingHome()
    home.states["switch.fan"] = {"entity_id": "switch.fan", "state": "off", "attributes": {}}
    fan = {"domain": "switch", "service": "turn_on", "entity_id": "switch.fan"}
    async with fast_gateway(tmp_path, home=home, policy=ALLOW_LIGHTS) as fg:
        ws = await authed(fg)
        await ws.send_message(tool_request("x", "ha_call_service", fan))
        shown = await fg.guardian.wait_for_card()
        await ws.aclose()  # the agent goes away
        assert await fg.guardian.press(shown.card.request_id, "allow") == "approved"
        update = await fg.guardian.wait_for_update(shown.card.request_id)
        assert update.status is Status.QUEUED
        assert update.detail.startswith("unknown: outcome unknown — now: switch.fan: on")
        ws = await authed(fg)
        [entry] = (await call(ws, 2, "get_pending_results"))["result"]["results"]
        assert entry["status"] == "unknown"
        assert entry["rpc_id"] == "x"
        assert entry["error"]["code"] == -32004
        assert entry["error"]["data"] == {
            "outcome": "unknown",
            "state_after": {"switch.fan": "on"},
        }


async def test_a_call_interrupted_by_a_crash_is_unknown_after_the_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = MockHome()
    home.states["switch.fan"] = {"entity_id": "switch.fan", "state": "on", "attributes": {}}
    fan = {"domain": "switch", "service": "turn_on", "entity_id": "switch.fan"}
    async with fast_gateway(tmp_path, home=home, policy=ALLOW_LIGHTS) as fg:
        ws = await authed(fg)
        await ws.send_message(tool_request(7, "ha_call_service", fan))
        shown = await fg.guardian.wait_for_card()
        request_id = shown.card.request_id
    # The gateway died right after the approval moved to executing (the call may have gone
    # out): what a restart finds in the store.
    conn = sqlite3.connect(tmp_path / "agentgate.db")
    with conn:
        conn.execute(
            "UPDATE pending_requests SET state='executing', decided_by='Alex' WHERE request_id=?",
            (request_id,),
        )
    conn.close()
    async with fast_gateway(tmp_path, home=home, policy=ALLOW_LIGHTS) as fg:
        ws = await authed(fg)
        [entry] = (await call(ws, 1, "get_pending_results"))["result"]["results"]
        assert (entry["request_id"], entry["rpc_id"], entry["status"]) == (request_id, 7, "unknown")
        assert entry["error"]["code"] == -32004
        assert "the gateway stopped while this call was executing" in entry["error"]["message"]
        assert entry["error"]["data"] == {"outcome": "unknown", "state_after": {"switch.fan": "on"}}
        rows = await fg.gateway.store.audit_rows()
        assert [(r.resolution, r.resolved_by) for r in rows] == [(Outcome.UNKNOWN, "Alex")]
    assert home.service_calls == []  # not run again


def test_the_card_of_an_unknown_outcome() -> None:
    update = CardUpdate(Status.UNKNOWN, "outcome unknown — now: lock.front_door: unlocked (x)")
    lock = {"domain": "lock", "service": "unlock", "entity_id": "lock.front_door"}
    text = telegram_visible_text(render_resolution(card(lock), update, now=0))
    assert "it may have run" in text
    assert "outcome unknown — now: lock.front_door: unlocked" in text


class SlowHome(MockHome):
    """Runs every service call at once and answers it 8 s later: longer than the gateway's
    shutdown bound, within Home Assistant's timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.started = trio.Event()

    async def handler(self, request: httpx.Request) -> httpx.Response:  # type: ignore[override]
        answer = super().handler(request)
        if request.method == "POST":
            self.started.set()
            await trio.sleep(8)
        return answer


async def test_an_allowed_call_cut_off_by_the_shutdown_bound_is_recorded_unknown(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = SlowHome()
    async with fast_gateway(tmp_path, home=home, policy=ALLOW_LIGHTS, ha_timeout=10) as fg:
        ws = await authed(fg)
        await ws.send_message(tool_request(1, "ha_call_service", LIGHT_ON))
        await home.started.wait()
        with trio.move_on_after(SHUTDOWN_BOUND):  # as serve does; what is left is cancelled
            await fg.gateway.shutdown()
    async with fast_gateway(tmp_path, home=home, policy=ALLOW_LIGHTS) as fg:
        [row] = await fg.gateway.store.audit_rows()
        assert (row.decision, row.resolution, row.error) == ("allow", Outcome.UNKNOWN, INTERRUPTED)
    assert len(home.service_calls) == 1


async def test_an_allowed_call_a_crash_left_without_outcome_is_unknown_at_the_next_start(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path, policy=ALLOW_LIGHTS) as fg:
        # What a kill -9 between the durable decision and the outcome leaves behind.
        await fg.gateway.store.audit(
            AuditEntry(
                time=1.0,
                agent="pi",
                request_id="r-1",
                tool="ha_call_service",
                args=LIGHT_ON,
                signature="ha_call_service(light.turn_on, light.bedroom)",
                decision="allow",
                matched="rule 0",
            )
        )
    async with fast_gateway(tmp_path, policy=ALLOW_LIGHTS) as fg:
        [row] = await fg.gateway.store.audit_rows()
        assert (row.resolution, row.error) == (Outcome.UNKNOWN, INTERRUPTED)
        assert row.resolved_at is not None
