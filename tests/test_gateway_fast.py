"""Fast tier: deadlines on a fake clock, restart semantics, without a socket or a thread."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from agentgate.connection import CLOSE_POLICY, Connection
from agentgate.gateway import SHUTDOWN_BOUND
from agentgate.protocol import Request
from agentgate.testing.harness import DEFAULT_POLICY, DEFAULT_TOKENS
from tests.fastgate import MockHome, authed, call, fast_gateway, reply


async def test_auth_deadline_closes_a_silent_socket(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await fg.connect()
        start = trio.current_time()
        frame = await reply(ws)
        assert frame["error"]["code"] == -32005
        assert "deadline" in frame["error"]["message"]
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 1008
        assert trio.current_time() - start >= 10  # the default deadline, on the fake clock
        assert fg.gateway.door.failed_auth.blocked("gate.test") is False


async def test_default_approval_timeout_is_900_seconds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        start = trio.current_time()
        answer = await call(
            ws,
            7,
            "tool_request",
            tool="ha_call_service",
            args={"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"},
        )
        assert answer["id"] == 7
        assert answer["error"]["code"] == -32002
        assert trio.current_time() - start >= 900
        assert fg.home.service_calls == []
        shown = await fg.guardian.wait_for_card()
        assert (await fg.guardian.wait_for_update(shown.card.request_id)).status == "timed_out"
        rows = await fg.gateway.store.audit_rows()
        assert [(r.decision, r.resolution) for r in rows] == [("ask", "timed_out")]


async def test_a_press_just_before_the_deadline_still_executes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        args = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}

        async def press_late() -> None:
            shown = await fg.guardian.wait_for_card()
            await trio.sleep(899)
            assert await fg.guardian.press(shown.card.request_id, "allow") == "approved"

        fg.nursery.start_soon(press_late)
        answer = await call(ws, 1, "tool_request", tool="ha_call_service", args=args)
        assert answer["result"]["status"] == "executed"
        assert len(fg.home.service_calls) == 1


async def test_restart_resumes_a_pending_approval_with_its_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = MockHome()
    async with fast_gateway(tmp_path, home=home) as fg:
        ws = await authed(fg)
        await ws.send_message(
            '{"jsonrpc":"2.0","id":"a-1","method":"tool_request","params":'
            '{"tool":"ha_call_service","args":{"domain":"light","service":"turn_on",'
            '"entity_id":"light.bedroom"}}}'
        )
        shown = await fg.guardian.wait_for_card()
        request_id = shown.card.request_id
    # "kill -9": the first gateway is gone without cleanup; a new one opens the same store.
    await trio.sleep(100)
    async with fast_gateway(tmp_path, home=home) as fg:
        assert [c.card.request_id for c in await fg.gateway.controls.pending()] == [request_id]
        assert await fg.guardian.press(request_id, "allow") == "approved"
        ws = await authed(fg)
        results = (await call(ws, 2, "get_pending_results"))["result"]["results"]
        assert [(r["request_id"], r["rpc_id"], r["status"]) for r in results] == [
            (request_id, "a-1", "executed")
        ]
        assert (await call(ws, 3, "get_pending_results"))["result"]["results"] == []
    assert home.service_calls == [("/api/services/light/turn_on", {"entity_id": "light.bedroom"})]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (
            {
                "policy": DEFAULT_POLICY.replace(
                    "action: ask\n    description: lights", "action: deny\n    description: lights"
                )
            },
            "denied by policy: rule 1: ha_call_service(light.*) (deny)",
        ),
        ({"tokens": {"laptop": DEFAULT_TOKENS["laptop"]}}, "agent pi is no longer configured"),
        ({"frozen": True}, "frozen by guardian"),
    ],
    ids=["policy-now-denies", "agent-removed", "frozen"],
)
async def test_an_approval_that_would_not_be_asked_now_does_not_come_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, change: dict[str, Any], why: str
) -> None:
    """A restart is how an operator tightens the policy or removes an agent: what a restored
    card would approve is checked against today's configuration first."""
    home = MockHome()
    frozen = change.pop("frozen", False)
    async with fast_gateway(tmp_path, home=home) as fg:
        ws = await authed(fg)
        await ws.send_message(
            '{"jsonrpc":"2.0","id":"a-1","method":"tool_request","params":'
            '{"tool":"ha_call_service","args":{"domain":"light","service":"turn_on",'
            '"entity_id":"light.bedroom"}}}'
        )
        request_id = (await fg.guardian.wait_for_card()).card.request_id
        if frozen:  # frozen while the gateway stops: the freeze holds at the next start
            await fg.gateway.store.set_setting("frozen", "1")
    async with fast_gateway(tmp_path, home=home, **change) as fg:
        await fg.gateway.broker.idle()
        assert await fg.gateway.controls.pending() == []
        answer = await fg.guardian.press(request_id, "allow", on=f"card-{request_id}")
        assert answer.startswith("expired")
        (row,) = [
            r for r in await fg.gateway.store.audit_rows(agent="pi") if r.request_id == request_id
        ]
        assert (row.decision, row.resolution) == ("ask", "denied")
        assert why in str(row.error)
    assert home.service_calls == []


async def test_an_approval_that_expired_while_down_is_queued_as_timed_out(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path, gateway={"approval_timeout": 60}) as fg:
        ws = await authed(fg)
        await ws.send_message(
            '{"jsonrpc":"2.0","id":5,"method":"tool_request","params":{"tool":"ha_call_service",'
            '"args":{"domain":"light","service":"turn_on","entity_id":"light.bedroom"}}}'
        )
        await fg.guardian.wait_for_card()
    await trio.sleep(120)
    async with fast_gateway(tmp_path, gateway={"approval_timeout": 60}) as fg:
        ws = await authed(fg)
        results = (await call(ws, 1, "get_pending_results"))["result"]["results"]
        assert [(r["rpc_id"], r["status"], r["error"]["code"]) for r in results] == [
            (5, "timed_out", -32002)
        ]
        assert fg.home.service_calls == []


LIGHT_ON = (
    '{"jsonrpc":"2.0","id":9,"method":"tool_request","params":{"tool":"ha_call_service",'
    '"args":{"domain":"light","service":"turn_on","entity_id":"light.bedroom"}}}'
)


async def test_a_planned_stop_keeps_pending_asks_and_closes_1001(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path, gateway={"approval_timeout": 600}) as fg:
        ws = await authed(fg)
        await ws.send_message(LIGHT_ON)
        shown = await fg.guardian.wait_for_card()
        request_id = shown.card.request_id
        with trio.fail_after(SHUTDOWN_BOUND):  # serve_gateway's own bound
            await fg.gateway.shutdown()
        answer = await reply(ws)
        error = answer["error"]
        assert (answer["id"], error["code"]) == (9, -32007)
        assert error["message"].startswith("gateway restarting: the approval stays open")
        assert error["data"]["pending"] is True
        assert error["data"]["request_id"] == request_id
        assert error["data"]["expires_at"] == shown.card.expires_at
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 1001
        update = await fg.guardian.wait_for_update(request_id)
        assert update.status == "restarting"  # edited once, without its buttons
        assert len(fg.guardian.cards[request_id].updates) == 1
        rows = await fg.gateway.store.audit_rows()
        assert [(r.decision, r.resolution) for r in rows] == [("ask", None)]  # still open
        [still] = await fg.gateway.store.open_pending()
        assert still.state == "pending"
        # A press while it stops decides nothing.
        assert await fg.guardian.press(request_id, "allow") == (
            "not decided: the gateway is restarting; press again once it is back"
        )
        assert fg.home.service_calls == []
    await trio.sleep(60)
    home = fg.home
    async with fast_gateway(tmp_path, home=home, gateway={"approval_timeout": 600}) as fg:
        # The card gets its buttons back, and they work; the result waits in the queue.
        [(restored, ref)] = await fg.guardian.wait_restored()
        assert (restored, ref) == (request_id, shown.ref)
        assert await fg.guardian.press(request_id, "allow", on=ref) == "approved"
        await fg.gateway.broker.idle()
        ws = await authed(fg)
        [entry] = (await call(ws, 1, "get_pending_results"))["result"]["results"]
        assert (entry["request_id"], entry["rpc_id"], entry["status"]) == (
            request_id,
            9,
            "executed",
        )
    assert home.service_calls == [("/api/services/light/turn_on", {"entity_id": "light.bedroom"})]


async def test_a_planned_stop_keeps_the_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path, gateway={"approval_timeout": 600}) as fg:
        ws = await authed(fg)
        await ws.send_message(LIGHT_ON)
        shown = await fg.guardian.wait_for_card()
        await fg.gateway.shutdown()
    await trio.sleep(300)
    async with fast_gateway(tmp_path, home=fg.home, gateway={"approval_timeout": 600}) as fg:
        ws = await authed(fg)
        await fg.gateway.broker.idle()  # nobody decides: it times out at its first deadline
        [entry] = (await call(ws, 1, "get_pending_results"))["result"]["results"]
        assert (entry["status"], entry["error"]["code"]) == ("timed_out", -32002)
        [row] = await fg.gateway.store.audit_rows()
        assert row.resolved_at == pytest.approx(shown.card.expires_at, abs=1)
    assert fg.home.service_calls == []


async def test_a_decommissioning_stop_resolves_pending_asks_as_shutdown(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        await ws.send_message(LIGHT_ON)
        shown = await fg.guardian.wait_for_card()
        with trio.fail_after(SHUTDOWN_BOUND):
            await fg.gateway.shutdown(cancel_pending=True)
        answer = await reply(ws)
        assert (answer["id"], answer["error"]["code"]) == (9, -32007)
        assert "pending" not in answer["error"]["data"]
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 1001
        assert (await fg.guardian.wait_for_update(shown.card.request_id)).status == "shutdown"
        rows = await fg.gateway.store.audit_rows()
        assert [(r.decision, r.resolution) for r in rows] == [("ask", "shutdown")]
        assert fg.home.service_calls == []


async def test_queued_results_whose_reply_is_lost_are_queued_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        await ws.send_message(
            '{"jsonrpc":"2.0","id":4,"method":"tool_request","params":{"tool":"ha_call_service",'
            '"args":{"domain":"light","service":"turn_on","entity_id":"light.bedroom"}}}'
        )
        shown = await fg.guardian.wait_for_card()
        await ws.aclose()
        await fg.guardian.press(shown.card.request_id, "allow")
        await fg.guardian.wait_for_update(shown.card.request_id)
        # get_pending_results on a connection that is gone before its reply could be written
        send, receive = trio.open_memory_channel[tuple[str, tuple[str, ...]]](1)
        gone = Connection("pi", "gate.test", send)
        gone.close()
        gone.in_flight = 1
        fg.gateway.door._in_flight += 1
        await fg.gateway.door._request(gone, Request(5, "get_pending_results", {}))
        receive.close()
        ws = await authed(fg)
        results = (await call(ws, 6, "get_pending_results"))["result"]["results"]
        assert [(r["rpc_id"], r["status"]) for r in results] == [(4, "executed")]
        assert (await call(ws, 7, "get_pending_results"))["result"]["results"] == []
        assert len(fg.home.service_calls) == 1


async def test_drained_returns_once_the_writer_is_done_with_every_queued_frame() -> None:
    send, receive = trio.open_memory_channel[tuple[str, tuple[str, ...]]](8)
    conn = Connection("pi", "gate.test", send)
    assert conn.try_send("one")
    assert conn.try_send("two", "request-id")
    finished: list[str] = []

    async def wait(name: str) -> None:
        await conn.drained()
        finished.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "first")
        await trio.testing.wait_all_tasks_blocked()
        conn.wrote()
        await trio.testing.wait_all_tasks_blocked()
        assert finished == []  # one frame of two written
        conn.wrote()
    assert finished == ["first"]
    await conn.drained()  # nothing queued since: returns at once
    # A connection that closes with frames still queued releases whoever waits for them.
    assert conn.try_send("three")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "second")
        await trio.testing.wait_all_tasks_blocked()
        conn.close()
    assert finished == ["first", "second"]
    receive.close()


async def test_the_agent_has_its_result_before_the_card_is_edited(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The outcome's bookkeeping (commit, card edit) waits until the result frame is written,
    so it does not compete with that frame for the event loop."""
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        written_at_edit: list[bool] = []
        update_card = fg.guardian.update_card

        async def spy(*args: Any) -> None:
            written_at_edit.extend(c.written >= c.queued for c in fg.gateway.door.connections["pi"])
            await update_card(*args)

        fg.guardian.update_card = spy  # type: ignore[method-assign]
        args = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}

        async def allow() -> None:
            shown = await fg.guardian.wait_for_card()
            await fg.guardian.press(shown.card.request_id, "allow")

        fg.nursery.start_soon(allow)
        answer = await call(ws, 1, "tool_request", tool="ha_call_service", args=args)
        assert answer["result"]["status"] == "executed"
        await fg.guardian.wait_for_update(answer["result"]["request_id"])
        assert written_at_edit == [True]


async def test_an_agent_that_does_not_read_is_closed_1008(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = MockHome()
    blob = {"blob": "x" * 20_000}
    home.states["sensor.big"] = {"entity_id": "sensor.big", "state": "1", "attributes": blob}
    limits = {"max_outbox_bytes": 65536, "requests_per_minute": 10_000}
    async with fast_gateway(tmp_path, home=home, limits=limits) as fg:
        greedy = await authed(fg, lockstep=True)
        await trio.testing.wait_all_tasks_blocked()  # registered just after its auth reply
        (conn,) = fg.gateway.door.connections["pi"]
        read = '{"tool":"ha_get_state","args":{"entity_id":"sensor.big"}}'
        sent = 0

        async def ask_and_never_read() -> None:
            nonlocal sent
            with contextlib.suppress(ConnectionClosed):
                for n in range(40):  # ~800 kB of replies, and it reads none of them
                    await greedy.send_message(
                        f'{{"jsonrpc":"2.0","id":{n},"method":"tool_request","params":{read}}}'
                    )
                    sent += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_and_never_read)
            await conn.closing.wait()
            nursery.cancel_scope.cancel()  # the gateway stopped reading it: its send hangs
        assert conn.overflowed
        assert sent < 40  # the gateway stopped reading it, too
        async with trio.open_nursery() as nursery:
            # Reading again within the close's grace, it hears why it was closed.
            nursery.start_soon(drain_until_closed, greedy)
            # Nothing else noticed: another agent is served.
            other = await authed(fg, "laptop")
            args = {"entity_id": "sensor.temp"}
            answer = await call(other, 1, "tool_request", tool="ha_get_state", args=args)
            assert answer["result"]["status"] == "executed"
        assert greedy.closed is not None
        assert greedy.closed.code == CLOSE_POLICY
        assert "pi" not in fg.gateway.door.connections


async def drain_until_closed(ws: Any) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.get_message()


async def test_an_ask_whose_card_cannot_show_everything_is_refused_and_audited(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        args = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}
        answer = await call(
            ws, 1, "tool_request", tool="ha_call_service", args=args | {"note": "x" * 5000}
        )
        error = answer["error"]
        assert error["code"] == -32602
        assert error["message"].startswith("arguments too large to show the guardian")
        assert (error["data"]["limit"], error["data"]["signature"]) == (
            4096,
            "ha_call_service(light.turn_on, light.bedroom)",
        )
        assert fg.guardian.cards == {}  # nobody was asked
        (row,) = await fg.gateway.store.audit_rows(agent="pi")
        assert (row.decision, row.resolution) == ("invalid", "rejected")
        assert "too large to show the guardian" in str(row.matched)
        # The same call, shown in full, is asked.
        await ws.send_message(
            '{"jsonrpc":"2.0","id":2,"method":"tool_request","params":{"tool":"ha_call_service",'
            '"args":{"domain":"light","service":"turn_on","entity_id":"light.bedroom"}}}'
        )
        shown = await fg.guardian.wait_for_card()
        assert shown.card.args == args
    assert fg.home.service_calls == []


async def test_no_grant_for_an_indirect_service(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Its signature leaves out what matters (a script's variables, the text Assist reads):
    # one "Allow 1 h" would approve any of them for an hour.
    policy = 'rules:\n  - {pattern: "ha_call_service(script.*)", action: ask}\n'
    async with fast_gateway(tmp_path, policy=policy) as fg:
        ws = await authed(fg)
        args = {"domain": "script", "service": "turn_on", "variables": {"x": "harmless"}}
        await ws.send_message(
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "tool_request",
                    "params": {"tool": "ha_call_service", "args": args},
                }
            )
        )
        shown = await fg.guardian.wait_for_card()
        answer = await fg.guardian.press(shown.card.request_id, "grant")
        assert answer.startswith("not decided: Allow 1 h is not offered")
        assert fg.gateway.broker.waiting("pi") == 1  # still the guardian's to decide
        assert await fg.gateway.controls.grants() == []
        assert await fg.guardian.press(shown.card.request_id, "deny") == "denied"


async def test_a_press_that_arrives_before_its_card_send_returns_still_counts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The Bot API has the message (and the guardian may press) before sendMessage answers.
    async with fast_gateway(tmp_path) as fg:
        guardian = fg.guardian
        answers: list[str] = []
        plain_send = guardian.send_card

        async def send_card(card: Any) -> str:
            ref = await plain_send(card)

            async def press_now() -> None:
                answers.append(await guardian.press(card.request_id, "allow", on=ref))

            fg.nursery.start_soon(press_now)
            await trio.testing.wait_all_tasks_blocked()  # the press is in before we return
            return ref

        guardian.send_card = send_card  # type: ignore[method-assign]
        ws = await authed(fg)
        args = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}
        answer = await call(ws, 1, "tool_request", tool="ha_call_service", args=args)
        assert answer["result"]["status"] == "executed"
        assert answers == ["approved"]


class HeldReads(MockHome):
    """Reads wait for the test to release them (so that many are asked meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        self.release = trio.Event()

    async def handler(self, request: httpx.Request) -> httpx.Response:  # type: ignore[override]
        if request.method == "GET" and request.url.path.startswith("/api/states/"):
            self.gets += 1
            await self.release.wait()
        return super().handler(request)


async def test_reads_asked_together_share_a_call_but_each_has_its_own_decision_and_answer(
    tmp_path: Path,
) -> None:
    home = HeldReads()
    async with fast_gateway(tmp_path, home=home) as fg:
        with trio.fail_after(10):
            agents = [await authed(fg, "pi"), await authed(fg, "laptop")]
            for n in range(20):
                await agents[n % 2].send_message(
                    json.dumps(
                        {
                            "jsonrpc": "2.0",
                            "id": n,
                            "method": "tool_request",
                            "params": {
                                "tool": "ha_get_state",
                                "args": {"entity_id": "sensor.temp"},
                            },
                        }
                    )
                )
            await trio.testing.wait_all_tasks_blocked()
            home.release.set()
            answers = [await reply(agents[n % 2]) for n in range(20)]
        assert home.gets < 20  # one read in flight, the next one for all who asked meanwhile
        assert sorted(a["id"] for a in answers) == list(range(20))
        assert all(a["result"]["data"]["state"] == "21" for a in answers)
        request_ids = {a["result"]["request_id"] for a in answers}
        assert len(request_ids) == 20
        rows = await fg.gateway.store.audit_rows()
        assert {r.request_id for r in rows} == request_ids
        assert sorted(r.agent for r in rows) == ["laptop"] * 10 + ["pi"] * 10
        assert {(r.decision, r.resolution) for r in rows} == {("allow", "executed")}


async def test_a_press_on_an_approval_that_is_over_says_what_became_of_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Once over, an approval leaves the broker's memory; the store still says how it ended,
    # also after a restart.
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        request_ids = []
        for count, action in ((1, "allow"), (2, "deny")):
            await ws.send_message(
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": count,
                        "method": "tool_request",
                        "params": {
                            "tool": "ha_call_service",
                            "args": {
                                "domain": "light",
                                "service": "turn_on",
                                "entity_id": "light.bedroom",
                            },
                        },
                    }
                )
            )
            shown = await fg.guardian.wait_for_card(count)
            request_ids.append(shown.card.request_id)
            await fg.guardian.press(shown.card.request_id, action)
            await reply(ws)
        await fg.gateway.broker.idle()
        assert fg.gateway.broker.approvals == {}
        answers = [await fg.guardian.press(r, "allow") for r in request_ids]
        assert answers == ["expired: already approved", "expired: already denied"]
        assert await fg.guardian.press("no-such-request", "allow") == "expired or unknown approval"
