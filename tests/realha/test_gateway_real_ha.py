"""The whole gateway against a real Home Assistant core (``make test-ha``).

A real gateway (TLS, the real executor, the Telegram guardian on the fake Bot API) in front of
the real 2025.4.4 core:
every test of ``tests/realha/gateway_contract.py`` (reads, a light turned on and read back, a
lock through an approval, an event, unknown entity on read and on a service call, unknown
service, a validation error, a wrong Home Assistant token) - the same assertions
``tests/test_fake_homeassistant.py`` holds the fake to - and then Home Assistant stopped under
a running gateway.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.realha.conftest import RealHA, stop_real_ha
from tests.realha.gateway_contract import *  # noqa: F403 - the shared gateway tests
from tests.realha.gateway_contract import GATE_CEILING, executed, failed, gateway

pytestmark = pytest.mark.realha


async def test_gateway_when_home_assistant_stops_mid_run(
    workdir: Path, own_real_ha: tuple[RealHA, Path]
) -> None:
    real, directory = own_real_ha
    with trio.fail_after(GATE_CEILING):
        async with gateway(workdir, real) as (_, agent, _):
            state = await executed(agent, "ha_get_state", entity_id=real.locked_lock)
            assert state["entity_id"] == real.locked_lock  # a kept-alive connection to HA
            await trio.to_thread.run_sync(stop_real_ha, directory)
            for _ in range(2):  # the dropped keep-alive connection, then a refused one
                error = await failed(agent, "ha_get_state", entity_id=real.locked_lock)
                assert error["message"].startswith("Home Assistant unreachable: ")
                assert real.url.split("//")[1] not in json.dumps(error)  # no internal address
                assert error["data"]["status"] is None
            # the gateway itself is fine: it still answers the agent
            reply = await agent.call("list_tools")
            assert "result" in reply, reply
