"""One set of assertions for the fake Home Assistant and a real core.

The tests here take a ``ha_home`` fixture (a :class:`Home`): ``tests/test_fake_homeassistant.py``
provides the fake (``agentgate/testing/fake_homeassistant.py``), ``tests/realha/conftest.py``
the real 2025.4.4 core of ``make test-ha``. Both modules star-import this one, so every test
below runs against both, and a difference between the fake and real HA fails one of them.

Two layers: the raw REST API (status, content type, body - what ``docs/homeassistant.md``
reports), and the executor (``agentgate/services/homeassistant.py``: what an agent gets).
Tests set the state they start from: the real core is shared by the whole session.

No ``pytestmark`` here: the importing module's marker applies (``slow`` / ``realha``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import trio
from attrs import frozen

from agentgate.config import ConfigError, HomeAssistantConfig
from agentgate.errors import ExecutionFailed, InvalidParams
from agentgate.services.homeassistant import HomeAssistant, open_homeassistant

CEILING = 20  # seconds per call; a real demo lock takes 2 s to lock

BAD_REQUEST = "Home Assistant refused the call: 400: Bad Request"
SERVICE_FAILED = (
    "Home Assistant failed to run the service (500): the arguments may be out of range or "
    "unsupported by this entity; see Home Assistant's log"
)
SERVER_ERROR_PAGE = "500 Internal Server Error\n\nServer got itself in trouble"
HISTORY_KEYS = {"entity_id", "state", "attributes", "last_changed", "last_updated"}


@frozen
class Home:
    """A Home Assistant under test (``url``/``token``) and the entities each role maps to.

    ``lock`` is locked-or-unlocked without the open feature (named "Front Door" in both),
    ``openable_lock`` has it, ``climate`` takes 7-35 °C, ``switchable`` is an on/off entity
    with history, ``script`` answers ``{"echo": text}`` with ``?return_response``.
    """

    url: str
    token: str
    real: bool
    light: str
    switchable: str
    lock: str
    openable_lock: str
    climate: str
    script: str = "script.echo"
    missing: str = "light.does_not_exist"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


# ---- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture
async def raw(ha_home: Home) -> AsyncIterator[httpx.AsyncClient]:
    """A bare httpx client with the home's token."""
    async with httpx.AsyncClient(base_url=ha_home.url, headers=ha_home.headers) as client:
        yield client


@pytest.fixture
async def ha(ha_home: Home) -> AsyncIterator[HomeAssistant]:
    """The gateway's executor pointed at the home."""
    async with open_homeassistant(settings(ha_home)) as executor:
        yield executor


def settings(home: Home, *, token: str | None = None) -> HomeAssistantConfig:
    return HomeAssistantConfig(url=home.url, token=token or home.token, timeout=10.0)


def is_text(response: httpx.Response) -> bool:
    return response.headers["content-type"].startswith("text/plain")


async def post(raw: httpx.AsyncClient, service: str, data: Any = None, **kw: Any) -> httpx.Response:
    domain, name = service.split(".")
    with trio.fail_after(CEILING):
        return await raw.post(f"/api/services/{domain}/{name}", json=data, **kw)


async def get(raw: httpx.AsyncClient, path: str, **kw: Any) -> httpx.Response:
    with trio.fail_after(CEILING):
        return await raw.get(path, **kw)


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


def pairs(changed: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(s["entity_id"], s["state"]) for s in changed]


# ---- REST: reads -------------------------------------------------------------------------


async def test_rest_api_root(raw: httpx.AsyncClient) -> None:
    response = await get(raw, "/api/")
    assert (response.status_code, response.json()) == (200, {"message": "API running."})


async def test_rest_state_object(raw: httpx.AsyncClient, ha_home: Home) -> None:
    state = (await get(raw, f"/api/states/{ha_home.lock}")).json()
    assert state["entity_id"] == ha_home.lock
    assert state["attributes"]["friendly_name"] == "Front Door"
    assert state.keys() == {
        "entity_id",
        "state",
        "attributes",
        "last_changed",
        "last_reported",
        "last_updated",
        "context",
    }
    assert state["context"].keys() == {"id", "parent_id", "user_id"}


@pytest.mark.parametrize("entity_id", ["light.does_not_exist", "NOT-AN-ENTITY"])
async def test_rest_unknown_entity_read_is_404_json(raw: httpx.AsyncClient, entity_id: str) -> None:
    response = await get(raw, f"/api/states/{entity_id}")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"message": "Entity not found."}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/nothing", 404),
        ("GET", "/api/states/", 404),
        ("GET", "/api/services/light/turn_on", 405),
        ("GET", "/api/events/doorbell", 405),
        ("PUT", "/api/states/light.does_not_exist", 405),
    ],
)
async def test_rest_unknown_path_and_wrong_method_are_text(
    raw: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    with trio.fail_after(CEILING):
        response = await raw.request(method, path)
    text = {404: "404: Not Found", 405: "405: Method Not Allowed"}[status]
    assert (response.status_code, response.text) == (status, text)
    assert is_text(response)


async def test_rest_services_list(raw: httpx.AsyncClient) -> None:
    listed = {d["domain"]: d["services"] for d in (await get(raw, "/api/services")).json()}
    assert {"turn_on", "turn_off", "toggle"} <= listed["light"].keys()
    assert {"lock", "unlock", "open"} <= listed["lock"].keys()
    assert "echo" in listed["script"]


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer nope"}, {}])
async def test_rest_bad_or_missing_token_is_401_text(
    ha_home: Home, headers: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=ha_home.url, headers=headers) as anonymous:
        with trio.fail_after(CEILING):
            answers = [
                await anonymous.get("/api/states"),
                await anonymous.post(
                    "/api/services/light/turn_on", json={"entity_id": ha_home.light}
                ),
            ]
    for response in answers:
        assert (response.status_code, response.text) == (401, "401: Unauthorized")
        assert is_text(response)


# ---- REST: service calls -----------------------------------------------------------------


async def test_rest_light_turned_on_and_read_back(raw: httpx.AsyncClient, ha_home: Home) -> None:
    assert (await post(raw, "light.turn_off", {"entity_id": ha_home.light})).status_code == 200
    response = await post(raw, "light.turn_on", {"entity_id": ha_home.light, "brightness": 77})
    assert response.status_code == 200
    changed = response.json()
    assert pairs(changed) == [(ha_home.light, "on")]
    assert changed[0]["attributes"]["brightness"] == 77
    assert isinstance(changed[0]["context"]["user_id"], str)  # the token's user
    state = (await get(raw, f"/api/states/{ha_home.light}")).json()
    assert (state["state"], state["attributes"]["brightness"]) == ("on", 77)
    # the same call again changes nothing: 200 [] (the same answer as for an unknown entity)
    again = await post(raw, "light.turn_on", {"entity_id": ha_home.light, "brightness": 77})
    assert (again.status_code, again.json()) == (200, [])


@pytest.mark.parametrize(
    ("data", "brightness"),
    [
        ({"brightness": 999}, 255),  # clamped, not refused
        ({"brightness": True}, 1),
        ({"brightness": "40"}, 40),
        ({"brightness": 12.7}, 12),
        ({"brightness_pct": 50}, 128),
        ({"brightness": -5}, None),  # clamped to 0: the light goes off
    ],
)
async def test_rest_brightness_is_coerced(
    raw: httpx.AsyncClient, ha_home: Home, data: dict[str, Any], brightness: int | None
) -> None:
    await post(raw, "light.turn_on", {"entity_id": ha_home.light, "brightness": 100})
    response = await post(raw, "light.turn_on", {"entity_id": ha_home.light, **data})
    assert response.status_code == 200
    state = (await get(raw, f"/api/states/{ha_home.light}")).json()
    assert state["attributes"]["brightness"] == brightness
    assert state["state"] == ("on" if brightness else "off")


async def test_rest_unknown_entity_in_a_service_call_is_200_empty(
    raw: httpx.AsyncClient, ha_home: Home
) -> None:
    for data in (
        {"entity_id": ha_home.missing},
        {"entity_id": [ha_home.missing, "sensor.nowhere"]},
        {"area_id": "nowhere"},
    ):
        response = await post(raw, "light.turn_on", data)
        assert (response.status_code, response.json()) == (200, [])


async def test_rest_service_of_another_domain_is_200_empty(
    raw: httpx.AsyncClient, ha_home: Home
) -> None:
    response = await post(raw, "light.turn_on", {"entity_id": ha_home.lock})
    assert (response.status_code, response.json()) == (200, [])


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/services/light/explode", {"entity_id": "light.x"}),  # unknown service
        ("/api/services/nodomain/turn_on", {}),  # unknown domain
        ("/api/services/light/turn_on", {"entity_id": "light.x", "bogus": 1}),  # extra field
        ("/api/services/light/turn_on", {"entity_id": "light.x", "brightness": "abc"}),
        ("/api/services/light/turn_on", {"entity_id": "light.x", "brightness_pct": 150}),
        ("/api/services/light/turn_on", {"entity_id": "NOT VALID"}),
        ("/api/services/light/turn_on", {}),  # an entity service with no target
        ("/api/services/light/turn_on", None),  # no body at all
        ("/api/services/light/turn_on", [1, 2]),  # not an object
        ("/api/services/light/turn_on", "null"),
        ("/api/services/lock/lock", {"entity_id": "lock.x", "brightness": 3}),
        ("/api/services/climate/set_temperature", {"entity_id": "climate.x"}),
        ("/api/services/climate/set_temperature", {"entity_id": "climate.x", "hvac_mode": "x"}),
    ],
)
async def test_rest_refused_call_is_400_text(raw: httpx.AsyncClient, path: str, body: Any) -> None:
    content = b"" if body is None else (b"null" if body == "null" else json.dumps(body).encode())
    with trio.fail_after(CEILING):
        response = await raw.post(path, content=content)
    assert (response.status_code, response.text) == (400, "400: Bad Request")
    assert is_text(response)


async def test_rest_body_that_is_not_json_is_400_json(raw: httpx.AsyncClient) -> None:
    with trio.fail_after(CEILING):
        response = await raw.post("/api/services/light/turn_on", content=b"{nope")
    assert response.status_code == 400
    assert response.json() == {"message": "Data should be valid JSON."}


async def test_rest_entity_services_of_homeassistant_need_no_target(
    raw: httpx.AsyncClient,
) -> None:
    response = await post(raw, "homeassistant.turn_on", {})
    assert (response.status_code, response.json()) == (200, [])


@pytest.mark.parametrize("role", ["climate", "lock"])
async def test_rest_service_validation_error_is_500_text(
    raw: httpx.AsyncClient, ha_home: Home, role: str
) -> None:
    # 2025.4.4 lets ServiceValidationError escape as a bare 500 (2026.x: 400 JSON)
    if role == "climate":
        data = {"entity_id": ha_home.climate, "temperature": 100}
        response = await post(raw, "climate.set_temperature", data)
    else:  # ServiceNotSupported: this lock has no open feature
        response = await post(raw, "lock.open", {"entity_id": ha_home.lock})
    assert (response.status_code, response.text) == (500, SERVER_ERROR_PAGE)
    assert is_text(response)


async def test_rest_climate_in_range(raw: httpx.AsyncClient, ha_home: Home) -> None:
    await post(raw, "climate.set_temperature", {"entity_id": ha_home.climate, "temperature": 20})
    data = {"entity_id": ha_home.climate, "temperature": 22}
    changed = (await post(raw, "climate.set_temperature", data)).json()
    assert [s["attributes"]["temperature"] for s in changed] == [22.0]
    assert (await post(raw, "climate.set_temperature", data)).json() == []


async def test_rest_lock_lists_the_transitional_state_even_when_locked(
    raw: httpx.AsyncClient, ha_home: Home
) -> None:
    assert (await post(raw, "lock.unlock", {"entity_id": ha_home.lock})).status_code == 200
    changed = (await post(raw, "lock.lock", {"entity_id": ha_home.lock})).json()
    assert pairs(changed) == [(ha_home.lock, "locking"), (ha_home.lock, "locked")]
    again = (await post(raw, "lock.lock", {"entity_id": ha_home.lock, "code": "1234"})).json()
    assert pairs(again) == [(ha_home.lock, "locking"), (ha_home.lock, "locked")]
    opened = (await post(raw, "lock.open", {"entity_id": ha_home.openable_lock})).json()
    assert pairs(opened)[-2:] == [
        (ha_home.openable_lock, "opening"),
        (ha_home.openable_lock, "open"),
    ]
    await post(raw, "lock.lock", {"entity_id": ha_home.openable_lock})


async def test_rest_return_response(raw: httpx.AsyncClient, ha_home: Home) -> None:
    with trio.fail_after(CEILING):
        response = await raw.post("/api/services/script/echo?return_response", json={"text": "hi"})
    assert response.status_code == 200
    body = response.json()
    assert body.keys() == {"changed_states", "service_response"}
    assert body["service_response"] == {"echo": "hi"}
    assert [s["state"] for s in body["changed_states"]] == ["on", "off"]
    without = await post(raw, "script.echo", {"text": "hi"})
    assert [s["state"] for s in without.json()] == ["on", "off"]
    with trio.fail_after(CEILING):
        refused = await raw.post(
            "/api/services/light/turn_on?return_response", json={"entity_id": ha_home.light}
        )
        unknown = await raw.post("/api/services/light/explode?return_response", json={})
    assert refused.status_code == 400
    assert refused.json() == {
        "message": "Service does not support responses. Remove return_response from request."
    }
    assert (unknown.status_code, unknown.text) == (400, "400: Bad Request")


# ---- REST: events and history ------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "status", "body"),
    [
        (b'{"a": 1}', 200, {"message": "Event agentgate_test fired."}),
        (b"", 200, {"message": "Event agentgate_test fired."}),
        (b"null", 200, {"message": "Event agentgate_test fired."}),
        (b"[1]", 400, {"message": "Event data should be a JSON object"}),
        (b"{nope", 400, {"message": "Event data should be valid JSON."}),
    ],
)
async def test_rest_fire_event(
    raw: httpx.AsyncClient, content: bytes, status: int, body: dict[str, str]
) -> None:
    with trio.fail_after(CEILING):
        response = await raw.post("/api/events/agentgate_test", content=content)
    assert (response.status_code, response.json()) == (status, body)


async def test_rest_history(raw: httpx.AsyncClient, ha_home: Home) -> None:
    await post(
        raw, f"{ha_home.switchable.split('.')[0]}.turn_off", {"entity_id": ha_home.switchable}
    )
    start = datetime.now(UTC)
    with trio.fail_after(CEILING):
        await trio.sleep(0.01)  # a wall-clock gap: the change must be stamped after `start`
        await post(
            raw, f"{ha_home.switchable.split('.')[0]}.turn_on", {"entity_id": ha_home.switchable}
        )
        params = {"filter_entity_id": ha_home.switchable}
        path = f"/api/history/period/{start.isoformat()}"
        # the recorder writes in its own thread: history trails the state machine by a few ms,
        # and Home Assistant (another process) tells no one when it has caught up
        while True:
            series = (await get(raw, path, params=params)).json()[0]
            if len(series) >= 2:
                break
            await trio.sleep(0.05)
    assert [s["state"] for s in series] == ["off", "on"]
    assert all(s.keys() == HISTORY_KEYS for s in series)  # no context, no last_reported
    # the state in force at the start carries the start as its time
    assert abs(datetime.fromisoformat(series[0]["last_changed"]) - start) < timedelta(
        milliseconds=1
    )
    minimal = (await get(raw, path, params={**params, "minimal_response": ""})).json()
    assert minimal[0][0].keys() == HISTORY_KEYS
    assert minimal[0][1].keys() == {"state", "last_changed"}
    naive = start.replace(tzinfo=None).isoformat()  # taken as the home's zone: UTC here
    assert (await get(raw, f"/api/history/period/{naive}", params=params)).json() == [series]
    both = {"filter_entity_id": f"{ha_home.missing},{ha_home.switchable.upper()}"}
    assert (await get(raw, path, params=both)).json() == [series]


@pytest.mark.parametrize(
    ("start", "params", "status", "body"),
    [
        ("", {}, 400, {"message": "filter_entity_id is missing"}),
        ("", {"filter_entity_id": ""}, 400, {"message": "filter_entity_id is missing"}),
        ("/yesterday", {"filter_entity_id": "light.x"}, 400, {"message": "Invalid datetime"}),
        (
            "",
            {"filter_entity_id": "light.x", "end_time": "x"},
            400,
            {"message": "Invalid end_time"},
        ),
        ("", {"filter_entity_id": "NOT VALID"}, 400, {"message": "Invalid filter_entity_id"}),
        ("", {"filter_entity_id": "light"}, 400, {"message": "Invalid filter_entity_id"}),
        ("", {"filter_entity_id": "light.does_not_exist"}, 200, []),
        ("/2999-01-01T00:00:00+00:00", {"filter_entity_id": "light.x"}, 200, []),
    ],
)
async def test_rest_history_answers(
    raw: httpx.AsyncClient, start: str, params: dict[str, str], status: int, body: Any
) -> None:
    response = await get(raw, f"/api/history/period{start}", params=params)
    assert (response.status_code, response.json()) == (status, body)


# ---- the executor: every tool ------------------------------------------------------------


async def test_health(ha: HomeAssistant) -> None:
    with trio.fail_after(CEILING):
        assert await ha.check_health() is None


async def test_get_state(ha: HomeAssistant, ha_home: Home) -> None:
    state = await execute(ha, "ha_get_state", entity_id=ha_home.lock)
    assert state["entity_id"] == ha_home.lock
    assert state["attributes"]["friendly_name"] == "Front Door"
    assert {"last_changed", "last_updated", "context"} <= state.keys()


async def test_get_states(ha: HomeAssistant, ha_home: Home) -> None:
    states = await execute(ha, "ha_get_states")
    ids = {s["entity_id"] for s in states}
    assert {ha_home.light, ha_home.lock, ha_home.switchable, ha_home.climate} <= ids


async def test_call_service_changes_state_once(ha: HomeAssistant, ha_home: Home) -> None:
    await service(ha, "light.turn_off", entity_id=ha_home.light)
    changed = await service(ha, "light.turn_on", entity_id=ha_home.light, brightness=77)
    assert pairs(changed) == [(ha_home.light, "on")]
    state = await execute(ha, "ha_get_state", entity_id=ha_home.light)
    assert state["attributes"]["brightness"] == 77
    # nothing left to change: 200 [] passes through as an empty result
    assert await service(ha, "light.turn_on", entity_id=ha_home.light, brightness=77) == []


@pytest.mark.parametrize(
    ("name", "role", "before", "expected"),
    [
        ("light.toggle", "light", "on", "off"),
        ("*.turn_on", "switchable", "off", "on"),
        ("*.toggle", "switchable", "on", "off"),
        ("homeassistant.turn_on", "light", "off", "on"),
        ("lock.unlock", "lock", "locked", "unlocked"),
    ],
)
async def test_services(
    ha: HomeAssistant, ha_home: Home, name: str, role: str, before: str, expected: str
) -> None:
    entity_id: str = getattr(ha_home, role)
    domain = entity_id.split(".")[0]
    setup = {"on": "turn_on", "off": "turn_off", "locked": "lock"}[before]
    await service(ha, f"{domain}.{setup}", entity_id=entity_id)
    await service(ha, name.replace("*", domain), entity_id=entity_id)
    state = await execute(ha, "ha_get_state", entity_id=entity_id)
    assert state["state"] == expected


async def test_lock_reports_the_transitional_state(ha: HomeAssistant, ha_home: Home) -> None:
    await service(ha, "lock.unlock", entity_id=ha_home.lock)
    changed = await service(ha, "lock.lock", entity_id=ha_home.lock)
    assert [s["state"] for s in changed] == ["locking", "locked"]
    # already locked: HA runs the lock again, and says so
    changed = await service(ha, "lock.lock", entity_id=ha_home.lock)
    assert [s["state"] for s in changed] == ["locking", "locked"]


async def test_fire_event(ha: HomeAssistant) -> None:
    answer = await execute(ha, "ha_fire_event", event_type="doorbell", event_data={"n": 1})
    assert answer == {"message": "Event doorbell fired."}
    assert await execute(ha, "ha_fire_event", event_type="doorbell") == answer


async def test_get_services_and_config(ha: HomeAssistant) -> None:
    listed = await execute(ha, "ha_get_services")
    assert "turn_on" in {s["domain"]: s["services"] for s in listed}["light"]
    config = await execute(ha, "ha_get_config")
    assert (config["state"], config["version"]) == ("RUNNING", "2025.4.4")


async def test_get_history(ha: HomeAssistant, ha_home: Home) -> None:
    domain = ha_home.switchable.split(".")[0]
    await service(ha, f"{domain}.turn_off", entity_id=ha_home.switchable)
    await service(ha, f"{domain}.toggle", entity_id=ha_home.switchable)
    with trio.fail_after(CEILING):
        while True:  # the recorder trails the state machine by a few ms; HA says nothing
            history = await ha.execute("ha_get_history", {"entity_id": ha_home.switchable})
            if [s["state"] for s in history[0]][-2:] == ["off", "on"]:
                break
            await trio.sleep(0.05)
    assert len(history) == 1
    assert history[0][0].keys() == HISTORY_KEYS
    assert history[0][0]["entity_id"] == ha_home.switchable
    assert history[0][-1].keys() == {"state", "last_changed"}  # minimal_response


async def test_get_history_of_an_unknown_entity_is_not_found(
    ha: HomeAssistant, ha_home: Home
) -> None:
    error = await failure(ha, "ha_get_history", entity_id=ha_home.missing, hours=1)
    assert error.message == f"entity not found: {ha_home.missing}"
    assert error.data["status"] == 404


async def test_describe(ha: HomeAssistant, ha_home: Home) -> None:
    await service(ha, "lock.lock", entity_id=ha_home.lock)
    with trio.fail_after(CEILING):
        description = await ha.describe_entity(ha_home.lock)
    assert description == f"{ha_home.lock} “Front Door” — now: locked"


async def test_concurrent_calls(ha: HomeAssistant, ha_home: Home) -> None:
    results: list[Any] = []

    async def one() -> None:
        results.append(await ha.execute("ha_get_state", {"entity_id": ha_home.light}))

    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(one)
    assert len(results) == 40


# ---- the executor: every error -----------------------------------------------------------


async def test_unknown_entity_in_a_service_call_is_reported(
    ha: HomeAssistant, ha_home: Home
) -> None:
    error = await failure(
        ha, "ha_call_service", domain="light", service="turn_on", entity_id=ha_home.missing
    )
    assert error.message == f"entity not found: {ha_home.missing}"
    assert error.data["status"] == 404


async def test_one_unknown_entity_among_several(ha: HomeAssistant, ha_home: Home) -> None:
    await service(ha, "light.turn_off", entity_id=ha_home.light)
    error = await failure(
        ha,
        "ha_call_service",
        domain="light",
        service="turn_on",
        entity_id=[ha_home.light, ha_home.missing],
    )
    assert error.message == f"entity not found: {ha_home.missing}"
    state = await execute(ha, "ha_get_state", entity_id=ha_home.light)
    assert state["state"] == "off"  # nothing was called


async def test_get_state_unknown_entity(ha: HomeAssistant) -> None:
    error = await failure(ha, "ha_get_state", entity_id="sensor.nowhere")
    assert error.message == "entity not found: sensor.nowhere"
    assert error.data["status"] == 404


@pytest.mark.parametrize(
    ("svc", "extra"),
    [
        ("explode", {}),
        ("turn_on", {"bogus_field": 1}),
        ("turn_on", {"brightness": "abc"}),
        ("turn_on", {"brightness_pct": 150}),
    ],
)
async def test_refused_call(
    ha: HomeAssistant, ha_home: Home, svc: str, extra: dict[str, Any]
) -> None:
    error = await failure(
        ha, "ha_call_service", domain="light", service=svc, entity_id=ha_home.light, **extra
    )
    assert error.message == BAD_REQUEST
    assert error.data["status"] == 400


@pytest.mark.parametrize(("value", "expected"), [(999, 255), (True, 1)])
async def test_odd_brightness_is_not_an_error(
    ha: HomeAssistant, ha_home: Home, value: Any, expected: int
) -> None:
    await service(ha, "light.turn_on", entity_id=ha_home.light, brightness=100)
    changed = await service(ha, "light.turn_on", entity_id=ha_home.light, brightness=value)
    assert [s["attributes"]["brightness"] for s in changed] == [expected]


async def test_unknown_domain_and_missing_target(ha: HomeAssistant) -> None:
    error = await failure(ha, "ha_call_service", domain="nodomain", service="turn_on")
    assert error.message == BAD_REQUEST
    error = await failure(ha, "ha_call_service", domain="light", service="turn_on")
    assert error.message == BAD_REQUEST


async def test_fire_event_with_a_non_object(ha: HomeAssistant) -> None:
    with trio.fail_after(CEILING), pytest.raises(InvalidParams):  # refused before sending
        await ha.execute("ha_fire_event", {"event_type": "doorbell", "event_data": [1]})


async def test_bad_token(ha_home: Home) -> None:
    with trio.fail_after(CEILING):
        async with open_homeassistant(settings(ha_home, token="wrong")) as executor:
            error = await failure(executor, "ha_get_states")
            with pytest.raises(ConfigError) as refused:  # at start-up: a config to fix
                await executor.check_health()
    assert error.data["status"] == 401
    assert "services.homeassistant.token" in error.message
    assert str(refused.value).startswith("services.homeassistant.token: ")
    assert "401" in str(refused.value)
    assert "wrong" not in str(refused.value)


@pytest.mark.parametrize("role", ["climate", "lock"])
async def test_service_validation_error(ha: HomeAssistant, ha_home: Home, role: str) -> None:
    if role == "climate":
        args = {"domain": "climate", "service": "set_temperature", "temperature": 100}
    else:
        args = {"domain": "lock", "service": "open"}
    error = await failure(ha, "ha_call_service", entity_id=getattr(ha_home, role), **args)
    assert error.message == SERVICE_FAILED
    assert error.data["status"] == 500
