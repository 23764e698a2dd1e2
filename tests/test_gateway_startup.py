"""Start-up: the Home Assistant health check warns but never stops the gateway; --insecure warns."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import raw_agent, running_gateway

READ = {"entity_id": "sensor.living_room_temperature"}


async def test_home_assistant_down_at_start_warns_and_serves(
    workdir: Path, home: FakeHomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    home.down()
    with trio.fail_after(30), caplog.at_level(logging.WARNING, logger="agentgate"):
        async with running_gateway(workdir, home=home, ha_timeout=1) as gw, raw_agent(gw) as agent:
            assert "Home Assistant health check failed at http://" in caplog.text
            assert caplog.text.count("health check") == 1  # said once
            reply = await agent.tool("ha_get_state", **READ)
            assert reply["error"]["code"] == -32004
            assert "unreachable" in reply["error"]["message"]
            home.up()
            reply = await agent.tool("ha_get_state", **READ)
            assert reply["result"]["status"] == "executed"


async def test_insecure_serves_plain_ws_and_says_so(
    workdir: Path, home: FakeHomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(30), caplog.at_level(logging.INFO, logger="agentgate"):
        async with running_gateway(workdir, home=home, tls=False) as gw, raw_agent(gw) as agent:
            assert gw.url.startswith("ws://127.0.0.1:")
            assert "INSECURE" in caplog.text
            assert f"listening on ws://127.0.0.1:{gw.running.port}" in caplog.text
            reply = await agent.tool("ha_get_state", **READ)
            assert reply["result"]["status"] == "executed"
