"""The wider Home Assistant toolset, one set of assertions for the fake home and a real core.

Templates, areas and entities, the logbook, and services that answer with data
(``?return_response``: calendar.get_events, weather.get_forecasts, todo.get_items), through
the executor as an agent gets them. ``tests/test_fake_homeassistant.py`` runs these against
the fake (``agentgate/testing/fake_ha_wider.py``), ``tests/realha/test_executor.py`` against
the real 2025.4.4 core of ``make test-ha`` (configured by ``scripts/realha/``: the demo's
calendar and weather, the shopping list, the Kitchen and Bedroom areas).

No ``pytestmark`` here: the importing module's marker applies.
"""

from __future__ import annotations

import secrets

import trio

from agentgate.services.homeassistant import HomeAssistant
from tests.realha.contract import CEILING, Home, execute, failure, service

CALENDAR = "calendar.calendar_1"  # the demo's: "Future Event", half an hour after start-up
WEATHER = "weather.demo_weather_south"
TODO = "todo.shopping_list"
KITCHEN_LIGHT = "light.kitchen"  # in the area kitchen ("Kitchen")


async def test_render_template(ha: HomeAssistant, ha_home: Home) -> None:
    domain = ha_home.switchable.split(".")[0]
    await service(ha, f"{domain}.turn_on", entity_id=ha_home.switchable)
    template = f"{{{{ states('{ha_home.switchable}') }}}}, {{{{ 1 + 1 }}}}\nend"
    assert await execute(ha, "ha_render_template", template=template) == "on, 2\nend"


async def test_render_template_error_is_home_assistants(ha: HomeAssistant) -> None:
    error = await failure(ha, "ha_render_template", template="{{ states('sun.sun' ")
    assert error.message.startswith(
        "Home Assistant refused the call: Error rendering template: TemplateSyntaxError: "
    )
    assert error.data["status"] == 400


async def test_list_areas(ha: HomeAssistant) -> None:
    areas = await execute(ha, "ha_list_areas")
    assert {"area_id": "kitchen", "name": "Kitchen"} in areas
    assert {"area_id": "bedroom", "name": "Bedroom"} in areas


async def test_list_entities_of_an_area(ha: HomeAssistant) -> None:
    listed = await execute(ha, "ha_list_entities", area="kitchen")
    state = await execute(ha, "ha_get_state", entity_id=KITCHEN_LIGHT)
    assert {
        "entity_id": KITCHEN_LIGHT,
        "name": state["attributes"]["friendly_name"],
        "area_id": "kitchen",
    } in listed
    assert all(entry["area_id"] == "kitchen" for entry in listed)
    lights = await execute(ha, "ha_list_entities", area="kitchen", domain="light")
    assert [entry["entity_id"] for entry in lights] == [KITCHEN_LIGHT]


async def test_list_entities_of_a_domain(ha: HomeAssistant) -> None:
    listed = await execute(ha, "ha_list_entities", domain="weather")
    ids = [entry["entity_id"] for entry in listed]
    assert WEATHER in ids
    assert ids == sorted(ids)
    assert all(entity_id.startswith("weather.") for entity_id in ids)
    assert all(entry.keys() == {"entity_id", "name", "area_id"} for entry in listed)


async def test_list_entities_of_an_unknown_area_is_not_found(ha: HomeAssistant) -> None:
    error = await failure(ha, "ha_list_entities", area="nowhere")
    assert error.message == "area not found: nowhere"


async def test_logbook(ha: HomeAssistant, ha_home: Home) -> None:
    domain = ha_home.switchable.split(".")[0]
    await service(ha, f"{domain}.turn_off", entity_id=ha_home.switchable)
    await service(ha, f"{domain}.turn_on", entity_id=ha_home.switchable)
    await service(ha, f"{domain}.turn_off", entity_id=ha_home.switchable)
    with trio.fail_after(CEILING):
        while True:  # the logbook trails the state machine, and HA tells no one when it caught up
            entries = await ha.execute("ha_get_logbook", {"entity_id": ha_home.switchable})
            if [e["state"] for e in entries][-2:] == ["on", "off"]:
                break
            await trio.sleep(0.05)
    last = entries[-1]
    assert {"state", "entity_id", "name", "when", "context_user_id"} <= last.keys()
    assert last["entity_id"] == ha_home.switchable
    assert (last["context_domain"], last["context_service"]) == (domain, "turn_off")
    assert last["context_event_type"] == "call_service"


async def test_logbook_of_an_unknown_entity_is_not_found(ha: HomeAssistant, ha_home: Home) -> None:
    error = await failure(ha, "ha_get_logbook", entity_id=ha_home.missing, hours=1)
    assert error.message == f"entity not found: {ha_home.missing}"


async def test_calendar_events_with_return_response(ha: HomeAssistant) -> None:
    answer = await service(
        ha, "calendar.get_events", entity_id=CALENDAR, return_response=True, duration={"hours": 24}
    )
    assert answer["changed_states"] == []
    (event,) = answer["service_response"][CALENDAR]["events"]
    assert event["summary"] == "Future Event"
    assert {"start", "end", "summary"} <= event.keys()


async def test_a_service_that_only_answers_needs_return_response(ha: HomeAssistant) -> None:
    error = await failure(
        ha, "ha_call_service", domain="calendar", service="get_events", entity_id=CALENDAR
    )
    assert error.message.startswith(
        "Home Assistant refused the call: Service call requires responses"
    )


async def test_weather_forecast_with_return_response(ha: HomeAssistant) -> None:
    answer = await service(
        ha, "weather.get_forecasts", entity_id=WEATHER, type="daily", return_response=True
    )
    forecast = answer["service_response"][WEATHER]["forecast"]
    assert forecast
    assert {"datetime", "condition", "temperature"} <= forecast[0].keys()


async def test_todo_items_with_return_response(ha: HomeAssistant) -> None:
    item = f"milk {secrets.token_hex(4)}"
    assert await service(ha, "todo.add_item", entity_id=TODO, item=item) is not None
    answer = await service(ha, "todo.get_items", entity_id=TODO, return_response=True)
    items = answer["service_response"][TODO]["items"]
    assert item in [entry["summary"] for entry in items]
    assert all(entry["status"] == "needs_action" for entry in items if entry["summary"] == item)


async def test_return_response_from_a_service_without_one_is_refused(
    ha: HomeAssistant, ha_home: Home
) -> None:
    domain = ha_home.switchable.split(".")[0]
    error = await failure(
        ha,
        "ha_call_service",
        domain=domain,
        service="turn_on",
        entity_id=ha_home.switchable,
        return_response=True,
    )
    assert error.message == (
        "Home Assistant refused the call: Service does not support responses."
        " Remove return_response from request."
    )
