"""Faults behind the gateway, over real sockets: a broken home, a broken store, no guardian.

Every fault becomes -32004 with a clear message, promptly (never a hang), and nothing executes
that could not be recorded first.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from agentgate.config import ConfigError
from agentgate.guardian import Status
from agentgate.store import Store
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import RawAgent, raw_agent, running_gateway

pytestmark = pytest.mark.slow

CEILING = 20
READ = {"entity_id": "sensor.living_room_temperature"}
LIGHT_ON = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}


def state(home: FakeHomeAssistant, entity_id: str) -> str:
    found = home.state(entity_id)
    assert found is not None, entity_id
    return str(found["state"])


def posts(home: FakeHomeAssistant) -> list[tuple[str, str, Any]]:
    return [call for call in home.calls if call[0] == "POST"]


async def assert_execution_failed(agent: RawAgent, contains: str, **args: Any) -> dict[str, Any]:
    reply = await agent.tool("ha_get_state", **(args or READ))
    error = reply["error"]
    assert error["code"] == -32004, reply
    assert contains in error["message"], error["message"]
    assert error["data"]["request_id"]
    assert error["data"]["signature"].startswith("ha_get_state(")
    return error  # type: ignore[no-any-return]


async def test_home_down_is_unreachable(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            home.down()
            error = await assert_execution_failed(agent, "unreachable")
            assert home.url.split("//")[1] not in json.dumps(error)  # no internal address
            rows = await gw.gateway.store.audit_rows(agent="pi")
            row = next(r for r in rows if r.request_id == error["data"]["request_id"])
            assert (row.decision, row.resolution) == ("allow", "failed")
            assert row.error is not None
            assert "unreachable" in row.error
            home.up()
            ok = await agent.tool("ha_get_state", **READ)
            assert ok["result"]["status"] == "executed"


async def test_home_down_after_an_approval_fails_closed(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            await agent.send(
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "tool_request",
                    "params": {"tool": "ha_call_service", "args": LIGHT_ON},
                }
            )
            card = (await gw.scripted.wait_for_card()).card
            home.down()
            await gw.scripted.press(card.request_id, "allow")
            reply = await agent.recv()
            assert reply["error"]["code"] == -32004
            assert "unreachable" in reply["error"]["message"]
            assert reply["error"]["data"]["request_id"] == card.request_id
            assert (await gw.scripted.wait_for_update(card.request_id)).status is Status.FAILED
            assert posts(home) == []


async def test_slow_home_hits_the_deadline(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with (
            running_gateway(workdir, home=home, ha_timeout=0.5) as gw,
            raw_agent(gw) as agent,
            raw_agent(gw, "laptop") as laptop,
        ):
            home.slow = 2
            async with trio.open_nursery() as nursery:
                # A slow request does not hold up the next one on the same connection.
                nursery.start_soon(assert_execution_failed, agent, "did not answer within 0.5 s")
                listed = await laptop.call("list_tools")
                assert "tools" in listed["result"]
            home.slow = 0
            ok = await agent.tool("ha_get_state", **READ)
            assert ok["result"]["status"] == "executed"


async def test_home_rejecting_the_gateway_token_at_start_up(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    wrong = SimpleNamespace(url=home.url, token="not-the-home-token")
    with trio.fail_after(CEILING), pytest.raises(ConfigError) as refused:
        async with running_gateway(workdir, home=wrong):
            pytest.fail("the gateway started with a token Home Assistant refuses")
    message = str(refused.value)
    assert message.startswith(f"{workdir / 'gate.toml'}: services.homeassistant.token: ")
    assert "401" in message
    assert "not-the-home-token" not in message


async def test_home_rejecting_the_gateway_token_later(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            home.token = "rotated-in-home-assistant"  # the gateway's token was revoked
            error = await assert_execution_failed(agent, "401")
            assert "token" in error["message"]
            assert error["data"]["status"] == 401


async def test_unknown_entity_is_not_found(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            error = await assert_execution_failed(
                agent, "entity not found: sensor.nowhere", entity_id="sensor.nowhere"
            )
            assert error["data"]["status"] == 404


async def test_home_server_error(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            home.fail_with = 500
            error = await assert_execution_failed(agent, "Home Assistant error (500)")
            assert error["data"]["status"] == 500


class _DyingDisk:
    """A sqlite3 connection whose every statement fails like a dying disk."""

    def __init__(self, conn: sqlite3.Connection, failures: list[int]) -> None:
        self._conn = conn
        self._failures = failures

    def execute(self, *args: Any) -> Any:
        self._failures[0] += 1
        raise sqlite3.OperationalError("disk I/O error")

    def close(self) -> None:
        self._conn.close()


class _FailingCommit:
    """A sqlite3 connection whose ``COMMIT`` fails like a full or dying disk; every other
    statement runs (so each write gets as far as its last step)."""

    def __init__(self, conn: sqlite3.Connection, failures: list[int]) -> None:
        self._conn = conn
        self._failures = failures

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.strip().upper() == "COMMIT":
            self._failures[0] += 1
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _break_the_store(monkeypatch: pytest.MonkeyPatch, store: Store, how: str) -> list[int]:
    """Make every write of ``store`` fail with "disk I/O error"; returns a failure counter.

    ``batch``: the store's batch runner itself raises (as an unexpected error would);
    ``statements``: every SQL statement fails inside the batch runner; ``commit``: only the
    ``COMMIT`` fails.
    """
    failures = [0]

    def run_batch(batch: list[Any], **kw: Any) -> None:
        failures[0] += 1
        raise sqlite3.OperationalError("disk I/O error")

    if how == "batch":
        monkeypatch.setattr(store, "_run_batch", run_batch)
    elif how == "commit":
        monkeypatch.setattr(store, "_conn", _FailingCommit(store._conn, failures))
    else:
        monkeypatch.setattr(store, "_conn", _DyingDisk(store._conn, failures))
    return failures


BREAKAGES = pytest.mark.parametrize("how", ["batch", "statements", "commit"])


@BREAKAGES
async def test_unwritable_store_executes_nothing(
    workdir: Path, home: FakeHomeAssistant, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            failures = _break_the_store(monkeypatch, gw.gateway.store, how)
            calls = list(home.calls)

            # An allowed read: the decision cannot be recorded, so it never reaches the home.
            read = await agent.tool("ha_get_state", **READ)
            assert read["error"]["code"] == -32004
            assert "audit log unavailable" in read["error"]["message"]
            assert "disk I/O error" in read["error"]["message"]

            # An ask: no card is shown, nothing executes.
            ask = await agent.tool("ha_call_service", **LIGHT_ON)
            assert ask["error"]["code"] == -32004
            assert "audit log unavailable" in ask["error"]["message"]
            assert gw.scripted.cards == {}

            assert home.calls == calls
            assert failures[0] >= 2
            assert state(home, "light.bedroom") == "off"

            # The gateway itself is still up and answers what needs no store.
            listed = await agent.call("list_tools")
            assert "tools" in listed["result"]


ALLOW_LIGHTS = """\
rules:
  - pattern: "ha_call_service(light.*)"
    action: allow
"""


@BREAKAGES
async def test_unwritable_store_blocks_an_allowed_service_call(
    workdir: Path, home: FakeHomeAssistant, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    with trio.fail_after(CEILING):
        async with (
            running_gateway(workdir, home=home, agent_policies={"laptop": ALLOW_LIGHTS}) as gw,
            raw_agent(gw, "laptop") as laptop,
        ):
            _break_the_store(monkeypatch, gw.gateway.store, how)
            calls = list(home.calls)
            reply = await laptop.tool("ha_call_service", **LIGHT_ON)
            assert reply["error"]["code"] == -32004
            assert "nothing was executed" in reply["error"]["message"]
            assert home.calls == calls
            assert state(home, "light.bedroom") == "off"
            monkeypatch.undo()
            ok = await laptop.tool("ha_call_service", **LIGHT_ON)
            assert ok["result"]["status"] == "executed"
            assert state(home, "light.bedroom") == "on"


@BREAKAGES
async def test_unwritable_store_blocks_an_approved_call(
    workdir: Path, home: FakeHomeAssistant, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # The approval's move to "executing" is the row that precedes execution: if it cannot be
    # committed, the guardian's Allow sends nothing to the home, reads included. Its outcome
    # (failed) is told once it is recorded, never before: the store would otherwise still hold
    # the approval open.
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            await agent.send(
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "tool_request",
                    "params": {"tool": "ha_call_service", "args": LIGHT_ON},
                }
            )
            card = (await gw.scripted.wait_for_card()).card
            store = gw.gateway.store
            recording, finish_pending = trio.Event(), store.finish_pending

            async def recorded(*args: Any, **kwargs: Any) -> bool:
                recording.set()
                return await finish_pending(*args, **kwargs)

            monkeypatch.setattr(store, "finish_pending", recorded)
            _break_the_store(monkeypatch, store, how)
            calls = list(home.calls)
            await gw.scripted.press(card.request_id, "allow")
            await recording.wait()  # executing refused: the outcome waits to be recorded
            assert home.calls == calls  # not even the read of what an Undo would put back
            monkeypatch.undo()  # the disk is back
            reply = await agent.recv()
            assert reply["error"]["code"] == -32004, reply
            assert "nothing was executed" in reply["error"]["message"]
            await gw.settled()
            assert [r.resolution for r in await store.audit_rows()] == ["failed"]
            assert posts(home) == []
            assert state(home, "light.bedroom") == "off"


@pytest.mark.parametrize("lost", ["hang_up", "late"])
async def test_a_call_whose_answer_is_lost_has_an_unknown_outcome(
    workdir: Path, home: FakeHomeAssistant, lost: str
) -> None:
    # The home runs the call, then drops the connection (or answers after the gateway's
    # deadline): it did run, so "failed" would be a lie that invites a retry.
    with trio.fail_after(CEILING):
        async with (
            running_gateway(
                workdir, home=home, ha_timeout=1, agent_policies={"laptop": ALLOW_LIGHTS}
            ) as gw,
            raw_agent(gw, "laptop") as laptop,
        ):
            if lost == "hang_up":
                home.hang_up = True
            else:
                home.answer_delay = 3
            reply = await laptop.tool("ha_call_service", **LIGHT_ON)
            error = reply["error"]
            assert error["code"] == -32004, reply
            assert error["message"].startswith("outcome unknown: "), error
            assert error["data"]["outcome"] == "unknown"
            assert error["data"]["state_after"] == {"light.bedroom": "on"}
            home.hang_up, home.answer_delay = False, 0
            rows = await gw.gateway.store.audit_rows(agent="laptop")  # after the queued writes
            assert [r.resolution for r in rows] == ["unknown"]
            assert len(posts(home)) == 1  # never retried
            assert state(home, "light.bedroom") == "on"


async def test_unavailable_guardian_fails_the_ask_closed(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw) as agent:
            gw.scripted.unavailable = True
            reply = await agent.tool("ha_call_service", **LIGHT_ON)
            error = reply["error"]
            assert error["code"] == -32004
            assert "guardian" in error["message"]
            assert error["data"]["signature"] == "ha_call_service(light.turn_on, light.bedroom)"
            assert gw.scripted.cards == {}
            assert posts(home) == []
            assert state(home, "light.bedroom") == "off"
            await gw.settled()
            rows = await gw.gateway.store.audit_rows(agent="pi", decision="ask")
            assert [(r.request_id, r.resolution) for r in rows] == [
                (error["data"]["request_id"], "failed")
            ]
            assert gw.gateway.broker.waiting("pi") == 0
            # Reads that need no human still work.
            ok = await agent.tool("ha_get_state", **READ)
            assert ok["result"]["status"] == "executed"
