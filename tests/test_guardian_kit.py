"""Fast tier for the guardian's toolkit (issue 18): Undo, Always allow, two-person approval,
quotas and hot reload, through the real wiring (``open_gateway``) on a fake clock.

Home Assistant is the fake home's own request handler behind ``httpx.MockTransport`` (the
same answers as over a socket), so windows of minutes and hours pass in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection

from agentgate.approvals import UndoState
from agentgate.guardian import Status
from agentgate.reload import Reloader
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import DEFAULT_TOKENS, write_gate_toml
from tests.fastgate import FastGateway, authed, call, fast_gateway, reply

HA_TOKEN = "ha-token-0123456789"  # what fast_gateway writes into gate.toml

POLICY = """\
defaults:
  - pattern: "ha_get_*"
    action: allow
rules:
  - pattern: "ha_call_service(light.*)"
    action: ask
  - pattern: "ha_call_service(switch.*)"
    action: allow
    quota: "3/min"
  - pattern: "ha_call_service(climate.*)"
    action: allow
  - pattern: "ha_call_service(lock.*)"
    action: ask
    approvals: 2
  - pattern: "ha_call_service(lock.unlock, lock.back_door)"
    action: deny
"""

KITCHEN_ON = {
    "domain": "light",
    "service": "turn_on",
    "entity_id": "light.kitchen",
    "brightness": 120,
}
KITCHEN = "ha_call_service(light.turn_on, light.kitchen)"
COFFEE_ON = {"domain": "switch", "service": "turn_on", "entity_id": "switch.coffee_maker"}
UNLOCK = {"domain": "lock", "service": "unlock", "entity_id": "lock.front_door"}


def fake_home() -> FakeHomeAssistant:
    return FakeHomeAssistant(token=HA_TOKEN)


CEILING = 30 * 86400  # seconds on the fake clock: a test that hangs fails, it does not wait


@asynccontextmanager
async def gateway(tmp_path: Path, home: FakeHomeAssistant, **toml: Any) -> AsyncIterator[Any]:
    toml.setdefault("policy", POLICY)
    async with fast_gateway(tmp_path, home=home, **toml) as fg:  # type: ignore[arg-type]
        # Not around the start: it uses a worker thread, and the fake clock jumps meanwhile.
        with trio.fail_after(CEILING):
            yield fg


async def ask(fg: FastGateway, ws: WebSocketConnection, rpc_id: int, args: dict[str, Any]) -> str:
    """Send a service call that asks; the request id of its card."""
    before = len(fg.guardian.cards)
    await ws.send_message(
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": rpc_id,
                "method": "tool_request",
                "params": {"tool": "ha_call_service", "args": args},
            }
        )
    )
    shown = await fg.guardian.wait_for_card(before + 1)
    return shown.card.request_id


async def run(ws: WebSocketConnection, rpc_id: int, args: dict[str, Any]) -> dict[str, Any]:
    return await call(ws, rpc_id, "tool_request", tool="ha_call_service", args=args)


async def closed(ws: WebSocketConnection) -> tuple[int, str]:
    """Read until the gateway closes ``ws``; its close code and reason."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as exc:
        return exc.reason.code, str(exc.reason.reason)


def posts(home: FakeHomeAssistant, path: str) -> list[Any]:
    return [body for method, target, body in home.calls if method == "POST" and target == path]


# -- Undo -------------------------------------------------------------------------------------


async def test_undo_restores_a_light_once_and_edits_its_card(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1, KITCHEN_ON)
        assert await fg.guardian.press(request_id, "allow") == "approved"
        assert (await reply(ws))["result"]["status"] == "executed"
        assert home.state("light.kitchen")["attributes"]["brightness"] == 120
        update = await fg.guardian.wait_for_update(request_id)
        assert update.status is Status.EXECUTED
        assert update.undo_until is not None  # the executed card keeps ↩ Undo
        assert update.undo_until == pytest.approx(fg.gateway.pipeline.now() + 600, abs=5)

        (item,) = await fg.gateway.controls.undoable()
        assert (item.request_id, item.signature, item.decided_by) == (
            request_id,
            KITCHEN,
            "test guardian (1)",
        )
        assert item.restores == "light.kitchen: off"

        answer = await fg.guardian.press(request_id, "undo", "Alex (42)")
        assert answer == "undone: light.kitchen: off"
        assert home.state("light.kitchen")["state"] == "off"
        assert posts(home, "/api/services/light/turn_off") == [{"entity_id": "light.kitchen"}]
        undone = fg.guardian.cards[request_id].updates[-1]
        assert (undone.status, undone.by, undone.detail) == (
            Status.UNDONE,
            "Alex (42)",
            "light.kitchen: off",
        )
        # Exactly once: later presses run nothing.
        again = await fg.guardian.press(request_id, "undo!", "Sam (43)")
        assert again.startswith("already undone by Alex (42) at ")
        assert len(posts(home, "/api/services/light/turn_off")) == 1
        assert fg.gateway.undo.restores == 1
        assert await fg.gateway.controls.undoable() == []

        rows = await fg.gateway.store.audit_rows(agent="pi")
        undo_row = [r for r in rows if r.kind == "undo"]
        assert [(r.request_id, r.decision, r.resolution, r.resolved_by) for r in undo_row] == [
            (request_id, "undo", "executed", "Alex (42)")
        ]
        assert undo_row[0].args == {
            "restore": [{"domain": "light", "service": "turn_off", "entity_id": "light.kitchen"}]
        }
        row = await fg.gateway.store.undo_row(request_id)
        assert row is not None
        assert row.state is UndoState.UNDONE


async def test_undo_puts_back_the_brightness_a_call_changed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    home.set_state("light.kitchen", "on", {"brightness": 40, "color_mode": "brightness"})
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1, KITCHEN_ON)
        await fg.guardian.press(request_id, "allow")
        assert (await reply(ws))["result"]["status"] == "executed"
        assert home.state("light.kitchen")["attributes"]["brightness"] == 120
        assert (await fg.guardian.press(request_id, "undo")).startswith("undone")
        kitchen = home.state("light.kitchen")
        assert (kitchen["state"], kitchen["attributes"]["brightness"]) == ("on", 40)
        assert posts(home, "/api/services/light/turn_on")[-1] == {
            "entity_id": "light.kitchen",
            "brightness": 40,
        }


async def test_undo_after_the_window_runs_only_when_confirmed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home, guardian_settings={"undo_window": 60}) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1, KITCHEN_ON)
        await fg.guardian.press(request_id, "allow")
        await reply(ws)
        await trio.sleep(61)
        assert await fg.gateway.controls.undoable() == []  # not listed any more
        answer = await fg.guardian.press(request_id, "undo")
        assert answer.startswith("not undone yet: the undo window has passed (1 min")
        assert home.state("light.kitchen")["state"] == "on"  # nothing ran
        text, buttons = await fg.guardian.wait_for_notice(lambda t: "Undo of" in t)
        assert KITCHEN in text
        assert "Undo anyway sets: light.kitchen: off" in text
        assert buttons == (("↩ Undo anyway", f"undo!:{request_id}"),)
        assert (await fg.guardian.press(request_id, "undo!")).startswith("undone")
        assert home.state("light.kitchen")["state"] == "off"
        rows = [r for r in await fg.gateway.store.audit_rows(agent="pi") if r.kind == "undo"]
        assert [r.matched for r in rows] == ["undo by test guardian (1) (confirmed)"]


async def test_undo_after_an_outside_change_runs_only_when_confirmed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1, KITCHEN_ON)
        await fg.guardian.press(request_id, "allow")
        await reply(ws)
        home.set_state("light.kitchen", "on", {"brightness": 250})  # someone else moved it
        answer = await fg.guardian.press(request_id, "undo")
        assert answer == (
            "not undone yet: light.kitchen (now: on) changed since the call; confirm to restore"
        )
        assert home.state("light.kitchen")["attributes"]["brightness"] == 250
        assert fg.gateway.undo.restores == 0
        assert (await fg.guardian.press(request_id, "undo!")).startswith("undone")
        assert home.state("light.kitchen")["state"] == "off"


async def test_undo_of_a_call_the_policy_allowed_is_listed_and_told(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        executed = await run(ws, 1, COFFEE_ON)
        request_id = executed["result"]["request_id"]
        assert home.state("switch.coffee_maker")["state"] == "on"
        assert fg.guardian.cards == {}  # allowed by policy: no card
        # Posted after the reply, it joins the next commit: before any later read.
        (item,) = await fg.gateway.controls.undoable()
        assert (item.request_id, item.decided_by) == (request_id, None)
        assert (await fg.guardian.press(request_id, "undo")).startswith("undone")
        assert home.state("switch.coffee_maker")["state"] == "off"
        # No card to edit: the guardians hear it in a message.
        text, _ = await fg.guardian.wait_for_notice(lambda t: t.startswith("↩ Undone"))
        assert "ha_call_service(switch.turn_on, switch.coffee_maker)" in text
        assert "switch.coffee_maker: off" in text


async def test_no_undo_where_there_is_no_safe_inverse(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    policy = POLICY + '  - pattern: "ha_call_service(scene.*)"\n    action: allow\n'
    async with gateway(tmp_path, home, policy=policy) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1, UNLOCK)
        await fg.guardian.press(request_id, "allow", "A (1)")
        await fg.guardian.press(request_id, "allow", "B (2)")
        assert (await reply(ws))["result"]["status"] == "executed"
        update = await fg.guardian.wait_for_update(request_id)
        assert update.undo_until is None  # a lock: never offered
        answer = await fg.guardian.press(request_id, "undo")
        assert answer == "nothing to undo: no undoable call has that id"
        scene = {"domain": "scene", "service": "apply", "entities": {"light.kitchen": "on"}}
        assert (await run(ws, 2, scene))["result"]["status"] == "executed"
        assert await fg.gateway.controls.undoable() == []


async def test_undo_window_zero_turns_undo_off(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home, guardian_settings={"undo_window": 0}) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1, KITCHEN_ON)
        await fg.guardian.press(request_id, "allow")
        await reply(ws)
        assert (await fg.guardian.wait_for_update(request_id)).undo_until is None
        assert (await fg.guardian.press(request_id, "undo")).startswith("nothing to undo")
        # No snapshot was read: before the call, one GET only (the card's target line).
        calls = [(m, t) for m, t, _ in home.calls]
        before = calls[: calls.index(("POST", "/api/services/light/turn_on"))]
        assert before.count(("GET", "/api/states/light.kitchen")) == 1


async def test_an_undo_that_fails_says_so_and_is_never_retried(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1, KITCHEN_ON)
        await fg.guardian.press(request_id, "allow")
        await reply(ws)
        await fg.guardian.wait_for_update(request_id)
        home.fail_with = 500
        answer = await fg.guardian.press(request_id, "undo!")  # confirmed: no state read first
        assert answer.startswith("undo failed: Home Assistant ")
        failed = fg.guardian.cards[request_id].updates[-1]
        assert failed.status is Status.UNDO_FAILED
        home.fail_with = None
        again = await fg.guardian.press(request_id, "undo!")
        assert again.startswith("not undone: it was tried already and failed (Home Assistant ")
        assert fg.gateway.undo.restores == 1
        assert home.state("light.kitchen")["state"] == "on"
        (row,) = [r for r in await fg.gateway.store.audit_rows(agent="pi") if r.kind == "undo"]
        assert (row.resolution, row.resolved_by) == ("failed", "test guardian (1)")


async def test_an_undo_interrupted_by_a_stop_is_never_run_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1, KITCHEN_ON)
        await fg.guardian.press(request_id, "allow")
        await reply(ws)
        assert await fg.gateway.store.begin_undo(
            request_id,
            by="x",
            at=0.0,
            entry=(await fg.gateway.store.audit_rows(agent="pi"))[0],
        )
    async with gateway(tmp_path, home) as fg:  # the restart after the crash
        row = await fg.gateway.store.undo_row(request_id)
        assert row is not None
        assert row.state is UndoState.FAILED
        answer = await fg.guardian.press(request_id, "undo!")
        assert answer.startswith("not undone: it was tried already and failed (interrupted")
        assert home.state("light.kitchen")["state"] == "on"


# -- Always allow -----------------------------------------------------------------------------


async def approve(fg: FastGateway, ws: WebSocketConnection, rpc_id: int) -> str:
    request_id = await ask(fg, ws, rpc_id, KITCHEN_ON)
    assert await fg.guardian.press(request_id, "allow") == "approved"
    assert (await reply(ws))["result"]["status"] == "executed"
    await fg.gateway.broker.idle()
    return request_id


async def test_always_allow_is_offered_after_the_threshold_and_honoured(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        for n in range(3):  # suggest_after = 3 (the default)
            request_id = await approve(fg, ws, n + 1)
            assert fg.guardian.cards[request_id].card.approved_before is None
            # Pressed where it is not offered: refused, nothing decided.
        fourth = await ask(fg, ws, 4, KITCHEN_ON)
        assert fg.guardian.cards[fourth].card.approved_before == 3
        assert await fg.guardian.press(fourth, "always") == "allowed always"
        assert (await reply(ws))["result"]["status"] == "executed"
        update = await fg.guardian.wait_for_update(fourth)
        assert update.grant_until == math.inf
        (grant,) = await fg.gateway.controls.grants()
        assert (grant.agent, grant.signature, grant.permanent) == ("pi", KITCHEN, True)

        # Honoured on the next call, without a card; a week later too.
        await trio.sleep(7 * 86400)
        executed = await run(ws, 5, KITCHEN_ON)
        assert executed["result"]["status"] == "executed"
        assert len(fg.guardian.cards) == 4
        rows = await fg.gateway.store.audit_rows(agent="pi", decision="allow")
        assert rows[-1].matched == f"grant {grant.grant_id} by test guardian (1)"
        guardian_rows = await fg.gateway.store.audit_rows(agent="-", decision="grant")
        assert [r.matched for r in guardian_rows] == [
            f"pi: {KITCHEN} always (until revoked) ({grant.grant_id})"
        ]

        # Revoked: it asks again.
        assert await fg.gateway.controls.revoke_grant(grant.grant_id, "Alex (42)")
        await ask(fg, ws, 6, KITCHEN_ON)


async def test_always_allow_is_not_offered_after_a_denial_nor_pressable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        for n in range(3):
            await approve(fg, ws, n + 1)
        denied = await ask(fg, ws, 4, KITCHEN_ON)
        assert await fg.guardian.press(denied, "deny") == "denied"
        await reply(ws)
        fifth = await ask(fg, ws, 5, KITCHEN_ON)
        assert fg.guardian.cards[fifth].card.approved_before is None
        answer = await fg.guardian.press(fifth, "always")
        assert answer.startswith("not decided: Always allow is offered only once")
        assert await fg.gateway.controls.grants() == []
        assert await fg.guardian.press(fifth, "allow") == "approved"  # still undecided before


async def test_a_deny_rule_wins_over_an_always_allow_grant(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        await fg.gateway.controls.add_grant("pi", KITCHEN, "Alex (42)", True)
        assert (await run(ws, 1, KITCHEN_ON))["result"]["status"] == "executed"
        deny = POLICY + '  - pattern: "ha_call_service(*, light.kitchen)"\n    action: deny\n'
        (tmp_path / "permissions.yaml").write_text(deny)
        result = await Reloader(fg.gateway, insecure=True).reload("test")
        assert result.ok, result.lines
        error = (await run(ws, 2, KITCHEN_ON))["error"]
        assert error["code"] == -32003  # the grant is still there; deny is decided first
        assert len(await fg.gateway.controls.grants()) == 1


# -- two-person approval ----------------------------------------------------------------------


async def test_two_person_rule_needs_two_different_guardians(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1, UNLOCK)
        card = fg.guardian.cards[request_id].card
        assert (card.quorum, card.votes, card.approved_before) == (2, (), None)
        for action in ("grant", "always"):  # never offered on such a card
            answer = await fg.guardian.press(request_id, action, "Alex (42)")
            assert "not offered where 2 guardians must allow" in answer
        first = await fg.guardian.press(request_id, "allow", "Alex (42)")
        assert first == "counted: 1 of 2 — another guardian must allow"
        again = await fg.guardian.press(request_id, "allow", "Alex (42)")
        assert again == "already counted: 1 of 2 — another guardian must allow"
        assert home.state("lock.front_door")["state"] == "locked"
        # The card is shown again with who allowed it.
        await fg.guardian.wait_restored(1)
        shown, _ = fg.guardian.shown[-1]
        assert shown.votes == ("Alex (42)",)
        second = await fg.guardian.press(request_id, "allow", "Sam (43)")
        assert second == "approved (2 of 2)"
        assert (await reply(ws))["result"]["status"] == "executed"
        assert home.state("lock.front_door")["state"] == "unlocked"
        assert len(posts(home, "/api/services/lock/unlock")) == 1
        late = await fg.guardian.press(request_id, "allow", "Kim (44)")
        assert late.startswith("expired: already approved")
        await fg.gateway.broker.idle()
        (asked,) = await fg.gateway.store.audit_rows(agent="pi", decision="ask")
        assert asked.resolved_by == "Alex (42) + Sam (43)"
        votes = await fg.gateway.store.audit_rows(agent="-", decision="vote")
        assert [(v.resolved_by, v.request_id) for v in votes] == [
            ("Alex (42)", request_id),
            ("Sam (43)", request_id),
        ]


async def test_no_grant_stands_for_two_guardians(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A grant made before the rule needed two guardians (or by mistake) does not let the call
    through: one guardian's grant is not two guardians' approval."""
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        signature = "ha_call_service(lock.unlock, lock.front_door)"
        await fg.gateway.controls.add_grant("pi", signature, "Alex (42)", True)
        request_id = await ask(fg, ws, 1, UNLOCK)
        assert fg.guardian.cards[request_id].card.quorum == 2
        assert home.state("lock.front_door")["state"] == "locked"


async def test_two_person_rule_deny_after_one_approval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1, UNLOCK)
        await fg.guardian.press(request_id, "allow", "Alex (42)")
        assert await fg.guardian.press(request_id, "deny", "Sam (43)") == "denied"
        assert (await reply(ws))["error"]["code"] == -32001
        assert posts(home, "/api/services/lock/unlock") == []


async def test_two_person_rule_timeout_after_one_approval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        start = trio.current_time()
        request_id = await ask(fg, ws, 1, UNLOCK)
        await fg.guardian.press(request_id, "allow", "Alex (42)")
        assert (await reply(ws))["error"]["code"] == -32002
        assert trio.current_time() - start >= 900  # the deadline holds for the whole
        assert posts(home, "/api/services/lock/unlock") == []


async def test_two_person_votes_survive_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        request_id = await ask(fg, ws, 1, UNLOCK)
        await fg.guardian.press(request_id, "allow", "Alex (42)")
    async with gateway(tmp_path, home) as fg:  # a crash, then a restart
        again = await fg.guardian.press(request_id, "allow", "Alex (42)")
        assert again.startswith("already counted: 1 of 2")
        assert await fg.guardian.press(request_id, "allow", "Sam (43)") == "approved (2 of 2)"
        await fg.gateway.broker.idle()
        assert home.state("lock.front_door")["state"] == "unlocked"


# -- quotas -----------------------------------------------------------------------------------


async def test_a_quota_turns_allow_into_ask_and_recovers_as_the_window_slides(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        for n in range(3):  # quota "3/min"
            assert (await run(ws, n + 1, COFFEE_ON))["result"]["status"] == "executed"
            await trio.sleep(10)
        request_id = await ask(fg, ws, 4, COFFEE_ON)
        card = fg.guardian.cards[request_id].card
        assert card.quota == "3 per minute"
        assert card.matched.startswith("quota reached: 3 per minute (rule 1: ")
        for action in ("grant", "always"):
            assert "not offered when a quota asked" in await fg.guardian.press(request_id, action)
        assert await fg.guardian.press(request_id, "allow") == "approved"
        assert (await reply(ws))["result"]["status"] == "executed"
        await trio.sleep(31)  # the first allowed call has left the window
        assert (await run(ws, 5, COFFEE_ON))["result"]["status"] == "executed"
        assert len(fg.guardian.cards) == 1


async def test_quota_counts_survive_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        for n in range(3):
            assert (await run(ws, n + 1, COFFEE_ON))["result"]["status"] == "executed"
        await fg.gateway.store.audit_rows()  # the resolutions are committed
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        await ask(fg, ws, 4, COFFEE_ON)  # derived from the audit log: still used up


async def test_a_quota_on_an_ask_rule_bounds_what_grants_allow(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    policy = POLICY.replace(
        '  - pattern: "ha_call_service(light.*)"\n    action: ask\n',
        '  - pattern: "ha_call_service(light.*)"\n    action: ask\n    quota: "2/h"\n',
    )
    async with gateway(tmp_path, home, policy=policy) as fg:
        ws = await authed(fg)
        await fg.gateway.controls.add_grant("pi", KITCHEN, "Alex (42)", True)
        for n in range(2):
            assert (await run(ws, n + 1, KITCHEN_ON))["result"]["status"] == "executed"
        request_id = await ask(fg, ws, 3, KITCHEN_ON)  # the grant no longer applies
        assert fg.guardian.cards[request_id].card.quota == "2 per hour"


# -- hot reload -------------------------------------------------------------------------------


async def test_reload_swaps_the_policy_and_audits_its_sha256(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        await ask(fg, ws, 1, KITCHEN_ON)  # pending: it keeps what it got
        light = '"ha_call_service(light.*)"\n    action: '
        text = POLICY.replace(light + "ask", light + "allow")
        (tmp_path / "permissions.yaml").write_text(text)
        result = await Reloader(fg.gateway, insecure=True).reload("SIGHUP")
        assert result.ok
        digest = hashlib.sha256(text.encode()).hexdigest()
        assert result.lines == (f"policies: policy.file sha256 {digest}",)
        answer = await run(ws, 2, KITCHEN_ON)
        assert answer.get("result", {}).get("status") == "executed", answer
        assert fg.gateway.broker.waiting("pi") == 1  # the earlier ask still waits
        (row,) = await fg.gateway.store.audit_rows(agent="-", decision="reload")
        assert row.resolved_by == "SIGHUP"
        assert digest in str(row.matched)
        text, _ = await fg.guardian.wait_for_notice(lambda t: "reloaded" in t)
        assert text.startswith("🔄 Configuration reloaded by SIGHUP.")


async def test_a_reload_that_fails_keeps_everything(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        ws = await authed(fg)
        (tmp_path / "permissions.yaml").write_text("rules:\n  - {pattern: x, action: maybe}\n")
        result = await Reloader(fg.gateway, insecure=True).reload("Alex")
        assert not result.ok
        assert "rules[0].action: expected one of allow, deny, ask" in result.text
        request_id = await ask(fg, ws, 1, KITCHEN_ON)  # the old policy still decides
        assert request_id
        (row,) = await fg.gateway.store.audit_rows(agent="-", decision="reload_failed")
        assert "rules[0].action" in str(row.matched)
        text, _ = await fg.guardian.wait_for_notice(lambda t: "failed" in t)
        assert "the running configuration stays" in text
        # A gate.toml that does not parse: the same.
        (tmp_path / "gate.toml").write_text("[gateway\n")
        assert not (await Reloader(fg.gateway, insecure=True).reload("Alex")).ok


async def test_a_reload_that_removes_an_agent_closes_its_connections(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    home = fake_home()
    async with gateway(tmp_path, home) as fg:
        pi = await authed(fg, "pi")
        laptop = await authed(fg, "laptop")
        request_id = await ask(fg, pi, 1, KITCHEN_ON)
        write_gate_toml(
            tmp_path,
            tokens={"laptop": DEFAULT_TOKENS["laptop"]},
            ha_url="http://ha.test",
            ha_token=HA_TOKEN,
            tls=None,
            policy=POLICY,
            gateway={"listen": "127.0.0.1:9"},  # needs a restart: said, not applied
        )
        result = await Reloader(fg.gateway, insecure=True).reload("test")
        assert result.ok
        assert "agents: -pi" in result.text
        assert result.closed == 1
        assert result.restart == ("gateway.listen",)
        assert fg.gateway.config.gateway.listen == "127.0.0.1:0"
        code, reason = await closed(pi)
        assert code == 1008
        assert "agent removed" in reason
        # The removed token no longer authenticates; the other agent goes on.
        again = await fg.connect()
        answer = await call(again, 0, "auth", token=DEFAULT_TOKENS["pi"])
        assert answer["error"]["code"] == -32005
        assert (await call(laptop, 2, "list_tools"))["result"]["tools"]
        # The pending approval keeps what it got: approved, it runs, its result queued.
        assert await fg.guardian.press(request_id, "allow") == "approved"
        await fg.gateway.broker.idle()
        assert home.state("light.kitchen")["state"] == "on"
