"""End to end over real TLS sockets: raw agents, the real gateway, the fake home.

Every test starts a real gateway on 127.0.0.1 (trustme certificates, a scripted guardian) in
front of a fake Home Assistant on a real socket, and talks to it as a bare JSON-RPC agent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from agentgate.guardian import Status
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import Harness, RawAgent, raw_agent, running_gateway

pytestmark = pytest.mark.slow

CEILING = 20

LIGHT_ON = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}
LIGHT_SIGNATURE = "ha_call_service(light.turn_on, light.bedroom)"


def posts(home: FakeHomeAssistant, path: str) -> int:
    """How many times the fake home executed ``POST path``."""
    return sum(1 for method, target, _ in home.calls if method == "POST" and target == path)


async def ask(agent: RawAgent, rpc_id: Any, **args: Any) -> None:
    """Send a tool request whose answer comes later (an ask)."""
    await agent.send(
        {
            "jsonrpc": "2.0",
            "id": rpc_id,
            "method": "tool_request",
            "params": {"tool": "ha_call_service", "args": args},
        }
    )


def entity(home: FakeHomeAssistant, entity_id: str) -> dict[str, Any]:
    """The fake home's current state object of ``entity_id`` (which must exist)."""
    found = home.state(entity_id)
    assert found is not None, entity_id
    return found


async def wait_disconnected(gw: Harness, agent: str) -> None:
    """Until the gateway has noticed that ``agent`` has no connection left (caller's ceiling)."""
    await gw.gateway.door.gone(agent)


async def test_allowed_read_returns_the_home_state(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            reply = await agent.tool("ha_get_state", entity_id="sensor.living_room_temperature")
            result = reply["result"]
            assert result["status"] == "executed"
            assert result["data"]["entity_id"] == "sensor.living_room_temperature"
            expected = entity(home, "sensor.living_room_temperature")
            assert result["data"]["state"] == expected["state"]
            rows = await gw.gateway.store.audit_rows(agent="pi")
            row = next(r for r in rows if r.request_id == result["request_id"])
            assert (row.decision, row.resolution) == ("allow", "executed")
            assert row.signature == "ha_get_state(sensor.living_room_temperature)"


async def test_denied_by_policy_carries_signature_and_request_id(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            reply = await agent.tool(
                "ha_call_service", domain="lock", service="unlock", entity_id="lock.front_door"
            )
            error = reply["error"]
            assert error["code"] == -32003
            assert "ha_call_service(lock.*)" in error["message"]
            assert error["data"]["signature"] == "ha_call_service(lock.unlock, lock.front_door)"
            request_id = error["data"]["request_id"]
            assert request_id
            assert gw.scripted.cards == {}
            assert posts(home, "/api/services/lock/unlock") == 0
            assert entity(home, "lock.front_door")["state"] == "locked"
            rows = await gw.gateway.store.audit_rows(agent="pi", decision="deny")
            assert [r.request_id for r in rows] == [request_id]
            assert rows[0].resolution == "denied"


async def test_ask_shows_a_complete_card_and_allow_executes(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            before = time.time()
            await ask(agent, "light-1", **LIGHT_ON, brightness=120)
            shown = await gw.scripted.wait_for_card()
            card = shown.card
            assert card.agent == "pi"
            assert card.tool == "ha_call_service"
            assert card.args == {**LIGHT_ON, "brightness": 120}
            assert card.signature == LIGHT_SIGNATURE
            assert "ha_call_service(light.*)" in card.matched
            assert card.target == "light.bedroom “Bedroom Light” — now: off"
            assert posts(home, "/api/services/light/turn_on") == 0

            assert await gw.scripted.press(card.request_id, "allow") == "approved"
            reply = await agent.recv()
            assert reply["id"] == "light-1"
            result = reply["result"]
            assert result["status"] == "executed"
            assert result["request_id"] == card.request_id
            assert entity(home, "light.bedroom")["state"] == "on"
            assert entity(home, "light.bedroom")["attributes"]["brightness"] == 120
            assert posts(home, "/api/services/light/turn_on") == 1

            update = await gw.scripted.wait_for_update(card.request_id)
            assert update.status is Status.EXECUTED
            assert "light.bedroom: on" in update.detail

            pending = [n for n in agent.notifications if n["method"] == "approval_pending"]
            assert len(pending) == 1
            params = pending[0]["params"]
            assert params["rpc_id"] == "light-1"
            assert params["request_id"] == card.request_id
            assert params["expires_at"] > before

            late = await gw.scripted.press(card.request_id, "deny")  # first decision won
            assert "already" in late or "expired" in late
            await gw.settled()
            rows = await gw.gateway.store.audit_rows(agent="pi", decision="ask")
            assert [(r.request_id, r.resolution) for r in rows] == [(card.request_id, "executed")]


async def test_ask_denied_by_the_guardian(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            await ask(agent, 7, **LIGHT_ON)
            card = (await gw.scripted.wait_for_card()).card
            assert await gw.scripted.press(card.request_id, "deny") == "denied"
            reply = await agent.recv()
            assert reply["id"] == 7
            assert reply["error"]["code"] == -32001
            assert reply["error"]["data"] == {
                "request_id": card.request_id,
                "signature": LIGHT_SIGNATURE,
            }
            assert (await gw.scripted.wait_for_update(card.request_id)).status is Status.DENIED
            assert posts(home, "/api/services/light/turn_on") == 0
            assert entity(home, "light.bedroom")["state"] == "off"


async def test_ask_without_an_answer_times_out(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with (
            running_gateway(workdir, home=home, gateway={"approval_timeout": 2}) as gw,
            raw_agent(gw) as agent,
        ):
            await ask(agent, 8, **LIGHT_ON)
            card = (await gw.scripted.wait_for_card()).card
            reply = await agent.recv()
            assert reply["id"] == 8
            assert reply["error"]["code"] == -32002
            assert reply["error"]["data"]["request_id"] == card.request_id
            assert (await gw.scripted.wait_for_update(card.request_id)).status is Status.TIMED_OUT
            late = await gw.scripted.press(card.request_id, "allow")
            assert "expired" in late or "already" in late
            assert posts(home, "/api/services/light/turn_on") == 0
            assert entity(home, "light.bedroom")["state"] == "off"


LAPTOP_POLICY = """\
defaults:
  - pattern: "*"
    action: deny
rules:
  - pattern: "ha_get_state(sensor.*)"
    action: deny
    description: the laptop reads nothing
  - pattern: "ha_get_states"
    action: allow
"""


async def test_two_agents_at_once_with_their_own_policies(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with (
            running_gateway(workdir, home=home, agent_policies={"laptop": LAPTOP_POLICY}) as gw,
            raw_agent(gw, "pi") as pi,
            raw_agent(gw, "laptop") as laptop,
        ):
            read = {"entity_id": "sensor.outdoor_humidity"}
            pi_reply: dict[str, Any] = {}
            laptop_reply: dict[str, Any] = {}

            async def pi_reads() -> None:
                pi_reply.update(await pi.tool("ha_get_state", **read))

            async def laptop_reads() -> None:
                laptop_reply.update(await laptop.tool("ha_get_state", **read))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pi_reads)
                nursery.start_soon(laptop_reads)
            assert pi_reply["result"]["data"]["state"] == "64"
            assert laptop_reply["error"]["code"] == -32003
            assert "laptop reads nothing" in laptop_reply["error"]["message"] or (
                "ha_get_state(sensor.*)" in laptop_reply["error"]["message"]
            )
            listed = await laptop.tool("ha_get_states")
            assert listed["result"]["status"] == "executed"

            rows = await gw.gateway.store.audit_rows()
            by_request = {r.request_id: r for r in rows}
            assert by_request[pi_reply["result"]["request_id"]].agent == "pi"
            denied = by_request[laptop_reply["error"]["data"]["request_id"]]
            assert (denied.agent, denied.decision) == ("laptop", "deny")
            assert by_request[listed["result"]["request_id"]].agent == "laptop"
            assert all(r.agent in {"pi", "laptop"} for r in rows if r.kind == "request")
            assert {r.agent for r in rows} == {"pi", "laptop"}


async def test_list_tools_shape(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            reply = await agent.call("list_tools")
            tools = reply["result"]["tools"]
            names = [t["name"] for t in tools]
            assert {"ha_get_state", "ha_get_states", "ha_call_service", "ha_fire_event"} <= set(
                names
            )
            assert len(names) == len(set(names))
            for tool in tools:
                assert set(tool) == {"name", "description", "args", "annotations"}
                assert isinstance(tool["description"], str)
                assert tool["description"]
                assert tool["args"]["type"] == "object"
                assert isinstance(tool["args"]["properties"], dict)
            get_state = next(t for t in tools if t["name"] == "ha_get_state")
            assert get_state["args"]["required"] == ["entity_id"]


async def test_result_of_a_disconnected_agent_is_queued_and_handed_out_once(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw:
            async with raw_agent(gw) as agent:
                await ask(agent, "gone", **LIGHT_ON)
                card = (await gw.scripted.wait_for_card()).card
            await wait_disconnected(gw, "pi")
            assert await gw.scripted.press(card.request_id, "allow") == "approved"
            update = await gw.scripted.wait_for_update(card.request_id)
            assert update.status is Status.QUEUED
            assert entity(home, "light.bedroom")["state"] == "on"

            async with raw_agent(gw) as agent:
                first = await agent.call("get_pending_results")
                assert {"method": "results_pending", "params": {"count": 1}} in [
                    {k: n[k] for k in ("method", "params")} for n in agent.notifications
                ]
                results = first["result"]["results"]
                assert len(results) == 1
                entry = results[0]
                assert entry["request_id"] == card.request_id
                assert entry["rpc_id"] == "gone"
                assert entry["tool"] == "ha_call_service"
                assert entry["signature"] == LIGHT_SIGNATURE
                assert entry["status"] == "executed"
                assert entry["data"][0]["entity_id"] == "light.bedroom"
                second = await agent.call("get_pending_results")
                assert second["result"]["results"] == []
            async with raw_agent(gw) as agent:
                third = await agent.call("get_pending_results")
                assert third["result"]["results"] == []
                assert not [n for n in agent.notifications if n["method"] == "results_pending"]
            assert posts(home, "/api/services/light/turn_on") == 1


async def test_allow_for_an_hour_remembers_the_signature(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            await ask(agent, 1, **LIGHT_ON)
            card = (await gw.scripted.wait_for_card()).card
            assert await gw.scripted.press(card.request_id, "grant") == "allowed for 1 h"
            assert (await agent.recv())["result"]["status"] == "executed"

            again = await agent.tool("ha_call_service", **LIGHT_ON)
            assert again["result"]["status"] == "executed"
            assert len(gw.scripted.cards) == 1
            assert posts(home, "/api/services/light/turn_on") == 2
            grants = await gw.gateway.controls.grants()
            assert [(g.agent, g.signature) for g in grants] == [("pi", LIGHT_SIGNATURE)]

            # The same service on another entity is another signature: it still asks.
            await ask(agent, 3, domain="light", service="turn_on", entity_id="light.kitchen")
            other = (await gw.scripted.wait_for_card(2)).card
            assert other.signature == "ha_call_service(light.turn_on, light.kitchen)"
            assert entity(home, "light.kitchen")["state"] == "off"
            await gw.scripted.press(other.request_id, "deny")
            assert (await agent.recv())["error"]["code"] == -32001

            # ... and another agent does not inherit pi's grant.
            async with raw_agent(gw, "laptop") as laptop:
                await ask(laptop, 4, **LIGHT_ON)
                third = (await gw.scripted.wait_for_card(3)).card
                assert third.agent == "laptop"
                await gw.scripted.press(third.request_id, "deny")
                assert (await laptop.recv())["error"]["code"] == -32001
            assert posts(home, "/api/services/light/turn_on") == 2
