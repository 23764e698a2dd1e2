"""``agentgate mcp`` end to end: the official ``mcp`` client on Trio starts the bridge as a
subprocess (as an MCP host does) and speaks MCP over its stdio; the bridge forwards over WSS
(TLS) to the real gateway in front of the fake home, with a scripted guardian."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from mcp.shared.exceptions import MCPError

from agentgate.guardian import Status
from agentgate.guardian.card import render_card
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import Harness, running_gateway
from agentgate.testing.mcp_client import mcp_stdio_client

pytestmark = pytest.mark.slow

CEILING = 60
LIGHT_ON = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}
LIGHT_PATH = "/api/services/light/turn_on"
READ = {"entity_id": "sensor.living_room_temperature"}


def posts(home: FakeHomeAssistant, path: str) -> int:
    return sum(1 for method, target, _ in home.calls if method == "POST" and target == path)


def text(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


def bridge(gw: Harness, agent: str = "pi", **kw: Any) -> Any:
    return mcp_stdio_client(gw.url, token=gw.tokens[agent], ca=gw.ca_path, **kw)


async def test_the_bridge_lists_reads_denies_and_refuses_bad_arguments(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, bridge(gw) as mcp:
            tools = {tool.name: tool for tool in (await mcp.list_tools()).tools}
            assert {"ha_get_state", "agentgate_result", "agentgate_pending_results"} <= set(tools)
            annotations = tools["ha_get_state"].annotations
            assert annotations is not None
            assert annotations.read_only_hint is True

            read = await mcp.call_tool("ha_get_state", READ)
            assert not read.is_error, text(read)
            assert read.structured_content["data"]["entity_id"] == READ["entity_id"]

            denied = await mcp.call_tool(
                "ha_call_service",
                {"domain": "lock", "service": "unlock", "entity_id": "lock.front_door"},
            )
            assert denied.is_error
            assert text(denied).startswith(
                "denied by policy: ha_call_service(lock.unlock, lock.front_door) — rule"
            )
            invalid = await mcp.call_tool("ha_get_state", {"entity_id": "sensor.*"})
            assert invalid.is_error
            assert "entity_id" in text(invalid)
            with pytest.raises(MCPError) as raised:
                await mcp.call_tool("no_such_tool", {})
            assert raised.value.error.code == -32602

            rows = await gw.gateway.store.audit_rows(agent="pi")
            assert {r.via for r in rows} == {"mcp-stdio"}
            assert posts(home, "/api/services/lock/unlock") == 0


async def test_asks_over_the_bridge_allow_deny_timeout(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    notices: list[str] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        notices.append(message or "")

    with trio.fail_after(CEILING):
        async with (
            running_gateway(workdir, home=home, gateway={"approval_timeout": 3}) as gw,
            bridge(gw) as mcp,
        ):
            for action, expected in [("allow", None), ("deny", "denied by the guardian")]:
                outcome: list[Any] = []

                async def call(box: list[Any] = outcome) -> None:
                    box.append(
                        await mcp.call_tool("ha_call_service", LIGHT_ON, progress_callback=progress)
                    )

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call)
                    shown = await gw.scripted.wait_for_card(len(gw.scripted.cards) + 1)
                    assert shown.card.via == "mcp-stdio"
                    assert "(via MCP)" in render_card(shown.card, now=time.time())
                    await gw.scripted.press(shown.card.request_id, action)
                result = outcome[0]
                if expected is None:
                    assert not result.is_error, text(result)
                    assert result.structured_content["request_id"] == shown.card.request_id
                else:
                    assert result.is_error
                    assert text(result).startswith(expected)
            assert notices
            assert notices[0].startswith("waiting for the guardian's approval")
            timed_out = await mcp.call_tool("ha_call_service", LIGHT_ON)
            assert timed_out.is_error
            assert text(timed_out).startswith("approval timed out")
            assert posts(home, LIGHT_PATH) == 1


async def test_pending_after_wait_cancel_mid_ask_and_results_later(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, bridge(gw, wait=1) as mcp:
            pending = await mcp.call_tool("ha_call_service", LIGHT_ON)
            assert pending.structured_content["status"] == "pending"
            waited = pending.structured_content["request_id"]
            with trio.move_on_after(60) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(mcp.call_tool, "ha_call_service", LIGHT_ON)
                    cancelled = (await gw.scripted.wait_for_card(2)).card.request_id
                    scope.cancel()
            for request_id in (waited, cancelled):
                assert await gw.scripted.press(request_id, "allow") == "approved"
                assert (await gw.scripted.wait_for_update(request_id)).status in (
                    Status.EXECUTED,
                    Status.QUEUED,
                )
            await gw.settled()
            assert posts(home, LIGHT_PATH) == 2

            first = await mcp.call_tool("agentgate_result", {"request_id": waited})
            assert not first.is_error, text(first)
            second = await mcp.call_tool("agentgate_result", {"request_id": waited})
            assert second.structured_content == first.structured_content
            queued = (await mcp.call_tool("agentgate_pending_results", {})).structured_content
            assert [r["request_id"] for r in queued["results"]] == [cancelled]
            assert queued["results"][0]["status"] == "executed"
            again = (await mcp.call_tool("agentgate_pending_results", {})).structured_content
            assert again["results"] == []
            assert posts(home, LIGHT_PATH) == 2


LAPTOP_POLICY = """\
defaults:
  - pattern: "*"
    action: deny
"""


async def test_a_second_agent_gets_its_own_policy_through_its_own_bridge(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with (
            running_gateway(workdir, home=home, agent_policies={"laptop": LAPTOP_POLICY}) as gw,
            bridge(gw, "laptop") as laptop,
        ):
            refused = await laptop.call_tool("ha_get_state", READ)
            assert refused.is_error
            assert text(refused).startswith("denied by policy: ha_get_state(")
            rows = await gw.gateway.store.audit_rows(agent="laptop")
            assert [(r.decision, r.via) for r in rows] == [("deny", "mcp-stdio")]


def _bridge_command(gw: Harness) -> list[str]:
    return [sys.executable, "-m", "agentgate", "mcp", "--url", gw.url, "--ca", str(gw.ca_path)]


async def test_a_wrong_token_stops_the_bridge_and_stdin_closing_ends_it(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw:
            env = {**os.environ, "AGENTGATE_TOKEN": "wrong-token-0123456789"}
            refused = await trio.run_process(
                _bridge_command(gw),
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                stdin=b"",
            )
            assert refused.returncode == 3
            assert refused.stdout == b""  # stdout is the protocol, nothing else
            assert b"authentication failed" in refused.stderr
            assert b"wrong-token" not in refused.stderr

            token_file = workdir / "token"
            token_file.write_text(f"  {gw.tokens['pi']}\n")
            command = [*_bridge_command(gw), "--token-file", str(token_file), "--log-level", "INFO"]
            bare = {k: v for k, v in os.environ.items() if k != "AGENTGATE_TOKEN"}
            async with trio.open_nursery() as nursery:
                process = await nursery.start(
                    partial(
                        trio.run_process,
                        command,
                        env=bare,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        check=False,
                    )
                )
                assert process.stdin is not None
                assert process.stderr is not None
                said = b""
                while b"connected to" not in said:  # the bridge says so once it is connected
                    chunk = await process.stderr.receive_some()
                    assert chunk, said
                    said += chunk
                assert gw.tokens["pi"].encode() not in said
                await process.stdin.aclose()  # the MCP host goes away
                with trio.fail_after(3):  # the bridge's promise: gone within 3 s
                    await process.wait()
                assert process.returncode == 0


async def test_a_host_that_goes_away_mid_ask_finds_the_outcome_through_a_new_bridge(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw:
            async with bridge(gw) as mcp, trio.open_nursery() as nursery:
                nursery.start_soon(mcp.call_tool, "ha_call_service", LIGHT_ON)
                request_id = (await gw.scripted.wait_for_card()).card.request_id
                nursery.cancel_scope.cancel()
            await gw.gateway.door.gone("pi")  # the bridge left with its host
            assert await gw.scripted.press(request_id, "allow") == "approved"
            assert (await gw.scripted.wait_for_update(request_id)).status is Status.QUEUED
            assert posts(home, LIGHT_PATH) == 1
            async with bridge(gw) as mcp:
                by_id = await mcp.call_tool("agentgate_result", {"request_id": request_id})
                assert not by_id.is_error, text(by_id)
                assert by_id.structured_content["request_id"] == request_id
                queued = (await mcp.call_tool("agentgate_pending_results", {})).structured_content
                assert queued["results"] == []  # already returned by agentgate_result
            assert posts(home, LIGHT_PATH) == 1


@pytest.mark.parametrize("mode", ["auto", "2026-07-28"])
async def test_the_bridge_speaks_the_stateless_form_too(
    workdir: Path, home: FakeHomeAssistant, mode: str
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, bridge(gw, mode=mode) as mcp:
            assert mcp.protocol_version == "2026-07-28"
            read = await mcp.call_tool("ha_get_state", READ)
            assert not read.is_error, text(read)
            assert read.structured_content["data"]["entity_id"] == READ["entity_id"]


@pytest.mark.parametrize(
    ("argv", "env", "wanted"),
    [
        (["--url", "wss://127.0.0.1:1", "--wait", "0"], {"AGENTGATE_TOKEN": "t" * 20}, "--wait"),
        (["--url", "wss://127.0.0.1:1", "--token", "abc"], {}, "--token"),
        (["--url", "wss://127.0.0.1:1", "--token-file", "/no/such/file"], {}, "--token-file"),
        (["--token-file", "/dev/null"], {}, "--token-file"),
        ([], {"AGENTGATE_TOKEN": "t" * 20}, "no gateway URL"),
        (["--url", "https://127.0.0.1:1"], {"AGENTGATE_TOKEN": "t" * 20}, "wss://"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str],
    env: dict[str, str],
    wanted: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from agentgate.cli import main

    for name in ("AGENTGATE_URL", "AGENTGATE_TOKEN", "AGENTGATE_CA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["mcp", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert wanted in captured.err


async def test_token_from_the_first_line_of_stdin(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw:
            bare = {k: v for k, v in os.environ.items() if k != "AGENTGATE_TOKEN"}
            done = await trio.run_process(
                [*_bridge_command(gw), "--token", "-", "--log-level", "INFO"],
                env=bare,
                stdin=f"{gw.tokens['pi']}\n".encode(),  # then end of input: the host is gone
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout == b""
            assert b"connected to" in done.stderr
            assert gw.tokens["pi"].encode() not in done.stderr


async def test_stdin_closing_mid_ask_ends_the_bridge_and_the_approval_goes_on(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    lines = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "host", "version": "1"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "ha_call_service", "arguments": LIGHT_ON},
        },
    ]
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw:
            env = {**os.environ, "AGENTGATE_TOKEN": gw.tokens["pi"]}
            async with trio.open_nursery() as nursery:
                process = await nursery.start(
                    partial(
                        trio.run_process,
                        _bridge_command(gw),
                        env=env,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL,
                        check=False,
                    )
                )
                assert process.stdin is not None
                for line in lines:
                    await process.stdin.send_all(json.dumps(line).encode() + b"\n")
                request_id = (await gw.scripted.wait_for_card()).card.request_id
                await process.stdin.aclose()  # the host crashed: nothing cancelled, stdin gone
                with trio.fail_after(3):
                    await process.wait()
            await gw.gateway.door.gone("pi")
            assert await gw.scripted.press(request_id, "allow") == "approved"
            assert (await gw.scripted.wait_for_update(request_id)).status is Status.QUEUED
            assert posts(home, LIGHT_PATH) == 1
