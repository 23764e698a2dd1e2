"""Real tier: the fake Home Assistant over real sockets, held to real HA's answers.

The contract modules (``tests/realha/contract.py``: the REST API and the executor;
``tests/realha/gateway_contract.py``: the whole gateway) run here against the fake and under
``make test-ha`` against a real 2025.4.4 core, with the same assertions. What follows them is
only what a real core cannot show: the fake's switches (slow, failing, down) and its call log.
"""

from __future__ import annotations

import http.client
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio
from attrs import frozen

from agentgate.errors import ExecutionFailed
from agentgate.services.homeassistant import LIMITS, HomeAssistant, open_homeassistant
from agentgate.testing.fake_homeassistant import FakeHomeAssistant, run_fake_homeassistant
from tests.realha.contract import *  # noqa: F403 - the shared tests and their fixtures
from tests.realha.contract import CEILING, Home
from tests.realha.contract_wider import *  # noqa: F403 - templates, areas, logbook, data
from tests.realha.gateway_contract import *  # noqa: F403

pytestmark = pytest.mark.slow

TOKEN = "fake-ha-token"


@pytest.fixture
def ha_home() -> Iterator[Home]:
    """The contract's home: a fresh fake, its locks slow enough to show ``locking``."""
    with FakeHomeAssistant(token=TOKEN) as fake:
        fake.lock_delay = 0.05
        yield Home(
            url=fake.url,
            token=fake.token,
            real=False,
            light="light.bedroom",
            switchable="switch.coffee_maker",
            lock="lock.front_door",
            openable_lock="lock.back_door",
            climate="climate.living_room",
        )


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
async def fake_ha(fake: FakeHomeAssistant) -> AsyncIterator[HomeAssistant]:
    with trio.fail_after(CEILING):
        async with open_homeassistant(Settings(fake.url)) as executor:
            yield executor


async def run(ha: HomeAssistant, tool: str, **args: Any) -> Any:
    with trio.fail_after(CEILING):
        return await ha.execute(tool, args)


async def refused(ha: HomeAssistant, tool: str, **args: Any) -> ExecutionFailed:
    with trio.fail_after(CEILING), pytest.raises(ExecutionFailed) as info:
        await ha.execute(tool, args)
    assert info.value.data["service"] == "homeassistant"
    return info.value


def posts(fake: FakeHomeAssistant) -> list[tuple[str, str, Any]]:
    return [call for call in fake.calls if call[0] == "POST"]


# ---- what only the fake can show -----------------------------------------------------


async def test_a_call_is_logged_and_changes_the_home(
    fake_ha: HomeAssistant, fake: FakeHomeAssistant
) -> None:
    changed = await run(
        fake_ha,
        "ha_call_service",
        domain="light",
        service="turn_on",
        entity_id="light.bedroom",
        brightness=77,
    )
    assert [(s["entity_id"], s["state"]) for s in changed] == [("light.bedroom", "on")]
    assert changed[0]["context"]["user_id"] == fake.user_id
    state = fake.state("light.bedroom")
    assert state is not None
    assert state["attributes"]["brightness"] == 77
    assert posts(fake) == [
        ("POST", "/api/services/light/turn_on", {"entity_id": "light.bedroom", "brightness": 77})
    ]


async def test_events_are_recorded(fake_ha: HomeAssistant, fake: FakeHomeAssistant) -> None:
    await run(fake_ha, "ha_fire_event", event_type="doorbell", event_data={"n": 1})
    await run(fake_ha, "ha_fire_event", event_type="doorbell")
    assert fake.events == [("doorbell", {"n": 1}), ("doorbell", {})]


async def test_unknown_entity_is_reported_and_nothing_is_called(
    fake_ha: HomeAssistant, fake: FakeHomeAssistant
) -> None:
    error = await refused(
        fake_ha, "ha_call_service", domain="light", service="turn_on", entity_id="light.attic"
    )
    assert error.message == "entity not found: light.attic"
    assert posts(fake) == []


async def test_lock_stays_locking_for_the_delay(fake: FakeHomeAssistant) -> None:
    fake.lock_delay = 5
    with trio.fail_after(CEILING):
        async with open_homeassistant(Settings(fake.url)) as executor, trio.open_nursery() as n:
            args = {"domain": "lock", "service": "unlock", "entity_id": "lock.front_door"}
            n.start_soon(executor.execute, "ha_call_service", args)
            await fake.wait_for_state("lock.front_door", "unlocking")
            n.cancel_scope.cancel()


async def test_history_keeps_only_state_changes(
    fake_ha: HomeAssistant, fake: FakeHomeAssistant
) -> None:
    for brightness in (10, 20, 30):  # attribute changes: not in history (significant only)
        fake.set_state("light.kitchen", "on", {"brightness": brightness})
    fake.set_state("light.kitchen", "off")
    history = await run(fake_ha, "ha_get_history", entity_id="light.kitchen", hours=1)
    assert [s["state"] for s in history[0]] == ["off", "on", "off"]


async def test_server_error(fake_ha: HomeAssistant, fake: FakeHomeAssistant) -> None:
    fake.fail_with = 500
    error = await refused(fake_ha, "ha_get_config")
    assert error.message.startswith("Home Assistant error (500): 500 Internal Server Error")
    error = await refused(fake_ha, "ha_call_service", domain="homeassistant", service="turn_on")
    assert error.message.startswith("Home Assistant failed to run the service (500): ")


async def test_slow_past_the_deadline(fake: FakeHomeAssistant) -> None:
    fake.slow = 5
    with trio.fail_after(CEILING):
        async with open_homeassistant(Settings(fake.url, timeout=0.5)) as executor:
            with trio.fail_after(4):  # a ceiling well before the fake would have answered
                error = await refused(executor, "ha_get_state", entity_id="light.bedroom")
    assert error.message == "Home Assistant did not answer within 0.5 s"


async def test_down_and_up(fake_ha: HomeAssistant, fake: FakeHomeAssistant) -> None:
    await run(fake_ha, "ha_get_config")  # leaves a keep-alive connection in the pool
    fake.down()
    error = await refused(fake_ha, "ha_get_config")
    assert error.message.startswith("Home Assistant unreachable: ")
    assert error.data["status"] is None
    with trio.fail_after(CEILING):
        warning = await fake_ha.check_health()
    assert warning is not None
    assert "unreachable" in warning
    fake.up()
    assert (await run(fake_ha, "ha_get_config"))["state"] == "RUNNING"


async def test_every_answer_gives_its_connection_back(fake: FakeHomeAssistant) -> None:
    # Three times the pool's connections, one after the other, answers and refusals alike:
    # each body is read and closed, or the pool would run dry and the calls time out.
    with trio.fail_after(CEILING):
        async with open_homeassistant(Settings(fake.url, timeout=2)) as executor:
            for i in range(3 * (LIMITS.max_connections or 10)):
                if i % 2:
                    await run(executor, "ha_get_state", entity_id="light.bedroom")
                else:
                    await refused(executor, "ha_get_state", entity_id=f"light.none_{i}")


async def _proxy(
    seen: list[bytes], *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A forward proxy in one line: it records each request's head and answers it itself."""

    async def serve(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            head += chunk
        seen.append(head)
        body = b'{"entity_id": "light.bedroom", "state": "on"}'
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(serve, listeners)


async def test_a_proxy_named_by_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # As with an httpx.AsyncClient: HTTP_PROXY (and its kin) carry the calls, NO_PROXY exempts.
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    seen: list[bytes] = []
    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_proxy, seen)
            monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
            async with open_homeassistant(Settings("http://ha.invalid:8123")) as executor:
                state = await run(executor, "ha_get_state", entity_id="light.bedroom")
            assert state["state"] == "on"
            assert seen[0].startswith(
                b"GET http://ha.invalid:8123/api/states/light.bedroom HTTP/1.1\r\n"
            )
            assert f"Authorization: Bearer {TOKEN}".encode() in seen[0]
            monkeypatch.setenv("NO_PROXY", "ha.invalid")
            async with open_homeassistant(Settings("http://ha.invalid:8123")) as executor:
                error = await refused(executor, "ha_get_state", entity_id="light.bedroom")
            assert error.message == "Home Assistant unreachable: cannot connect"
            assert len(seen) == 1
            nursery.cancel_scope.cancel()


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
