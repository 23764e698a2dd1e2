"""A fake Home Assistant: a real HTTP server on 127.0.0.1 that answers like HA 2025.4 does.

It holds a small simulated home and answers the REST endpoints agentgate uses, with Home
Assistant's real status codes and body types (see ``design/HOMEASSISTANT.md``)::

    GET  /api/                          200 {"message": "API running."}
    GET  /api/config                    200 config object, "state": "RUNNING"
    GET  /api/states                    200 [state, ...]
    GET  /api/states/<entity_id>        200 state | 404 JSON {"message": "Entity not found."}
    GET  /api/services                  200 [{"domain", "services"}, ...]
    GET  /api/history/period/<start>    200 [[state, ...], ...] (filter_entity_id, end_time,
                                        minimal_response)
    POST /api/services/<domain>/<svc>   200 [changed states] (unknown entity: 200 [])
                                        | 400 text/plain "400: Bad Request" (unknown service)
    POST /api/events/<event_type>       200 {"message": "Event <event_type> fired."}
    any, bad or missing token           401 text/plain "401: Unauthorized"
    POST with a body that is not JSON   400 JSON {"message": "Data should be valid JSON."}

Switches for tests: ``ha.slow = seconds`` (delay every answer), ``ha.fail_with = 500`` (answer
every request with that status), ``ha.down()`` / ``ha.up()`` (refuse connections: the listening
socket closes and open keep-alive connections are dropped; ``up()`` listens on the same port).
``ha.calls`` logs every request as ``(method, path_with_query, body)`` where ``body`` is the
parsed JSON, the raw text if it is not JSON, or ``None`` if empty. ``ha.state(entity_id)`` returns
a copy of an entity's state object.

Use it from Trio (``async with run_fake_homeassistant(token=...) as ha``), from sync code
(``with FakeHomeAssistant(token=...) as ha``) or as a process for benchmarks and the demo::

    python -m agentgate.testing.fake_homeassistant --port 8123 --token T   # prints its URL

It is a stdlib ``ThreadingHTTPServer`` (one thread per connection, HTTP/1.1 keep-alive, Nagle
off) with its own accept loop, so ``stop()``/``down()`` return at once.
"""

from __future__ import annotations

import argparse
import copy
import json
import secrets
import selectors
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import trio

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

# domain -> service -> entity domains it acts on
_SERVICES: dict[str, dict[str, frozenset[str]]] = {
    "light": {s: frozenset({"light"}) for s in ("turn_on", "turn_off", "toggle")},
    "switch": {s: frozenset({"switch"}) for s in ("turn_on", "turn_off", "toggle")},
    "lock": {s: frozenset({"lock"}) for s in ("lock", "unlock", "open")},
    "homeassistant": {s: frozenset({"light", "switch"}) for s in ("turn_on", "turn_off", "toggle")},
}

_HISTORY_LENGTH = 1000
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _context() -> dict[str, Any]:
    return {"id": secrets.token_hex(13).upper(), "parent_id": None, "user_id": None}


def _state_object(entity_id: str, state: str, attributes: dict[str, Any]) -> State:
    now = _now()
    return {
        "entity_id": entity_id,
        "state": state,
        "attributes": dict(attributes),
        "last_changed": now,
        "last_reported": now,
        "last_updated": now,
        "context": _context(),
    }


class _Reply(Exception):
    """Raised inside a route to answer with this status and body."""

    def __init__(self, status: int, body: Any, content_type: str = _JSON) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


def _bad_request() -> _Reply:
    return _Reply(400, "400: Bad Request", _TEXT)


class FakeHomeAssistant:
    """The simulated home and its HTTP server (see the module docstring).

    ``start()``/``stop()`` (or ``with``) run it on a daemon thread; ``url`` and ``token`` are
    what a client needs. The home's state and the call log are safe to read from any thread.
    """

    def __init__(self, *, token: str | None = None, port: int = 0) -> None:
        self.token = token if token is not None else secrets.token_urlsafe(24)
        self.slow: float = 0.0
        self.fail_with: int | None = None
        self.calls: list[tuple[str, str, Any]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._port = port
        self._lock = threading.Lock()
        self._states: dict[str, State] = {}
        self._history: dict[str, list[State]] = {}
        for entity_id, state, attributes in _INITIAL_HOME:
            extra = _LIGHT_EXTRA if entity_id.startswith("light.") else {}
            self._set(entity_id, state, {**extra, **attributes})
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
            self._set(entity_id, state, merged)

    def _set(self, entity_id: str, state: str, attributes: dict[str, Any]) -> State | None:
        """Change an entity like HA's state machine; the new state if anything changed."""
        current = self._states.get(entity_id)
        if (
            current is not None
            and current["state"] == state
            and current["attributes"] == attributes
        ):
            return None
        new = _state_object(entity_id, state, attributes)
        if current is not None and current["state"] == state:
            new["last_changed"] = current["last_changed"]
        self._states[entity_id] = new
        history = self._history.setdefault(entity_id, [])
        history.append(new)
        del history[:-_HISTORY_LENGTH]  # bounded, for long benchmark runs
        return copy.deepcopy(new)

    def _call_service(self, domain: str, service: str, data: dict[str, Any]) -> list[State]:
        targets = _SERVICES.get(domain, {}).get(service)
        if targets is None:
            raise _bad_request()
        brightness = data.get("brightness")
        if brightness is not None and (
            isinstance(brightness, bool)
            or not isinstance(brightness, int)
            or not 0 <= brightness <= 255
        ):
            raise _bad_request()
        raw_ids = data.get("entity_id", [])
        entity_ids = [raw_ids] if isinstance(raw_ids, str) else raw_ids
        if not isinstance(entity_ids, list) or not all(isinstance(e, str) for e in entity_ids):
            raise _bad_request()
        changed = []
        with self._lock:
            for entity_id in entity_ids:
                current = self._states.get(entity_id)
                if current is None or entity_id.split(".", 1)[0] not in targets:
                    continue  # real HA only logs a warning and answers 200 []
                new = self._apply(current, service, brightness)
                if new is not None:
                    changed.append(new)
        return changed

    def _apply(self, current: State, service: str, brightness: int | None) -> State | None:
        entity_id, attributes = current["entity_id"], dict(current["attributes"])
        if entity_id.startswith("lock."):
            state = {"lock": "locked", "unlock": "unlocked", "open": "open"}[service]
            return self._set(entity_id, state, attributes)
        if service == "toggle":
            service = "turn_off" if current["state"] == "on" else "turn_on"
        is_light = entity_id.startswith("light.")
        if is_light and brightness == 0:
            service = "turn_off"  # as in HA: brightness 0 turns a light off
        if service == "turn_on":
            if is_light:
                attributes["brightness"] = brightness or attributes.get("brightness") or 255
                attributes["color_mode"] = "brightness"
            return self._set(entity_id, "on", attributes)
        if is_light:
            attributes["brightness"] = attributes["color_mode"] = None
        return self._set(entity_id, "off", attributes)

    def _history_for(
        self, start: datetime, end: datetime, entity_ids: list[str], minimal: bool
    ) -> list[list[State]]:
        """One series per entity: the state in force at ``start``, then every change."""
        result = []
        with self._lock:
            for entity_id in entity_ids or sorted(self._history):
                before: list[State] = []
                during: list[State] = []
                for entry in self._history.get(entity_id, []):
                    updated = datetime.fromisoformat(entry["last_updated"])
                    if updated <= start:
                        before[:] = [entry]
                    elif updated <= end:
                        during.append(entry)
                series = copy.deepcopy(before + during)
                if minimal and series:  # later entries carry only state and last_changed
                    series[1:] = [
                        {"state": s["state"], "last_changed": s["last_changed"]} for s in series[1:]
                    ]
                if series:
                    result.append(series)
        return result

    def _config(self) -> dict[str, Any]:
        return {
            "latitude": 52.37,
            "longitude": 4.89,
            "elevation": 0,
            "unit_system": {"length": "km", "mass": "g", "temperature": "°C", "volume": "L"},
            "location_name": "Fake Home",
            "time_zone": "Europe/Amsterdam",
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
                        "fields": {},
                    }
                    for name in services
                },
            }
            for domain, services in _SERVICES.items()
        ]

    # ---- routing (called on handler threads) -----------------------------------------

    def _route(self, method: str, path: str, query: dict[str, list[str]], raw: bytes) -> Any:
        parts = path.split("/")
        if parts[:2] != ["", "api"]:
            raise _Reply(404, "404: Not Found", _TEXT)
        rest = parts[2:]
        if method == "GET":
            if rest == [""]:
                return {"message": "API running."}
            if rest == ["config"]:
                with self._lock:
                    return self._config()
            if rest == ["states"]:
                with self._lock:
                    return copy.deepcopy(list(self._states.values()))
            if len(rest) == 2 and rest[0] == "states":
                found = self.state(rest[1])
                if found is None:
                    raise _Reply(404, {"message": "Entity not found."})
                return found
            if rest == ["services"]:
                return self._services()
            if len(rest) == 3 and rest[:2] == ["history", "period"]:
                return self._history_route(rest[2], query)
        elif method == "POST":
            if len(rest) == 3 and rest[0] == "services":
                return self._call_service(rest[1], rest[2], self._json_object(raw))
            if len(rest) == 2 and rest[0] == "events":
                data = self._json_object(raw)
                with self._lock:
                    self.events.append((rest[1], data))
                return {"message": f"Event {rest[1]} fired."}
        else:
            raise _Reply(405, "405: Method Not Allowed", _TEXT)
        raise _Reply(404, "404: Not Found", _TEXT)

    def _history_route(self, start_text: str, query: dict[str, list[str]]) -> Any:
        try:
            start = datetime.fromisoformat(start_text)
            end_text = query.get("end_time", [None])[0]
            end = datetime.fromisoformat(end_text) if end_text else datetime.now(UTC)
            if start.tzinfo is None or end.tzinfo is None:
                raise ValueError(start_text)
        except ValueError:
            raise _Reply(400, {"message": "Invalid datetime"}) from None
        filtered = query.get("filter_entity_id", [""])[0]
        entity_ids = [e.strip().lower() for e in filtered.split(",") if e.strip()]
        return self._history_for(start, end, entity_ids, "minimal_response" in query)

    @staticmethod
    def _json_object(raw: bytes) -> dict[str, Any]:
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise _Reply(400, {"message": "Data should be valid JSON."}) from None
        if not isinstance(data, dict):
            raise _Reply(400, {"message": "Data should be a JSON object."})
        return data

    def _handle(self, method: str, target: str, headers: Any, raw: bytes) -> _Reply:
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        with self._lock:
            self.calls.append((method, target, body))
        if self.slow > 0 and self._stopping.wait(self.slow):
            raise ConnectionAbortedError("fake Home Assistant stopped")
        if headers.get("Authorization") != f"Bearer {self.token}":
            return _Reply(401, "401: Unauthorized", _TEXT)
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
        return _Reply(200, result)


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
