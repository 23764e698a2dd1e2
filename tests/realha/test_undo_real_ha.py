"""Undo against a real Home Assistant core (``make test-ha``): a demo light's brightness and
colour put back from its executed card, a demo switch put back from ``/undo``.

The real gateway (TLS, the real executor, the Telegram guardian on the fake Bot API) in front
of the real 2025.4.4 core; the test presses the buttons as the guardian and reads the states
back from Home Assistant's own REST API.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from agentgate.testing.fake_telegram import FakeMessage, FakeTelegram, run_fake_telegram
from agentgate.testing.harness import Harness, RawAgent, raw_agent, running_gateway
from tests.realha.conftest import RealHA
from tests.realha.gateway_contract import BOT_TOKEN, CHAT, GATE_CEILING, GUARDIAN, ask, press

pytestmark = pytest.mark.realha

SWITCH = "switch.decorative_lights"  # a demo switch
POLICY = """\
defaults:
  - pattern: "ha_get_*"
    action: allow
rules:
  - pattern: "ha_call_service(light.*)"
    action: ask
  - pattern: "ha_call_service(switch.*)"
    action: allow
"""


@asynccontextmanager
async def gateway(
    workdir: Path, real: RealHA
) -> AsyncIterator[tuple[Harness, RawAgent, FakeTelegram]]:
    async with run_fake_telegram(token=BOT_TOKEN, chat_id=CHAT) as tg:
        telegram = {
            "token": BOT_TOKEN,
            "chat_id": CHAT,
            "allowed_users": [GUARDIAN],
            "base_url": tg.base_url,
        }
        async with (
            running_gateway(
                workdir, home=real, policy=POLICY, use_telegram=True, telegram=telegram
            ) as gw,
            raw_agent(gw) as agent,
        ):
            yield gw, agent, tg


async def call(real: RealHA, service: str, **data: Any) -> None:
    domain, name = service.split(".")
    async with httpx.AsyncClient(base_url=real.url, headers=real.headers) as client:
        response = await client.post(f"/api/services/{domain}/{name}", json=data)
    assert response.status_code == 200, response.text


async def state(real: RealHA, entity_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=real.url, headers=real.headers) as client:
        response = await client.get(f"/api/states/{entity_id}")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


async def reply(agent: RawAgent, rpc_id: str) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await agent.ws.get_message())
        if frame.get("id") == rpc_id:
            return frame


async def test_undo_restores_a_real_lights_brightness_and_colour(
    workdir: Path, real_ha: RealHA
) -> None:
    light = real_ha.light
    with trio.fail_after(GATE_CEILING):
        await call(real_ha, "light.turn_on", entity_id=light, brightness=77, hs_color=[30, 60])
        before = await state(real_ha, light)
        assert (before["state"], before["attributes"]["brightness"]) == ("on", 77)
        async with gateway(workdir, real_ha) as (_, agent, tg):
            request_id = await ask(
                agent, "bright", {"domain": "light", "service": "turn_on", "entity_id": light,
                                  "brightness": 220, "hs_color": [200, 90]},
            )  # fmt: skip
            card = await tg.wait_for_message(
                lambda m: f"allow:{request_id}" in [d for _, d in m.buttons]
            )
            assert await press(tg, card, "allow") == "approved"
            assert (await reply(agent, "bright"))["result"]["status"] == "executed"
            assert (await state(real_ha, light))["attributes"]["brightness"] == 220
            done = await tg.wait_for_message(
                lambda m: m.message_id == card.message_id and "Executed" in m.text
            )
            assert done.buttons == [("↩ Undo", f"undo:{request_id}")]

            assert await press(tg, done, "undo") == f"undone: {light}: on"
            after = await state(real_ha, light)
            assert after["state"] == "on"
            assert after["attributes"]["brightness"] == before["attributes"]["brightness"]
            assert after["attributes"]["hs_color"] == before["attributes"]["hs_color"]
            undone: FakeMessage = await tg.wait_for_message(
                lambda m: m.message_id == card.message_id and "Undone" in m.text
            )
            assert undone.text.startswith(f"↩ Undone by Alice ({GUARDIAN}) at ")
            # Once: a second press runs nothing.
            assert (await press(tg, done, "undo")).startswith("already undone")


async def test_undo_turns_a_real_switch_back_off_from_the_undo_command(
    workdir: Path, real_ha: RealHA
) -> None:
    with trio.fail_after(GATE_CEILING):
        await call(real_ha, "switch.turn_off", entity_id=SWITCH)
        assert (await state(real_ha, SWITCH))["state"] == "off"
        async with gateway(workdir, real_ha) as (_, agent, tg):
            executed = await agent.tool(
                "ha_call_service", domain="switch", service="turn_on", entity_id=SWITCH
            )
            assert executed["result"]["status"] == "executed", executed
            assert (await state(real_ha, SWITCH))["state"] == "on"
            tg.send_command("/undo", GUARDIAN, first_name="Alice")
            listing = await tg.wait_for_message(lambda m: m.text.startswith("Undo (newest"))
            assert f"undo sets {SWITCH}: off" in listing.text
            assert await press(tg, listing, "undo") == f"undone: {SWITCH}: off"
            assert (await state(real_ha, SWITCH))["state"] == "off"
            await tg.wait_for_message(lambda m: m.text.startswith("↩ Undone by Alice"))
