"""Real tier: the Home Assistant executor against the fake Home Assistant over real sockets."""

from __future__ import annotations

import http.client
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from attrs import frozen

from agentgate.errors import ExecutionFailed
from agentgate.services.homeassistant import HomeAssistant, open_homeassistant
from agentgate.testing.fake_homeassistant import FakeHomeAssistant, run_fake_homeassistant

pytestmark = pytest.mark.slow

TOKEN = "fake-ha-token"
CEILING = 10


@frozen
class Settings:
    url: str
    token: str = TOKEN
    timeout: float = 5.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeHomeAssistant]:
    async with run_fake_homeassistant(token=TOKEN) as ha:
        yield ha


@pytest.fixture
async def ha(fake: FakeHomeAssistant) -> AsyncIterator[HomeAssistant]:
    with trio.fail_after(CEILING):
        async with open_homeassistant(Settings(fake.url)) as executor:
            yield executor


async def execute(ha: HomeAssistant, tool: str, **args: Any) -> Any:
    with trio.fail_after(CEILING):
        return await ha.execute(tool, args)


async def failure(ha: HomeAssistant, tool: str, **args: Any) -> ExecutionFailed:
    with trio.fail_after(CEILING), pytest.raises(ExecutionFailed) as info:
        await ha.execute(tool, args)
    assert info.value.data["service"] == "homeassistant"
    return info.value


def posts(fake: FakeHomeAssistant) -> list[tuple[str, str, Any]]:
    return [call for call in fake.calls if call[0] == "POST"]


# ---- every tool ----------------------------------------------------------------------


async def test_health(ha: HomeAssistant) -> None:
    assert await ha.check_health() is None


async def test_get_state(ha: HomeAssistant) -> None:
    state = await execute(ha, "ha_get_state", entity_id="lock.front_door")
    assert state["state"] == "locked"
    assert state["attributes"]["friendly_name"] == "Front Door"
    assert {"last_changed", "last_updated", "context"} <= state.keys()


async def test_get_states(ha: HomeAssistant) -> None:
    states = await execute(ha, "ha_get_states")
    ids = {s["entity_id"] for s in states}
    assert {"light.living_room", "switch.coffee_maker", "binary_sensor.front_door"} <= ids


async def test_call_service_changes_state_once(ha: HomeAssistant, fake: FakeHomeAssistant) -> None:
    changed = await execute(
        ha,
        "ha_call_service",
        domain="light",
        service="turn_on",
        entity_id="light.bedroom",
        brightness=77,
    )
    assert [(s["entity_id"], s["state"]) for s in changed] == [("light.bedroom", "on")]
    state = fake.state("light.bedroom")
    assert state is not None
    assert state["attributes"]["brightness"] == 77
    assert posts(fake) == [
        ("POST", "/api/services/light/turn_on", {"entity_id": "light.bedroom", "brightness": 77})
    ]


async def test_call_service_nothing_changed(ha: HomeAssistant, fake: FakeHomeAssistant) -> None:
    args = {"domain": "lock", "service": "lock", "entity_id": "lock.front_door"}
    assert await execute(ha, "ha_call_service", **args) == []


@pytest.mark.parametrize(
    ("domain", "service", "entity_id", "expected"),
    [
        ("light", "toggle", "light.living_room", "off"),
        ("switch", "turn_on", "switch.coffee_maker", "on"),
        ("lock", "unlock", "lock.front_door", "unlocked"),
        ("homeassistant", "turn_on", "light.kitchen", "on"),
    ],
)
async def test_services(
    ha: HomeAssistant,
    fake: FakeHomeAssistant,
    domain: str,
    service: str,
    entity_id: str,
    expected: str,
) -> None:
    await execute(ha, "ha_call_service", domain=domain, service=service, entity_id=entity_id)
    state = fake.state(entity_id)
    assert state is not None
    assert state["state"] == expected


async def test_fire_event(ha: HomeAssistant, fake: FakeHomeAssistant) -> None:
    answer = await execute(ha, "ha_fire_event", event_type="doorbell", event_data={"n": 1})
    assert answer == {"message": "Event doorbell fired."}
    assert fake.events == [("doorbell", {"n": 1})]


async def test_get_services_and_config(ha: HomeAssistant) -> None:
    services = await execute(ha, "ha_get_services")
    assert "turn_on" in {s["domain"]: s["services"] for s in services}["light"]
    config = await execute(ha, "ha_get_config")
    assert config["state"] == "RUNNING"


async def test_get_history(ha: HomeAssistant) -> None:
    await execute(
        ha, "ha_call_service", domain="switch", service="toggle", entity_id="switch.coffee_maker"
    )
    history = await execute(ha, "ha_get_history", entity_id="switch.coffee_maker", hours=1)
    assert len(history) == 1
    assert [s["state"] for s in history[0]] == ["off", "on"]
    assert history[0][1].keys() == {"state", "last_changed"}  # minimal_response


async def test_describe(ha: HomeAssistant) -> None:
    with trio.fail_after(CEILING):
        assert await ha.describe("lock.front_door") == "Front Door (lock.front_door) — now: locked"


async def test_concurrent_calls(ha: HomeAssistant) -> None:
    results: list[Any] = []

    async def one() -> None:
        results.append(await ha.execute("ha_get_state", {"entity_id": "light.bedroom"}))

    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(one)
    assert len(results) == 40


# ---- every error ---------------------------------------------------------------------


async def test_unknown_entity_is_reported_and_nothing_is_called(
    ha: HomeAssistant, fake: FakeHomeAssistant
) -> None:
    error = await failure(
        ha, "ha_call_service", domain="light", service="turn_on", entity_id="light.attic"
    )
    assert error.message == "entity not found: light.attic"
    assert error.data["status"] == 404
    assert posts(fake) == []


async def test_get_state_unknown_entity(ha: HomeAssistant) -> None:
    error = await failure(ha, "ha_get_state", entity_id="sensor.nowhere")
    assert error.message == "entity not found: sensor.nowhere"


async def test_unknown_service(ha: HomeAssistant) -> None:
    error = await failure(
        ha, "ha_call_service", domain="light", service="explode", entity_id="light.bedroom"
    )
    assert error.message == "Home Assistant refused the call: 400: Bad Request"
    assert error.data["status"] == 400


async def test_bad_token(fake: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with open_homeassistant(Settings(fake.url, token="wrong")) as executor:
            error = await failure(executor, "ha_get_states")
            warning = await executor.check_health()
    assert error.data["status"] == 401
    assert "services.homeassistant.token" in error.message
    assert warning is not None
    assert "401" in warning


async def test_server_error(ha: HomeAssistant, fake: FakeHomeAssistant) -> None:
    fake.fail_with = 500
    error = await failure(ha, "ha_get_config")
    assert error.message.startswith("Home Assistant error (500): 500 Internal Server Error")


async def test_slow_past_the_deadline(fake: FakeHomeAssistant) -> None:
    fake.slow = 5
    with trio.fail_after(CEILING):
        async with open_homeassistant(Settings(fake.url, timeout=0.5)) as executor:
            start = trio.current_time()
            error = await failure(executor, "ha_get_state", entity_id="light.bedroom")
            elapsed = trio.current_time() - start
    assert error.message == "Home Assistant did not answer within 0.5 s"
    assert elapsed < 4  # well before the fake would have answered


async def test_down_and_up(ha: HomeAssistant, fake: FakeHomeAssistant) -> None:
    await execute(ha, "ha_get_config")  # leaves a keep-alive connection in the pool
    fake.down()
    error = await failure(ha, "ha_get_config")
    assert error.message.startswith(f"Home Assistant unreachable at {fake.url}: ")
    assert error.data["status"] is None
    with trio.fail_after(CEILING):
        warning = await ha.check_health()
    assert warning is not None
    assert "unreachable" in warning
    fake.up()
    assert (await execute(ha, "ha_get_config"))["state"] == "RUNNING"


# ---- the fake itself, as real HA answers ---------------------------------------------


@pytest.fixture
async def raw(fake: FakeHomeAssistant) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=fake.url, headers=headers) as client:
        yield client


async def test_fake_answers_like_home_assistant(raw: httpx.AsyncClient) -> None:
    with trio.fail_after(CEILING):
        unknown = await raw.post("/api/services/light/turn_on", json={"entity_id": "light.x"})
        assert (unknown.status_code, unknown.json()) == (200, [])
        bad_json = await raw.post("/api/services/light/turn_on", content=b"{nope")
        assert bad_json.status_code == 400
        assert bad_json.json() == {"message": "Data should be valid JSON."}
        no_service = await raw.post("/api/services/nope/nope", json={})
        assert (no_service.status_code, no_service.text) == (400, "400: Bad Request")
        assert no_service.headers["content-type"].startswith("text/plain")
        missing = await raw.get("/api/states/light.x")
        assert (missing.status_code, missing.json()) == (404, {"message": "Entity not found."})
        unauthorised = await raw.get("/api/", headers={"Authorization": "Bearer nope"})
        assert (unauthorised.status_code, unauthorised.text) == (401, "401: Unauthorized")
        assert (await raw.get("/api/")).json() == {"message": "API running."}


def test_threaded_start_from_sync_code() -> None:
    with FakeHomeAssistant(token=TOKEN) as fake:
        connection = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=CEILING)
        try:
            for _ in range(3):  # keep-alive: one connection, several requests
                connection.request("GET", "/api/", headers={"Authorization": f"Bearer {TOKEN}"})
                response = connection.getresponse()
                assert response.status == 200
                assert response.read() == b'{"message": "API running."}'
        finally:
            connection.close()


async def test_runs_as_a_process() -> None:
    command = [sys.executable, "-m", "agentgate.testing.fake_homeassistant", "--token", TOKEN]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        with trio.fail_after(CEILING):
            line = b""
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                assert chunk, "the fake exited before printing its URL"
                line += chunk
            url = line.decode().strip()
            assert url.startswith("http://127.0.0.1:")
            async with open_homeassistant(Settings(url)) as executor:
                assert await executor.check_health() is None
            process.terminate()
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()
