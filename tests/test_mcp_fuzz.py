"""Fuzzed MCP input on the HTTP door: malformed JSON, wrong types, huge bodies, unknown
methods, random JSON. Every answer is an HTTP error or a JSON-RPC message (never a crash, never
a 5xx), nothing executes, no card goes out, and a WebSocket agent is served all along."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import Harness, raw_agent, running_gateway

pytestmark = pytest.mark.slow

CEILING = 120
MODERN = "2026-07-28"

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_messages = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]) | _json,
        "id": st.integers() | st.text(max_size=8) | st.none() | _json,
        "method": st.sampled_from(
            ["tools/call", "tools/list", "initialize", "ping", "nope/nope", "resources/list"]
        )
        | _json,
        "params": st.fixed_dictionaries(
            {},
            optional={
                "name": st.sampled_from(["ha_call_service", "ha_get_state", "agentgate_result"])
                | _json,
                "arguments": _json,
                "_meta": _json,
            },
        )
        | _json,
    },
)


def _headers(gw: Harness, **extra: str) -> dict[str, str]:
    return {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {gw.tokens['pi']}",
        **extra,
    }


def _check(reply: httpx.Response) -> None:
    assert reply.status_code < 500, reply.text
    if reply.status_code >= 400 and reply.content:
        body = reply.json()
        assert body["jsonrpc"] == "2.0"
        assert isinstance(body["error"]["code"], int)
    elif reply.headers.get("content-type", "").startswith("application/json") and reply.content:
        body = reply.json()
        assert isinstance(body, dict | list)
    elif reply.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[5:] for line in reply.text.splitlines() if line.startswith("data:")]
        for event in events:
            if event.strip():
                assert json.loads(event)["jsonrpc"] == "2.0"


async def _session(http: httpx.AsyncClient, gw: Harness) -> dict[str, str]:
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "fuzz", "version": "1"},
        },
    }
    opened = await http.post(gw.mcp_url, json=init, headers=_headers(gw))
    assert opened.status_code == 200
    headers = _headers(
        gw,
        **{"Mcp-Session-Id": opened.headers["mcp-session-id"]},
        **{"Mcp-Protocol-Version": "2025-11-25"},
    )
    ready = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    await http.post(gw.mcp_url, json=ready, headers=headers)
    return headers


async def test_hand_picked_garbage_gets_json_rpc_errors(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    cases: list[tuple[bytes, dict[str, str] | None, int | None]] = [
        (b"{not json", None, None),
        (b"", None, None),
        (b"[]", None, None),
        (b'"just a string"', None, None),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "nope/nope"}', None, None),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": []}', None, None),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 3}}', None, None),
        (
            b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call",'
            b' "params": {"name": "ha_call_service", "arguments": "on"}}',
            None,
            None,
        ),
        (b"x" * 200_000, None, 413),
        (b'{"jsonrpc": "2.0"}', {"Content-Type": "text/plain"}, 415),
    ]
    with trio.fail_after(CEILING):
        async with (
            running_gateway(workdir, home=home, mcp={}) as gw,
            raw_agent(gw) as agent,
            httpx.AsyncClient(verify=gw.client_ssl) as http,
        ):
            session = await _session(http, gw)
            for body, extra, status in cases:
                for headers in (session, _headers(gw, **{"Mcp-Protocol-Version": MODERN})):
                    reply = await http.post(
                        gw.mcp_url, content=body, headers={**headers, **(extra or {})}
                    )
                    _check(reply)
                    if status is not None:
                        assert reply.status_code == status
                # the WebSocket agent is served meanwhile
                read = await agent.tool("ha_get_state", entity_id="sensor.living_room_temperature")
                assert read["result"]["status"] == "executed"
            assert gw.scripted.cards == {}
            assert [call for call in home.calls if call[0] == "POST"] == []


async def test_random_json_rpc_never_crashes_nor_executes(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with (
            running_gateway(
                workdir, home=home, mcp={"wait": 1}, limits={"requests_per_minute": 100_000}
            ) as gw,
            httpx.AsyncClient(verify=gw.client_ssl) as http,
        ):
            session = await _session(http, gw)
            modern = _headers(gw, **{"Mcp-Protocol-Version": MODERN})
            seen: list[Any] = []

            @settings(
                max_examples=60,
                deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            )
            @given(message=_messages, modern_era=st.booleans())
            def fuzz(message: dict[str, Any], modern_era: bool) -> None:
                seen.append((message, modern if modern_era else session))

            fuzz()
            for message, headers in seen:
                body = json.dumps(message).encode()
                with trio.fail_after(30):
                    reply = await http.post(gw.mcp_url, content=body, headers=headers)
                _check(reply)
            async with raw_agent(gw) as agent:
                read = await agent.tool("ha_get_state", entity_id="sensor.living_room_temperature")
                assert read["result"]["status"] == "executed"
            assert [call for call in home.calls if call[0] == "POST"] == []
