"""Real Home Assistant's REST API: what only a real core shows, probed directly with httpx.

The answers the fake must match too (status, content type, body) are in
``tests/realha/contract.py`` and run against both; here are the rest: the offline test home,
side effects of a template light, a jamming lock, a core stopped under a client. Observed on
2025.4.4.
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


def wait_for_state(client: httpx.Client, entity_id: str, expected: str) -> dict[str, Any]:
    deadline = time.monotonic() + CEILING
    # Home Assistant is another process: its REST API is all there is to watch.
    while (state := state_of(client, entity_id))["state"] != expected:
        assert time.monotonic() < deadline, f"{entity_id} stayed {state['state']!r}"
        time.sleep(0.1)
    return state


# ---- reads -----------------------------------------------------------------------------


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


# ---- service calls ---------------------------------------------------------------------


def test_changed_states_include_side_effects(client: httpx.Client, real_ha: RealHA) -> None:
    call(client, "light.turn_off", entity_id=real_ha.template_light).raise_for_status()
    changed = call(client, "light.turn_on", entity_id=real_ha.template_light).json()
    assert {(s["entity_id"], s["state"]) for s in changed} == {
        (real_ha.template_power, "on"),
        (real_ha.template_light, "on"),
    }


def test_jamming_lock(client: httpx.Client, real_ha: RealHA) -> None:
    call(client, "lock.unlock", entity_id=real_ha.jamming_lock).raise_for_status()
    response = call(client, "lock.lock", entity_id=real_ha.jamming_lock)
    assert response.status_code == 200  # a jam is no HTTP error
    assert response.json()[0]["state"] == "locking"
    wait_for_state(client, real_ha.jamming_lock, "jammed")


# ---- events, history, auth -------------------------------------------------------------


def test_stopped_mid_run(own_real_ha: tuple[RealHA, Path]) -> None:
    ha, directory = own_real_ha
    with httpx.Client(base_url=ha.url, headers=ha.headers, timeout=CEILING) as client:
        assert client.get("/api/").status_code == 200  # leaves a keep-alive connection
        stop_real_ha(directory)
        with pytest.raises(httpx.TransportError):
            client.get("/api/")
        with pytest.raises(httpx.ConnectError):
            client.get("/api/")
