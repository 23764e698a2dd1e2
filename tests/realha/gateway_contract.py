"""The whole gateway in front of a Home Assistant: one set of assertions for the fake and real HA.

A real gateway (TLS with trustme certificates, the real executor, the real Telegram guardian
talking to the fake Bot API of ``agentgate.testing.fake_telegram``) from
``agentgate.testing.harness.running_gateway`` in front of the ``ha_home`` fixture (see
``tests/realha/contract.py``), driven by a bare JSON-RPC agent over WSS; the test presses the
card's buttons as the guardian. Star-imported by
``tests/realha/test_gateway_real_ha.py`` (real core) and ``tests/test_fake_homeassistant.py``
(the fake). No ``pytestmark`` here: the importing module's marker applies.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio

from agentgate.config import ConfigError
from agentgate.testing.fake_telegram import FakeMessage, FakeTelegram, run_fake_telegram
from agentgate.testing.harness import Harness, RawAgent, raw_agent, running_gateway
from agentgate.tools import ENTITY_DOMAINS
from tests.realha.contract import BAD_REQUEST, CEILING, SERVICE_FAILED, Home

POLICY = """\
defaults:
  - pattern: "ha_get_*"
    action: allow
rules:
  - pattern: "ha_call_service(light.*)"
    action: allow
  - pattern: "ha_call_service(climate.*)"
    action: allow
  - pattern: "ha_call_service(lock.*)"
    action: ask
    description: locks need a human
  - pattern: "ha_fire_event(*)"
    action: allow
"""

GATE_CEILING = 3 * CEILING  # a gateway start, a few calls, a 2 s lock

BOT_TOKEN = "123456:REALHA-GUARDIAN"
CHAT = -1001
GUARDIAN = 111


@asynccontextmanager
async def gateway(
    workdir: Path, home: Any
) -> AsyncIterator[tuple[Harness, RawAgent, FakeTelegram]]:
    """A gateway guarded through the fake Bot API in front of ``home``, and an agent on it."""
    async with run_fake_telegram(token=BOT_TOKEN, chat_id=CHAT) as tg:
        telegram = {
            "token": BOT_TOKEN,
            "chat_id": CHAT,
            "allowed_users": [GUARDIAN],
            "base_url": tg.base_url,
        }
        async with (
            running_gateway(
                workdir, home=home, policy=POLICY, use_telegram=True, telegram=telegram
            ) as gw,
            raw_agent(gw) as agent,
        ):
            yield gw, agent, tg


async def ask(agent: RawAgent, rpc_id: str, args: dict[str, Any]) -> str:
    """Send a service call that needs a human; its request_id from ``approval_pending``."""
    request = {"tool": "ha_call_service", "args": args}
    await agent.send({"jsonrpc": "2.0", "id": rpc_id, "method": "tool_request", "params": request})
    while True:
        frame = json.loads(await agent.ws.get_message())
        assert "id" not in frame, f"answered instead of asking: {frame}"
        if frame.get("method") == "approval_pending":
            request_id: str = frame["params"]["request_id"]
            return request_id


async def press(tg: FakeTelegram, card: FakeMessage, action: str) -> str:
    """Press ``action`` on ``card`` as the guardian; the bot's answer to the press."""
    data = next(d for _, d in card.buttons if d.startswith(f"{action}:"))
    answer = await tg.press(card.message_id, data, GUARDIAN, first_name="Alice").wait_answer()
    return str(answer.text)


async def set_up(home: Home, service: str, entity_id: str) -> None:
    """Put an entity into the state a test starts from, straight through HA's REST API."""
    domain, name = service.split(".")
    async with httpx.AsyncClient(base_url=home.url, headers=home.headers) as client:
        response = await client.post(
            f"/api/services/{domain}/{name}", json={"entity_id": entity_id}
        )
    assert response.status_code == 200, response.text


async def executed(agent: RawAgent, tool: str, **args: Any) -> Any:
    reply = await agent.tool(tool, **args)
    assert "result" in reply, reply
    assert reply["result"]["status"] == "executed"
    return reply["result"]["data"]


async def failed(agent: RawAgent, tool: str, **args: Any) -> dict[str, Any]:
    """The -32004 error of a request that was allowed, ran, and failed in Home Assistant."""
    reply = await agent.tool(tool, **args)
    assert "error" in reply, reply
    error: dict[str, Any] = reply["error"]
    assert error["code"] == -32004
    assert error["data"]["service"] == "homeassistant"
    assert error["data"]["request_id"]
    return error


def states(changed: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(s["entity_id"], s["state"]) for s in changed]


async def test_gateway_reads(workdir: Path, ha_home: Home) -> None:
    with trio.fail_after(GATE_CEILING):
        async with gateway(workdir, ha_home) as (_, agent, _):
            state = await executed(agent, "ha_get_state", entity_id=ha_home.lock)
            assert (state["entity_id"], state["attributes"]["friendly_name"]) == (
                ha_home.lock,
                "Front Door",
            )
            everything = await executed(agent, "ha_get_states")
            assert ha_home.light in {s["entity_id"] for s in everything}
            assert (await executed(agent, "ha_get_config"))["state"] == "RUNNING"
            history = await executed(agent, "ha_get_history", entity_id=ha_home.lock, hours=1)
            assert history[0][0]["entity_id"] == ha_home.lock


async def test_gateway_light_turned_on_and_read_back(workdir: Path, ha_home: Home) -> None:
    await set_up(ha_home, "light.turn_off", ha_home.light)
    with trio.fail_after(GATE_CEILING):
        async with gateway(workdir, ha_home) as (_, agent, _):
            args = {"domain": "light", "service": "turn_on", "entity_id": ha_home.light}
            changed = await executed(agent, "ha_call_service", **args, brightness=77)
            assert states(changed) == [(ha_home.light, "on")]
            state = await executed(agent, "ha_get_state", entity_id=ha_home.light)
            assert (state["state"], state["attributes"]["brightness"]) == ("on", 77)
            # the same call again: HA changes nothing and says [] - a success, not an error
            assert await executed(agent, "ha_call_service", **args, brightness=77) == []


async def test_gateway_lock_through_an_approval(workdir: Path, ha_home: Home) -> None:
    await set_up(ha_home, "lock.unlock", ha_home.lock)
    with trio.fail_after(GATE_CEILING):
        async with gateway(workdir, ha_home) as (gw, agent, tg):
            args = {"domain": "lock", "service": "lock", "entity_id": ha_home.lock}
            request_id = await ask(agent, "lock-1", args)
            card = await tg.wait_for_message(
                lambda m: f"allow:{request_id}" in [d for _, d in m.buttons]
            )
            assert f"Signature: ha_call_service(lock.lock, {ha_home.lock})" in card.text
            assert f"Target: {ha_home.lock} “Front Door” — now: unlocked" in card.text
            assert await press(tg, card, "allow") == "approved"
            reply = await agent.recv()
            assert reply["id"] == "lock-1"
            assert reply["result"]["status"] == "executed"
            # real HA waits for the lock and lists the transitional state too
            assert states(reply["result"]["data"]) == [
                (ha_home.lock, "locking"),
                (ha_home.lock, "locked"),
            ]
            done = await tg.wait_for_message(
                lambda m: m.message_id == card.message_id and "Executed" in m.text
            )
            assert f"{ha_home.lock}: locked" in done.text
            assert done.buttons == []
            state = await executed(agent, "ha_get_state", entity_id=ha_home.lock)
            assert state["state"] == "locked"
            rows = await gw.gateway.store.audit_rows(agent="pi", decision="ask")
            assert [(r.request_id, r.resolution) for r in rows] == [(request_id, "executed")]


async def test_gateway_event(workdir: Path, ha_home: Home) -> None:
    with trio.fail_after(GATE_CEILING):
        async with gateway(workdir, ha_home) as (_, agent, _):
            answer = await executed(
                agent, "ha_fire_event", event_type="agentgate_doorbell", event_data={"n": 1}
            )
            assert answer == {"message": "Event agentgate_doorbell fired."}


async def test_gateway_errors(workdir: Path, ha_home: Home) -> None:
    await set_up(ha_home, "light.turn_off", ha_home.light)
    with trio.fail_after(GATE_CEILING):
        async with gateway(workdir, ha_home) as (_, agent, _):
            missing = ha_home.missing
            error = await failed(agent, "ha_get_state", entity_id=missing)
            assert (error["message"], error["data"]["status"]) == (
                f"entity not found: {missing}",
                404,
            )
            error = await failed(
                agent, "ha_call_service", domain="light", service="turn_on", entity_id=missing
            )
            assert (error["message"], error["data"]["status"]) == (
                f"entity not found: {missing}",
                404,
            )
            light = {"domain": "light", "entity_id": ha_home.light}
            for extra in ({"service": "explode"}, {"service": "turn_on", "brightness_pct": 150}):
                error = await failed(agent, "ha_call_service", **light, **extra)
                assert (error["message"], error["data"]["status"]) == (BAD_REQUEST, 400)
            error = await failed(
                agent,
                "ha_call_service",
                domain="climate",
                service="set_temperature",
                entity_id=ha_home.climate,
                temperature=100,
            )
            assert (error["message"], error["data"]["status"]) == (SERVICE_FAILED, 500)
            # none of it reached the light, and the connection is still good
            state = await executed(agent, "ha_get_state", entity_id=ha_home.light)
            assert state["state"] == "off"


async def test_gateway_with_a_wrong_home_token(workdir: Path, ha_home: Home) -> None:
    # Refused at start-up: the gateway does not start (agentgate serve exits 2).
    wrong = SimpleNamespace(url=ha_home.url, token="not-the-home-token")
    with trio.fail_after(GATE_CEILING), pytest.raises(ConfigError) as refused:
        async with gateway(workdir, wrong):
            pytest.fail("the gateway started with a token Home Assistant refuses")
    assert "gate.toml: services.homeassistant.token: " in str(refused.value)
    assert "not-the-home-token" not in str(refused.value)


SHIPPED_POLICY = (Path(__file__).resolve().parents[2] / "permissions.yaml").read_text()


async def state_of(home: Home, entity_id: str) -> str:
    async with httpx.AsyncClient(base_url=home.url, headers=home.headers) as client:
        response = await client.get(f"/api/states/{entity_id}")
    assert response.status_code == 200, response.text
    return str(response.json()["state"])


async def test_gateway_a_scene_cannot_unlock_the_front_door(workdir: Path, ha_home: Home) -> None:
    # The attack is real: Home Assistant reproduces a lock's state that a scene names.
    await set_up(ha_home, "lock.lock", ha_home.openable_lock)
    async with httpx.AsyncClient(base_url=ha_home.url, headers=ha_home.headers) as client:
        response = await client.post(
            "/api/services/scene/apply",
            json={"entities": {ha_home.openable_lock: "unlocked"}},
            timeout=CEILING,
        )
    assert response.status_code == 200, response.text
    assert await state_of(ha_home, ha_home.openable_lock) == "unlocked"
    await set_up(ha_home, "lock.lock", ha_home.openable_lock)

    # Through the gateway, under the shipped policy, no form of it gets there.
    await set_up(ha_home, "lock.lock", ha_home.lock)
    lock, light = ha_home.lock, ha_home.light
    attacks: list[dict[str, Any]] = [
        {"domain": "scene", "service": "apply", "entities": {light: "on", lock: "unlocked"}},
        {"domain": "scene", "service": "apply", "entities": {lock.upper(): "unlocked"}},
        {"domain": "scene", "service": "create", "scene_id": "x", "entities": {lock: "unlocked"}},
        {"domain": "scene", "service": "create", "scene_id": "x", "snapshot_entities": [lock]},
        {"domain": "light", "service": "turn_on", "entity_id": light, "x": {"entity_id": lock}},
        {"domain": "script", "service": "echo", "variables": {"door": f" {lock}"}},
    ]
    with trio.fail_after(GATE_CEILING):
        async with (
            running_gateway(workdir, home=ha_home, policy=SHIPPED_POLICY) as gw,
            raw_agent(gw) as agent,
        ):
            for args in attacks:
                reply = await agent.tool("ha_call_service", **args)
                assert reply.get("error", {}).get("code") == -32003, (args, reply)
                assert lock in reply["error"]["data"]["signature"]
            rows = await gw.gateway.store.audit_rows(agent="pi")
    assert [row.decision for row in rows] == ["deny"] * len(attacks)
    assert await state_of(ha_home, lock) == "locked"


async def test_gateway_entity_domains_cover_every_entity_home_assistant_has(
    ha_home: Home,
) -> None:
    # A string naming an entity is a reference when its domain is one Home Assistant has.
    async with httpx.AsyncClient(base_url=ha_home.url, headers=ha_home.headers) as client:
        response = await client.get("/api/states")
    domains = {state["entity_id"].split(".")[0] for state in response.json()}
    assert domains - ENTITY_DOMAINS == set()
