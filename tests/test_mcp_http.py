"""The MCP Streamable HTTP door, end to end: the official ``mcp`` client on Trio, over TLS, to
the real gateway in front of the fake home, with a scripted guardian."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from mcp.shared.exceptions import MCPError

import agentgate.mcp.http as mcp_http
from agentgate.guardian import Status
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import Harness, raw_agent, running_gateway
from agentgate.testing.mcp_client import mcp_http_client

pytestmark = pytest.mark.slow

CEILING = 30
LIGHT_ON = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}
LIGHT_PATH = "/api/services/light/turn_on"
READ = {"entity_id": "sensor.living_room_temperature"}


def posts(home: FakeHomeAssistant, path: str) -> int:
    return sum(1 for method, target, _ in home.calls if method == "POST" and target == path)


def text(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


def client(gw: Harness, agent: str = "pi", **kw: Any) -> Any:
    return mcp_http_client(gw.mcp_url, token=gw.tokens[agent], ca=gw.ca_path, **kw)


def gate(workdir: Path, home: FakeHomeAssistant, **kw: Any) -> Any:
    mcp = {"wait": 20, **kw.pop("mcp", {})}
    return running_gateway(workdir, home=home, mcp=mcp, **kw)


async def test_tools_list_reads_allowed_and_policy_denials_name_the_rule(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with gate(workdir, home) as gw, client(gw) as mcp:
            assert gw.mcp_url.startswith("https://127.0.0.1:")
            tools = {tool.name: tool for tool in (await mcp.list_tools()).tools}
            assert {"ha_get_state", "ha_call_service", "agentgate_result"} <= set(tools)
            assert "agentgate_pending_results" in tools
            state = tools["ha_get_state"]
            assert state.input_schema["required"] == ["entity_id"]
            assert state.title
            assert state.annotations is not None
            assert state.annotations.read_only_hint is True
            assert state.annotations.open_world_hint is False
            service = tools["ha_call_service"].annotations
            assert service is not None
            assert service.destructive_hint is True
            assert service.read_only_hint is False
            assert all(tool.output_schema is None for tool in tools.values())

            read = await mcp.call_tool("ha_get_state", READ)
            assert not read.is_error
            assert read.structured_content is not None
            data = read.structured_content["data"]
            assert data["entity_id"] == "sensor.living_room_temperature"
            assert json.loads(text(read)) == data
            request_id = read.structured_content["request_id"]

            denied = await mcp.call_tool(
                "ha_call_service",
                {"domain": "lock", "service": "unlock", "entity_id": "lock.front_door"},
            )
            assert denied.is_error
            assert text(denied).startswith(
                "denied by policy: ha_call_service(lock.unlock, lock.front_door) — rule"
            )
            assert "ha_call_service(lock.*)" in text(denied)
            assert posts(home, "/api/services/lock/unlock") == 0
            assert gw.scripted.cards == {}

            rows = await gw.gateway.store.audit_rows(agent="pi")
            allowed = next(r for r in rows if r.request_id == request_id)
            assert (allowed.decision, allowed.resolution, allowed.via) == (
                "allow",
                "executed",
                "mcp-http",
            )
            assert [r.via for r in rows if r.decision == "deny"] == ["mcp-http"]


async def test_invalid_arguments_get_the_websocket_message_and_unknown_tools_a_protocol_error(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    bad = {"entity_id": "sensor.*"}
    with trio.fail_after(CEILING):
        async with gate(workdir, home) as gw, client(gw) as mcp, raw_agent(gw) as agent:
            reply = await agent.tool("ha_get_state", **bad)
            assert reply["error"]["code"] == -32602
            result = await mcp.call_tool("ha_get_state", bad)
            assert result.is_error
            assert text(result) == reply["error"]["message"]

            with pytest.raises(MCPError) as raised:
                await mcp.call_tool("no_such_tool", {})
            assert raised.value.error.code == -32602
            assert "unknown tool" in raised.value.error.message
            assert home.calls == [] or all(m == "GET" for m, _, _ in home.calls)


async def test_ask_waits_with_progress_then_the_approval_executes_once(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    notices: list[str] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        notices.append(message or "")

    with trio.fail_after(CEILING):
        async with gate(workdir, home) as gw, client(gw) as mcp:
            outcome: list[Any] = []

            async def call() -> None:
                outcome.append(
                    await mcp.call_tool("ha_call_service", LIGHT_ON, progress_callback=progress)
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                shown = await gw.scripted.wait_for_card()
                assert shown.card.via == "mcp-http"
                assert posts(home, LIGHT_PATH) == 0
                assert await gw.scripted.press(shown.card.request_id, "allow") == "approved"
            result = outcome[0]
            assert not result.is_error, text(result)
            assert result.structured_content["request_id"] == shown.card.request_id
            assert posts(home, LIGHT_PATH) == 1
            assert notices
            assert notices[0].startswith("waiting for the guardian's approval (expires ")
            assert shown.card.request_id in notices[0]
            update = await gw.scripted.wait_for_update(shown.card.request_id)
            assert update.status is Status.EXECUTED  # delivered, not queued
            await gw.settled()
            rows = await gw.gateway.store.audit_rows(agent="pi", decision="ask")
            assert [(r.resolution, r.via) for r in rows] == [("executed", "mcp-http")]


async def test_ask_denied_by_the_guardian_or_timed_out(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with (
            gate(workdir, home, gateway={"approval_timeout": 2}) as gw,
            client(gw) as mcp,
        ):
            outcome: list[Any] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: _append(outcome, mcp.call_tool("ha_call_service", LIGHT_ON))
                )
                card = (await gw.scripted.wait_for_card()).card
                assert await gw.scripted.press(card.request_id, "deny") == "denied"
            assert outcome[0].is_error
            assert text(outcome[0]).startswith("denied by the guardian")

            timed_out = await mcp.call_tool("ha_call_service", LIGHT_ON)  # nobody presses
            assert timed_out.is_error
            assert text(timed_out).startswith("approval timed out")
            assert posts(home, LIGHT_PATH) == 0


async def _append(out: list[Any], awaitable: Any) -> None:
    out.append(await awaitable)


async def test_still_pending_after_wait_then_agentgate_result_returns_it(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with gate(workdir, home, mcp={"wait": 1}) as gw, client(gw) as mcp:
            pending = await mcp.call_tool("ha_call_service", LIGHT_ON)
            assert not pending.is_error
            content = pending.structured_content
            assert content is not None
            assert content["status"] == "pending"
            request_id = content["request_id"]
            assert isinstance(content["expires_at"], float)
            assert "agentgate_result" in text(pending)

            again = await mcp.call_tool("agentgate_result", {"request_id": request_id})
            assert again.structured_content["status"] == "pending"  # still undecided
            assert await gw.scripted.press(request_id, "allow") == "approved"
            await gw.settled()
            assert posts(home, LIGHT_PATH) == 1

            first = await mcp.call_tool("agentgate_result", {"request_id": request_id})
            assert not first.is_error, text(first)
            assert first.structured_content["request_id"] == request_id
            assert first.structured_content["data"]
            second = await mcp.call_tool("agentgate_result", {"request_id": request_id})
            assert second.structured_content == first.structured_content
            queued = await mcp.call_tool("agentgate_pending_results", {})
            assert queued.structured_content["results"] == []  # delivered by agentgate_result
            assert posts(home, LIGHT_PATH) == 1  # reading it ran nothing

            unknown = await mcp.call_tool("agentgate_result", {"request_id": "nope"})
            assert unknown.is_error
            assert "unknown request" in text(unknown)


async def test_a_cancelled_or_dropped_call_leaves_its_approval_to_run_once_and_queue(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        # a wait longer than the ceiling: only noticing the client's departure ends the calls
        async with gate(workdir, home, mcp={"wait": 600}) as gw:
            # 1. the client cancels the call (notifications/cancelled)
            async with client(gw) as mcp:
                with trio.move_on_after(60) as scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(mcp.call_tool, "ha_call_service", LIGHT_ON)
                        first = (await gw.scripted.wait_for_card()).card
                        scope.cancel()
            # 2. the client goes away mid-call: its connection closes, nothing is said
            async with httpx.AsyncClient(verify=gw.client_ssl) as http:
                headers = _headers(gw.tokens["pi"])
                opened = await http.post(
                    gw.mcp_url, json=_initialize("2025-11-25"), headers=headers
                )
                headers["Mcp-Session-Id"] = opened.headers["mcp-session-id"]
                headers["Mcp-Protocol-Version"] = "2025-11-25"
                ready = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                assert (await http.post(gw.mcp_url, json=ready, headers=headers)).status_code == 202
                call = {
                    "jsonrpc": "2.0",
                    "id": 2,
                    "method": "tools/call",
                    "params": {"name": "ha_call_service", "arguments": LIGHT_ON},
                }
                async with http.stream("POST", gw.mcp_url, json=call, headers=headers) as reply:
                    assert reply.status_code == 200
                    second = (await gw.scripted.wait_for_card(2)).card
            await gw.gateway.mcp.idle()  # the call noticed its client was gone
            for card in (first, second):
                assert await gw.scripted.press(card.request_id, "allow") == "approved"
                update = await gw.scripted.wait_for_update(card.request_id)
                assert update.status is Status.QUEUED
            await gw.settled()
            assert posts(home, LIGHT_PATH) == 2
            async with client(gw) as mcp:
                queued = await mcp.call_tool("agentgate_pending_results", {})
                results = queued.structured_content["results"]
                assert sorted(r["request_id"] for r in results) == sorted(
                    [first.request_id, second.request_id]
                )
                assert {r["status"] for r in results} == {"executed"}
                assert (await mcp.call_tool("agentgate_pending_results", {})).structured_content[
                    "results"
                ] == []
            assert posts(home, LIGHT_PATH) == 2


async def test_wrong_token_401_foreign_origin_403_and_the_failed_auth_limit_429(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "ha_call_service", "arguments": LIGHT_ON},
    }
    headers = {"Accept": "application/json, text/event-stream"}
    with trio.fail_after(CEILING):
        async with gate(workdir, home, mcp={"allowed_origins": ["https://ok.example"]}) as gw:
            async with httpx.AsyncClient(verify=gw.client_ssl) as http:
                good = {**headers, "Authorization": f"Bearer {gw.tokens['pi']}"}
                foreign = await http.post(
                    gw.mcp_url, json=body, headers={**good, "Origin": "https://evil.example"}
                )
                assert foreign.status_code == 403
                assert foreign.json()["error"]["message"] == "origin not allowed"
                none = await http.post(gw.mcp_url, json=body, headers=headers)
                assert none.status_code == 401
                assert none.headers["www-authenticate"].startswith("Bearer")
                for _ in range(5):
                    wrong = await http.post(
                        gw.mcp_url, json=body, headers={**headers, "Authorization": "Bearer x" * 3}
                    )
                    assert wrong.status_code == 401
                    assert wrong.json()["error"]["code"] == -32005
                limited = await http.post(gw.mcp_url, json=body, headers=good)
                assert limited.status_code == 429
                assert int(limited.headers["retry-after"]) >= 1
                assert limited.json()["error"]["code"] == -32006
            assert gw.scripted.cards == {}
            assert posts(home, LIGHT_PATH) == 0
            rows = await gw.gateway.store.audit_rows()
            assert rows == []


LAPTOP_POLICY = """\
defaults:
  - pattern: "*"
    action: deny
rules:
  - pattern: "ha_get_state(sensor.*)"
    action: deny
    description: the laptop reads nothing
"""


async def test_each_agent_gets_its_own_policy_and_only_its_own_session(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with (
            gate(workdir, home, agent_policies={"laptop": LAPTOP_POLICY}) as gw,
            client(gw, "pi") as pi,
            client(gw, "laptop") as laptop,
        ):
            assert not (await pi.call_tool("ha_get_state", READ)).is_error
            refused = await laptop.call_tool("ha_get_state", READ)
            assert refused.is_error
            assert "the laptop reads nothing" in text(refused) or "rule" in text(refused)
            rows = await gw.gateway.store.audit_rows(agent="laptop")
            assert [(r.decision, r.via) for r in rows] == [("deny", "mcp-http")]
            # A session opened by pi cannot be used with laptop's token.
            async with httpx.AsyncClient(verify=gw.client_ssl) as http:
                opened = await http.post(
                    gw.mcp_url,
                    json=_initialize("2025-06-18"),
                    headers=_headers(gw.tokens["pi"]),
                )
                assert opened.status_code == 200
                session = opened.headers["mcp-session-id"]
                hijack = await http.post(
                    gw.mcp_url,
                    json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                    headers={**_headers(gw.tokens["laptop"]), "Mcp-Session-Id": session},
                )
                assert hijack.status_code == 404


def _initialize(version: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"},
        },
    }


def _headers(token: str) -> dict[str, str]:
    return {
        "Accept": "application/json, text/event-stream",
        "Authorization": f"Bearer {token}",
    }


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_protocol_versions(workdir: Path, home: FakeHomeAssistant, mode: str) -> None:
    with trio.fail_after(CEILING):
        async with gate(workdir, home) as gw, client(gw, mode=mode) as mcp:
            assert mcp.protocol_version == ("2025-11-25" if mode == "legacy" else mode)
            read = await mcp.call_tool("ha_get_state", READ)
            assert not read.is_error
            async with httpx.AsyncClient(verify=gw.client_ssl) as http:
                old = await http.post(
                    gw.mcp_url, json=_initialize("2025-06-18"), headers=_headers(gw.tokens["pi"])
                )
                assert old.status_code == 200
                assert "2025-06-18" in old.text


async def test_one_rate_and_one_pending_budget_per_agent_across_both_doors(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with (
            gate(
                workdir, home, limits={"requests_per_minute": 5, "max_pending_per_agent": 1}
            ) as gw,
            raw_agent(gw) as agent,
            client(gw) as mcp,  # its initialize: the first request this minute
        ):
            await agent.send(
                {
                    "jsonrpc": "2.0",
                    "id": "ask",
                    "method": "tool_request",
                    "params": {"tool": "ha_call_service", "args": LIGHT_ON},
                }
            )
            await gw.scripted.wait_for_card()  # the second request, pending, from the WS door
            await mcp.list_tools()  # the third request this minute (the client lists once)
            over = await mcp.call_tool("ha_call_service", LIGHT_ON)
            assert over.is_error
            assert "too many pending approvals" in text(over)
            assert len(gw.scripted.cards) == 1
            read = await agent.tool("ha_get_state", **READ)  # the fifth request this minute
            assert read["result"]["status"] == "executed"
            limited = await mcp.call_tool("ha_get_state", READ)
            assert limited.is_error
            assert text(limited).startswith("rate limited")
            assert (await agent.tool("ha_get_state", **READ))["error"]["code"] == -32006


async def test_a_waiting_call_hears_the_gateway_shut_down(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with gate(workdir, home) as gw, client(gw) as mcp:
            outcome: list[Any] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_append, outcome, mcp.call_tool("ha_call_service", LIGHT_ON))
                await gw.scripted.wait_for_card()
                gw.running.request_stop()
            assert outcome[0].is_error
            # A planned stop: the approval stays open for the next start, its result queued.
            assert text(outcome[0]).startswith("gateway restarting: the approval stays open")
            assert posts(home, LIGHT_PATH) == 0


async def test_an_execution_longer_than_the_doors_bound_is_not_cut_short(
    workdir: Path, home: FakeHomeAssistant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A started call may outlive its MCP caller by a bound; that bound is longer than Home
    Assistant's own timeout, so a slow service is never cut off mid-call by the door."""
    monkeypatch.setattr(mcp_http, "SUBMIT_BOUND", 1.0)  # stands for a service timeout > 60 s
    allow = 'rules:\n  - pattern: "ha_call_service(light.*)"\n    action: allow\n'
    with trio.fail_after(CEILING):
        async with gate(workdir, home, policy=allow, ha_timeout=10) as gw, client(gw) as mcp:
            home.answer_delay = 2.0  # it runs at once, answers 2 s later
            result = await mcp.call_tool("ha_call_service", LIGHT_ON)
            assert not result.is_error, text(result)
            await gw.settled()
            rows = await gw.gateway.store.audit_rows(agent="pi")
            assert [(r.decision, r.resolution) for r in rows] == [("allow", "executed")]
    assert posts(home, LIGHT_PATH) == 1


async def test_one_agent_cannot_take_every_mcp_session(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    """Sessions come from one pool for every agent; each agent holds at most its share
    (``max_connections_per_agent``), and a closed session gives its place back."""
    with trio.fail_after(CEILING):
        async with gate(workdir, home, limits={"max_connections_per_agent": 2}) as gw:
            async with client(gw) as first, client(gw) as second:
                assert (await first.list_tools()).tools
                assert (await second.list_tools()).tools
                with pytest.raises(Exception) as refused:  # noqa: PT011 - the SDK wraps the 429
                    async with client(gw) as third:
                        await third.list_tools()
                assert "429" in repr(refused.value) or "too many open MCP sessions" in repr(
                    refused.value
                )
                async with client(gw, "laptop") as other:  # another agent still gets one
                    assert (await other.list_tools()).tools
            async with client(gw) as again:  # the first two were closed: room again
                assert (await again.list_tools()).tools
