"""The fake home's wider toolset, answering as the real 2025.4.4 core does (``make test-ha``).

- ``POST /api/template`` ``{"template", "variables"}``: rendered with Jinja's sandbox and the
  Home Assistant functions agentgate's templates use (``states`` as function and as the list
  of states, ``state_attr``, ``is_state``, ``areas``, ``area_name``, ``area_id``,
  ``area_entities``); 200 text/plain, or 400 JSON ``Error rendering template: ...``.
- Areas: ``kitchen`` "Kitchen" holds ``light.kitchen``, ``bedroom`` "Bedroom" holds
  ``light.bedroom`` (the real core's are made by ``scripts/realha/seed_areas.py``).
- ``GET /api/logbook/<start>?entity=X&end_time=Y``: each state change of X in the window, as
  ``{"state", "entity_id", "name", "when", "context_user_id"}`` and, for a change a service
  call made, ``context_domain``/``context_service``/``context_event_type``; 400 JSON
  ``Invalid datetime`` / ``Invalid end_time``; ``[]`` for an unknown entity.
- Services that answer with data (``?return_response``; without it 400 JSON "Service call
  requires responses ..."): ``calendar.get_events`` (``calendar.calendar_1``: one event half an
  hour from start-up), ``weather.get_forecasts`` (``weather.demo_weather_south``, ``type``
  daily/hourly/twice_daily), ``todo.get_items`` (``todo.shopping_list``); ``todo.add_item``
  (``item``) adds to the list.

Imports: nothing of agentgate. Jinja2 only when a template is rendered (a test dependency).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

__all__ = ["AREAS", "ENTITIES", "SERVICES", "WiderHome"]

AREAS: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "kitchen": ("Kitchen", ("light.kitchen",)),
    "bedroom": ("Bedroom", ("light.bedroom",)),
}

ENTITIES: Final[list[tuple[str, str, dict[str, Any]]]] = [
    ("calendar.calendar_1", "off", {"message": "Future Event", "friendly_name": "Calendar 1"}),
    (
        "weather.demo_weather_south",
        "sunny",
        {"temperature": 21.6, "humidity": 92, "friendly_name": "Demo Weather South"},
    ),
    ("todo.shopping_list", "0", {"friendly_name": "Shopping List", "supported_features": 15}),
]

SERVICES: Final = {
    ("calendar", "get_events"),
    ("weather", "get_forecasts"),
    ("todo", "get_items"),
    ("todo", "add_item"),
}
_ONLY_RESPONSES: Final = {("calendar", "get_events"), ("weather", "get_forecasts")}
_NEEDS_RESPONSE = (
    "Service call requires responses but caller did not ask for responses. "
    "Add ?return_response to query parameters."
)
_FORECAST: Final = [
    ("rainy", 1.0, 22.0, 15.0, 60),
    ("rainy", 5.0, 19.0, 8.0, 30),
    ("cloudy", 0.0, 15.0, 9.0, 10),
    ("sunny", 0.0, 12.0, 6.0, 0),
    ("partlycloudy", 2.0, 14.0, 7.0, 20),
]


class Refused(Exception):
    """An answer other than 200: ``status`` with a JSON ``{"message"}`` (or text/plain)."""

    def __init__(self, status: int, message: str | None) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class WiderHome:
    """What the fake home adds; it reads and changes the home through ``states`` (a copy of
    every state object), ``history`` (each entity's list of state objects) and ``set``."""

    def __init__(
        self,
        states: Callable[[], Mapping[str, dict[str, Any]]],
        history: Callable[[str], list[dict[str, Any]]],
        set_state: Callable[[str, str, dict[str, Any]], Any],
    ) -> None:
        self._states, self._history, self._set = states, history, set_state
        self._event_start = datetime.now(UTC) + timedelta(minutes=30)
        self.todo: list[dict[str, str]] = []
        self.calls: dict[str, tuple[str, str]] = {}  # last_updated -> the service that did it

    # -- templates ---------------------------------------------------------------------------

    def render(self, body: Any) -> str:
        if not isinstance(body, dict) or not isinstance(body.get("template"), str):
            raise Refused(400, "Error rendering template: template is missing")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        states = self._states()
        env = ImmutableSandboxedEnvironment(undefined=jinja2.ChainableUndefined)
        env.globals.update(self._functions(states))
        env.filters["to_json"] = env.filters["tojson"]
        variables = body.get("variables") or {}
        try:
            return env.from_string(body["template"]).render(**variables)
        except jinja2.TemplateError as exc:
            raise Refused(
                400, f"Error rendering template: {type(exc).__name__}: {exc.message}"
            ) from None

    def _functions(self, states: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        class States:
            def __call__(self, entity_id: str) -> str:
                found = states.get(entity_id)
                return "unknown" if found is None else str(found["state"])

            def __iter__(self) -> Any:
                return iter(sorted(states.values(), key=lambda s: s["entity_id"]))

        def state_attr(entity_id: str, name: str) -> Any:
            found = states.get(entity_id)
            return None if found is None else found["attributes"].get(name)

        def area_of(entity_id: str) -> str | None:
            return next((a for a, (_, ids) in AREAS.items() if entity_id in ids), None)

        def area_name(value: str) -> str | None:
            area = value if value in AREAS else area_of(value)
            return AREAS[area][0] if area is not None else None

        return {
            "states": States(),
            "is_state": lambda entity_id, state: States()(entity_id) == state,
            "state_attr": state_attr,
            "areas": lambda: list(AREAS),
            "area_name": area_name,
            "area_id": area_of,
            "area_entities": lambda area: list(AREAS[area][1]) if area in AREAS else [],
        }

    # -- logbook -----------------------------------------------------------------------------

    def logbook(self, start: datetime, entity_id: str, end: datetime) -> list[dict[str, Any]]:
        entries = []
        previous = None
        for state in self._history(entity_id):
            # a change from a known state: the first state (start-up) is not in the logbook
            changed = previous is not None and state["state"] != previous
            previous = state["state"]
            when = datetime.fromisoformat(state["last_updated"])
            if not changed or not start <= when < end:
                continue
            entry = {
                "state": state["state"],
                "entity_id": entity_id,
                "name": state["attributes"].get("friendly_name", entity_id),
                "when": state["last_updated"],
                "context_user_id": state["context"]["user_id"],
            }
            service = self.calls.get(state["context"]["id"])
            if service is not None:
                entry["context_domain"], entry["context_service"] = service
                entry["context_event_type"] = "call_service"
            entries.append(entry)
        return entries

    # -- services with data ------------------------------------------------------------------

    def call(self, domain: str, service: str, data: Any, respond: bool) -> Any:
        if (domain, service) in _ONLY_RESPONSES and not respond:
            raise Refused(400, _NEEDS_RESPONSE)
        if service == "add_item" and respond:
            raise Refused(
                400, "Service does not support responses. Remove return_response from request."
            )
        if not isinstance(data, dict) or not isinstance(data.get("entity_id"), str):
            raise Refused(400, None)
        entity_id = data["entity_id"]
        if entity_id not in self._states():
            return {"changed_states": [], "service_response": {}} if respond else []
        if (domain, service) == ("calendar", "get_events"):
            answer = {"events": self._events(data)}
        elif (domain, service) == ("weather", "get_forecasts"):
            if data.get("type") not in ("daily", "hourly", "twice_daily"):
                raise Refused(400, None)
            answer = {"forecast": self._forecast(str(data["type"]))}
        elif service == "get_items":
            answer = {"items": [dict(item) for item in self.todo]}
        else:
            if not isinstance(data.get("item"), str):
                raise Refused(400, None)
            self.todo.append({"summary": data["item"], "uid": uuid.uuid4().hex})
            self.todo[-1]["status"] = "needs_action"
            self._set(entity_id, str(len(self.todo)), {})
            return []
        return {"changed_states": [], "service_response": {entity_id: answer}}

    def _events(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        start = datetime.now(UTC)
        duration = data.get("duration")
        if isinstance(duration, dict):
            end = start + timedelta(**{k: float(v) for k, v in duration.items()})
        else:
            end = start + timedelta(days=1)
        event_end = self._event_start + timedelta(hours=1)
        if self._event_start >= end or event_end < start:
            return []
        return [
            {
                "start": self._event_start.isoformat(),
                "end": event_end.isoformat(),
                "summary": "Future Event",
                "description": "Future Description",
                "location": "Future Location",
            }
        ]

    @staticmethod
    def _forecast(kind: str) -> list[dict[str, Any]]:
        step = timedelta(days=1) if kind == "daily" else timedelta(hours=1)
        now = datetime.now(UTC)
        return [
            {
                "datetime": (now + step * (index + 1)).isoformat(),
                "condition": condition,
                "precipitation": rain,
                "temperature": high,
                "templow": low,
                "precipitation_probability": chance,
            }
            for index, (condition, rain, high, low, chance) in enumerate(_FORECAST)
        ]
