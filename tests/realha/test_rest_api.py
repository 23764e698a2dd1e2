"""Real Home Assistant's REST API as agentgate relies on it, probed directly with httpx.

These pin what a real core answers (status, content type, body) so that the executor, the
fake in ``agentgate/testing/fake_homeassistant.py`` and ``docs/homeassistant.md`` can be
checked against the real thing. Observed on 2025.4.4.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.realha.conftest import RealHA, stop_real_ha

pytestmark = pytest.mark.realha

CEILING = 20.0  # seconds per request; the demo locks take 2 s to lock


@pytest.fixture
def client(real_ha: RealHA) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=real_ha.url, headers=real_ha.headers, timeout=CEILING) as c:
        yield c


def call(client: httpx.Client, service: str, **data: Any) -> httpx.Response:
    domain, name = service.split(".")
    return client.post(f"/api/services/{domain}/{name}", json=data)


def state_of(client: httpx.Client, entity_id: str) -> dict[str, Any]:
    response = client.get(f"/api/states/{entity_id}")
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()
    return state


def is_text(response: httpx.Response) -> bool:
    return response.headers["content-type"].startswith("text/plain")


def wait_for_state(client: httpx.Client, entity_id: str, expected: str) -> dict[str, Any]:
    deadline = time.monotonic() + CEILING
    while (state := state_of(client, entity_id))["state"] != expected:
        assert time.monotonic() < deadline, f"{entity_id} stayed {state['state']!r}"
        time.sleep(0.1)
    return state


# ---- reads -----------------------------------------------------------------------------


def test_api_root(client: httpx.Client) -> None:
    response = client.get("/api/")
    assert (response.status_code, response.json()) == (200, {"message": "API running."})


def test_config_is_the_offline_test_home(client: httpx.Client, real_ha: RealHA) -> None:
    config = client.get("/api/config").json()
    assert config["state"] == "RUNNING"
    assert config["version"] == real_ha.version
    assert (config["currency"], config["country"], config["time_zone"]) == ("EUR", "NL", "UTC")
    assert config["unit_system"]["temperature"] == "°C"
    assert {"api", "demo", "template", "script", "history", "input_boolean"} <= set(
        config["components"]
    )


def test_states_hold_the_known_entities(client: httpx.Client, real_ha: RealHA) -> None:
    states = client.get("/api/states").json()
    ids = {s["entity_id"] for s in states}
    known = {real_ha.light, real_ha.template_light, real_ha.lock, real_ha.locked_lock}
    assert known | {real_ha.cover, real_ha.climate, real_ha.echo_script, real_ha.flag} <= ids
    assert len(states) > 100  # demo: brings ~108 entities


def test_get_state(client: httpx.Client, real_ha: RealHA) -> None:
    state = state_of(client, real_ha.locked_lock)
    assert state["entity_id"] == real_ha.locked_lock
    assert state["attributes"]["friendly_name"] == "Front Door"
    assert {"state", "last_changed", "last_reported", "last_updated", "context"} <= state.keys()


@pytest.mark.parametrize("entity_id", ["light.does_not_exist", "NOT-AN-ENTITY"])
def test_unknown_entity_read_is_404_json(client: httpx.Client, entity_id: str) -> None:
    response = client.get(f"/api/states/{entity_id}")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"message": "Entity not found."}


def test_services_list(client: httpx.Client) -> None:
    services = {d["domain"]: d["services"] for d in client.get("/api/services").json()}
    assert {"turn_on", "turn_off", "toggle"} <= services["light"].keys()
    assert {"lock", "unlock", "open"} <= services["lock"].keys()
    assert "echo" in services["script"]


def test_unknown_path_and_wrong_method_are_text(client: httpx.Client) -> None:
    missing = client.get("/api/nothing")
    assert (missing.status_code, missing.text) == (404, "404: Not Found")
    assert is_text(missing)
    wrong = client.get("/api/services/light/turn_on")
    assert (wrong.status_code, wrong.text) == (405, "405: Method Not Allowed")
    assert is_text(wrong)


# ---- service calls ---------------------------------------------------------------------


def test_light_turned_on_and_read_back(client: httpx.Client, real_ha: RealHA) -> None:
    assert call(client, "light.turn_off", entity_id=real_ha.light).status_code == 200
    response = call(client, "light.turn_on", entity_id=real_ha.light, brightness=77)
    assert response.status_code == 200
    changed = response.json()
    assert [(s["entity_id"], s["state"]) for s in changed] == [(real_ha.light, "on")]
    assert changed[0]["attributes"]["brightness"] == 77
    state = state_of(client, real_ha.light)
    assert (state["state"], state["attributes"]["brightness"]) == ("on", 77)
    # the same call again changes nothing: 200 [] (the same answer as for an unknown entity)
    again = call(client, "light.turn_on", entity_id=real_ha.light, brightness=77)
    assert (again.status_code, again.json()) == (200, [])


def test_out_of_range_brightness_is_clamped_not_refused(
    client: httpx.Client, real_ha: RealHA
) -> None:
    response = call(client, "light.turn_on", entity_id=real_ha.light, brightness=999)
    assert response.status_code == 200
    assert state_of(client, real_ha.light)["attributes"]["brightness"] == 255


def test_changed_states_include_side_effects(client: httpx.Client, real_ha: RealHA) -> None:
    call(client, "light.turn_off", entity_id=real_ha.template_light).raise_for_status()
    changed = call(client, "light.turn_on", entity_id=real_ha.template_light).json()
    assert {(s["entity_id"], s["state"]) for s in changed} == {
        (real_ha.template_power, "on"),
        (real_ha.template_light, "on"),
    }


def test_lock_through_lock_service(client: httpx.Client, real_ha: RealHA) -> None:
    call(client, "lock.unlock", entity_id=real_ha.lock).raise_for_status()
    wait_for_state(client, real_ha.lock, "unlocked")
    response = call(client, "lock.lock", entity_id=real_ha.lock)
    assert response.status_code == 200
    # the call waits for the demo lock (2 s) and lists the transitional state too
    states = [s["state"] for s in response.json() if s["entity_id"] == real_ha.lock]
    assert states[0] == "locking"
    assert states[-1] == "locked"
    assert state_of(client, real_ha.lock)["state"] == "locked"


def test_jamming_lock(client: httpx.Client, real_ha: RealHA) -> None:
    call(client, "lock.unlock", entity_id=real_ha.jamming_lock).raise_for_status()
    response = call(client, "lock.lock", entity_id=real_ha.jamming_lock)
    assert response.status_code == 200  # a jam is no HTTP error
    assert response.json()[0]["state"] == "locking"
    wait_for_state(client, real_ha.jamming_lock, "jammed")


def test_script_with_response(client: httpx.Client, real_ha: RealHA) -> None:
    response = client.post("/api/services/script/echo?return_response", json={"text": "hi"})
    assert response.status_code == 200
    body = response.json()
    assert body.keys() == {"changed_states", "service_response"}
    assert body["service_response"] == {"echo": "hi"}
    refused = client.post(
        "/api/services/light/turn_on?return_response", json={"entity_id": real_ha.light}
    )
    assert refused.status_code == 400
    assert refused.json() == {
        "message": "Service does not support responses. Remove return_response from request."
    }


def test_unknown_entity_in_a_service_call_is_200_empty(client: httpx.Client) -> None:
    response = call(client, "light.turn_on", entity_id="light.does_not_exist")
    assert (response.status_code, response.json()) == (200, [])


@pytest.mark.parametrize(
    ("path", "data"),
    [
        ("/api/services/light/explode", {"entity_id": "light.bed_light"}),  # unknown service
        ("/api/services/nodomain/turn_on", {}),  # unknown domain
        ("/api/services/light/turn_on", {"entity_id": "light.bed_light", "bogus": 1}),  # extra
        ("/api/services/light/turn_on", {"entity_id": "light.bed_light", "brightness": "abc"}),
        ("/api/services/light/turn_on", {"entity_id": "light.bed_light", "brightness_pct": 150}),
        ("/api/services/light/turn_on", {"entity_id": "NOT VALID"}),
    ],
)
def test_refused_call_is_400_text(client: httpx.Client, path: str, data: dict[str, Any]) -> None:
    response = client.post(path, json=data)
    assert (response.status_code, response.text) == (400, "400: Bad Request")
    assert is_text(response)


def test_body_that_is_not_an_object_is_400_text(client: httpx.Client) -> None:
    response = client.post("/api/services/light/turn_on", json=[1, 2])
    assert (response.status_code, response.text) == (400, "400: Bad Request")
    assert is_text(response)


def test_body_that_is_not_json_is_400_json(client: httpx.Client) -> None:
    response = client.post("/api/services/light/turn_on", content=b"{nope")
    assert response.status_code == 400
    assert response.json() == {"message": "Data should be valid JSON."}


@pytest.mark.parametrize(
    ("service", "data"),
    [
        ("climate.set_temperature", {"entity_id": "climate.hvac", "temperature": 100}),
        ("lock.open", {"entity_id": "lock.front_door"}),  # ServiceNotSupported
    ],
)
def test_service_validation_error_is_500_text(
    client: httpx.Client, service: str, data: dict[str, Any]
) -> None:
    # 2025.4.4 lets ServiceValidationError escape as a bare 500 (2026.x: 400 JSON)
    response = call(client, service, **data)
    assert response.status_code == 500
    assert response.text == "500 Internal Server Error\n\nServer got itself in trouble"
    assert is_text(response)


# ---- events, history, auth -------------------------------------------------------------


def test_fire_event(client: httpx.Client) -> None:
    response = client.post("/api/events/agentgate_test", json={"a": 1})
    assert (response.status_code, response.json()) == (
        200,
        {"message": "Event agentgate_test fired."},
    )
    empty = client.post("/api/events/agentgate_test")
    assert (empty.status_code, empty.json()) == (200, {"message": "Event agentgate_test fired."})
    not_object = client.post("/api/events/agentgate_test", json=[1])
    assert not_object.status_code == 400
    assert not_object.json() == {"message": "Event data should be a JSON object"}
    not_json = client.post("/api/events/agentgate_test", content=b"{nope")
    assert not_json.status_code == 400
    assert not_json.json() == {"message": "Event data should be valid JSON."}


def test_history(client: httpx.Client, real_ha: RealHA) -> None:
    call(client, "input_boolean.turn_off", entity_id=real_ha.flag).raise_for_status()
    call(client, "input_boolean.turn_on", entity_id=real_ha.flag).raise_for_status()
    params = {"filter_entity_id": real_ha.flag, "minimal_response": ""}
    # the recorder writes in its own thread: history trails the state machine by a few ms
    deadline = time.monotonic() + CEILING
    while (
        not (series := client.get("/api/history/period", params=params).json())
        or series[0][-1]["state"] != "on"
    ):
        assert time.monotonic() < deadline, series
        time.sleep(0.05)
    assert len(series) == 1
    assert series[0][0]["entity_id"] == real_ha.flag
    assert series[0][-1]["state"] == "on"
    assert series[0][-1].keys() == {"state", "last_changed"}  # minimal_response after the first
    unknown = client.get("/api/history/period", params={"filter_entity_id": real_ha.missing})
    assert (unknown.status_code, unknown.json()) == (200, [])
    no_filter = client.get("/api/history/period")
    assert (no_filter.status_code, no_filter.json()) == (
        400,
        {"message": "filter_entity_id is missing"},
    )
    bad_start = client.get(
        "/api/history/period/yesterday", params={"filter_entity_id": real_ha.flag}
    )
    assert (bad_start.status_code, bad_start.json()) == (400, {"message": "Invalid datetime"})


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer nope"}, {}])
def test_bad_or_missing_token_is_401_text(real_ha: RealHA, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=real_ha.url, headers=headers, timeout=CEILING) as anonymous:
        for response in (
            anonymous.get("/api/states"),
            anonymous.post("/api/services/light/turn_on", json={"entity_id": real_ha.light}),
        ):
            assert (response.status_code, response.text) == (401, "401: Unauthorized")
            assert is_text(response)


def test_stopped_mid_run(own_real_ha: tuple[RealHA, Path]) -> None:
    ha, directory = own_real_ha
    with httpx.Client(base_url=ha.url, headers=ha.headers, timeout=CEILING) as client:
        assert client.get("/api/").status_code == 200  # leaves a keep-alive connection
        stop_real_ha(directory)
        with pytest.raises(httpx.TransportError):
            client.get("/api/")
        with pytest.raises(httpx.ConnectError):
            client.get("/api/")
