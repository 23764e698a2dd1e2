"""The Home Assistant executor and the raw REST API against a real core.

Every test of ``tests/realha/contract.py`` runs here against the real 2025.4.4 core, with the
same assertions ``tests/test_fake_homeassistant.py`` holds the fake to. What only a real core
can show follows (a core stopped under the executor).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from agentgate.services.homeassistant import open_homeassistant
from tests.realha.conftest import RealHA, stop_real_ha
from tests.realha.contract import *  # noqa: F403 - the shared tests and their fixtures
from tests.realha.contract import CEILING, Home, execute, failure, settings
from tests.realha.contract_wider import *  # noqa: F403 - templates, areas, logbook, data

pytestmark = pytest.mark.realha


async def test_stopped_mid_run(own_real_ha: tuple[RealHA, Path]) -> None:
    real, directory = own_real_ha
    home = Home(
        url=real.url,
        token=real.token,
        real=True,
        light=real.light,
        switchable=real.flag,
        lock=real.locked_lock,
        openable_lock=real.openable_lock,
        climate=real.climate,
    )
    async with open_homeassistant(settings(home)) as ha:
        assert (await execute(ha, "ha_get_config"))["state"] == "RUNNING"  # keep-alive
        await trio.to_thread.run_sync(stop_real_ha, directory)
        error = await failure(ha, "ha_get_config")
        assert error.message.startswith("Home Assistant unreachable: ")
        assert error.data["status"] is None
        error = await failure(ha, "ha_get_state", entity_id=real.light)
        assert error.message.startswith("Home Assistant unreachable: ")
        with trio.fail_after(CEILING):
            warning = await ha.check_health()
        assert warning is not None
        assert "unreachable" in warning
