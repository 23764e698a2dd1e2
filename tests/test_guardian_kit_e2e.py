"""The guardian's toolkit end to end (issue 18): the real gateway over TLS, the real Telegram
guardian talking to the fake Bot API, the fake home over HTTP, an agent on a WebSocket, and
the operator's commands (``agentgate reload``, ``grants``, ``undo``) run as processes.

Undo windows and quota windows pass on the gateway's wall clock, which the test moves on
(:class:`WallClock`); everything else waits on events, under ``trio.fail_after`` ceilings.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from agentgate.store import AuditEntry
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.fake_telegram import FakeMessage, FakeTelegram, run_fake_telegram
from agentgate.testing.harness import (
    DEFAULT_TOKENS,
    Harness,
    RawAgent,
    raw_agent,
    running_gateway,
    write_gate_toml,
)
from agentgate.testing.processes import agent_websocket
from tests.test_telegram_e2e import Agent, card_of, edited, posts

pytestmark = pytest.mark.slow

TOKEN = "123456:E2E-GUARDIAN-KIT"
CHAT = -1001
ALICE, BOB, MALLORY = 111, 222, 666
NAMES = {ALICE: "Alice", BOB: "Bob", MALLORY: "Mallory"}
CEILING = 45

POLICY = """\
defaults:
  - pattern: "ha_get_*"
    action: allow
rules:
  - pattern: "ha_call_service(light.*)"
    action: ask
  - pattern: "ha_call_service(switch.*)"
    action: allow
    quota: "2/min"
  - pattern: "ha_call_service(lock.*)"
    action: ask
    approvals: 2
"""

KITCHEN_ON = {
    "domain": "light",
    "service": "turn_on",
    "entity_id": "light.kitchen",
    "brightness": 200,
}
KITCHEN = "ha_call_service(light.turn_on, light.kitchen)"
COFFEE_ON = {"domain": "switch", "service": "turn_on", "entity_id": "switch.coffee_maker"}
UNLOCK = {"domain": "lock", "service": "unlock", "entity_id": "lock.front_door"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}


class WallClock:
    """The gateway's wall clock: real time, plus whatever the test moved it on by."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with run_fake_telegram(token=TOKEN, chat_id=CHAT) as fake:
        yield fake


@pytest.fixture
def clock() -> WallClock:
    return WallClock()


@asynccontextmanager
async def gate(
    workdir: Path,
    home: FakeHomeAssistant,
    tg: FakeTelegram,
    clock: WallClock,
    *,
    users: tuple[int, ...] = (ALICE,),
    approval_timeout: float = 60,
    **toml: Any,
) -> AsyncIterator[Harness]:
    telegram = {
        "token": TOKEN,
        "chat_id": CHAT,
        "allowed_users": list(users),
        "base_url": tg.base_url,
    }
    async with running_gateway(
        workdir,
        home=home,
        use_telegram=True,
        telegram=telegram,
        gateway={"approval_timeout": approval_timeout},
        policy=toml.pop("policy", POLICY),
        now=clock,
        **toml,
    ) as gw:
        yield gw


@asynccontextmanager
async def agent_of(gw: Harness, name: str = "pi") -> AsyncIterator[Agent]:
    async with raw_agent(gw, name) as raw:
        yield Agent(raw)


@asynccontextmanager
async def closable_agent(gw: Harness, name: str) -> AsyncIterator[Agent]:
    """An agent the gateway may close: its socket is closed here whatever trio-websocket does
    (its client leaves it open when the server closes the WebSocket)."""
    async with agent_websocket(gw.url, gw.client_ssl) as ws:
        raw = RawAgent(ws)
        reply = await raw.call("auth", {"token": gw.tokens[name]})
        assert reply.get("result", {}).get("status") == "authenticated", reply
        yield Agent(raw)


async def press(tg: FakeTelegram, message: FakeMessage, kind: str, user: int = ALICE) -> str:
    """Press the button whose callback data starts with ``kind:``; the bot's answer."""
    data = next(d for _, d in message.buttons if d.startswith(f"{kind}:"))
    pressed = tg.press(message.message_id, data, user, first_name=NAMES[user])
    return str((await pressed.wait_answer()).text)


def kinds(message: FakeMessage) -> list[str]:
    return [data.partition(":")[0] for _, data in message.buttons]


async def agentgate(*args: str) -> tuple[int, str, str]:
    """``python -m agentgate ARGS`` as the operator runs it: (status, stdout, stderr)."""
    done = await trio.run_process(
        [sys.executable, "-m", "agentgate", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def guardian_rows(gw: Harness, decision: str) -> list[AuditEntry]:
    return [
        r
        for r in await gw.gateway.store.audit_rows(agent="-", decision=decision)
        if r.kind == "guardian"
    ]


# -- Undo -------------------------------------------------------------------------------------


async def test_undo_from_the_executed_card_restores_the_brightness(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram, clock: WallClock
) -> None:
    home.set_state("light.kitchen", "on", {"brightness": 40, "color_mode": "brightness"})
    with trio.fail_after(CEILING):
        async with gate(workdir, home, tg, clock) as gw, agent_of(gw) as agent:
            request_id = await agent.ask(1, **KITCHEN_ON)
            card = await card_of(tg, request_id)
            assert await press(tg, card, "allow") == "approved"
            assert (await agent.reply(1))["result"]["status"] == "executed"
            done = await edited(tg, card, "Executed")
            assert done.buttons == [("↩ Undo", f"undo:{request_id}")]
            assert "↩ Undo possible until " in done.text
            assert home.state("light.kitchen")["attributes"]["brightness"] == 200

            assert await press(tg, done, "undo") == "undone: light.kitchen: on"
            kitchen = home.state("light.kitchen")
            assert (kitchen["state"], kitchen["attributes"]["brightness"]) == ("on", 40)
            undone = await edited(tg, card, "Undone")
            assert undone.text.startswith("↩ Undone by Alice (111) at ")
            assert "light.kitchen: on" in undone.text
            assert undone.buttons == []
            # Pressed again (the button on an older render of the card): nothing runs.
            again = await press(tg, done, "undo")
            assert again.startswith("already undone by Alice (111)")
            assert len(posts(home)) == 2  # the call, and its undo
            rows = [r for r in await gw.gateway.store.audit_rows(agent="pi") if r.kind == "undo"]
            assert [(r.request_id, r.resolution, r.resolved_by) for r in rows] == [
                (request_id, "executed", "Alice (111)")
            ]


async def test_undo_after_the_window_or_an_outside_change_asks_to_confirm(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram, clock: WallClock
) -> None:
    with trio.fail_after(CEILING):
        async with gate(workdir, home, tg, clock) as gw, agent_of(gw) as agent:
            first = await agent.ask(1, **KITCHEN_ON)
            card = await card_of(tg, first)
            await press(tg, card, "allow")
            await agent.reply(1)
            done = await edited(tg, card, "Executed")

            # Someone else moved it: told, nothing runs until confirmed.
            home.set_state("light.kitchen", "on", {"brightness": 10})
            answer = await press(tg, done, "undo")
            assert answer.startswith("not undone yet: light.kitchen (now: on) changed since")
            confirm = await tg.wait_for_message(lambda m: "undo!:" in json.dumps(m.buttons))
            assert "Undo anyway sets: light.kitchen: off" in confirm.text
            assert home.state("light.kitchen")["attributes"]["brightness"] == 10
            assert (await press(tg, confirm, "undo!")).startswith("undone")
            assert home.state("light.kitchen")["state"] == "off"

            # After the window (10 min by default): the same.
            second = await agent.ask(2, **KITCHEN_ON)
            card = await card_of(tg, second)
            await press(tg, card, "allow")
            await agent.reply(2)
            done = await edited(tg, card, "Executed")
            clock.advance(601)
            answer = await press(tg, done, "undo")
            assert answer.startswith("not undone yet: the undo window has passed (10 min")
            assert home.state("light.kitchen")["state"] == "on"
            confirm = await tg.wait_for_message(
                lambda m: f"undo!:{second}" in [d for _, d in m.buttons]
            )
            assert (await press(tg, confirm, "undo!")).startswith("undone")
            assert home.state("light.kitchen")["state"] == "off"


async def test_undo_command_lists_policy_allowed_calls_and_strangers_are_refused(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram, clock: WallClock
) -> None:
    with trio.fail_after(CEILING):
        async with gate(workdir, home, tg, clock) as gw, agent_of(gw) as agent:
            executed = await agent.tool(1, "ha_call_service", **COFFEE_ON)
            request_id = executed["result"]["request_id"]
            tg.send_command("/undo", ALICE)
            listing = await tg.wait_for_message(lambda m: m.text.startswith("Undo (newest"))
            assert "ha_call_service(switch.turn_on, switch.coffee_maker)" in listing.text
            assert "by policy" in listing.text
            assert "undo sets switch.coffee_maker: off" in listing.text
            assert listing.buttons == [("↩ Undo 1", f"undo:{request_id}")]
            # A stranger's press and command: refused, audited, nothing runs.
            stranger = tg.press(
                listing.message_id, f"undo:{request_id}", MALLORY, first_name="Mallory"
            )
            answer = await stranger.wait_answer()
            assert answer.text == "not authorised"
            assert home.state("switch.coffee_maker")["state"] == "on"
            assert await press(tg, listing, "undo") == "undone: switch.coffee_maker: off"
            told = await tg.wait_for_message(lambda m: m.text.startswith("↩ Undone by Alice"))
            assert "switch.coffee_maker: off" in told.text
            refused = await guardian_rows(gw, "refused")
            assert [r.resolved_by for r in refused] == ["Mallory (666)"]
            tg.send_command("/undo", ALICE)
            await tg.wait_for_message(lambda m: m.text.startswith("Nothing to undo"))


async def test_agentgate_undo_from_the_shell(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram, clock: WallClock
) -> None:
    with trio.fail_after(CEILING):
        async with gate(workdir, home, tg, clock) as gw, agent_of(gw) as agent:
            request_id = await agent.ask(1, **KITCHEN_ON)
            card = await card_of(tg, request_id)
            await press(tg, card, "allow")
            await agent.reply(1)
            await edited(tg, card, "Executed")
            config = str(gw.workdir / "gate.toml")
            home.set_state("light.kitchen", "on", {"brightness": 10})
            status, _, err = await agentgate("undo", request_id, "--config", config)
            assert status == 1
            assert "changed since the call: run again with --confirm" in err
            status, out, err = await agentgate("undo", request_id, "--config", config, "--confirm")
            assert status == 0, err
            assert out.strip() == "undone: light.kitchen: off"
            assert home.state("light.kitchen")["state"] == "off"
            undone = await edited(tg, card, "Undone")
            assert "(shell, uid " in undone.text
            status, _, err = await agentgate("undo", request_id, "--config", config)
            assert status == 1
            assert "already undone" in err
            status, _, err = await agentgate("undo", "no-such-id", "--config", config)
            assert (status, "nothing to undo" in err) == (1, True)
        # No gateway running: it says so.
        status, _, err = await agentgate("undo", request_id, "--config", config)
        assert status == 3
        assert "no gateway answers on" in err


# -- Always allow -----------------------------------------------------------------------------


async def test_always_allow_offered_after_the_threshold_then_revoked_in_telegram(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram, clock: WallClock
) -> None:
    with trio.fail_after(CEILING):
        async with (
            gate(workdir, home, tg, clock, guardian_settings={"suggest_after": 2}) as gw,
            agent_of(gw) as agent,
        ):
            for n in (1, 2):
                request_id = await agent.ask(n, **KITCHEN_ON)
                card = await card_of(tg, request_id)
                assert kinds(card) == ["allow", "deny", "grant"]
                await press(tg, card, "allow")
                await agent.reply(n)
                await edited(tg, card, "Executed")
            request_id = await agent.ask(3, **KITCHEN_ON)
            card = await card_of(tg, request_id)
            assert kinds(card) == ["allow", "deny", "grant", "always"]
            assert ("🔁 Always allow (approved 2 times)", f"always:{request_id}") in card.buttons
            assert await press(tg, card, "always") == "allowed always"
            assert (await agent.reply(3))["result"]["status"] == "executed"
            done = await edited(tg, card, "Executed")
            assert "🔁 Allowed always: the same request from pi runs without asking" in done.text

            # Honoured without a card, a month later too.
            clock.advance(31 * 86400)
            cards = len(tg.calls_to("sendMessage"))
            assert (await agent.tool(4, "ha_call_service", **KITCHEN_ON))["result"]
            assert len(tg.calls_to("sendMessage")) == cards
            (grant_row,) = await guardian_rows(gw, "grant")
            assert str(grant_row.matched).startswith(f"pi: {KITCHEN} always (until revoked)")

            tg.send_command("/grants", ALICE)
            listing = await tg.wait_for_message(lambda m: "Active grants" in m.text)
            assert "always (until revoked)" in listing.text
            assert await press(tg, listing, "revoke") == "grant revoked"
            request_id = await agent.ask(5, **KITCHEN_ON)  # asks again
            assert [r.decision for r in await guardian_rows(gw, "revoke")] == ["revoke"]


async def test_grants_listed_and_revoked_from_the_shell(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram, clock: WallClock
) -> None:
    with trio.fail_after(CEILING):
        async with gate(workdir, home, tg, clock) as gw, agent_of(gw) as agent:
            request_id = await agent.ask(1, **KITCHEN_ON)
            await press(tg, await card_of(tg, request_id), "grant")
            await agent.reply(1)
            config = str(gw.workdir / "gate.toml")
            status, out, _ = await agentgate("grants", "--config", config, "--json")
            assert status == 0
            (listed,) = [json.loads(line) for line in out.splitlines()]
            assert (listed["agent"], listed["signature"], listed["permanent"]) == (
                "pi",
                KITCHEN,
                False,
            )
            status, out, err = await agentgate(
                "grants", "--config", config, "--revoke", listed["grant_id"]
            )
            assert (status, out.strip()) == (0, "grant revoked"), err
            # The running gateway knows at once: the next call asks.
            again = await agent.ask(2, **KITCHEN_ON)
            assert again
            (revoked,) = await guardian_rows(gw, "revoke")
            assert str(revoked.resolved_by).endswith(")")
            assert "(shell, uid " in str(revoked.resolved_by)
            status, _, err = await agentgate(
                "grants", "--config", config, "--revoke", listed["grant_id"]
            )
            assert status == 1
            assert "no active grant" in err


async def test_a_grant_revoked_while_the_gateway_is_down_stays_revoked(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram, clock: WallClock
) -> None:
    with trio.fail_after(CEILING):
        async with gate(workdir, home, tg, clock) as gw, agent_of(gw) as agent:
            request_id = await agent.ask(1, **KITCHEN_ON)
            await press(tg, await card_of(tg, request_id), "grant")
            await agent.reply(1)
            (grant,) = await gw.gateway.controls.grants()
        config = str(workdir / "gate.toml")
        status, out, err = await agentgate("grants", "--config", config, "--revoke", grant.grant_id)
        assert status == 0, err
        assert "the gateway is not running" in out
        async with gate(workdir, home, tg, clock) as gw, agent_of(gw) as agent:
            assert await gw.gateway.controls.grants() == []
            assert await agent.ask(2, **KITCHEN_ON)


# -- two-person approval ----------------------------------------------------------------------


async def test_two_person_rule_in_telegram(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram, clock: WallClock
) -> None:
    with trio.fail_after(CEILING):
        async with (
            gate(workdir, home, tg, clock, users=(ALICE, BOB)) as gw,
            agent_of(gw) as agent,
        ):
            # One approval, then the same guardian again: counted once, nothing runs.
            request_id = await agent.ask(1, **UNLOCK)
            card = await card_of(tg, request_id)
            assert kinds(card) == ["allow", "deny"]  # no Allow 1 h, no Always allow
            assert "👥 2 guardians must allow: 0 of 2" in card.text
            answer = await press(tg, card, "allow", ALICE)
            assert answer == "counted: 1 of 2 — another guardian must allow"
            voted = await edited(tg, card, "1 of 2 — approved by Alice (111)")
            assert kinds(voted) == ["allow", "deny"]
            assert (await press(tg, voted, "allow", ALICE)).startswith("already counted: 1 of 2")
            assert home.state("lock.front_door")["state"] == "locked"
            # The second guardian: it runs, once.
            assert await press(tg, voted, "allow", BOB) == "approved (2 of 2)"
            assert (await agent.reply(1))["result"]["status"] == "executed"
            done = await edited(tg, card, "Executed")
            assert done.text.startswith("✅ Executed by Alice (111) + Bob (222)")
            assert len(posts(home, "/api/services/lock/unlock")) == 1

            # A deny after one approval denies at once.
            home.set_state("lock.front_door", "locked")
            request_id = await agent.ask(2, **UNLOCK)
            card = await card_of(tg, request_id)
            await press(tg, card, "allow", BOB)
            assert await press(tg, card, "deny", ALICE) == "denied"
            assert (await agent.reply(2))["error"]["code"] == -32001
            assert len(posts(home, "/api/services/lock/unlock")) == 1


async def test_two_person_rule_times_out_after_one_approval(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram, clock: WallClock
) -> None:
    with trio.fail_after(CEILING):
        async with (
            gate(workdir, home, tg, clock, users=(ALICE, BOB), approval_timeout=3) as gw,
            agent_of(gw) as agent,
        ):
            request_id = await agent.ask(1, **UNLOCK)
            card = await card_of(tg, request_id)
            assert (await press(tg, card, "allow", ALICE)).startswith("counted: 1 of 2")
            assert (await agent.reply(1))["error"]["code"] == -32002
            await edited(tg, card, "Timed out")
            assert posts(home, "/api/services/lock/unlock") == []
            assert gw.gateway.broker.executions == 0


# -- quotas -----------------------------------------------------------------------------------


async def test_a_quota_crosses_into_ask_and_recovers_when_the_window_slides(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram, clock: WallClock
) -> None:
    with trio.fail_after(CEILING):
        async with gate(workdir, home, tg, clock) as gw, agent_of(gw) as agent:
            for n in (1, 2):  # quota: 2/min
                assert (await agent.tool(n, "ha_call_service", **COFFEE_ON))["result"]
            request_id = await agent.ask(3, **COFFEE_ON)
            card = await card_of(tg, request_id)
            assert "quota reached: 2 per minute" in card.text
            assert kinds(card) == ["allow", "deny"]
            assert await press(tg, card, "deny") == "denied"
            assert (await agent.reply(3))["error"]["code"] == -32001
            clock.advance(61)
            assert (await agent.tool(4, "ha_call_service", **COFFEE_ON))["result"]
            asked = await gw.gateway.store.audit_rows(agent="pi", decision="ask")
            assert len(asked) == 1
            config = str(gw.workdir / "gate.toml")
            status, out, _ = await agentgate(
                "check", "--config", config, "--agent", "pi", "ha_call_service", "domain=switch",
                "service=turn_on", "entity_id=switch.coffee_maker",
            )  # fmt: skip
            assert status == 0
            assert "quota:     2 per minute for this agent, then it asks; " in out
            assert " used in the last minute" in out


# -- hot reload -------------------------------------------------------------------------------


async def test_reload_from_the_shell_succeeds_fails_and_removes_an_agent(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram, clock: WallClock
) -> None:
    with trio.fail_after(CEILING + 15):
        async with (
            gate(workdir, home, tg, clock, mcp={"wait": 30}) as gw,
            closable_agent(gw, "pi") as pi,
            agent_of(gw, "laptop") as laptop,
        ):
            config = str(gw.workdir / "gate.toml")
            policy = gw.workdir / "permissions.yaml"

            # 1. Lights are allowed from now on.
            policy.write_text(
                POLICY.replace('(light.*)"\n    action: ask', '(light.*)"\n    action: allow')
            )
            status, out, err = await agentgate("reload", "--config", config)
            assert status == 0, err
            assert out.startswith(f"reloaded: {config}")
            assert "policy.file sha256 " in out
            assert (await pi.tool(1, "ha_call_service", **KITCHEN_ON))["result"]
            await tg.wait_for_message(lambda m: m.text.startswith("🔄 Configuration reloaded by"))
            (row,) = await guardian_rows(gw, "reload")
            assert "(shell, uid " in str(row.resolved_by)

            # 2. A policy that does not load: the old one stays, the guardians hear it.
            policy.write_text("rules: [")
            status, _, err = await agentgate("reload", "--config", config)
            assert status == 2
            assert "invalid YAML" in err
            await tg.wait_for_message(lambda m: "reload" in m.text and "failed" in m.text)
            assert (await pi.tool(2, "ha_call_service", **KITCHEN_ON))["result"]

            # 3. pi removed mid-session: its WebSocket and its MCP request are closed.
            policy.write_text(POLICY)  # lights ask again
            assert (await agentgate("reload", "--config", config))[0] == 0
            async with httpx.AsyncClient(verify=gw.client_ssl) as http:
                headers = {
                    "Accept": "application/json, text/event-stream",
                    "Authorization": f"Bearer {gw.tokens['pi']}",
                }
                opened = await http.post(gw.mcp_url, json=INITIALIZE, headers=headers)
                headers["Mcp-Session-Id"] = opened.headers["mcp-session-id"]
                headers["Mcp-Protocol-Version"] = "2025-11-25"
                ready = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                assert (await http.post(gw.mcp_url, json=ready, headers=headers)).status_code == 202
                call = {
                    "jsonrpc": "2.0",
                    "id": 2,
                    "method": "tools/call",
                    "params": {"name": "ha_call_service", "arguments": KITCHEN_ON},
                }
                async with http.stream("POST", gw.mcp_url, json=call, headers=headers) as reply:
                    await tg.wait_for_message(lambda m: "via MCP" in m.text)
                    write_gate_toml(
                        gw.workdir,
                        tokens={"laptop": DEFAULT_TOKENS["laptop"]},
                        ha_url=home.url,
                        ha_token=home.token,
                        tls=(gw.workdir / "gate.crt", gw.workdir / "gate.key"),
                        policy=POLICY,
                        gateway={"approval_timeout": 60},
                        telegram={
                            "token": TOKEN,
                            "chat_id": CHAT,
                            "allowed_users": [ALICE],
                            "base_url": tg.base_url,
                        },
                        mcp={"wait": 30},
                    )
                    status, out, err = await agentgate("reload", "--config", config)
                    assert status == 0, err
                    assert "agents: -pi" in out
                    assert "connections closed (1008): 2" in out
                    with pytest.raises(httpx.HTTPError):
                        await reply.aread()  # ended mid-stream
                code, reason = await closed_by_gateway(pi)
                assert (code, reason) == (1008, "agent removed by a configuration reload")
                refused = await http.post(gw.mcp_url, json=call, headers=headers)
                assert refused.status_code == 401
            assert (await laptop.tool(3, "ha_get_state", entity_id="sensor.outdoor_humidity"))[
                "result"
            ]
            assert (await laptop.tool(4, "ha_call_service", **COFFEE_ON))["result"]


async def closed_by_gateway(agent: Agent) -> tuple[int, str]:
    from trio_websocket import ConnectionClosed

    try:
        while True:
            await agent.raw.ws.get_message()
    except ConnectionClosed as exc:
        return exc.reason.code, str(exc.reason.reason)
