"""Every outcome of the decision pipeline, through the same wiring as ``agentgate serve``.

Fast tier: :func:`agentgate.gateway.open_gateway` with the store inline, Home Assistant behind
``httpx.MockTransport``, the WebSocket door on memory streams and an autojump clock (so the
900 s approval timeout takes no time). Each test sends raw JSON-RPC frames as an agent would
and checks the answer, what reached Home Assistant and the audit row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection

from agentgate.errors import ExecutionFailed, GatewayShuttingDown, RateLimited
from agentgate.store import AuditEntry
from agentgate.tools import TOOLS, ToolSpec
from tests.fastgate import FastGateway, authed, call, fast_gateway, reply

READ = {"tool": "ha_get_state", "args": {"entity_id": "sensor.temp"}}
LIGHT = {
    "tool": "ha_call_service",
    "args": {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"},
}
LOCK = {
    "tool": "ha_call_service",
    "args": {"domain": "lock", "service": "unlock", "entity_id": "lock.front_door"},
}


async def send(ws: WebSocketConnection, rpc_id: int, params: dict[str, Any]) -> None:
    frame = {"jsonrpc": "2.0", "id": rpc_id, "method": "tool_request", "params": params}
    await ws.send_message(json.dumps(frame))


async def request(ws: WebSocketConnection, rpc_id: int, params: dict[str, Any]) -> dict[str, Any]:
    await send(ws, rpc_id, params)
    return await reply(ws)


async def rows(fg: FastGateway) -> list[AuditEntry]:
    return [r for r in await fg.gateway.store.audit_rows(agent="pi") if r.kind == "request"]


def code(answer: dict[str, Any]) -> int:
    return int(answer["error"]["code"]) if "error" in answer else 0


# -- decided at once --------------------------------------------------------------------------


async def test_allow_executes_and_is_audited(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        answer = await request(ws, 1, READ)
        assert answer["result"]["status"] == "executed"
        assert answer["result"]["data"]["state"] == "21"
        await trio.testing.wait_all_tasks_blocked()  # the resolution joins the next commit
        (row,) = await rows(fg)
        assert (row.decision, row.resolution) == ("allow", "executed")


async def test_deny_executes_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        answer = await request(ws, 1, LOCK)
        assert code(answer) == -32003
        assert answer["error"]["data"]["signature"] == (
            "ha_call_service(lock.unlock, lock.front_door)"
        )
        (row,) = await rows(fg)
        assert (row.decision, row.resolution) == ("deny", "denied")
    assert fg.home.service_calls == []
    assert fg.guardian.cards == {}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tool": "shell_exec", "args": {}}, "unknown tool: shell_exec"),
        ({"tool": "ha_get_state", "args": {"entity_id": "sensor.*"}}, "forbidden character"),
        (
            {
                "tool": "ha_call_service",
                "args": {"domain": "light", "service": "x", "area_id": "a"},
            },
            "targeting by area_id",
        ),
    ],
)
async def test_invalid_requests_are_refused_and_audited(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, params: dict[str, Any], message: str
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        answer = await request(ws, 1, params)
        assert code(answer) == -32602
        assert message in answer["error"]["message"]
        (row,) = await rows(fg)
        assert (row.decision, row.resolution) == ("invalid", "rejected")
    assert fg.home.service_calls == []


async def test_over_the_request_rate_is_limited(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path, limits={"requests_per_minute": 2}) as fg:
        ws = await authed(fg)
        assert code(await request(ws, 1, READ)) == 0
        assert code(await request(ws, 2, READ)) == 0
        limited = await request(ws, 3, READ)
        assert code(limited) == -32006
        assert "over 2 requests per minute" in limited["error"]["message"]
        await trio.sleep(30)  # one token back (fake clock)
        assert code(await request(ws, 4, READ)) == 0


class _NoDoor:
    """A reply handle of a front door that checks nothing itself (the pipeline must)."""

    agent = "pi"
    via = "ws"
    confirms_delivery = False

    def approval_pending(self, request_id: str, reply_to: Any, expires_at: float) -> None:
        pass

    def deliver(self, result: Any) -> bool:
        return False

    def results_waiting(self, count: int) -> None:
        pass

    async def drained(self) -> None:
        pass


async def test_the_pipeline_limits_the_rate_whatever_the_front_door_does(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path, limits={"requests_per_minute": 2}) as fg:
        pipeline = fg.gateway.pipeline
        door = _NoDoor()
        for rpc_id in (1, 2):
            await pipeline.submit("pi", READ["tool"], dict(READ["args"]), door, rpc_id)
        with pytest.raises(RateLimited):
            await pipeline.submit("pi", READ["tool"], dict(READ["args"]), door, 3)
        with pytest.raises(RateLimited):  # listing tools and collecting results count too
            pipeline.list_tools("pi")
        pipeline.closing = True
        with pytest.raises(GatewayShuttingDown):
            await pipeline.submit("pi", READ["tool"], dict(READ["args"]), door, 4)
    assert len(fg.home.service_calls) == 0


class _OneToolExecutor:
    """An executor that is not Home Assistant: it offers one tool of its own."""

    tools: ClassVar[dict[str, ToolSpec]] = {"ha_get_state": TOOLS["ha_get_state"]}

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def execute(self, tool: str, args: dict[str, Any]) -> Any:
        self.calls.append((tool, args))
        return {"answered_by": "one-tool"}

    async def describe(self, tool: str, args: dict[str, Any]) -> str | None:
        return None

    async def check_health(self) -> str | None:
        return None


async def test_the_tools_offered_are_the_executors(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        executor = _OneToolExecutor()
        fg.gateway.pipeline.executor = executor
        ws = await authed(fg)
        listed = await call(ws, 1, "list_tools")
        assert [t["name"] for t in listed["result"]["tools"]] == ["ha_get_state"]
        assert (await request(ws, 2, READ))["result"]["data"] == {"answered_by": "one-tool"}
        refused = await request(ws, 3, LIGHT)  # a Home Assistant tool this executor lacks
        assert code(refused) == -32602
        assert refused["error"]["message"] == "unknown tool: ha_call_service"
        fg.gateway.pipeline.executor = None  # no service at all: nothing is offered
        assert (await call(ws, 4, "list_tools"))["result"]["tools"] == []
    assert executor.calls == [("ha_get_state", READ["args"])]
    assert fg.home.service_calls == []


async def test_over_the_pending_limit_is_limited(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path, limits={"max_pending_per_agent": 1}) as fg:
        ws = await authed(fg)
        await send(ws, 1, LIGHT)
        await fg.guardian.wait_for_card()
        answer = await request(ws, 2, LIGHT)
        assert code(answer) == -32006
        assert "too many pending approvals" in answer["error"]["message"]
        assert len(fg.guardian.cards) == 1


async def test_frozen_refuses_everything_until_unfrozen(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        await send(ws, 1, LIGHT)
        await fg.guardian.wait_for_card()
        await fg.gateway.controls.set_frozen(True, by="Alice (1)")
        pending = await reply(ws)  # the pending ask is denied by the freeze
        assert (pending["id"], code(pending)) == (1, -32003)
        assert "frozen" in pending["error"]["message"]
        answer = await request(ws, 2, READ)  # even what the policy allows
        assert (code(answer), answer["error"]["message"]) == (-32003, "frozen by guardian")
        await fg.gateway.controls.set_frozen(False, by="Alice (1)")
        assert code(await request(ws, 3, READ)) == 0
    assert fg.home.service_calls == []


async def test_an_unwritable_audit_log_executes_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        await fg.gateway.store.close()  # the disk is gone
        for rpc_id, params in enumerate((READ, LIGHT), 1):
            answer = await request(ws, rpc_id, params)
            assert code(answer) == -32004
            assert "audit log unavailable" in answer["error"]["message"]
    assert fg.home.service_calls == []
    assert fg.guardian.cards == {}


# -- asked: every way an approval ends ----------------------------------------------------------


async def ask(fg: FastGateway, ws: WebSocketConnection, rpc_id: int) -> str:
    await send(ws, rpc_id, LIGHT)
    shown = await fg.guardian.wait_for_card(len(fg.guardian.cards) + 1)
    return shown.card.request_id


@pytest.mark.parametrize(
    ("press", "answer_code", "resolution", "executed"),
    [
        ("allow", 0, "executed", 1),
        ("grant", 0, "executed", 1),
        ("deny", -32001, "denied", 0),
    ],
)
async def test_a_guardian_decides(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    press: str,
    answer_code: int,
    resolution: str,
    executed: int,
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1)
        assert (await fg.guardian.press(request_id, press)).startswith(
            {"allow": "approved", "grant": "allowed for 1 h", "deny": "denied"}[press]
        )
        answer = await reply(ws)
        assert (answer["id"], code(answer)) == (1, answer_code)
        await fg.gateway.broker.idle()
        (row,) = await rows(fg)
        assert (row.decision, row.resolution) == ("ask", resolution)
        assert row.resolved_by == "test guardian (1)"
    assert len(fg.home.service_calls) == executed


async def test_a_grant_lets_the_same_call_through_without_a_card(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1)
        await fg.guardian.press(request_id, "grant")
        assert code(await reply(ws)) == 0
        again = await request(ws, 2, LIGHT)
        assert again["result"]["status"] == "executed"
        assert len(fg.guardian.cards) == 1  # no second card
        await trio.testing.wait_all_tasks_blocked()
        second = (await rows(fg))[-1]
        assert second.decision == "allow"
        assert str(second.matched).startswith("grant ")
    assert len(fg.home.service_calls) == 2


async def test_nobody_decides_before_the_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1)
        answer = await reply(ws)  # 900 s later, on the fake clock
        assert code(answer) == -32002
        assert (await fg.guardian.wait_for_update(request_id)).status == "timed_out"
        assert (await fg.guardian.press(request_id, "allow")).startswith("expired")
    assert fg.home.service_calls == []


@pytest.mark.parametrize("store", ["slow", "refusing"])
async def test_approvals_timing_out_together_tell_every_agent_before_editing_cards(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    store: str,
) -> None:
    # Many deadlines falling due at once: the agents' answers go out before the cards' edits,
    # which would take the loop from them. One outcome's commit is slow (every card edit waits
    # for it) or refused once (it is retried, and does not hold the other cards meanwhile).
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        ids = [await ask(fg, ws, rpc_id) for rpc_id in range(1, 6)]
        held = ids[2]
        finish = fg.gateway.store.finish_pending
        recorded: set[str] = set()
        refused = False

        async def finish_pending(request_id: str, *args: Any, **kw: Any) -> bool:
            nonlocal refused
            if request_id == held and store == "slow":
                await trio.sleep(5)
            if request_id == held and store == "refusing" and not refused:
                refused = True
                raise ExecutionFailed("disk full")
            done = await finish(request_id, *args, **kw)
            recorded.add(request_id)
            return done

        monkeypatch.setattr(fg.gateway.store, "finish_pending", finish_pending)
        edited_with: dict[str, set[str]] = {}  # request id -> outcomes recorded at its edit
        update_card = fg.guardian.update_card

        async def watched_update(card: Any, message_ref: str, update: Any) -> None:
            edited_with.setdefault(card.request_id, set(recorded))
            await update_card(card, message_ref, update)

        monkeypatch.setattr(fg.guardian, "update_card", watched_update)
        answers = [await reply(ws) for _ in ids]
        assert {code(a) for a in answers} == {-32002}
        assert {a["error"]["data"]["request_id"] for a in answers} == set(ids)
        for request_id in ids:
            assert (await fg.guardian.wait_for_update(request_id)).status == "timed_out"
        if store == "slow":  # no card was edited while an outcome was still being told
            assert all(seen == set(ids) for seen in edited_with.values())
        else:  # the refused one did not hold the others' cards until its retry
            assert any(held not in seen for seen in edited_with.values())
        await fg.gateway.broker.idle()
        assert {r.request_id: r.resolution for r in await rows(fg)} == dict.fromkeys(
            ids, "timed_out"
        )
    assert fg.home.service_calls == []


async def test_an_undeliverable_card_fails_the_ask_closed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        fg.guardian.unavailable = True
        ws = await authed(fg)
        answer = await request(ws, 1, LIGHT)
        assert code(answer) == -32004
        assert answer["error"]["message"].startswith("guardian unreachable")
        await fg.gateway.broker.idle()
        (row,) = await rows(fg)
        assert (row.decision, row.resolution) == ("ask", "failed")
    assert fg.home.service_calls == []


async def test_shutdown_cancels_what_is_still_asked(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        ws = await authed(fg)
        await ask(fg, ws, 1)
        await fg.gateway.shutdown(cancel_pending=True)  # decommissioning
        answer = await reply(ws)
        assert code(answer) == -32007
        (row,) = await rows(fg)
        assert (row.decision, row.resolution) == ("ask", "shutdown")
    assert fg.home.service_calls == []
