"""A fake Home Assistant: a real HTTP server on 127.0.0.1 that answers like HA 2025.4.4 does.

It holds a small simulated home and answers the REST endpoints agentgate uses with Home
Assistant's real status codes and body types. Every answer below was observed against a real
2025.4.4 core (``tests/realha/``; ``docs/homeassistant.md``); ``tests/realha/contract.py`` runs
the same assertions against this fake and against the real core::

    GET  /api/                          200 {"message": "API running."}
    GET  /api/config                    200 config object, "state": "RUNNING"
    GET  /api/states                    200 [state, ...]
    GET  /api/states/<entity_id>        200 state | 404 JSON {"message": "Entity not found."}
    GET  /api/services                  200 [{"domain", "services"}, ...]
    GET  /api/events                    200 [{"event", "listener_count"}, ...]
    GET  /api/history/period[/<start>]  200 [[first state, change, ...], ...] per entity
         ?filter_entity_id=a,b (required: 400 JSON "filter_entity_id is missing" / "Invalid
         filter_entity_id"), end_time (400 "Invalid end_time"; default start + 1 day),
         minimal_response, no_attributes; a bad start is 400 "Invalid datetime", a naive one
         is UTC, a future one 200 []. The first state is the one in force at start (its times
         clamped to start); then state changes only (significant_changes_only).
    POST /api/services/<domain>/<svc>   200 [every state the call changed] - transitional
                                        states included (a lock: [locking, locked], even when
                                        it was locked already); [] for an unknown entity or
                                        when nothing changed
         400 text/plain "400: Bad Request": unknown domain/service, a field the service does
             not take, a value its schema refuses (brightness "abc", brightness_pct 150), an
             ill-formed entity_id, no target for an entity service, a body that is not an
             object. (brightness is coerced and clamped: 999 -> 255, true -> 1, -5 -> off.)
         500 text/plain "500 Internal Server Error\n\nServer got itself in trouble": a service
             validation error (a thermostat set out of its min/max, lock.open on a lock
             without the open feature)
         ?return_response: 200 {"changed_states", "service_response"} (script.echo), 400 JSON
             "Service does not support responses. ..." for other services
    POST /api/events/<event_type>       200 {"message": "Event <event_type> fired."}; 400 JSON
                                        "Event data should be valid JSON." / "Event data
                                        should be a JSON object"
    any, bad or missing token           401 text/plain "401: Unauthorized"
    POST to a service with a non-JSON body  400 JSON {"message": "Data should be valid JSON."}
    POST /api/template, GET /api/logbook/<start>, calendar.get_events, weather.get_forecasts,
    todo.get_items / add_item, the areas: see agentgate/testing/fake_ha_wider.py
    a known path with another method    405 text/plain "405: Method Not Allowed"
    an unknown path                     404 text/plain "404: Not Found"

States changed by a call carry ``context.user_id`` (the token's user), like real HA.

Switches for tests: ``ha.slow = seconds`` (delay every answer), ``ha.fail_with = 500`` (answer
every request with that status), ``ha.answer_delay = seconds`` (a POST runs at once, its answer
comes that much later), ``ha.hang_up = True`` (a POST runs, then the connection is dropped
without an answer), ``ha.lock_delay = seconds`` (how long a lock stays
``locking``/``unlocking``/``opening`` inside the call; real demo locks take 2 s, the default
here is 0), ``ha.down()`` / ``ha.up()`` (refuse connections: the listening socket closes and
open keep-alive connections are dropped; ``up()`` listens on the same port). ``ha.calls`` logs
every request as ``(method, path_with_query, body)`` where ``body`` is the parsed JSON, the raw
text if it is not JSON, or ``None`` if empty. ``ha.state(entity_id)`` returns a copy of an
entity's state object; ``await ha.wait_for_state(entity_id, state)`` (Trio) waits for one.

Use it from Trio (``async with run_fake_homeassistant(token=...) as ha``), from sync code
(``with FakeHomeAssistant(token=...) as ha``), without a socket (``httpx.MockTransport(
FakeHomeAssistant(token=...).handler)``: the same answers, for the fast tier) or as a process
for benchmarks and the demo::

    python -m agentgate.testing.fake_homeassistant --port 8123 --token T   # prints its URL

It is a stdlib ``ThreadingHTTPServer`` (one thread per connection, HTTP/1.1 keep-alive, Nagle
off) with its own accept loop, so ``stop()``/``down()`` return at once.

Imports: testing.fake_ha_wider (the wider toolset), and nothing else: it stands for another
program.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import secrets
import selectors
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import httpx
import trio

from agentgate.testing import fake_ha_wider
from agentgate.testing.fake_ha_wider import Refused, WiderHome

__all__ = ["FakeHomeAssistant", "run_fake_homeassistant"]

State = dict[str, Any]

_INITIAL_HOME: list[tuple[str, str, dict[str, Any]]] = [
    (
        "light.living_room",
        "on",
        {"brightness": 180, "color_mode": "brightness", "friendly_name": "Living Room Light"},
    ),
    (
        "light.bedroom",
        "off",
        {"brightness": None, "color_mode": None, "friendly_name": "Bedroom Light"},
    ),
    (
        "light.kitchen",
        "off",
        {"brightness": None, "color_mode": None, "friendly_name": "Kitchen Light"},
    ),
    ("switch.coffee_maker", "off", {"friendly_name": "Coffee Maker"}),
    ("lock.front_door", "locked", {"friendly_name": "Front Door", "supported_features": 0}),
    ("lock.back_door", "unlocked", {"friendly_name": "Back Door", "supported_features": 1}),
    (
        "climate.living_room",
        "heat",
        {
            "hvac_modes": ["off", "heat"],
            "min_temp": 7,
            "max_temp": 35,
            "target_temp_step": 0.5,
            "current_temperature": 21.5,
            "temperature": 21,
            "friendly_name": "Living Room Thermostat",
            "supported_features": 1,
        },
    ),
    (
        "script.echo",
        "off",
        {"last_triggered": None, "mode": "single", "current": 0, "friendly_name": "Echo"},
    ),
    (
        "sensor.living_room_temperature",
        "21.5",
        {
            "unit_of_measurement": "°C",
            "device_class": "temperature",
            "state_class": "measurement",
            "friendly_name": "Living Room Temperature",
        },
    ),
    (
        "sensor.outdoor_humidity",
        "64",
        {
            "unit_of_measurement": "%",
            "device_class": "humidity",
            "state_class": "measurement",
            "friendly_name": "Outdoor Humidity",
        },
    ),
    (
        "binary_sensor.front_door",
        "off",
        {"device_class": "door", "friendly_name": "Front Door Sensor"},
    ),
]

_LIGHT_EXTRA = {"supported_color_modes": ["brightness"], "supported_features": 0}

# HA's valid_entity_id(); comp_entity_ids also takes the words "all" and "none"
_ENTITY_ID = re.compile(r"^(?!.+__)(?!_)[\da-z_]+(?<!_)\.(?!_)[\da-z_]+(?<!_)$")
_TARGET_KEYS = frozenset({"entity_id", "device_id", "area_id", "floor_id", "label_id"})
# history keeps attribute-only changes for these domains (significant_changes_only)
_SIGNIFICANT_DOMAINS = frozenset({"climate", "device_tracker", "humidifier", "water_heater"})
_HVAC_MODES = frozenset({"off", "heat", "cool", "heat_cool", "auto", "dry", "fan_only"})
_LOCK_OPEN = 1  # LockEntityFeature.OPEN
_LOCK_STEPS = {
    "lock": ("locking", "locked"),
    "unlock": ("unlocking", "unlocked"),
    "open": ("opening", "open"),
}
_ONE_DAY = timedelta(days=1)
_HISTORY_LENGTH = 1000
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_ULID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class _Invalid(ValueError):
    """A service field value the schema refuses (voluptuous ``Invalid``): 400."""


class _ServiceValidationError(Exception):
    """What HA raises once the schema passed but the entity refuses: 2025.4.4 answers 500."""


def _coerce_int(value: Any) -> int:
    try:
        return int(value)  # vol.Coerce(int): True -> 1, 12.7 -> 12, "40" -> 40
    except (TypeError, ValueError):
        raise _Invalid(value) from None


def _coerce_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _Invalid(value) from None


def _brightness(value: Any) -> int:
    return min(max(_coerce_int(value), 0), 255)  # clamped, not refused: 999 -> 255


def _brightness_pct(value: Any) -> float:
    pct = _coerce_float(value)
    if not 0 <= pct <= 100:
        raise _Invalid(value)
    return pct


def _hvac_mode(value: Any) -> str:
    if value not in _HVAC_MODES:
        raise _Invalid(value)
    return str(value)


def _anything(value: Any) -> Any:
    return value


_LIGHT_ON_FIELDS: dict[str, Callable[[Any], Any]] = {
    "brightness": _brightness,
    "brightness_pct": _brightness_pct,
    **dict.fromkeys(
        (
            "transition",
            "color_temp_kelvin",
            "rgb_color",
            "hs_color",
            "xy_color",
            "color_name",
            "effect",
            "flash",
            "profile",
            "white",
        ),
        _anything,
    ),
}


@attrs.frozen
class _Service:
    """A service: the entity domains it acts on, its fields, what it needs."""

    acts_on: frozenset[str]
    fields: Mapping[str, Callable[[Any], Any]] = attrs.field(factory=dict)
    needs_target: bool = True
    needs_one_of: frozenset[str] = frozenset()  # cv.has_at_least_one_key
    responds: bool = False


def _on_off(domain: str, fields: Mapping[str, Callable[[Any], Any]] | None = None) -> _Service:
    return _Service(frozenset({domain}), fields or {})


_SERVICES: dict[str, dict[str, _Service]] = {
    "light": {
        "turn_on": _on_off("light", _LIGHT_ON_FIELDS),
        "turn_off": _on_off("light", {"transition": _anything, "flash": _anything}),
        "toggle": _on_off("light", _LIGHT_ON_FIELDS),
    },
    "switch": {s: _on_off("switch") for s in ("turn_on", "turn_off", "toggle")},
    "lock": {s: _on_off("lock", {"code": str}) for s in ("lock", "unlock", "open")},
    "climate": {
        "set_temperature": _Service(
            frozenset({"climate"}),
            {
                "temperature": _coerce_float,
                "target_temp_high": _coerce_float,
                "target_temp_low": _coerce_float,
                "hvac_mode": _hvac_mode,
            },
            needs_one_of=frozenset({"temperature", "target_temp_high", "target_temp_low"}),
        )
    },
    "homeassistant": {
        s: _Service(frozenset({"light", "switch"}), needs_target=False)
        for s in ("turn_on", "turn_off", "toggle")
    },
    "script": {
        "echo": _Service(frozenset(), {"text": _anything}, needs_target=False, responds=True)
    },
    # Scenes reproduce the states they hold, whatever their domain (a lock's "unlocked" unlocks).
    "scene": {
        "apply": _Service(
            frozenset(), {"entities": _anything, "transition": _anything}, needs_target=False
        ),
        "create": _Service(
            frozenset(),
            {"scene_id": str, "entities": _anything, "snapshot_entities": _anything},
            needs_target=False,
        ),
        "turn_on": _Service(frozenset({"scene"}), {"transition": _anything}),
    },
}
# The service that reproduces a state, per domain (HA's reproduce_state).
_REPRODUCE: dict[str, dict[str, str]] = {
    "lock": {"locked": "lock", "unlocked": "unlock", "open": "open"},
    "light": {"on": "turn_on", "off": "turn_off"},
    "switch": {"on": "turn_on", "off": "turn_off"},
}


def _now() -> datetime:
    return datetime.now(UTC)


def _ulid() -> str:
    return "".join(secrets.choice(_ULID_ALPHABET) for _ in range(26))


def _context(user_id: str | None) -> dict[str, Any]:
    return {"id": _ulid(), "parent_id": None, "user_id": user_id}


def _state_object(
    entity_id: str, state: str, attributes: dict[str, Any], user_id: str | None
) -> State:
    now = _now().isoformat()
    return {
        "entity_id": entity_id,
        "state": state,
        "attributes": dict(attributes),
        "last_changed": now,
        "last_reported": now,
        "last_updated": now,
        "context": _context(user_id),
    }


def _parse_datetime(text: str) -> datetime | None:
    """HA's ``dt_util.parse_datetime`` then ``as_utc``: naive times are in the home's zone (UTC)."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


class _Reply(Exception):
    """Raised inside a route to answer with this status and body."""

    def __init__(self, status: int, body: Any, content_type: str = _JSON) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


def _text(status: int) -> _Reply:
    if status == 500:
        return _Reply(500, "500 Internal Server Error\n\nServer got itself in trouble", _TEXT)
    return _Reply(status, f"{status}: {HTTPStatus(status).phrase}", _TEXT)


def _message(status: int, message: str) -> _Reply:
    return _Reply(status, {"message": message})


def _target_ids(data: Mapping[str, Any]) -> list[str] | None:
    """``entity_id`` as HA's ``comp_entity_ids`` reads it, or ``None`` if there is none."""
    raw = data.get("entity_id")
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = raw.split(",")
    if not isinstance(raw, list) or not all(isinstance(e, str) for e in raw):
        raise _Invalid(raw)
    ids = [e.strip().lower() for e in raw if e.strip()]
    if not all(e in ("all", "none") or _ENTITY_ID.match(e) for e in ids):
        raise _Invalid(raw)
    return ids


class FakeHomeAssistant:
    """The simulated home and its HTTP server (see the module docstring).

    ``start()``/``stop()`` (or ``with``) run it on a daemon thread; ``url`` and ``token`` are
    what a client needs. The home's state and the call log are safe to read from any thread.
    """

    def __init__(self, *, token: str | None = None, port: int = 0) -> None:
        self.token = token if token is not None else secrets.token_urlsafe(24)
        self.user_id = secrets.token_hex(16)  # the token's owner, as in context.user_id
        self.slow: float = 0.0
        self.fail_with: int | None = None
        self.answer_delay: float = 0.0
        self.hang_up = False
        self.lock_delay: float = 0.0
        self.calls: list[tuple[str, str, Any]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._port = port
        self._lock = threading.Lock()
        self._states: dict[str, State] = {}
        self._history: dict[str, list[State]] = {}
        self._scenes: dict[str, dict[str, dict[str, Any]]] = {}  # scene.create
        self._watchers: list[Callable[[], None]] = []  # wait_for_state's wake-ups, under _lock
        for entity_id, state, attributes in [*_INITIAL_HOME, *fake_ha_wider.ENTITIES]:
            extra = _LIGHT_EXTRA if entity_id.startswith("light.") else {}
            self._set(entity_id, state, {**extra, **attributes}, None)
        self.wider = WiderHome(self._copy_states, self._copy_history, self._merge)
        self._server: ThreadingHTTPServer | None = None
        self._accept_thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()  # wakes handlers sleeping in `slow`

    # ---- lifecycle ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port (known once started; kept across ``down()``/``up()``)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8123``."""
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> None:
        """Bind 127.0.0.1 and serve on a daemon thread."""
        self._stopping.clear()
        self.up()

    def stop(self) -> None:
        """Stop listening, drop every connection and wake sleeping handlers."""
        self._stopping.set()
        self.down()

    def up(self) -> None:
        """Listen again (on the same port) after ``down()``."""
        if self._server is not None:
            return
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.fake = self
        server.socket.setblocking(False)
        self._port = server.server_address[1]
        wake = socket.socketpair()
        thread = threading.Thread(
            target=self._accept_loop,
            args=(server, wake[0]),
            name=f"fake-ha:{self._port}",
            daemon=True,
        )
        self._server, self._wake, self._accept_thread = server, wake, thread
        thread.start()

    def down(self) -> None:
        """Refuse connections: close the listener and drop open connections."""
        server, wake, thread = self._server, self._wake, self._accept_thread
        if server is None or wake is None or thread is None:
            return
        self._server = self._wake = self._accept_thread = None
        wake[1].send(b"x")
        thread.join()
        server.server_close()
        for sock in wake:
            sock.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handler(self, request: httpx.Request) -> httpx.Response:
        """Answer ``request`` as the server would, without a socket (``httpx.MockTransport``).
        ``hang_up`` has no meaning here: such an answer raises ``httpx.ReadError``."""
        reply = self._handle(
            request.method, request.url.raw_path.decode("ascii"), request.headers, request.content
        )
        if reply is _HANG_UP:
            raise httpx.ReadError("fake Home Assistant dropped the connection", request=request)
        payload = json.dumps(reply.body) if reply.content_type == _JSON else str(reply.body)
        return httpx.Response(
            reply.status, content=payload.encode(), headers={"Content-Type": reply.content_type}
        )

    def __enter__(self) -> FakeHomeAssistant:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @staticmethod
    def _accept_loop(server: ThreadingHTTPServer, wake: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(server.socket, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if any(key.fileobj is wake for key, _ in ready):
                    return
                try:
                    conn, address = server.get_request()
                except OSError:  # BlockingIOError: another wake-up won the race
                    continue
                conn.setblocking(True)
                server.process_request(conn, address)

    # ---- the simulated home ----------------------------------------------------------

    def state(self, entity_id: str) -> State | None:
        """A copy of the entity's current state object, or ``None``."""
        with self._lock:
            found = self._states.get(entity_id)
            return copy.deepcopy(found) if found is not None else None

    def set_state(
        self, entity_id: str, state: str, attributes: dict[str, Any] | None = None
    ) -> None:
        """Create or change an entity (attributes are merged into the current ones)."""
        with self._lock:
            current = self._states.get(entity_id)
            merged = {**(current["attributes"] if current else {}), **(attributes or {})}
            self._set(entity_id, state, merged, None)

    def _set(
        self, entity_id: str, state: str, attributes: dict[str, Any], user_id: str | None
    ) -> State | None:
        """Change an entity like HA's state machine; the new state if anything changed."""
        current = self._states.get(entity_id)
        if (
            current is not None
            and current["state"] == state
            and current["attributes"] == attributes
        ):
            return None
        new = _state_object(entity_id, state, attributes, user_id)
        if current is not None and current["state"] == state:
            new["last_changed"] = current["last_changed"]
        self._states[entity_id] = new
        history = self._history.setdefault(entity_id, [])
        history.append(new)
        del history[:-_HISTORY_LENGTH]  # bounded, for long benchmark runs
        for wake in self._watchers:
            wake()
        return copy.deepcopy(new)

    async def wait_for_state(self, entity_id: str, state: str) -> State:
        """Wait (in Trio, under the caller's deadline) until the entity is in ``state``; a
        copy of its state object. Handler threads wake the waiter through its Trio token."""
        token = trio.lowlevel.current_trio_token()
        while True:
            changed = trio.Event()
            wake = functools.partial(token.run_sync_soon, changed.set)
            with self._lock:
                found = self._states.get(entity_id)
                if found is not None and found["state"] == state:
                    return copy.deepcopy(found)
                self._watchers.append(wake)
            try:
                await changed.wait()
            finally:
                with self._lock:
                    self._watchers.remove(wake)

    def _copy_states(self) -> dict[str, State]:
        with self._lock:
            return copy.deepcopy(self._states)

    def _copy_history(self, entity_id: str) -> list[State]:
        with self._lock:
            return copy.deepcopy(self._history.get(entity_id, []))

    def _merge(self, entity_id: str, state: str, attributes: dict[str, Any]) -> None:
        current = self.state(entity_id)
        merged = {**(current["attributes"] if current else {}), **attributes}
        self._change(entity_id, state, merged)

    def _pause(self, seconds: float) -> None:
        if seconds > 0 and self._stopping.wait(seconds):
            raise ConnectionAbortedError("fake Home Assistant stopped")

    def _call_service(
        self, domain: str, name: str, data: Any, return_response: bool
    ) -> list[State] | dict[str, Any]:
        if (domain, name) in fake_ha_wider.SERVICES:
            try:
                answer: list[State] | dict[str, Any] = self.wider.call(
                    domain, name, data, return_response
                )
            except Refused as refused:
                if refused.message is None:
                    raise _text(refused.status) from None
                raise _message(refused.status, refused.message) from None
            return answer
        changed = self._run_service(domain, name, data, return_response)
        for state in changed if isinstance(changed, list) else changed["changed_states"]:
            self.wider.calls[state["context"]["id"]] = (domain, name)
        return changed

    def _run_service(
        self, domain: str, name: str, data: Any, return_response: bool
    ) -> list[State] | dict[str, Any]:
        service = _SERVICES.get(domain, {}).get(name)
        if service is None:
            raise _text(400)
        if return_response and not service.responds:
            raise _message(
                400, "Service does not support responses. Remove return_response from request."
            )
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise _text(400)
        try:
            fields = {
                key: service.fields[key](value)
                for key, value in data.items()
                if key not in _TARGET_KEYS
            }
            entity_ids = _target_ids(data)
        except (KeyError, _Invalid):  # a field the service does not take, or a bad value
            raise _text(400) from None
        if service.needs_target and not (_TARGET_KEYS & data.keys()):
            raise _text(400)
        if service.needs_one_of and not (service.needs_one_of & fields.keys()):
            raise _text(400)
        if domain == "script":
            return self._run_script(fields, return_response)
        if domain == "scene" and name != "turn_on":
            return self._scene(name, fields)
        if domain == "scene":
            with self._lock:
                scenes = [self._scenes.get(e) for e in entity_ids or []]
            return [s for found in scenes if found for s in self._reproduce(found)]
        with self._lock:
            if entity_ids is not None and "all" in entity_ids:
                entity_ids = [e for e in self._states if e.split(".")[0] in service.acts_on]
            targets = [  # real HA only logs a warning for the others and answers 200 []
                e
                for e in dict.fromkeys(entity_ids or [])
                if e in self._states and e.split(".")[0] in service.acts_on
            ]
            try:
                for entity_id in targets:
                    self._validate(entity_id, name, fields)
            except _ServiceValidationError:
                raise _text(500) from None
        changed: list[State] = []
        for entity_id in targets:
            changed += self._apply(entity_id, name, fields)
        return changed

    def _validate(self, entity_id: str, service: str, fields: dict[str, Any]) -> None:
        """What the entity refuses after the schema passed (under ``_lock``)."""
        attributes = self._states[entity_id]["attributes"]
        features = attributes.get("supported_features", 0)
        if entity_id.startswith("lock.") and service == "open" and not features & _LOCK_OPEN:
            raise _ServiceValidationError("Entity does not support this service.")
        if entity_id.startswith("climate."):
            low, high = attributes["min_temp"], attributes["max_temp"]
            for key in ("temperature", "target_temp_high", "target_temp_low"):
                if key in fields and not low <= fields[key] <= high:
                    raise _ServiceValidationError(f"{key} out of range")
            if "hvac_mode" in fields and fields["hvac_mode"] not in attributes["hvac_modes"]:
                raise _ServiceValidationError("unsupported hvac_mode")

    def _change(self, entity_id: str, state: str, attributes: dict[str, Any]) -> list[State]:
        with self._lock:
            new = self._set(entity_id, state, attributes, self.user_id)
        return [new] if new is not None else []

    def _apply(self, entity_id: str, service: str, fields: dict[str, Any]) -> list[State]:
        current = self.state(entity_id)
        assert current is not None
        attributes = current["attributes"]
        domain = entity_id.split(".", 1)[0]
        if domain == "lock":
            # like the demo lock: a transitional state for lock_delay, then the final one -
            # both in the answer, even when the lock was in the final state already
            moving, final = _LOCK_STEPS[service]
            changed = self._change(entity_id, moving, attributes)
            self._pause(self.lock_delay)
            return changed + self._change(entity_id, final, attributes)
        if domain == "climate":
            temperature = fields.get("temperature", attributes.get("temperature"))
            state: str = fields["hvac_mode"] if "hvac_mode" in fields else current["state"]
            return self._change(entity_id, state, {**attributes, "temperature": temperature})
        if service == "toggle":
            service = "turn_off" if current["state"] == "on" else "turn_on"
        brightness: int | None = fields.get("brightness")
        if "brightness_pct" in fields:
            brightness = round(fields["brightness_pct"] * 255 / 100)
        if domain == "light" and brightness == 0:
            service = "turn_off"  # as in HA: brightness 0 turns a light off
        if service == "turn_on":
            if domain == "light":
                attributes["brightness"] = brightness or attributes.get("brightness") or 255
                attributes["color_mode"] = "brightness"
            return self._change(entity_id, "on", attributes)
        if domain == "light":
            attributes["brightness"] = attributes["color_mode"] = None
        return self._change(entity_id, "off", attributes)

    def _scene(self, name: str, fields: dict[str, Any]) -> list[State]:
        """``scene.apply`` (reproduce ``entities``) and ``scene.create`` (remember them, and the
        current states of ``snapshot_entities``, as ``scene.<scene_id>``)."""
        entities = fields.get("entities") or {}
        if not isinstance(entities, dict) or not all(
            isinstance(e, str) and _ENTITY_ID.match(e.lower()) for e in entities
        ):
            raise _text(400)
        wanted = {
            e.lower(): v if isinstance(v, dict) else {"state": v} for e, v in entities.items()
        }
        if name == "apply":
            return self._reproduce(wanted)
        scene_id = fields.get("scene_id")
        if not isinstance(scene_id, str) or not _ENTITY_ID.match(f"scene.{scene_id}"):
            raise _text(400)
        snapshot = fields.get("snapshot_entities") or []
        with self._lock:
            for entity_id in snapshot if isinstance(snapshot, list) else [snapshot]:
                current = self._states.get(str(entity_id).strip().lower())
                if current is not None:
                    wanted[current["entity_id"]] = {"state": current["state"]}
            self._scenes[f"scene.{scene_id}"] = wanted
            self._set(f"scene.{scene_id}", "unknown", {"entity_id": sorted(wanted)}, self.user_id)
        return []

    def _reproduce(self, wanted: dict[str, dict[str, Any]]) -> list[State]:
        changed: list[State] = []
        for entity_id, target in wanted.items():
            service = _REPRODUCE.get(entity_id.split(".")[0], {}).get(str(target.get("state")))
            if service is not None and self.state(entity_id) is not None:
                changed += self._apply(entity_id, service, {})
        return changed

    def _run_script(
        self, fields: dict[str, Any], return_response: bool
    ) -> list[State] | dict[str, Any]:
        """``script.echo``: runs (on, then off) and answers ``{"echo": text}``."""
        current = self.state("script.echo")
        assert current is not None
        attributes = {**current["attributes"], "last_triggered": _now().isoformat()}
        changed = self._change("script.echo", "on", {**attributes, "current": 1})
        changed += self._change("script.echo", "off", {**attributes, "current": 0})
        if return_response:
            text = fields.get("text")
            return {"changed_states": changed, "service_response": {"echo": text or ""}}
        return changed

    def _history_route(
        self, start_text: str | None, query: Mapping[str, list[str]]
    ) -> list[list[dict[str, Any]]]:
        """``/api/history/period``, its checks in real HA's order."""
        start = None
        if start_text and (start := _parse_datetime(start_text)) is None:
            raise _message(400, "Invalid datetime")
        filtered = query.get("filter_entity_id", [""])[0]
        entity_ids = list(dict.fromkeys(e.strip().lower() for e in filtered.split(",")))
        entity_ids = [e for e in entity_ids if e]
        if not entity_ids:
            raise _message(400, "filter_entity_id is missing")
        with self._lock:
            if not all(e in self._states or _ENTITY_ID.match(e) for e in entity_ids):
                raise _message(400, "Invalid filter_entity_id")
        now = _now()
        start = start or now - _ONE_DAY
        if start > now:
            return []
        end_text = query.get("end_time", [""])[0]
        end = start + _ONE_DAY
        if end_text:
            parsed_end = _parse_datetime(end_text)
            if parsed_end is None:
                raise _message(400, "Invalid end_time")
            end = parsed_end
        minimal, no_attributes = "minimal_response" in query, "no_attributes" in query
        result = []
        with self._lock:
            for entity_id in entity_ids:
                series = self._series(entity_id, start, end)
                if not series:
                    continue
                for entry in series:
                    if no_attributes:
                        entry["attributes"] = {}
                if minimal:
                    series[1:] = [
                        {"state": s["state"], "last_changed": s["last_changed"]} for s in series[1:]
                    ]
                result.append(series)
        return result

    def _series(self, entity_id: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """The state in force at ``start`` (times clamped to it), then each significant change."""
        keys = ("entity_id", "state", "attributes", "last_changed", "last_updated")
        every_change = entity_id.split(".")[0] in _SIGNIFICANT_DOMAINS
        before: dict[str, Any] | None = None
        during: list[dict[str, Any]] = []
        for entry in self._history.get(entity_id, []):
            updated = datetime.fromisoformat(entry["last_updated"])
            row = {key: copy.deepcopy(entry[key]) for key in keys}
            if updated <= start:
                before = row
            elif updated < end and (every_change or row["last_changed"] == row["last_updated"]):
                during.append(row)
        if before is not None:
            for key in ("last_changed", "last_updated"):
                before[key] = max(datetime.fromisoformat(before[key]), start).isoformat()
        return ([before] if before is not None else []) + during

    def _config(self) -> dict[str, Any]:
        return {
            "latitude": 52.37,
            "longitude": 4.89,
            "elevation": 0,
            "unit_system": {"length": "km", "mass": "g", "temperature": "°C", "volume": "L"},
            "location_name": "Fake Home",
            "time_zone": "UTC",
            "components": sorted({"api", "http", *(e.split(".")[0] for e in self._states)}),
            "config_dir": "/config",
            "allowlist_external_dirs": [],
            "allowlist_external_urls": [],
            "version": "2025.4.4",
            "config_source": "storage",
            "recovery_mode": False,
            "state": "RUNNING",
            "external_url": None,
            "internal_url": None,
            "currency": "EUR",
            "country": "NL",
            "language": "en",
            "safe_mode": False,
            "debug": False,
            "radius": 100,
        }

    @staticmethod
    def _services() -> list[dict[str, Any]]:
        return [
            {
                "domain": domain,
                "services": {
                    name: {
                        "name": name.replace("_", " ").capitalize(),
                        "description": "",
                        "fields": {field: {} for field in service.fields},
                        **(
                            {"target": {"entity": [{"domain": sorted(service.acts_on)}]}}
                            if service.needs_target
                            else {}
                        ),
                        **({"response": {"optional": True}} if service.responds else {}),
                    }
                    for name, service in services.items()
                },
            }
            for domain, services in _SERVICES.items()
        ]

    # ---- routing (called on handler threads) -----------------------------------------

    def _route(self, method: str, path: str, query: dict[str, list[str]], raw: bytes) -> Any:
        """The answer for one authorised request; a :class:`_Reply` for anything but 200."""
        parts = path.split("/")
        if parts[:2] != ["", "api"]:
            raise _text(404)
        route: tuple[str, Callable[[], Any]] | None = None
        match parts[2:]:
            case [""]:
                route = ("GET", lambda: {"message": "API running."})
            case ["config"]:
                route = ("GET", self._locked(self._config))
            case ["states"]:
                route = ("GET", self._locked(lambda: copy.deepcopy(list(self._states.values()))))
            case ["states", entity_id] if entity_id:
                route = ("GET", lambda: self._read_state(entity_id))
            case ["services"]:
                route = ("GET", self._services)
            case ["services", domain, service] if domain and service:
                route = (
                    "POST",
                    lambda: self._call_service(
                        domain, service, self._service_data(raw), "return_response" in query
                    ),
                )
            case ["events"]:
                route = ("GET", lambda: [{"event": "*", "listener_count": 1}])
            case ["events", event_type] if event_type:
                route = ("POST", lambda: self._fire(event_type, raw))
            case ["history", "period"]:
                route = ("GET", lambda: self._history_route(None, query))
            case ["history", "period", start]:
                route = ("GET", lambda: self._history_route(start, query))
            case ["template"]:
                route = ("POST", lambda: self._template(raw))
            case ["logbook", start]:
                route = ("GET", lambda: self._logbook(start, query))
        if route is None:
            raise _text(404)
        allowed, answer = route
        if method != allowed:
            raise _text(405)
        return answer()

    def _template(self, raw: bytes) -> Any:
        try:
            text = self.wider.render(self._service_data(raw))
        except Refused as refused:
            raise _message(refused.status, str(refused.message)) from None
        raise _Reply(200, text, _TEXT)

    def _logbook(self, start_text: str, query: Mapping[str, list[str]]) -> Any:
        start = _parse_datetime(start_text)
        if start is None:
            raise _message(400, "Invalid datetime")
        end_text = query.get("end_time", [""])[0]
        end = _parse_datetime(end_text) if end_text else start + _ONE_DAY
        if end is None:
            raise _message(400, "Invalid end_time")
        entity_id = query.get("entity", [""])[0]
        return self.wider.logbook(start, entity_id, end)

    def _locked(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with self._lock:
                return fn()

        return run

    def _read_state(self, entity_id: str) -> State:
        found = self.state(entity_id)
        if found is None:
            raise _message(404, "Entity not found.")
        return found

    @staticmethod
    def _service_data(raw: bytes) -> Any:
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise _message(400, "Data should be valid JSON.") from None

    def _fire(self, event_type: str, raw: bytes) -> dict[str, str]:
        data = None
        if raw:
            try:
                data = json.loads(raw)
            except ValueError:
                raise _message(400, "Event data should be valid JSON.") from None
        if data is not None and not isinstance(data, dict):
            raise _message(400, "Event data should be a JSON object")
        with self._lock:
            self.events.append((event_type, data or {}))
        return {"message": f"Event {event_type} fired."}

    def _handle(self, method: str, target: str, headers: Any, raw: bytes) -> _Reply:
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        with self._lock:
            self.calls.append((method, target, body))
        self._pause(self.slow)
        if headers.get("Authorization") != f"Bearer {self.token}":
            return _text(401)
        if self.fail_with is not None:
            status = self.fail_with
            phrase = HTTPStatus(status).phrase
            return _Reply(status, f"{status} {phrase}\n\nServer got itself in trouble", _TEXT)
        url = urlsplit(target)
        try:
            result = self._route(
                method, unquote(url.path), parse_qs(url.query, keep_blank_values=True), raw
            )
        except _Reply as reply:
            return reply
        if method == "POST":  # it ran; what happens to its answer is up to the switches
            if self.hang_up:
                return _HANG_UP
            self._pause(self.answer_delay)
        return _Reply(200, result)


_HANG_UP: Final = _Reply(0, None)  # drop the connection without an answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    fake: FakeHomeAssistant

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away, or we dropped it in down()/stop()
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    # Buffered: the head and the body of a response leave in one write when the handler
    # flushes, as aiohttp sends them; two writes cost the client one more wake-up per request.
    wbufsize = 64 * 1024
    server: _Server
    server_version = "Python/3 aiohttp/3.11"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        fake = self.server.fake
        with fake._lock:
            fake._connections.add(self.connection)

    def finish(self) -> None:
        fake = self.server.fake
        with fake._lock:
            fake._connections.discard(self.connection)
        with suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        reply = self.server.fake._handle(self.command, self.path, self.headers, raw)
        if reply is _HANG_UP:
            self.close_connection = True
            with suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if reply.content_type == _JSON:
            payload = json.dumps(reply.body).encode()
        else:
            payload = str(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch


@asynccontextmanager
async def run_fake_homeassistant(
    *, token: str | None = None, port: int = 0
) -> AsyncIterator[FakeHomeAssistant]:
    """Run a :class:`FakeHomeAssistant` for the body of an ``async with`` (Trio)."""
    ha = FakeHomeAssistant(token=token, port=port)
    ha.start()
    try:
        yield ha
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(ha.stop)


def main(argv: list[str] | None = None) -> int:
    """``python -m agentgate.testing.fake_homeassistant --port N --token T``: print URL, serve."""
    parser = argparse.ArgumentParser(description="Run a fake Home Assistant on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 picks a free one)")
    parser.add_argument("--token", required=True, help="the bearer token clients must send")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with FakeHomeAssistant(token=args.token, port=args.port) as ha:
        print(ha.url, flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
