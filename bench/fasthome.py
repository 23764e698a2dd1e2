"""The benchmarks' fast fake Home Assistant, and the bare client that measures it.

``python -m bench.fasthome --token T`` serves on a free port of 127.0.0.1 and prints its URL.
``python -m bench.fasthome drive '<json spec>'`` is the bare client (one JSON result on stdout).

A benchmark floor must be faster than what it bounds. The correctness fake
(:mod:`agentgate.testing.fake_homeassistant`, a stdlib threaded server that models Home
Assistant's behaviour, and what the tests use) answers about as fast as the gateway itself, so
the benchmarks drive this one instead: a raw asyncio HTTP/1.1 keep-alive server, ``TCP_NODELAY``
on every connection, every answer encoded once at start, and only what the scenarios ask:

    GET  /api/                           200 {"message": "API running."}
    GET  /api/states/<entity_id>         200 the entity's state (Home Assistant's shape and size)
    POST /api/services/<domain>/<svc>    200 lights (turn_on, turn_off, toggle on ``entity_id``):
                                         [the new state] if it changed, [] if not; others: []
    a wrong or missing bearer token      401; any other request: 404

It is not a model of Home Assistant: no history, no validation beyond what the scenarios need.

The bare client (``drive``) holds ``connections`` keep-alive connections, each with one request
in flight, sends a pre-encoded ``GET /api/states/<entity>`` and reads the answer by its
Content-Length: what the service can answer with next to no client work in the way. It counts
the answers that arrive within ``[start_at, start_at + duration]`` (wall clock), as
:mod:`bench.load` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import time
from functools import partial
from typing import Any

from bench.stats import Window

# Fixed times: the answers are encoded once; a benchmark reads them, nothing compares them.
_T = "2026-12-01T00:00:00.000000+00:00"

ENTITIES: dict[str, tuple[str, dict[str, Any]]] = {
    "sensor.living_room_temperature": (
        "21.5",
        {
            "unit_of_measurement": "°C",
            "device_class": "temperature",
            "state_class": "measurement",
            "friendly_name": "Living Room Temperature",
        },
    ),
    "sensor.outdoor_humidity": (
        "64",
        {
            "unit_of_measurement": "%",
            "device_class": "humidity",
            "state_class": "measurement",
            "friendly_name": "Outdoor Humidity",
        },
    ),
    "light.kitchen": (
        "off",
        {
            "supported_color_modes": ["brightness"],
            "supported_features": 0,
            "brightness": None,
            "color_mode": None,
            "friendly_name": "Kitchen Light",
        },
    ),
    "light.living_room": (
        "on",
        {
            "supported_color_modes": ["brightness"],
            "supported_features": 0,
            "brightness": 180,
            "color_mode": "brightness",
            "friendly_name": "Living Room Light",
        },
    ),
}
# S2U's sensors: 100 of them, so that no two of its calls in flight read the same entity.
SPREAD = [f"sensor.bench_{i:03d}" for i in range(100)]
for _i, _entity in enumerate(SPREAD):
    ENTITIES[_entity] = (
        f"{20 + _i / 10:.1f}",
        dict(ENTITIES["sensor.living_room_temperature"][1], friendly_name=f"Bench {_i:03d}"),
    )

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024


def state_object(entity_id: str, state: str, attributes: dict[str, Any]) -> dict[str, Any]:
    return {
        "entity_id": entity_id,
        "state": state,
        "attributes": attributes,
        "last_changed": _T,
        "last_reported": _T,
        "last_updated": _T,
        "context": {"id": "01JE0000000000000000000000", "parent_id": None, "user_id": None},
    }


def _json(data: Any) -> bytes:
    return json.dumps(data).encode()


def response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


UNAUTHORIZED = response("401 Unauthorized", b"401: Unauthorized", "text/plain; charset=utf-8")
NOT_FOUND = response("404 Not Found", b'{"message": "Not found."}')
BAD_REQUEST = response("400 Bad Request", b"400: Bad Request", "text/plain; charset=utf-8")
EMPTY = response("200 OK", b"[]")


class Home:
    """The answers, by request; lights keep their on/off state (an approved call changes it)."""

    def __init__(self, token: str) -> None:
        self.auth = f"Bearer {token}".encode()
        self.get: dict[bytes, bytes] = {
            b"/api/": response("200 OK", b'{"message": "API running."}'),
        }
        # light -> {"on": (GET answer, POST answer), "off": ...}
        self.lights: dict[str, dict[str, tuple[bytes, bytes]]] = {}
        self.light_state: dict[str, str] = {}
        for entity_id, (state, attributes) in ENTITIES.items():
            path = f"/api/states/{entity_id}".encode()
            self.get[path] = response("200 OK", _json(state_object(entity_id, state, attributes)))
            if entity_id.startswith("light."):
                answers = {}
                for now in ("on", "off"):
                    attrs = dict(attributes)
                    attrs["brightness"] = (attrs["brightness"] or 255) if now == "on" else None
                    attrs["color_mode"] = "brightness" if now == "on" else None
                    body = state_object(entity_id, now, attrs)
                    answers[now] = (
                        response("200 OK", _json(body)),
                        response("200 OK", _json([body])),
                    )
                self.lights[entity_id] = answers
                self.light_state[entity_id] = state
                self.get[path] = answers[state][0]

    def answer(self, method: bytes, target: bytes, auth: bytes | None, body: bytes) -> bytes:
        if auth != self.auth:
            return UNAUTHORIZED
        path = target.split(b"?", 1)[0]
        if method == b"GET":
            return self.get.get(path, NOT_FOUND)
        if method == b"POST" and path.startswith(b"/api/services/"):
            return self._service(path.decode("ascii", "replace"), body)
        return NOT_FOUND

    def _service(self, path: str, body: bytes) -> bytes:
        parts = path.split("/")  # "", "api", "services", domain, service
        if len(parts) != 5:
            return NOT_FOUND
        domain, service = parts[3], parts[4]
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            return BAD_REQUEST
        targets = data.get("entity_id") if isinstance(data, dict) else None
        if domain != "light" or service not in ("turn_on", "turn_off", "toggle"):
            return EMPTY
        ids = [targets] if isinstance(targets, str) else targets
        if not isinstance(ids, list):
            return EMPTY
        changed = []
        for entity_id in ids:
            if entity_id not in self.lights:
                continue
            old = self.light_state[entity_id]
            new = {"turn_on": "on", "turn_off": "off"}.get(service, "off" if old == "on" else "on")
            if new != old:
                self.light_state[entity_id] = new
                get, post = self.lights[entity_id][new]
                self.get[f"/api/states/{entity_id}".encode()] = get
                changed.append(post)
        if not changed:
            return EMPTY
        if len(changed) == 1:
            return changed[0]
        states = [json.loads(one.split(b"\r\n\r\n", 1)[1])[0] for one in changed]
        return response("200 OK", _json(states))


class _ServerConnection(asyncio.Protocol):
    """One keep-alive connection: requests are parsed from the buffer and answered in order."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buffer = self.buffer
        buffer += data
        while buffer:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._fail()
                return
            lines = bytes(buffer[:end]).split(b"\r\n")
            request = lines[0].split(b" ")
            if len(request) != 3:
                self._fail()
                return
            auth = None
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"authorization":
                    auth = value.strip()
                elif name == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        self._fail()
                        return
                elif name == b"transfer-encoding" or (
                    name == b"connection" and value.strip().lower() == b"close"
                ):
                    close = True  # chunked bodies are not needed here: answer, then hang up
            if not 0 <= length <= MAX_BODY:
                self._fail()
                return
            if len(buffer) < end + 4 + length:
                return
            body = bytes(buffer[end + 4 : end + 4 + length])
            del buffer[: end + 4 + length]
            self.transport.write(self.home.answer(request[0], request[1], auth, body))
            if close:
                self.transport.close()
                return

    def _fail(self) -> None:
        assert self.transport is not None
        self.transport.write(BAD_REQUEST)
        self.transport.close()
        self.buffer.clear()


async def serve(token: str, port: int = 0) -> None:
    loop = asyncio.get_running_loop()
    home = Home(token)
    server = await loop.create_server(
        lambda: _ServerConnection(home), "127.0.0.1", port, backlog=1024
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"http://127.0.0.1:{bound}", flush=True)
    async with server:
        await stop.wait()


# -- the bare client ---------------------------------------------------------------------------


class _ClientConnection(asyncio.Protocol):
    """Sends the request, reads one answer by its Content-Length, sends the next."""

    def __init__(self, request: bytes, window: Window, done: asyncio.Future[None]) -> None:
        self.request = request
        self.window = window
        self.done = done
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.sent = 0.0
        self.need = -1  # bytes of the whole answer, once its head is in
        self.status_ok = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self) -> None:
        assert self.transport is not None
        self.sent = time.time()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.need < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            self.need = end + 4 + length
            self.status_ok = head.startswith(b"http/1.1 200")
        if len(self.buffer) < self.need:
            return
        now = time.time()
        if self.status_ok:
            self.window.done(self.sent, now)
        else:
            self.window.failed(RuntimeError(bytes(self.buffer[:40]).decode()), now)
        del self.buffer[: self.need]
        self.need = -1
        if now < self.window.end:
            self.send()
        elif not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def drive(spec: dict[str, Any]) -> dict[str, Any]:
    """``connections`` keep-alive connections, one request in flight on each."""
    window = Window(spec["start_at"], spec["duration"])
    host, port = spec["url"].removeprefix("http://").rstrip("/").split(":")
    request = (
        f"GET /api/states/{spec['entity']} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {spec['token']}\r\nAccept: */*\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    connections: list[_ClientConnection] = []
    for _ in range(spec["connections"]):
        done: asyncio.Future[None] = loop.create_future()
        _, protocol = await loop.create_connection(
            partial(_ClientConnection, request, window, done), host, int(port)
        )
        connections.append(protocol)
    late = max(0.0, time.time() - window.start)
    for connection in connections:
        connection.send()  # the warm-up runs until start_at, as in the other workers
    await asyncio.wait_for(
        asyncio.gather(*(c.done for c in connections)),
        timeout=max(0.0, window.end - time.time()) + 30,
    )
    for connection in connections:
        if connection.transport is not None:
            connection.transport.close()
    return window.result(late)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["drive"]:
        print(json.dumps(asyncio.run(drive(json.loads(args[1])))), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.fasthome", description=__doc__)
    parser.add_argument("--token", required=True, help="the bearer token to accept")
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args(args)
    asyncio.run(serve(options.token, options.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
