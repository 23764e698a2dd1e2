"""What the whole-pipeline state machine (``test_pipeline_state_machine.py``) found, each case
reduced to a focused test on the fast tier (memory streams, MockTransport, ``autojump_clock``).

All are fixed (the outcome is recorded, queued, before it is told; a result leaves the queue
only once a connection's writer wrote its frame), and the state machine checks every property
with no exemption. What each test pinned:

1. An outcome the store could not record (its COMMIT failed) was still told to the agent and
   shown on the card, but the approval stayed ``pending`` in the store with no task behind
   it: a restart resumed it, so it was decided a second time — a call the agent was told was
   denied could then run. The same without any disk error: the agent was told first and the
   outcome recorded once its frame went out; a crash in between left the approval open.
2. A late result handed to a connection's outbox was recorded as delivered even if the
   connection's writer never wrote it (the gateway stopped with the frame in the outbox, or
   the connection dropped before the writer's requeue could see the outcome): the result was
   neither on the wire nor in the agent's queue.
3. A result whose frame could not be written went back to the agent's queue — unless that
   write failed (a disk error at that moment): it was only logged, and the result lost.
4. (found while fixing 1-3) With a result queued before it is told, a listing made while its
   answer is on its way must skip it, and an answer written just before a crash is listed
   again after it: the SDK drops that repeat (``test_client_core.py``).
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from trio_websocket import WebSocketConnection, wrap_client_stream, wrap_server_stream

from agentgate.gateway import SHUTDOWN_BOUND
from agentgate.testing.harness import DEFAULT_TOKENS
from tests.fastgate import FastGateway, MockHome, authed, call, fast_gateway, reply
from tests.test_pipeline_state_machine import Valve

LIGHT_ON = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}


class FailingCommits:
    """The store's connection, whose next ``count`` COMMITs fail (a disk error at the end of a
    transaction); every other statement runs for real."""

    def __init__(self, conn: sqlite3.Connection, count: int = 1) -> None:
        self._conn = conn
        self.count = count

    def execute(self, sql: str, *args: Any) -> Any:
        if self.count and sql.strip().upper() == "COMMIT":
            self.count -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def ask_frame(rpc_id: int) -> str:
    params = {"tool": "ha_call_service", "args": LIGHT_ON}
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": "tool_request", "params": params})


def stored(workdir: Path, request_id: str) -> tuple[str, str | None, int]:
    with sqlite3.connect(f"file:{workdir / 'agentgate.db'}?mode=ro", uri=True) as db:
        row = db.execute(
            "SELECT state, outcome, delivered FROM pending_requests WHERE request_id = ?",
            (request_id,),
        ).fetchone()
    db.close()
    return row[0], row[1], row[2]


async def test_an_outcome_the_store_could_not_record_is_recorded_once_it_can(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        await ws.send_message(ask_frame(1))
        shown = await fg.guardian.wait_for_card()
        request_id = shown.card.request_id
        store = fg.gateway.store
        healthy = store._conn
        store._conn = FailingCommits(healthy)  # type: ignore[assignment]
        assert await fg.guardian.press(request_id, "deny") == "denied"
        answer = await reply(ws)
        store._conn = healthy  # the disk is back
        assert answer["error"]["code"] == -32001  # the agent heard "denied"
        await trio.sleep(60)
        # What the agent heard is what the store says (it said "pending", forever).
        assert stored(tmp_path, request_id)[:2] == ("done", "denied")


async def test_a_denial_the_store_could_not_record_never_runs_after_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = MockHome()
    async with fast_gateway(tmp_path, home=home) as fg:
        ws = await authed(fg)
        await ws.send_message(ask_frame(1))
        shown = await fg.guardian.wait_for_card()
        request_id = shown.card.request_id
        store = fg.gateway.store
        healthy = store._conn
        store._conn = FailingCommits(healthy)  # type: ignore[assignment]
        assert await fg.guardian.press(request_id, "deny") == "denied"
        assert (await reply(ws))["error"]["code"] == -32001
        store._conn = healthy
        await fg.gateway.shutdown()  # a planned restart, with the disk healthy again
    async with fast_gateway(tmp_path, home=home) as fg:
        # The denied approval came back with its buttons; Allow ran the call.
        await fg.guardian.press(request_id, "allow")
        await trio.sleep(1)
        assert home.service_calls == []


async def test_a_result_the_gateway_never_wrote_stays_queued(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg, lockstep=True)  # frames leave only as fast as the agent reads
        for rpc_id in range(1, 5):
            await ws.send_message(ask_frame(rpc_id))
        shown = await fg.guardian.wait_for_card(4)
        request_id = shown.card.request_id
        # The agent reads nothing more: the writer waits on an approval_pending frame, and
        # the denial's frame waits behind it in the outbox.
        assert await fg.guardian.press(request_id, "deny") == "denied"
        await fg.guardian.wait_for_update(request_id)
        with trio.move_on_after(SHUTDOWN_BOUND, shield=True):  # as serve_gateway stops
            await fg.gateway.shutdown()
    # The frame never left: the result belongs in the agent's queue (it said delivered).
    assert stored(tmp_path, request_id) == ("done", "denied", 0)
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        listed = await call(ws, 1, "get_pending_results", ack=[])
        assert request_id in [r["request_id"] for r in listed["result"]["results"]]


async def jammable(fg: FastGateway) -> tuple[WebSocketConnection, Valve]:
    """An authenticated agent on a lockstep stream (the gateway writes only as fast as the
    agent reads) behind a valve (closed: the agent takes no more bytes), and its end of that
    stream (closing it drops the connection)."""
    server_stream, inner = trio.testing.lockstep_stream_pair()
    client_stream = Valve(inner)

    async def serve() -> None:
        request = await wrap_server_stream(fg.nursery, server_stream)
        await fg.gateway.door.handle(request, None)

    fg.nursery.start_soon(serve)
    ws = await wrap_client_stream(fg.nursery, client_stream, "gate.test", "/")
    assert (await call(ws, 0, "auth", token=DEFAULT_TOKENS["pi"]))["result"]["agent"] == "pi"
    return ws, client_stream


@settings(
    max_examples=100,  # a bad order comes about one time in six: 100 never miss it
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # the first failure is enough
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scheduling=st.random_module())  # the scheduler's order decides it: explore it
async def test_a_result_whose_connection_drops_before_it_is_written_stays_queued(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, scheduling: Any
) -> None:
    workdir = Path(tempfile.mkdtemp(dir=tmp_path))
    async with fast_gateway(workdir) as fg:
        ws, stream = await jammable(fg)
        stream.jam(True)  # the agent takes no more bytes (a full TCP window)
        await ws.send_message(ask_frame(1))
        shown = await fg.guardian.wait_for_card()
        request_id = shown.card.request_id
        # The writer waits on the approval_pending frame; the result's will wait behind it.
        assert await fg.guardian.press(request_id, "allow") == "approved"
        await trio.testing.wait_all_tasks_blocked()  # executed; its frame in the outbox
        await stream.aclose()  # the network drops the connection before DRAIN_WAIT is over
        await fg.guardian.wait_for_update(request_id)
        assert fg.home.service_calls  # it ran
        # Its frame never left: the result must wait in the agent's queue.
        assert stored(workdir, request_id) == ("done", "executed", 0)


async def test_a_result_whose_requeue_fails_is_not_lost(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws, stream = await jammable(fg)
        stream.jam(True)  # the agent takes no more bytes (a full TCP window)
        await ws.send_message(ask_frame(1))
        shown = await fg.guardian.wait_for_card()
        request_id = shown.card.request_id
        assert await fg.guardian.press(request_id, "deny") == "denied"
        await fg.guardian.wait_for_update(request_id)  # recorded, its frame in the outbox
        assert stored(tmp_path, request_id) == ("done", "denied", 0)  # queued until written
        store = fg.gateway.store
        healthy = store._conn
        store._conn = FailingCommits(healthy)  # type: ignore[assignment]
        await stream.aclose()  # the connection drops: the frame was never written
        await trio.sleep(1)
        store._conn = healthy
        # Never written, so back in the queue (it stayed "delivered": lost).
        assert stored(tmp_path, request_id) == ("done", "denied", 0)


class Dead:
    """A store connection after ``kill -9``: nothing reaches the file any more."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: Any) -> Any:
        raise sqlite3.OperationalError("the process is gone")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_a_denial_told_just_before_a_crash_never_runs_after_the_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = MockHome()
    async with fast_gateway(tmp_path, home=home) as fg:
        ws, stream = await jammable(fg)
        stream.jam(True)  # the agent reads slowly: its frames take a while to go out
        await ws.send_message(ask_frame(1))
        shown = await fg.guardian.wait_for_card()
        request_id = shown.card.request_id
        assert await fg.guardian.press(request_id, "deny") == "denied"
        await trio.testing.wait_all_tasks_blocked()  # the denial's frame is on its way
        store = fg.gateway.store
        store._conn = Dead(store._conn)  # type: ignore[assignment]  # kill -9: nothing more
        stream.jam(False)  # the socket still hands the agent what the gateway had written
        assert (await reply(ws))["error"]["code"] == -32001  # the agent was told: denied
    async with fast_gateway(tmp_path, home=home) as fg:
        await fg.guardian.press(request_id, "allow")
        await trio.sleep(1)
        assert home.service_calls == []  # the call it was told was denied never runs


async def test_an_outcome_unrecorded_at_a_stop_is_not_told_and_is_decided_afresh(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = MockHome()
    async with fast_gateway(tmp_path, home=home) as fg:
        ws = await authed(fg)
        await ws.send_message(ask_frame(1))
        shown = await fg.guardian.wait_for_card()
        request_id = shown.card.request_id
        store = fg.gateway.store
        healthy = store._conn
        store._conn = FailingCommits(healthy, count=10_000)  # type: ignore[assignment]
        assert await fg.guardian.press(request_id, "deny") == "denied"
        await trio.sleep(60)  # retried meanwhile, never recorded: nothing told
        await fg.gateway.shutdown()  # a planned restart, the disk still failing
        answer = await reply(ws)
        assert answer["error"]["code"] == -32007  # not "denied": the store never said so
        assert answer["error"]["data"]["pending"] is True
        update = await fg.guardian.wait_for_update(request_id)  # the card never said "denied"
        assert [u.detail for u in fg.guardian.cards[request_id].updates] == [update.detail]
        assert "could not be recorded" in update.detail
        store._conn = healthy
    assert stored(tmp_path, request_id)[:2] == ("pending", None)
    assert home.service_calls == []
    async with fast_gateway(tmp_path, home=home) as fg:
        # Decided again after the restart: only a new, recorded Allow runs it, once.
        assert await fg.guardian.press(request_id, "allow") == "approved"
        await fg.gateway.broker.idle()
        assert len(home.service_calls) == 1
        assert stored(tmp_path, request_id)[:2] == ("done", "executed")
        ws = await authed(fg)
        listed = await call(ws, 1, "get_pending_results", ack=[])
        assert [r["status"] for r in listed["result"]["results"]] == ["executed"]


async def test_a_result_on_its_way_is_not_listed_until_its_frame_is_given_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        asking, stream = await jammable(fg)
        stream.jam(True)  # the denial's frame waits in the outbox of the asking connection
        await asking.send_message(ask_frame(1))
        shown = await fg.guardian.wait_for_card()
        request_id = shown.card.request_id
        assert await fg.guardian.press(request_id, "deny") == "denied"
        await fg.guardian.wait_for_update(request_id)
        assert stored(tmp_path, request_id) == ("done", "denied", 0)  # queued until written
        other = await authed(fg)
        # Neither mode hands it out while its answer may still be written.
        assert (await call(other, 1, "get_pending_results"))["result"]["results"] == []
        listed = await call(other, 2, "get_pending_results", ack=[])
        assert listed["result"]["results"] == []
        await stream.aclose()  # the asking connection drops: its frame was never written
        await trio.testing.wait_all_tasks_blocked()
        handed = await call(other, 3, "get_pending_results")
        assert [r["request_id"] for r in handed["result"]["results"]] == [request_id]
        await fg.gateway.broker.idle()
        await fg.gateway.store.get_setting("flush")  # a waited-for commit flushes posted writes
        assert stored(tmp_path, request_id) == ("done", "denied", 1)  # written: delivered
        assert (await call(other, 4, "get_pending_results"))["result"]["results"] == []
