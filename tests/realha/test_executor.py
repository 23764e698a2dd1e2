"""The Home Assistant executor against a real core: the fake suite's assertions, for real.

Mirrors ``tests/test_fake_homeassistant.py`` (same tools, same messages) so that a difference
between the fake and real Home Assistant shows up as a failure here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from agentgate.config import HomeAssistantConfig
from agentgate.errors import ExecutionFailed
from agentgate.services.homeassistant import HomeAssistant, open_homeassistant
from tests.realha.conftest import RealHA, stop_real_ha

pytestmark = pytest.mark.realha

CEILING = 20  # per tool call; the demo locks take 2 s


def settings(ha: RealHA, *, token: str | None = None, timeout: float = 10.0) -> HomeAssistantConfig:
    return HomeAssistantConfig(url=ha.url, token=token or ha.token, timeout=timeout)


@pytest.fixture
async def ha(real_ha: RealHA) -> AsyncIterator[HomeAssistant]:
    async with open_homeassistant(settings(real_ha)) as executor:
        yield executor


async def execute(ha: HomeAssistant, tool: str, **args: Any) -> Any:
    with trio.fail_after(CEILING):
        return await ha.execute(tool, args)


async def failure(ha: HomeAssistant, tool: str, **args: Any) -> ExecutionFailed:
    with trio.fail_after(CEILING), pytest.raises(ExecutionFailed) as info:
        await ha.execute(tool, args)
    assert info.value.data["service"] == "homeassistant"
    return info.value


async def service(ha: HomeAssistant, name: str, **data: Any) -> Any:
    domain, svc = name.split(".")
    return await execute(ha, "ha_call_service", domain=domain, service=svc, **data)


# ---- every tool ----------------------------------------------------------------------


async def test_health(ha: HomeAssistant) -> None:
    with trio.fail_after(CEILING):
        assert await ha.check_health() is None


async def test_get_state(ha: HomeAssistant, real_ha: RealHA) -> None:
    state = await execute(ha, "ha_get_state", entity_id=real_ha.locked_lock)
    assert state["entity_id"] == real_ha.locked_lock
    assert state["attributes"]["friendly_name"] == "Front Door"
    assert {"last_changed", "last_updated", "context"} <= state.keys()


async def test_get_states(ha: HomeAssistant, real_ha: RealHA) -> None:
    states = await execute(ha, "ha_get_states")
    ids = {s["entity_id"] for s in states}
    assert {real_ha.light, real_ha.lock, real_ha.template_light, real_ha.flag} <= ids


async def test_call_service_changes_state_once(ha: HomeAssistant, real_ha: RealHA) -> None:
    await service(ha, "light.turn_off", entity_id=real_ha.light)
    changed = await service(ha, "light.turn_on", entity_id=real_ha.light, brightness=77)
    assert [(s["entity_id"], s["state"]) for s in changed] == [(real_ha.light, "on")]
    state = await execute(ha, "ha_get_state", entity_id=real_ha.light)
    assert state["attributes"]["brightness"] == 77
    # nothing left to change: 200 [] passes through as an empty result
    assert await service(ha, "light.turn_on", entity_id=real_ha.light, brightness=77) == []


@pytest.mark.parametrize(
    ("name", "entity", "before", "expected"),
    [
        ("light.toggle", "light", "on", "off"),
        ("input_boolean.turn_on", "flag", "off", "on"),
        ("homeassistant.turn_on", "light", "off", "on"),
        ("lock.unlock", "locked_lock", "locked", "unlocked"),
    ],
)
async def test_services(
    ha: HomeAssistant, real_ha: RealHA, name: str, entity: str, before: str, expected: str
) -> None:
    entity_id: str = getattr(real_ha, entity)
    domain = entity_id.split(".")[0]
    setup = {"on": "turn_on", "off": "turn_off", "locked": "lock"}[before]
    await service(ha, f"{domain}.{setup}", entity_id=entity_id)
    await service(ha, name, entity_id=entity_id)
    state = await execute(ha, "ha_get_state", entity_id=entity_id)
    assert state["state"] == expected


async def test_lock_reports_the_transitional_state(ha: HomeAssistant, real_ha: RealHA) -> None:
    await service(ha, "lock.unlock", entity_id=real_ha.lock)
    changed = await service(ha, "lock.lock", entity_id=real_ha.lock)
    assert [s["state"] for s in changed] == ["locking", "locked"]


async def test_fire_event(ha: HomeAssistant) -> None:
    answer = await execute(ha, "ha_fire_event", event_type="doorbell", event_data={"n": 1})
    assert answer == {"message": "Event doorbell fired."}
    assert await execute(ha, "ha_fire_event", event_type="doorbell") == answer


async def test_get_services_and_config(ha: HomeAssistant) -> None:
    services = await execute(ha, "ha_get_services")
    assert "turn_on" in {s["domain"]: s["services"] for s in services}["light"]
    config = await execute(ha, "ha_get_config")
    assert config["state"] == "RUNNING"


async def test_get_history(ha: HomeAssistant, real_ha: RealHA) -> None:
    await service(ha, "input_boolean.turn_off", entity_id=real_ha.flag)
    await service(ha, "input_boolean.toggle", entity_id=real_ha.flag)
    # the recorder writes in its own thread: history trails the state machine by a few ms
    with trio.fail_after(CEILING):
        while True:
            history = await ha.execute("ha_get_history", {"entity_id": real_ha.flag, "hours": 1})
            if history and [s["state"] for s in history[0]][-2:] == ["off", "on"]:
                break
            await trio.sleep(0.05)
    assert len(history) == 1
    assert history[0][0]["entity_id"] == real_ha.flag
    assert history[0][-1].keys() == {"state", "last_changed"}  # minimal_response
    assert await execute(ha, "ha_get_history", entity_id=real_ha.missing) == []


async def test_describe(ha: HomeAssistant, real_ha: RealHA) -> None:
    await service(ha, "lock.lock", entity_id=real_ha.locked_lock)
    with trio.fail_after(CEILING):
        description = await ha.describe(real_ha.locked_lock)
    assert description == "Front Door (lock.front_door) — now: locked"


async def test_concurrent_calls(ha: HomeAssistant, real_ha: RealHA) -> None:
    results: list[Any] = []

    async def one() -> None:
        results.append(await ha.execute("ha_get_state", {"entity_id": real_ha.light}))

    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(one)
    assert len(results) == 40


# ---- every error ---------------------------------------------------------------------


async def test_unknown_entity_in_a_service_call_is_reported(
    ha: HomeAssistant, real_ha: RealHA
) -> None:
    error = await failure(
        ha, "ha_call_service", domain="light", service="turn_on", entity_id=real_ha.missing
    )
    assert error.message == f"entity not found: {real_ha.missing}"
    assert error.data["status"] == 404


async def test_one_unknown_entity_among_several(ha: HomeAssistant, real_ha: RealHA) -> None:
    await service(ha, "light.turn_off", entity_id=real_ha.light)
    error = await failure(
        ha,
        "ha_call_service",
        domain="light",
        service="turn_on",
        entity_id=[real_ha.light, real_ha.missing],
    )
    assert error.message == f"entity not found: {real_ha.missing}"
    state = await execute(ha, "ha_get_state", entity_id=real_ha.light)
    assert state["state"] == "off"  # nothing was called


async def test_get_state_unknown_entity(ha: HomeAssistant) -> None:
    error = await failure(ha, "ha_get_state", entity_id="sensor.nowhere")
    assert error.message == "entity not found: sensor.nowhere"
    assert error.data["status"] == 404


@pytest.mark.parametrize(
    ("svc", "extra"),
    [("explode", {}), ("turn_on", {"bogus_field": 1}), ("turn_on", {"brightness": "abc"})],
)
async def test_refused_call(
    ha: HomeAssistant, real_ha: RealHA, svc: str, extra: dict[str, Any]
) -> None:
    error = await failure(
        ha, "ha_call_service", domain="light", service=svc, entity_id=real_ha.light, **extra
    )
    assert error.message == "Home Assistant refused the call: 400: Bad Request"
    assert error.data["status"] == 400


async def test_unknown_domain(ha: HomeAssistant) -> None:
    error = await failure(ha, "ha_call_service", domain="nodomain", service="turn_on")
    assert error.message == "Home Assistant refused the call: 400: Bad Request"


async def test_fire_event_with_a_non_object(ha: HomeAssistant) -> None:
    from agentgate.errors import InvalidParams  # refused before anything is sent

    with trio.fail_after(CEILING), pytest.raises(InvalidParams):
        await ha.execute("ha_fire_event", {"event_type": "doorbell", "event_data": [1]})


async def test_bad_token(real_ha: RealHA) -> None:
    with trio.fail_after(CEILING):
        async with open_homeassistant(settings(real_ha, token="wrong")) as executor:
            error = await failure(executor, "ha_get_states")
            warning = await executor.check_health()
    assert error.data["status"] == 401
    assert "services.homeassistant.token" in error.message
    assert warning is not None
    assert "401" in warning


async def test_service_validation_error_is_a_server_error(
    ha: HomeAssistant, real_ha: RealHA
) -> None:
    error = await failure(
        ha,
        "ha_call_service",
        domain="climate",
        service="set_temperature",
        entity_id=real_ha.climate,
        temperature=100,
    )
    assert error.message == (
        "Home Assistant error (500): 500 Internal Server Error Server got itself in trouble"
    )
    assert error.data["status"] == 500


async def test_stopped_mid_run(own_real_ha: tuple[RealHA, Path]) -> None:
    real, directory = own_real_ha
    async with open_homeassistant(settings(real)) as ha:
        assert (await execute(ha, "ha_get_config"))["state"] == "RUNNING"  # keep-alive
        await trio.to_thread.run_sync(stop_real_ha, directory)
        error = await failure(ha, "ha_get_config")
        assert error.message.startswith(f"Home Assistant unreachable at {real.url}: ")
        assert error.data["status"] is None
        error = await failure(ha, "ha_get_state", entity_id=real.light)
        assert error.message.startswith(f"Home Assistant unreachable at {real.url}: ")
        with trio.fail_after(CEILING):
            warning = await ha.check_health()
        assert warning is not None
        assert "unreachable" in warning
