"""Fast tier: the Home Assistant executor against ``httpx.MockTransport`` (no sockets)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
import trio.testing
from attrs import frozen

from agentgate.config import ConfigError
from agentgate.errors import ExecutionFailed, InvalidParams, OutcomeUnknown, error_from_wire
from agentgate.services.homeassistant import (
    TOOLS,
    URLS_MAX,
    HomeAssistant,
    open_homeassistant,
)

URL = "http://ha.test:8123"
TOKEN = "secret-token"
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]

LOCK = {
    "entity_id": "lock.front_door",
    "state": "locked",
    "attributes": {"friendly_name": "Front door"},
}


@frozen
class Settings:
    url: str = URL
    token: str = TOKEN
    timeout: float = 10.0


class FakeHA:
    """A scripted HA: answers from ``routes`` and records every request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], httpx.Response] = {
            ("GET", "/api/"): httpx.Response(200, json={"message": "API running."}),
            ("GET", "/api/states/lock.front_door"): httpx.Response(200, json=LOCK),
            ("GET", "/api/states/light.bedroom"): httpx.Response(
                200, json={"entity_id": "light.bedroom", "state": "off", "attributes": {}}
            ),
        }

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        found = self.routes.get((request.method, request.url.path))
        if found is not None:
            return found
        if request.url.path.startswith("/api/states/"):
            return httpx.Response(404, json={"message": "Entity not found."})
        if request.method == "POST":
            return httpx.Response(200, json=[])
        return httpx.Response(200, json={"path": request.url.path})

    def seen(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.requests]


@pytest.fixture
def fake() -> FakeHA:
    return FakeHA()


@pytest.fixture
async def ha(fake: FakeHA) -> AsyncIterator[HomeAssistant]:
    async with open_homeassistant(
        Settings(), transport=httpx.MockTransport(fake), now=lambda: NOW
    ) as executor:
        yield executor


async def failure(ha: HomeAssistant, tool: str, args: dict[str, Any]) -> ExecutionFailed:
    with pytest.raises(ExecutionFailed) as info:
        await ha.execute(tool, args)
    assert info.value.code == -32004
    assert info.value.data["service"] == "homeassistant"
    return info.value


def answering(response: httpx.Response) -> Handler:
    return lambda request: response


async def with_handler(handler: Handler, settings: Settings | None = None) -> Any:
    """Open an executor on ``handler`` and run ``ha_get_state(lock.front_door)``."""
    async with open_homeassistant(
        settings or Settings(), transport=httpx.MockTransport(handler)
    ) as executor:
        return await executor.execute("ha_get_state", {"entity_id": "lock.front_door"})


async def failure_from(handler: Handler, settings: Settings | None = None) -> ExecutionFailed:
    with pytest.raises(ExecutionFailed) as info:
        await with_handler(handler, settings)
    assert info.value.data["service"] == "homeassistant"
    return info.value


# ---- tools ---------------------------------------------------------------------------


def test_tools() -> None:
    assert set(HomeAssistant.tools) == TOOLS
    assert all(spec.name == name for name, spec in HomeAssistant.tools.items())
    assert {"ha_get_state", "ha_call_service", "ha_get_history"} <= TOOLS


async def test_get_state_sends_bearer_token(ha: HomeAssistant, fake: FakeHA) -> None:
    assert await ha.execute("ha_get_state", {"entity_id": "lock.front_door"}) == LOCK
    request = fake.requests[-1]
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert str(request.url) == f"{URL}/api/states/lock.front_door"


@pytest.mark.parametrize(
    ("tool", "path"),
    [
        ("ha_get_states", "/api/states"),
        ("ha_get_services", "/api/services"),
        ("ha_get_config", "/api/config"),
    ],
)
async def test_simple_gets(ha: HomeAssistant, fake: FakeHA, tool: str, path: str) -> None:
    assert await ha.execute(tool, {}) == {"path": path}
    assert fake.seen() == [("GET", path)]


async def test_call_service_checks_entity_then_posts(ha: HomeAssistant, fake: FakeHA) -> None:
    changed = [{"entity_id": "light.bedroom", "state": "on"}]
    fake.routes["POST", "/api/services/light/turn_on"] = httpx.Response(200, json=changed)
    args = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom", "brightness": 9}
    assert await ha.execute("ha_call_service", args) == changed
    assert fake.seen() == [
        ("GET", "/api/states/light.bedroom"),
        ("POST", "/api/services/light/turn_on"),
    ]
    assert json.loads(fake.requests[-1].content) == {"entity_id": "light.bedroom", "brightness": 9}


async def test_call_service_unknown_entity_is_not_a_success(
    ha: HomeAssistant, fake: FakeHA
) -> None:
    args = {"domain": "light", "service": "turn_on", "entity_id": "light.nowhere"}
    error = await failure(ha, "ha_call_service", args)
    assert error.message == "entity not found: light.nowhere"
    assert error.data["status"] == 404
    assert ("POST", "/api/services/light/turn_on") not in fake.seen()


async def test_call_service_checks_every_listed_entity(ha: HomeAssistant, fake: FakeHA) -> None:
    args = {"domain": "homeassistant", "service": "turn_off"}
    error = await failure(
        ha, "ha_call_service", {**args, "entity_id": ["light.bedroom", "switch.nope"]}
    )
    assert error.message == "entity not found: switch.nope"
    assert fake.seen()[-1] == ("GET", "/api/states/switch.nope")


async def test_call_service_without_entity(ha: HomeAssistant, fake: FakeHA) -> None:
    assert await ha.execute("ha_call_service", {"domain": "script", "service": "reload"}) == []
    assert fake.seen() == [("POST", "/api/services/script/reload")]
    assert json.loads(fake.requests[-1].content) == {}


async def test_fire_event(ha: HomeAssistant, fake: FakeHA) -> None:
    fake.routes["POST", "/api/events/doorbell"] = httpx.Response(
        200, json={"message": "Event doorbell fired."}
    )
    args = {"event_type": "doorbell", "event_data": {"who": "courier"}}
    assert await ha.execute("ha_fire_event", args) == {"message": "Event doorbell fired."}
    assert json.loads(fake.requests[-1].content) == {"who": "courier"}
    await ha.execute("ha_fire_event", {"event_type": "doorbell"})
    assert json.loads(fake.requests[-1].content) == {}


async def test_get_history_window(ha: HomeAssistant, fake: FakeHA) -> None:
    await ha.execute("ha_get_history", {"entity_id": "sensor.temp", "hours": 2})
    url = fake.requests[-1].url
    assert url.path == "/api/history/period/2026-11-01T10:00:00+00:00"
    assert url.params["filter_entity_id"] == "sensor.temp"
    assert url.params["end_time"] == "2026-11-01T12:00:00+00:00"
    assert "minimal_response" in url.params
    await ha.execute("ha_get_history", {"entity_id": "sensor.temp"})
    assert fake.requests[-1].url.path == "/api/history/period/2026-10-31T12:00:00+00:00"


async def test_empty_history_checks_the_entity(ha: HomeAssistant, fake: FakeHA) -> None:
    # real HA answers [] for an entity it does not know
    path = "/api/history/period/2026-11-01T11:00:00+00:00"
    fake.routes[("GET", path)] = httpx.Response(200, json=[])
    assert await ha.execute("ha_get_history", {"entity_id": "lock.front_door", "hours": 1}) == []
    assert fake.seen()[-1] == ("GET", "/api/states/lock.front_door")
    error = await failure(ha, "ha_get_history", {"entity_id": "sensor.nowhere", "hours": 1})
    assert (error.message, error.data["status"]) == ("entity not found: sensor.nowhere", 404)


SERVICE_CALL = {"domain": "homeassistant", "service": "save_persistent_states"}


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (
            httpx.Response(500, text="500 Internal Server Error\n\nServer got itself in trouble"),
            "Home Assistant failed to run the service (500): the arguments may be out of range "
            "or unsupported by this entity; see Home Assistant's log",
        ),
        (
            httpx.Response(500, json={"message": "Temperature 100 is out of range"}),
            "Home Assistant failed to run the service (500): Temperature 100 is out of range",
        ),
        (
            httpx.Response(503, text="503: Service Unavailable"),
            "Home Assistant error (503): 503: Service Unavailable",
        ),
        (  # 2026.x: a service validation error is a 400 with a reason
            httpx.Response(400, json={"message": "Temperature 100 is out of range"}),
            "Home Assistant refused the call: Temperature 100 is out of range",
        ),
    ],
)
async def test_service_call_failures(response: httpx.Response, message: str) -> None:
    async with open_homeassistant(
        Settings(), transport=httpx.MockTransport(answering(response))
    ) as executor:
        error = await failure(executor, "ha_call_service", SERVICE_CALL)
    assert (error.message, error.data["status"]) == (message, response.status_code)


async def test_unknown_tool_is_refused(ha: HomeAssistant, fake: FakeHA) -> None:
    with pytest.raises(InvalidParams, match="unknown tool: shell_exec"):
        await ha.execute("shell_exec", {"cmd": "rm -rf /"})
    assert fake.requests == []


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("ha_get_state", {}),
        ("ha_get_state", {"entity_id": 3}),
        ("ha_call_service", {"domain": "light", "service": "turn_on", "entity_id": [1]}),
        ("ha_fire_event", {"event_type": "x", "event_data": [1]}),
        ("ha_get_history", {"entity_id": "sensor.t", "hours": -1}),
        ("ha_get_history", {"entity_id": "sensor.t", "hours": True}),
    ],
)
async def test_ill_shaped_args_are_refused(
    ha: HomeAssistant, fake: FakeHA, tool: str, args: dict[str, Any]
) -> None:
    with pytest.raises(InvalidParams):
        await ha.execute(tool, args)
    assert fake.requests == []


async def test_identifiers_are_one_path_segment(ha: HomeAssistant, fake: FakeHA) -> None:
    await failure(ha, "ha_get_state", {"entity_id": "../config"})
    assert fake.requests[-1].url.raw_path == b"/api/states/..%2Fconfig"


async def test_a_path_goes_to_the_same_url_every_time_and_the_kept_urls_are_bounded(
    ha: HomeAssistant, fake: FakeHA
) -> None:
    # Each path's URL is parsed once and kept: the second request (and a service call on the
    # same entity, and a read under a base URL with a path) goes where the first one went.
    odd = {"entity_id": "light.x?y=1#z%20 ä"}
    for _ in range(2):
        await failure(ha, "ha_get_state", odd)
    first, second = fake.requests[-2:]
    assert first.url == second.url
    assert first.url.raw_path == b"/api/states/light.x%3Fy%3D1%23z%2520%20%C3%A4"
    for i in range(URLS_MAX + 5):
        await failure(ha, "ha_get_state", {"entity_id": f"sensor.s{i}"})
    assert fake.requests[-1].url.raw_path == f"/api/states/sensor.s{URLS_MAX + 4}".encode()
    assert len(ha._urls) <= URLS_MAX
    async with open_homeassistant(
        Settings(url="http://ha.test:8123/prefix"), transport=httpx.MockTransport(fake)
    ) as under_a_path:
        for _ in range(2):
            assert (
                await under_a_path.execute("ha_call_service", {"domain": "script", "service": "go"})
                == []
            )
    assert [str(r.url) for r in fake.requests[-2:]] == [
        "http://ha.test:8123/prefix/api/services/script/go"
    ] * 2


@pytest.mark.parametrize(
    "base", [URL, "http://ha.test:8123/", "https://ha.test/prefix", "http://[::1]:8123/a/b/"]
)
async def test_each_request_is_what_an_httpx_client_would_send(base: str) -> None:
    # The executor builds its requests itself and calls its transport: the URL, every header
    # (and their order and case on the wire), the body and the timeouts are those of an
    # httpx.AsyncClient made as the executor's was, for each kind of request it sends.
    fake = FakeHA()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return fake(request)

    client = httpx.AsyncClient(
        base_url=base,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=httpx.Timeout(10.0),
        follow_redirects=False,
    )
    settings = Settings(url=base)
    transport = httpx.MockTransport(handler)
    async with open_homeassistant(settings, transport=transport, now=lambda: NOW) as executor:
        await executor.execute("ha_get_state", {"entity_id": "lock.front_door"})
        await executor.execute("ha_get_history", {"entity_id": "light.x y", "hours": 1})
        await executor.execute("ha_fire_event", {"event_type": "door bell"})
        await executor.execute(
            "ha_call_service",
            {"domain": "script", "service": "go", "return_response": True, "ä": [1, "é"]},
        )
    sent = [(r.method, str(r.url)) for r in seen]
    start, end = (NOW - timedelta(hours=1)).isoformat(), NOW.isoformat()
    history = {"filter_entity_id": "light.x y", "end_time": end, "minimal_response": ""}
    expected = [
        client.build_request("GET", "/api/states/lock.front_door"),
        client.build_request("GET", f"/api/history/period/{quote(start, safe='')}", params=history),
        client.build_request("POST", "/api/events/door%20bell", json={}),
        client.build_request(
            "POST", "/api/services/script/go", json={"ä": [1, "é"]}, params={"return_response": ""}
        ),
    ]
    assert len(seen) == len(expected), sent
    for request, want in zip(seen, expected, strict=True):
        assert request.method == want.method
        assert str(request.url) == str(want.url)
        assert request.headers.raw == want.headers.raw
        assert request.content == want.read()
        assert request.extensions["timeout"] == want.extensions["timeout"]
    await client.aclose()


async def test_a_redirect_is_never_followed() -> None:
    # The bearer token goes to Home Assistant's URL and nowhere else.
    fake = FakeHA()
    fake.routes["GET", "/api/states/lock.front_door"] = httpx.Response(
        302, headers={"Location": "http://elsewhere.test/steal"}
    )
    async with open_homeassistant(Settings(), transport=httpx.MockTransport(fake)) as executor:
        error = await failure(executor, "ha_get_state", {"entity_id": "lock.front_door"})
    assert error.message.startswith("Home Assistant answered 302")
    assert error.data["status"] == 302
    assert [str(r.url) for r in fake.requests] == [f"{URL}/api/states/lock.front_door"]


class _Body(httpx.AsyncByteStream):
    """A body that breaks after its first chunk, and says whether it was closed."""

    def __init__(self) -> None:
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"entity_id": '
        raise httpx.ReadError("connection reset")

    async def aclose(self) -> None:
        self.closed = True


async def test_a_body_that_breaks_is_closed_and_the_call_failed() -> None:
    body = _Body()
    error = await failure_from(answering(httpx.Response(200, stream=body)))
    assert error.message == "Home Assistant unreachable: connection failed"
    assert body.closed  # its connection is not left taken


# ---- describe and health -------------------------------------------------------------


async def test_describe(ha: HomeAssistant, fake: FakeHA) -> None:
    assert (
        await ha.describe_entity("lock.front_door") == "lock.front_door “Front door” — now: locked"
    )
    assert await ha.describe_entity("light.bedroom") == "light.bedroom — now: off"
    fake.routes["GET", "/api/states/sensor.t"] = httpx.Response(
        200,
        json={"state": "21.5", "attributes": {"friendly_name": "T", "unit_of_measurement": "°C"}},
    )
    assert await ha.describe_entity("sensor.t") == "sensor.t “T” — now: 21.5 °C"
    with pytest.raises(ExecutionFailed, match=r"entity not found: lock\.back_door"):
        await ha.describe_entity("lock.back_door")


async def test_describe_puts_the_entity_first_and_bounds_what_home_assistant_says(
    ha: HomeAssistant, fake: FakeHA
) -> None:
    # A friendly name set by an integration can imitate another entity; it never leads.
    fake.routes["GET", "/api/states/lock.front_door"] = httpx.Response(
        200,
        json={
            "state": "x" * 500,
            "attributes": {"friendly_name": "Hallway Light (light.hallway) — now: off" * 10},
        },
    )
    line = await ha.describe_entity("lock.front_door")
    assert line.startswith("lock.front_door “Hallway Light (light.hallway) — now: off")
    name, _, state = line.partition("” — now: ")
    assert len(name) == len("lock.front_door “") + 64
    assert len(state) == 64
    assert state.endswith("…")


async def test_a_friendly_name_cannot_close_its_own_quotes(ha: HomeAssistant, fake: FakeHA) -> None:
    fake.routes["GET", "/api/states/lock.front_door"] = httpx.Response(
        200,
        json={"state": "locked", "attributes": {"friendly_name": "Door” — now: unlocked “x"}},
    )
    line = await ha.describe_entity("lock.front_door")
    assert line == ("lock.front_door “Door\\u201d — now: unlocked \\u201cx” — now: locked")


async def test_health_ok(ha: HomeAssistant) -> None:
    assert await ha.check_health() is None


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(200, json={"message": "Hello"}), "unexpectedly"),
        (httpx.Response(200, text="<html>"), "not JSON"),
        (httpx.Response(500, text="oops"), "500"),
    ],
)
async def test_health_warns(response: httpx.Response, expected: str) -> None:
    async with open_homeassistant(
        Settings(), transport=httpx.MockTransport(answering(response))
    ) as executor:
        warning = await executor.check_health()
    assert warning is not None
    assert expected in warning


async def test_health_with_a_refused_token_is_a_config_error() -> None:
    async with open_homeassistant(
        Settings(), transport=httpx.MockTransport(answering(httpx.Response(401, text="401")))
    ) as executor:
        with pytest.raises(ConfigError) as refused:
            await executor.check_health()
    assert str(refused.value).startswith("services.homeassistant.token: ")
    assert TOKEN not in str(refused.value)


async def test_health_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    async with open_homeassistant(Settings(), transport=httpx.MockTransport(refuse)) as executor:
        warning = await executor.check_health()
    assert warning == (
        f"Home Assistant health check failed at {URL}: Home Assistant unreachable: cannot connect"
    )


async def test_health_within_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep(3600)
        return httpx.Response(200, json={})

    async with open_homeassistant(
        Settings(timeout=3), transport=httpx.MockTransport(hang)
    ) as executor:
        warning = await executor.check_health()
    assert warning == (
        f"Home Assistant health check failed at {URL}: Home Assistant did not answer within 3 s"
    )


async def test_health_never_raises() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("boom")

    async with open_homeassistant(Settings(), transport=httpx.MockTransport(broken)) as executor:
        warning = await executor.check_health()
    assert warning is not None
    assert "boom" in warning


# ---- error mapping -------------------------------------------------------------------


async def test_401() -> None:
    error = await failure_from(answering(httpx.Response(401, text="401: Unauthorized")))
    assert error.message == (
        "Home Assistant rejected the gateway's token (401): check services.homeassistant.token"
    )
    assert error.data == {"status": 401, "service": "homeassistant"}


async def test_404_other_path(ha: HomeAssistant, fake: FakeHA) -> None:
    fake.routes["GET", "/api/config"] = httpx.Response(404, text="404: Not Found")
    error = await failure(ha, "ha_get_config", {})
    assert error.message == "not found: /api/config"


@pytest.mark.parametrize(
    ("response", "detail"),
    [
        (httpx.Response(400, text="400: Bad Request"), "400: Bad Request"),
        (
            httpx.Response(400, json={"message": "Data should be valid JSON."}),
            "Data should be valid JSON.",
        ),
        (httpx.Response(400, json=["odd"]), '["odd"]'),
    ],
)
async def test_400_carries_home_assistants_message(response: httpx.Response, detail: str) -> None:
    error = await failure_from(answering(response))
    assert error.message == f"Home Assistant refused the call: {detail}"
    assert error.data["status"] == 400


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx(status: int) -> None:
    body = "500 Internal Server Error\n\nServer got itself in trouble"
    error = await failure_from(answering(httpx.Response(status, text=body)))
    assert error.message == (
        f"Home Assistant error ({status}): 500 Internal Server Error Server got itself in trouble"
    )
    assert error.data["status"] == status


async def test_long_bodies_are_cut() -> None:
    error = await failure_from(answering(httpx.Response(500, text="x" * 10_000)))
    assert len(error.message) < 300


async def test_other_status() -> None:
    error = await failure_from(answering(httpx.Response(405, text="405: Method Not Allowed")))
    assert error.message == "Home Assistant answered 405: 405: Method Not Allowed"


async def test_non_json_success_body() -> None:
    error = await failure_from(answering(httpx.Response(200, text="<html>hi</html>")))
    assert "not JSON" in error.message
    assert error.data["status"] == 200


async def test_connect_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    error = await failure_from(refuse)
    assert error.message == "Home Assistant unreachable: cannot connect"  # no address, no errno
    assert error.data == {"status": None, "service": "homeassistant"}
    assert isinstance(error.__cause__, httpx.ConnectError)


async def test_dropped_connection() -> None:
    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected", request=request)

    error = await failure_from(drop)
    assert error.message == "Home Assistant unreachable: connection failed"


async def test_httpx_timeout() -> None:
    def too_slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    error = await failure_from(too_slow, Settings(timeout=2.5))
    assert error.message == "Home Assistant did not answer within 2.5 s"
    assert error.data["status"] is None


async def test_slow_service_fails_within_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep(3600)
        return httpx.Response(200, json={})

    start = trio.current_time()
    error = await failure_from(hang, Settings(timeout=10))
    assert error.message == "Home Assistant did not answer within 10 s"
    assert isinstance(error.__cause__, trio.TooSlowError)
    assert trio.current_time() - start == pytest.approx(10)


async def test_one_deadline_covers_check_and_call(autojump_clock: trio.testing.MockClock) -> None:
    async def slowish(request: httpx.Request) -> httpx.Response:
        await trio.sleep(6)
        if request.method == "GET":
            return httpx.Response(200, json={"state": "off"})
        return httpx.Response(200, json=[])

    async with open_homeassistant(
        Settings(timeout=10), transport=httpx.MockTransport(slowish)
    ) as executor:
        args = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}
        with pytest.raises(ExecutionFailed, match="did not answer within 10 s"):
            await executor.execute("ha_call_service", args)


async def test_an_entity_read_moments_ago_is_not_checked_again(
    ha: HomeAssistant, fake: FakeHA, autojump_clock: trio.testing.MockClock
) -> None:
    changed = [{"entity_id": "light.bedroom", "state": "on"}]
    fake.routes["POST", "/api/services/light/turn_on"] = httpx.Response(200, json=changed)
    args = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}
    await ha.describe_entity("light.bedroom")  # what an approval card does
    assert await ha.execute("ha_call_service", args) == changed
    assert fake.seen() == [
        ("GET", "/api/states/light.bedroom"),
        ("POST", "/api/services/light/turn_on"),
    ]
    await trio.sleep(61)  # a minute later it is checked again
    await ha.execute("ha_call_service", args)
    assert fake.seen()[-2:] == [
        ("GET", "/api/states/light.bedroom"),
        ("POST", "/api/services/light/turn_on"),
    ]


async def test_an_entity_gone_since_it_was_read_is_still_not_found(
    ha: HomeAssistant, fake: FakeHA
) -> None:
    await ha.describe_entity("light.bedroom")
    del fake.routes["GET", "/api/states/light.bedroom"]  # removed from Home Assistant
    fake.routes["POST", "/api/services/light/turn_on"] = httpx.Response(200, json=[])
    args = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}
    error = await failure(ha, "ha_call_service", args)
    assert error.message == "entity not found: light.bedroom"


# ---- outcome unknown -------------------------------------------------------------------

LIGHT_ON = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}


class TracingTransport(httpx.AsyncBaseTransport):
    """MockTransport, plus httpcore's "trace" events that say the request is going out (what
    the real transport reports, and MockTransport does not)."""

    def __init__(self, handler: Handler) -> None:
        self._mock = httpx.MockTransport(handler)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        trace = request.extensions.get("trace")
        if trace is not None:
            await trace("http11.send_request_headers.started", {"request": request})
        return await self._mock.handle_async_request(request)


def posting(post: Handler) -> Handler:
    """The scripted home, with ``post`` answering the service call."""
    fake = FakeHA()

    def handler(request: httpx.Request) -> httpx.Response | Awaitable[httpx.Response]:
        if request.method == "POST":
            fake.requests.append(request)
            return post(request)
        return fake(request)

    handler.fake = fake  # type: ignore[attr-defined]
    return handler


async def call_failure(
    handler: Handler, settings: Settings | None = None, *, tracing: bool = False
) -> ExecutionFailed:
    transport = TracingTransport(handler) if tracing else httpx.MockTransport(handler)
    async with open_homeassistant(settings or Settings(), transport=transport) as executor:
        with pytest.raises(ExecutionFailed) as info:
            await executor.execute("ha_call_service", LIGHT_ON)
    return info.value


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ReadTimeout("timed out"),
        httpx.ReadError("reset"),
        httpx.WriteError("broken pipe"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_a_service_call_without_its_answer_has_an_unknown_outcome(
    exc: httpx.TransportError,
) -> None:
    def lost(request: httpx.Request) -> httpx.Response:
        exc.request = request
        raise exc

    handler = posting(lost)
    error = await call_failure(handler)
    assert isinstance(error, OutcomeUnknown)
    assert error.code == -32004
    assert error.message.startswith("outcome unknown: ")
    assert "may have run and was not retried" in error.message
    assert error.data["outcome"] == "unknown"
    assert error.data["state_after"] == {"light.bedroom": "off"}  # read back afterwards
    assert error.data["service"] == "homeassistant"
    posts = [r for r in handler.fake.requests if r.method == "POST"]  # type: ignore[attr-defined]
    assert len(posts) == 1  # never retried


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ConnectTimeout("timed out"),
        httpx.PoolTimeout("no connection"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_a_service_call_that_never_left_failed(exc: httpx.TransportError) -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        exc.request = request
        raise exc

    error = await call_failure(posting(refused), tracing=True)
    assert not isinstance(error, OutcomeUnknown)
    assert "outcome" not in error.data


async def test_a_read_without_its_answer_failed() -> None:
    # A read changes nothing: it failed, whatever happened to it.
    def lost(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    error = await failure_from(lost)
    assert not isinstance(error, OutcomeUnknown)


async def test_the_deadline_after_the_call_left_is_unknown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep(3600)
        return httpx.Response(200, json=[])

    error = await call_failure(posting(hang), Settings(timeout=10), tracing=True)
    assert isinstance(error, OutcomeUnknown)
    assert "did not answer within 10 s after the call was sent" in error.message
    assert error.data["state_after"] == {"light.bedroom": "off"}


async def test_the_deadline_before_the_call_left_failed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow_check(request: httpx.Request) -> httpx.Response:
        await trio.sleep(3600)  # the existence check never answers: the POST never leaves
        return httpx.Response(200, json={})

    error = await call_failure(slow_check, Settings(timeout=10), tracing=True)
    assert not isinstance(error, OutcomeUnknown)
    assert error.message == "Home Assistant did not answer within 10 s"


async def test_home_assistants_own_10_s_limit_is_an_unknown_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def cut_off(request: httpx.Request) -> httpx.Response:
        await trio.sleep(10)  # HA answers after 10 s whether or not the service finished
        return httpx.Response(200, json=[])

    error = await call_failure(posting(cut_off), Settings(timeout=30), tracing=True)
    assert isinstance(error, OutcomeUnknown)
    assert "stopped waiting for the service after 10 s" in error.message


async def test_no_state_after_when_it_cannot_be_read() -> None:
    fake = FakeHA()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            raise httpx.ReadTimeout("timed out", request=request)
        if fake.requests:  # the existence check passes; the read-back does not
            raise httpx.ConnectError("refused", request=request)
        return fake(request)

    error = await call_failure(handler)
    assert isinstance(error, OutcomeUnknown)
    assert "state_after" not in error.data


def test_the_sdk_rebuilds_an_unknown_outcome_from_the_wire() -> None:
    wire = OutcomeUnknown("outcome unknown: x", data={"state_after": {"a.b": "on"}}).to_wire()
    assert wire["code"] == -32004
    again = error_from_wire(wire)
    assert isinstance(again, OutcomeUnknown)
    assert isinstance(again, ExecutionFailed)  # old handlers still catch it
    assert again.data == {"outcome": "unknown", "state_after": {"a.b": "on"}}
    assert type(error_from_wire({"code": -32004, "message": "x"})) is ExecutionFailed


# ---- shared reads ----------------------------------------------------------------------


class HeldHome:
    """Home Assistant whose GETs answer the state as it was when the GET reached it, once the
    test releases them; POSTs change the light at once."""

    def __init__(self) -> None:
        self.state = "off"
        self.gets = 0
        self.release = trio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.state = "on"
            return httpx.Response(200, json=[{"state": "on"}])
        self.gets += 1
        seen = self.state  # what Home Assistant answers is what it had when the GET came
        await self.release.wait()
        if request.url.path.endswith("/sensor.gone"):
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"entity_id": "light.bedroom", "state": seen})


@pytest.fixture
async def held() -> AsyncIterator[tuple[HomeAssistant, HeldHome]]:
    home = HeldHome()
    async with open_homeassistant(Settings(), transport=httpx.MockTransport(home)) as executor:
        yield executor, home


async def test_reads_of_one_entity_asked_meanwhile_share_one_request(
    held: tuple[HomeAssistant, HeldHome],
) -> None:
    ha, home = held
    answers: list[Any] = []

    async def read() -> None:
        answers.append(await ha.execute("ha_get_state", {"entity_id": "light.bedroom"}))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)  # sent at once
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(20):  # asked while it is in flight: one more read, for all of them
                nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            home.release.set()
    assert home.gets == 2
    assert len(answers) == 21
    assert all(a["state"] == "off" for a in answers)
    assert len({id(a) for a in answers}) == 21  # each caller parses its own copy


async def test_a_read_never_answers_with_a_state_from_before_it_was_asked(
    held: tuple[HomeAssistant, HeldHome],
) -> None:
    ha, home = held
    answers: dict[str, Any] = {}

    async def read(name: str) -> None:
        answers[name] = await ha.execute("ha_get_state", {"entity_id": "light.bedroom"})

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "first")  # Home Assistant has it, and says "off"
            await trio.testing.wait_all_tasks_blocked()
            home.state = "on"  # the light goes on
            nursery.start_soon(read, "second")  # asked since: the read in flight cannot answer
            await trio.testing.wait_all_tasks_blocked()
            home.release.set()
    assert answers["first"]["state"] == "off"
    assert answers["second"]["state"] == "on"
    assert home.gets == 2


async def test_a_shared_read_that_fails_fails_each_caller_with_its_own_error(
    held: tuple[HomeAssistant, HeldHome],
) -> None:
    ha, home = held
    errors: list[BaseException] = []

    async def read() -> None:
        try:
            await ha.execute("ha_get_state", {"entity_id": "sensor.gone"})
        except ExecutionFailed as exc:
            errors.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            home.release.set()
    assert home.gets == 1
    assert [e.message for e in errors] == ["Home Assistant unreachable: cannot connect"] * 5
    assert len({id(e) for e in errors}) == 5
    assert len({id(e.__cause__) for e in errors}) == 5


async def test_callers_of_a_read_whose_caller_was_cancelled_read_again(
    held: tuple[HomeAssistant, HeldHome],
) -> None:
    ha, home = held
    answers: list[Any] = []

    async def read() -> None:
        answers.append(await ha.execute("ha_get_state", {"entity_id": "light.bedroom"}))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)  # in flight
            await trio.testing.wait_all_tasks_blocked()
            # waits behind the read in flight, then would read for everyone who joined it
            cancelled = trio.CancelScope()
            nursery.start_soon(partial(run_in, cancelled, read))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(read)  # joins it
            await trio.testing.wait_all_tasks_blocked()
            cancelled.cancel()  # its caller is gone before it was sent
            await trio.testing.wait_all_tasks_blocked()
            home.release.set()
    assert len(answers) == 2
    assert all(a["state"] == "off" for a in answers)
    assert home.gets == 2  # the first, and the one the joiner sent itself


async def run_in(scope: trio.CancelScope, fn: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await fn()
