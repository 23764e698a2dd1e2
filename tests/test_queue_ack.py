"""Acknowledged delivery of queued results (``get_pending_results`` with ``ack``).

Fast tier (memory streams, the real wiring, a fake clock) and the same over real sockets. A
call that carries ``ack`` — even ``[]`` — leaves every result it lists queued, under the same
``request_id``, until a later call acknowledges it; a call without ``ack`` hands each result
out once, as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection

from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import raw_agent, running_gateway
from tests.fastgate import FastGateway, authed, call, fast_gateway

LIGHT = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}
CEILING = 30


async def queue_one(fg: FastGateway, agent: str = "pi", rpc_id: Any = 4) -> str:
    """An ask of ``agent`` decided (allowed) after its connection left: one queued result."""
    ws = await authed(fg, agent)
    request = {"tool": "ha_call_service", "args": LIGHT}
    frame = {"jsonrpc": "2.0", "id": rpc_id, "method": "tool_request", "params": request}
    await ws.send_message(json.dumps(frame))
    shown = await fg.guardian.wait_for_card(len(fg.guardian.cards) + 1)
    await ws.aclose()
    await fg.gateway.door.gone(agent)
    request_id = shown.card.request_id
    assert await fg.guardian.press(request_id, "allow") == "approved"
    await fg.guardian.wait_for_update(request_id)
    return request_id


async def results(ws: WebSocketConnection, rpc_id: int, **params: Any) -> list[dict[str, Any]]:
    answer = await call(ws, rpc_id, "get_pending_results", **params)
    assert "result" in answer, answer
    return answer["result"]["results"]  # type: ignore[no-any-return]


async def test_a_listed_result_stays_queued_until_acknowledged(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        request_id = await queue_one(fg)
        ws = await authed(fg)
        (listed,) = await results(ws, 1, ack=[])
        assert (listed["request_id"], listed["rpc_id"], listed["status"]) == (
            request_id,
            4,
            "executed",
        )
        # The frame was written (and even read); the connection drops before any ack.
        await ws.aclose()
        await fg.gateway.door.gone("pi")
        assert await fg.gateway.store.queued_count("pi") == 1
        ws = await authed(fg)
        again = await results(ws, 2, ack=[])
        assert again == [listed]  # the same entry, the same request_id
        assert await results(ws, 3, ack=[request_id]) == []  # acknowledged first, then listed
        assert await results(ws, 4) == []  # nothing left for a hand-once call either
        assert await fg.gateway.store.queued_count("pi") == 0
        assert len(fg.home.service_calls) == 1


async def test_a_call_without_ack_hands_each_result_out_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        request_id = await queue_one(fg)
        ws = await authed(fg)
        assert [r["request_id"] for r in await results(ws, 1, ack=[])] == [request_id]
        # an old-style client on another connection: handed out, and gone from the queue
        old = await authed(fg)
        assert [r["request_id"] for r in await results(old, 1)] == [request_id]
        assert await results(old, 2) == []
        assert await results(ws, 2, ack=[]) == []
        answer = await call(old, 3, "get_pending_results", **{})
        assert answer["result"] == {"results": []}


async def test_unknown_and_other_agents_ids_in_ack_are_ignored(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        mine = await queue_one(fg, "pi")
        theirs = await queue_one(fg, "laptop")
        ws = await authed(fg, "pi")
        ack = [theirs, "no-such-request", "", theirs]
        assert [r["request_id"] for r in await results(ws, 1, ack=ack)] == [mine]
        laptop = await authed(fg, "laptop")
        assert [r["request_id"] for r in await results(laptop, 1, ack=[mine])] == [theirs]
        assert [r["request_id"] for r in await results(ws, 2, ack=[mine, mine])] == []
        assert await fg.gateway.store.queued_count("laptop") == 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"ack": "r1"}, "ack must be a list of request ids"),
        ({"ack": None}, "ack must be a list of request ids"),
        ({"ack": {"r1": True}}, "ack must be a list of request ids"),
        ({"ack": ["r1", 7]}, "ack must be a list of request ids"),
        ({"ack": [["r1"]]}, "ack must be a list of request ids"),
        ({"ack": ["x" * 200]}, "longer than"),
        ({"ack": [f"r{i}" for i in range(1001)]}, "at most 1000"),
        ({"acks": []}, "unexpected params: acks"),
    ],
)
async def test_a_bad_ack_is_invalid_params_and_acknowledges_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, params: dict[str, Any], message: str
) -> None:
    async with fast_gateway(tmp_path) as fg:
        request_id = await queue_one(fg)
        ws = await authed(fg)
        answer = await call(ws, 9, "get_pending_results", **params)
        assert answer["id"] == 9
        assert answer["error"]["code"] == -32602
        assert message in answer["error"]["message"]
        # nothing was acknowledged or handed out, and the connection is still up
        assert [r["request_id"] for r in await results(ws, 10, ack=[])] == [request_id]


async def test_acknowledged_mode_over_real_sockets(workdir: Path, home: FakeHomeAssistant) -> None:
    async with running_gateway(workdir, home=home, gateway={"approval_timeout": 60}) as gw:
        with trio.fail_after(CEILING):
            async with raw_agent(gw) as agent:
                await agent.send(
                    {
                        "jsonrpc": "2.0",
                        "id": "ask-1",
                        "method": "tool_request",
                        "params": {
                            "tool": "ha_call_service",
                            "args": {**LIGHT, "entity_id": "light.kitchen"},
                        },
                    }
                )
                shown = await gw.scripted.wait_for_card()
            await gw.gateway.door.gone("pi")
            request_id = shown.card.request_id
            assert await gw.scripted.press(request_id, "allow") == "approved"
            await gw.scripted.wait_for_update(request_id)
            async with raw_agent(gw) as agent:
                first = await agent.call("get_pending_results", {"ack": []})
                assert [r["request_id"] for r in first["result"]["results"]] == [request_id]
                # the connection drops: nothing acknowledged the result
            await gw.gateway.door.gone("pi")
            async with raw_agent(gw) as agent:
                second = await agent.call("get_pending_results", {"ack": []})
                assert second["result"] == first["result"]
                assert {"method": "results_pending", "params": {"count": 1}} in [
                    {k: n[k] for k in ("method", "params")} for n in agent.notifications
                ]
                third = await agent.call("get_pending_results", {"ack": [request_id]})
                assert third["result"] == {"results": []}
            assert await gw.gateway.store.queued_count("pi") == 0
            await gw.settled()
        assert [c for c in home.calls if c[0] == "POST"] == [
            ("POST", "/api/services/light/turn_on", {"entity_id": "light.kitchen"})
        ]
