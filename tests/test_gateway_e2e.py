"""End to end over real TLS sockets: raw agents, the real gateway, the fake home."""

from __future__ import annotations

from pathlib import Path

import trio

from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import raw_agent, running_gateway


async def test_allowed_read_returns_the_home_state(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(20):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            reply = await agent.tool("ha_get_state", entity_id="sensor.living_room_temperature")
            result = reply["result"]
            assert result["status"] == "executed"
            assert result["data"]["entity_id"] == "sensor.living_room_temperature"
            assert result["data"]["state"] == home.state("sensor.living_room_temperature")["state"]
