"""End to end through Telegram: agent → gateway → fake Bot API → guardian's press → fake home.

Everything runs on real sockets on 127.0.0.1: the real gateway over TLS, the real Telegram
guardian (python-telegram-bot inside trio-asyncio) talking to the fake Bot API, the real httpx
executor talking to the fake Home Assistant, and a bare JSON-RPC agent. The test plays the
guardian by pressing buttons on the cards the fake Bot API received.

trio-asyncio plus real I/O cannot run on ``autojump_clock``, so these tests use the real clock
under ``trio.fail_after`` ceilings; the 3 s approval timeout is the only wait that is a timeout.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from agentgate.guardian.telegram import SendLimits
from agentgate.store import AuditEntry
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.fake_telegram import FakeMessage, FakeTelegram, run_fake_telegram
from agentgate.testing.harness import Harness, RawAgent, raw_agent, running_gateway

pytestmark = pytest.mark.slow

TOKEN = "123456:E2E-GUARDIAN-TOKEN"
CHAT = -1001
ALICE = 111  # in allowed_users
MALLORY = 666  # not
CEILING = 30

KITCHEN_ON = {
    "domain": "light",
    "service": "turn_on",
    "entity_id": "light.kitchen",
    "brightness": 200,
}
KITCHEN_SIGNATURE = "ha_call_service(light.turn_on, light.kitchen)"
KITCHEN_PATH = "/api/services/light/turn_on"
READ = {"entity_id": "sensor.living_room_temperature"}


# -- helpers ----------------------------------------------------------------------------------


class Agent:
    """A raw JSON-RPC agent that keeps replies and notifications apart, by id."""

    def __init__(self, raw: RawAgent) -> None:
        self.raw = raw
        self.replies: dict[Any, dict[str, Any]] = {}
        self.pending: dict[Any, str] = {}  # rpc_id -> request_id (approval_pending)
        self.results_pending: list[int] = []

    async def _read_one(self) -> None:
        frame = json.loads(await self.raw.ws.get_message())
        if "id" in frame:
            self.replies[frame["id"]] = frame
        elif frame.get("method") == "approval_pending":
            params = frame["params"]
            self.pending[params["rpc_id"]] = params["request_id"]
        elif frame.get("method") == "results_pending":
            self.results_pending.append(frame["params"]["count"])

    async def send(self, rpc_id: Any, method: str, params: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.raw.send(message)

    async def ask(self, rpc_id: Any, **args: Any) -> str:
        """Send a tool request that needs a human; return its request_id once announced."""
        await self.send(rpc_id, "tool_request", {"tool": "ha_call_service", "args": args})
        while rpc_id not in self.pending:
            if rpc_id in self.replies:
                raise AssertionError(f"answered instead of asking: {self.replies[rpc_id]}")
            await self._read_one()
        return self.pending[rpc_id]

    async def reply(self, rpc_id: Any) -> dict[str, Any]:
        while rpc_id not in self.replies:
            await self._read_one()
        return self.replies.pop(rpc_id)

    async def tool(self, rpc_id: Any, tool: str, **args: Any) -> dict[str, Any]:
        await self.send(rpc_id, "tool_request", {"tool": tool, "args": args})
        return await self.reply(rpc_id)


@asynccontextmanager
async def telegram_gateway(
    workdir: Path,
    home: FakeHomeAssistant,
    base_url: str,
    *,
    approval_timeout: float = 60,
) -> AsyncIterator[Harness]:
    telegram = {"token": TOKEN, "chat_id": CHAT, "allowed_users": [ALICE], "base_url": base_url}
    async with running_gateway(
        workdir,
        home=home,
        use_telegram=True,
        telegram=telegram,
        gateway={"approval_timeout": approval_timeout},
    ) as gw:
        yield gw


@asynccontextmanager
async def agent_of(gw: Harness) -> AsyncIterator[Agent]:
    async with raw_agent(gw) as raw:
        yield Agent(raw)


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with run_fake_telegram(token=TOKEN, chat_id=CHAT) as fake:
        yield fake


def has_button(data: str) -> Callable[[FakeMessage], bool]:
    return lambda m: data in [d for _, d in m.buttons]


async def card_of(tg: FakeTelegram, request_id: str) -> FakeMessage:
    """The approval card (with its Allow button) for ``request_id``."""
    return await tg.wait_for_message(has_button(f"allow:{request_id}"))


async def edited(tg: FakeTelegram, card: FakeMessage, text: str) -> FakeMessage:
    """Wait until ``card`` has been edited to show ``text``; return it as it is then."""
    return await tg.wait_for_message(lambda m: m.message_id == card.message_id and text in m.text)


async def press(tg: FakeTelegram, card: FakeMessage, action: str, user: int = ALICE) -> str:
    """Press ``action`` (allow, deny, grant) on ``card``; return the bot's answer."""
    data = next(d for _, d in card.buttons if d.startswith(f"{action}:"))
    name = "Alice" if user == ALICE else "Mallory"
    answer = await tg.press(card.message_id, data, user, first_name=name).wait_answer()
    return str(answer.text)


def stale(answer: str) -> bool:
    """The answer to a press on a resolved (or forgotten) approval: "expired" (issue 4)."""
    return answer.startswith("expired")


async def guardian_rows(gw: Harness, decision: str, *, count: int) -> list[AuditEntry]:
    """The ``count`` guardian audit rows with ``decision`` (a refused press is audited before
    it is answered, so they are there once the answer is)."""
    rows = await gw.gateway.store.audit_rows(agent="-", decision=decision)
    rows = [r for r in rows if r.kind == "guardian"]
    assert len(rows) == count, rows
    return rows


async def silently_audited(gw: Harness, decision: str, *, count: int) -> list[AuditEntry]:
    """Wait for guardian rows nothing else shows: a stranger's command gets no answer at all,
    so this watches the store's audit writes, each of which wakes it once committed (the
    caller's ceiling bounds this)."""
    store = gw.gateway.store
    written = trio.Event()
    audit = store.audit

    async def watched(entry: AuditEntry, **kw: Any) -> int:
        try:
            return await audit(entry, **kw)
        finally:
            written.set()

    store.audit = watched  # type: ignore[method-assign]  # a spy: the store has no write event
    try:
        while True:
            rows = await store.audit_rows(agent="-", decision=decision)
            rows = [r for r in rows if r.kind == "guardian"]
            if len(rows) >= count:
                return rows
            await written.wait()
            written = trio.Event()
    finally:
        del store.audit


def posts(home: FakeHomeAssistant, path: str = KITCHEN_PATH) -> list[Any]:
    """The bodies of every ``POST path`` the fake home executed."""
    return [body for method, target, body in home.calls if method == "POST" and target == path]


def cards(tg: FakeTelegram) -> list[FakeMessage]:
    """Every approval card sent so far."""
    return [m for m in tg.messages.values() if any(d.startswith("allow:") for _, d in m.buttons)]


def approval_cards(tg: FakeTelegram) -> int:
    """How many approval cards were sent (edited ones included)."""
    return sum(1 for p in tg.calls_to("sendMessage") if "allow:" in json.dumps(p))


# -- decisions --------------------------------------------------------------------------------


async def test_allow_executes_and_the_card_says_so(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    with trio.fail_after(CEILING):
        async with telegram_gateway(workdir, home, tg.base_url) as gw, agent_of(gw) as agent:
            request_id = await agent.ask(1, **KITCHEN_ON)
            card = await card_of(tg, request_id)
            assert card.chat_id == CHAT
            assert "Approval needed" in card.text
            assert "Agent: pi" in card.text
            assert "Target: light.kitchen “Kitchen Light” — now: off" in card.text
            assert f"Signature: {KITCHEN_SIGNATURE}" in card.text
            assert "ha_call_service(light.*)" in card.text  # what decided "ask"
            for key, value in KITCHEN_ON.items():  # every argument, service data included
                assert f'"{key}": {json.dumps(value)}' in card.text
            assert home.state("light.kitchen")["state"] == "off"

            assert await press(tg, card, "allow") == "approved"
            reply = await agent.reply(1)
            result = reply["result"]
            assert (result["status"], result["request_id"]) == ("executed", request_id)
            assert [s["entity_id"] for s in result["data"]] == ["light.kitchen"]
            kitchen = home.state("light.kitchen")
            assert (kitchen["state"], kitchen["attributes"]["brightness"]) == ("on", 200)
            assert posts(home) == [{"entity_id": "light.kitchen", "brightness": 200}]

            done = await edited(tg, card, "Executed")
            assert done.text.startswith("✅ Executed by Alice (111)")
            assert "light.kitchen: on" in done.text
            # The target says what it is after the call, not what it was when asked.
            assert "Target: light.kitchen “Kitchen Light” — now: on" in done.text
            assert "now: off" not in done.text
            assert done.buttons == [("↩ Undo", f"undo:{request_id}")]  # issue 18: Undo stays
            rows = await gw.gateway.store.audit_rows(agent="pi", decision="ask")
            assert [(r.request_id, r.resolution, r.resolved_by) for r in rows] == [
                (request_id, "executed", "Alice (111)")
            ]


async def test_deny(workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram) -> None:
    with trio.fail_after(CEILING):
        async with telegram_gateway(workdir, home, tg.base_url) as gw, agent_of(gw) as agent:
            request_id = await agent.ask("deny-me", **KITCHEN_ON)
            card = await card_of(tg, request_id)
            assert await press(tg, card, "deny") == "denied"
            error = (await agent.reply("deny-me"))["error"]
            assert error["code"] == -32001
            assert "Alice (111)" in error["message"]
            assert error["data"] == {"request_id": request_id, "signature": KITCHEN_SIGNATURE}
            done = await edited(tg, card, "Denied")
            assert done.text.startswith("❌ Denied by Alice (111)")
            assert done.buttons == []
    assert posts(home) == []
    assert home.state("light.kitchen")["state"] == "off"


async def test_timeout(workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram) -> None:
    with trio.fail_after(CEILING):
        async with (
            telegram_gateway(workdir, home, tg.base_url, approval_timeout=3) as gw,
            agent_of(gw) as agent,
        ):
            request_id = await agent.ask(7, **KITCHEN_ON)
            card = await card_of(tg, request_id)
            assert "(in 3 s)" in card.text
            error = (await agent.reply(7))["error"]
            assert error["code"] == -32002
            assert error["data"]["request_id"] == request_id
            done = await edited(tg, card, "Timed out")
            assert done.buttons == []
            # A press on the timed-out card changes nothing.
            assert stale(await press(tg, card, "allow"))
    assert posts(home) == []


async def test_stranger_is_refused_and_audited(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    with trio.fail_after(CEILING):
        async with telegram_gateway(workdir, home, tg.base_url) as gw, agent_of(gw) as agent:
            request_id = await agent.ask(1, **KITCHEN_ON)
            card = await card_of(tg, request_id)
            assert await press(tg, card, "allow", user=MALLORY) == "not authorised"
            assert await press(tg, card, "grant", user=MALLORY) == "not authorised"
            refused = await guardian_rows(gw, "refused", count=2)
            assert [r.resolved_by for r in refused] == ["Mallory (666)", "Mallory (666)"]
            assert f"allow:{request_id}" in str(refused[0].matched)
            assert posts(home) == []
            assert tg.messages[card.message_id].edits == 0
            assert gw.gateway.broker.waiting("pi") == 1
            # The real guardian still decides.
            assert await press(tg, card, "allow") == "approved"
            assert (await agent.reply(1))["result"]["status"] == "executed"
    assert len(posts(home)) == 1


async def test_double_press_executes_once(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    with trio.fail_after(CEILING):
        async with telegram_gateway(workdir, home, tg.base_url) as gw, agent_of(gw) as agent:
            request_id = await agent.ask(1, **KITCHEN_ON)
            card = await card_of(tg, request_id)
            data = f"allow:{request_id}"
            first = tg.press(card.message_id, data, ALICE)
            second = tg.press(card.message_id, data, ALICE)  # before the first is answered
            answers = [str((await p.wait_answer()).text) for p in (first, second)]
            assert sorted(answers, key=stale) == ["approved", answers[answers[0] == "approved"]]
            assert stale(answers[answers[0] == "approved"]), answers
            assert (await agent.reply(1))["result"]["status"] == "executed"
            await edited(tg, card, "Executed")
            # Later presses (even Deny) on the finished card: expired, nothing happens.
            late = await tg.press(card.message_id, f"deny:{request_id}", ALICE).wait_answer()
            assert stale(str(late.text))
            assert gw.gateway.broker.executions == 1
    assert len(posts(home)) == 1


# -- Allow 1 h --------------------------------------------------------------------------------


async def test_allow_for_an_hour_then_revoke(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    with trio.fail_after(CEILING):
        async with telegram_gateway(workdir, home, tg.base_url) as gw, agent_of(gw) as agent:
            request_id = await agent.ask(1, **KITCHEN_ON)
            card = await card_of(tg, request_id)
            assert await press(tg, card, "grant") == "allowed for 1 h"
            assert (await agent.reply(1))["result"]["status"] == "executed"
            done = await edited(tg, card, "Executed")
            # The card says the grant is active, and until when.
            assert "⏱ Allowed for 1 h: the same request from pi runs without asking until " in (
                done.text
            )
            assert approval_cards(tg) == 1

            # The same signature again: executed at once, no card.
            again = await agent.tool(2, "ha_call_service", **KITCHEN_ON)
            assert again["result"]["status"] == "executed"
            assert 2 not in agent.pending
            assert approval_cards(tg) == 1
            assert len(posts(home)) == 2
            rows = await gw.gateway.store.audit_rows(agent="pi", decision="allow")
            assert rows[-1].request_id == again["result"]["request_id"]
            assert str(rows[-1].matched).startswith("grant ")

            # Another entity still asks.
            other = await agent.ask(3, domain="light", service="turn_on", entity_id="light.bedroom")
            other_card = await card_of(tg, other)
            assert await press(tg, other_card, "deny") == "denied"
            assert (await agent.reply(3))["error"]["code"] == -32001

            # /grants lists it, with a Revoke button that works.
            tg.send_command("/grants", ALICE)
            listing = await tg.wait_for_message(lambda m: "Active grants" in m.text)
            assert KITCHEN_SIGNATURE in listing.text
            assert "agent pi" in listing.text
            ((label, revoke),) = listing.buttons
            assert label == "Revoke 1"
            answer = await tg.press(listing.message_id, revoke, ALICE).wait_answer()
            assert answer.text == "grant revoked"
            again = await tg.press(listing.message_id, revoke, ALICE).wait_answer()
            assert "already gone" in str(again.text)
            tg.send_command("/grants", ALICE)
            await tg.wait_for_message(lambda m: m.text == "No active grants.")

            # Revoked: the same request asks again.
            request_id = await agent.ask(4, **KITCHEN_ON)
            await card_of(tg, request_id)
            decisions = [
                r.decision
                for r in await gw.gateway.store.audit_rows(agent="-")
                if r.kind == "guardian"
            ]
            assert decisions == ["grant", "revoke"]
    assert len(posts(home)) == 2


# -- commands ---------------------------------------------------------------------------------


async def test_freeze_denies_pending_and_new_requests_until_unfreeze(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    with trio.fail_after(CEILING):
        async with telegram_gateway(workdir, home, tg.base_url) as gw, agent_of(gw) as agent:
            request_id = await agent.ask(1, **KITCHEN_ON)
            card = await card_of(tg, request_id)

            tg.send_command("/freeze", ALICE, first_name="Alice")
            await tg.wait_for_message(lambda m: "Frozen by Alice (111)" in m.text)
            error = (await agent.reply(1))["error"]  # the pending ask is denied by the freeze
            assert (error["code"], error["message"]) == (-32003, "frozen by guardian")
            frozen_card = await edited(tg, card, "Frozen")
            assert frozen_card.buttons == []
            assert stale(await press(tg, card, "allow"))

            # Everything is refused while frozen, even what the policy allows.
            for rpc_id, tool, args in [
                (2, "ha_call_service", KITCHEN_ON),
                (3, "ha_get_state", READ),
            ]:
                error = (await agent.tool(rpc_id, tool, **args))["error"]
                assert (error["code"], error["message"]) == (-32003, "frozen by guardian")
            assert approval_cards(tg) == 1

            tg.send_command("/unfreeze", ALICE, first_name="Alice")
            await tg.wait_for_message(lambda m: "Unfrozen by Alice (111)" in m.text)
            assert (await agent.tool(4, "ha_get_state", **READ))["result"]["status"] == "executed"
            request_id = await agent.ask(5, **KITCHEN_ON)
            assert await press(tg, await card_of(tg, request_id), "allow") == "approved"
            assert (await agent.reply(5))["result"]["status"] == "executed"
            decisions = [
                r.decision
                for r in await gw.gateway.store.audit_rows(agent="-")
                if r.kind == "guardian"
            ]
            assert decisions == ["freeze", "unfreeze"]
    assert len(posts(home)) == 1


async def test_status_and_pending(workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram) -> None:
    with trio.fail_after(CEILING):
        async with telegram_gateway(workdir, home, tg.base_url) as gw, agent_of(gw) as agent:
            tg.send_command("/pending", ALICE)
            await tg.wait_for_message(lambda m: m.text == "No pending approvals.")
            request_id = await agent.ask(1, **KITCHEN_ON)
            card = await card_of(tg, request_id)

            tg.send_command("/status", ALICE)
            status = await tg.wait_for_message(lambda m: "agentgate status" in m.text)
            assert "Agents connected: pi (1)" in status.text
            assert "Pending approvals: 1" in status.text
            assert "Frozen: no" in status.text

            tg.send_command("/pending", ALICE)
            resent = await tg.wait_for_message(
                lambda m: m.message_id != card.message_id and has_button(f"allow:{request_id}")(m)
            )
            assert "Target: light.kitchen “Kitchen Light” — now: off" in resent.text
            # Either copy of the card decides; the first press wins.
            assert await press(tg, resent, "allow") == "approved"
            assert (await agent.reply(1))["result"]["status"] == "executed"
            assert stale(await press(tg, card, "allow"))

            # A stranger's command gets no answer but is audited.
            before = len(tg.calls_to("sendMessage"))
            tg.send_command("/status", MALLORY, first_name="Mallory")
            (refused,) = await silently_audited(gw, "refused", count=1)
            assert refused.resolved_by == "Mallory (666)"
            assert refused.matched == "command /status"
            assert len(tg.calls_to("sendMessage")) == before
    assert len(posts(home)) == 1


# -- outages ----------------------------------------------------------------------------------


async def test_outage_fails_asks_closed_and_reads_go_on(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    with trio.fail_after(CEILING + 20):
        async with telegram_gateway(workdir, home, tg.base_url) as gw, agent_of(gw) as agent:
            tg.down()
            asked = trio.current_time()
            request_id = await agent.ask(1, **KITCHEN_ON)
            # The ask is being retried: reads are served meanwhile.
            read = await agent.tool(2, "ha_get_state", **READ)
            assert read["result"]["status"] == "executed"
            error = (await agent.reply(1))["error"]
            # Failed closed within the guardian's send budget (its attempts are cut at it).
            assert trio.current_time() - asked <= SendLimits().budget
            assert error["code"] == -32004
            assert error["message"].startswith("guardian unreachable")
            assert error["data"]["request_id"] == request_id
            assert gw.gateway.broker.waiting("pi") == 0
            assert posts(home) == []

            tg.up()
            request_id = await agent.ask(3, **KITCHEN_ON)
            card = await card_of(tg, request_id)
            assert await press(tg, card, "allow") == "approved"  # polling came back too
            assert (await agent.reply(3))["result"]["status"] == "executed"
    assert len(posts(home)) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_telegram_unreachable_at_start_up(workdir: Path, home: FakeHomeAssistant) -> None:
    """The gateway starts and serves without Telegram; once the Bot API answers, asks work."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/bot"
    with trio.fail_after(CEILING + 20):
        async with telegram_gateway(workdir, home, base_url) as gw, agent_of(gw) as agent:
            read = await agent.tool(1, "ha_get_state", **READ)
            assert read["result"]["status"] == "executed"
            await agent.ask(2, **KITCHEN_ON)
            error = (await agent.reply(2))["error"]
            assert error["code"] == -32004
            assert error["message"].startswith("guardian unreachable")
            assert f"127.0.0.1:{port}" not in json.dumps(error)  # no internal address

            async with run_fake_telegram(token=TOKEN, chat_id=CHAT, port=port) as tg:
                await tg.wait_for(lambda: tg.calls_to("getUpdates") or None)  # bot running
                request_id = await agent.ask(3, **KITCHEN_ON)
                card = await card_of(tg, request_id)
                assert await press(tg, card, "allow") == "approved"
                assert (await agent.reply(3))["result"]["status"] == "executed"
    assert len(posts(home)) == 1


async def test_a_token_refused_after_start_up_is_retried_not_fatal(
    workdir: Path, home: FakeHomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the first start treats a refused token as a configuration error; later (here:
    Telegram unreachable at first, then refusing the token, then fine) it is an outage."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/bot"
    with trio.fail_after(CEILING + 20), caplog.at_level(logging.INFO, logger="agentgate"):
        async with (
            telegram_gateway(workdir, home, base_url) as gw,
            agent_of(gw) as agent,
            run_fake_telegram(token=TOKEN, chat_id=CHAT, port=port) as tg,
        ):
            tg.fail("getMe", 401, "Unauthorized")
            await tg.wait_for(lambda: tg.calls_to("getMe") or None)
            await agent.ask(1, **KITCHEN_ON)
            error = (await agent.reply(1))["error"]
            assert error["code"] == -32004  # asks fail closed meanwhile
            assert error["message"].startswith("guardian unreachable")
            read = await agent.tool(2, "ha_get_state", **READ)
            assert read["result"]["status"] == "executed"
            tg.heal()
            await tg.wait_for(lambda: tg.calls_to("getUpdates") or None)  # running again
            request_id = await agent.ask(3, **KITCHEN_ON)
            card = await card_of(tg, request_id)
            assert await press(tg, card, "allow") == "approved"
            assert (await agent.reply(3))["result"]["status"] == "executed"
    refused = [
        r
        for r in caplog.records
        if "refused the bot token" in r.getMessage() and r.levelname == "ERROR"
    ]
    assert len(refused) == 1, [r.getMessage() for r in refused]  # once, not at every attempt
    assert "guardian.telegram.token" in refused[0].getMessage()
    assert any("Telegram guardian running again" in r.getMessage() for r in caplog.records)


async def test_delete_webhook_failing_at_start_up_does_not_stop_the_gateway(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    tg.fail_next("deleteWebhook", 502, "Bad Gateway")  # exit 1 before (start_polling raised)
    with trio.fail_after(CEILING):
        async with telegram_gateway(workdir, home, tg.base_url) as gw, agent_of(gw) as agent:
            request_id = await agent.ask(1, **KITCHEN_ON)
            card = await card_of(tg, request_id)
            assert await press(tg, card, "allow") == "approved"
            assert (await agent.reply(1))["result"]["status"] == "executed"
