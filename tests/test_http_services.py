"""HTTP services from configuration, against a real HTTP API application: Kinto.

The gateway runs for real (TLS on 127.0.0.1, ``running_gateway``) with a
``[services.http.kinto]`` table whose tools file is the shipped example
(``examples/tools/kinto-shopping.yaml``) plus a few test tools; Kinto runs as its own process
(``tests/kinto_app.py``: Mozilla's Kinto on its memory backends, basic auth). Each scene is
an agent's call through the raw WebSocket protocol, checked at Kinto's side too (its records,
and ``HITS``: what reached it).
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from agentgate.guardian import Status
from agentgate.testing.harness import Harness, RawAgent, raw_agent, running_gateway

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tools" / "kinto-shopping.yaml"
CEILING = 30
USER, PASSWORD = "agentgate", "kinto-pa55word-never-shown"
PAIR = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

TEST_TOOLS = """\
tools:
  - name: get_record
    description: "One record by id (no pattern: only the gateway's own path checks)."
    method: GET
    path: /buckets/home/collections/shopping/records/{id}
    args:
      id: {type: string}
  - name: away
    description: Kinto behind a proxy that redirects elsewhere.
    method: GET
    path: /__away__
  - name: slow
    description: A service that takes 30 s.
    method: GET
    path: /__slow__
"""

POLICY = """\
rules:
  - {pattern: "http_kinto_list_items*", action: allow}
  - {pattern: "http_kinto_add_item(*)", action: ask}
  - {pattern: "http_kinto_remove_item(*)", action: deny}
  - {pattern: "http_test_*", action: allow}
"""


@pytest.fixture(scope="module")
def kinto() -> Iterator[str]:
    """Kinto's ``/v1`` URL, with the bucket and collection of the example created."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kinto_app"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}/v1"
        with httpx.Client(auth=(USER, PASSWORD), timeout=10) as client:
            client.put(f"{url}/buckets/home", json={}).raise_for_status()
            client.put(f"{url}/buckets/home/collections/shopping", json={}).raise_for_status()
        yield url
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def records(kinto: str) -> list[dict[str, Any]]:
    with httpx.Client(auth=(USER, PASSWORD), timeout=10) as client:
        response = client.get(f"{kinto}/buckets/home/collections/shopping/records")
        response.raise_for_status()
        found: list[dict[str, Any]] = response.json()["data"]
        return found


def hits(kinto: str) -> dict[str, int]:
    with httpx.Client(timeout=10) as client:
        found: dict[str, int] = client.get(f"{kinto}/__hits__").json()
        return found


def service_toml(kinto: str, tools: Path, name: str = "kinto", timeout: float = 5) -> str:
    return (
        f"\n[services.http.{name}]\n"
        f'base_url = "{kinto}"\n'
        f'tools = "{tools}"\n'
        'auth = "basic"\n'
        f'username = "{USER}"\n'
        f'password = "{PASSWORD}"\n'
        f"timeout = {timeout}\n"
    )


def write_test_tools(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "test-tools.yaml").write_text(TEST_TOOLS)


@pytest.fixture
async def gate(workdir: Path, kinto: str) -> AsyncIterator[Harness]:
    write_test_tools(workdir)
    extra = service_toml(kinto, EXAMPLE) + service_toml(
        kinto, workdir / "test-tools.yaml", name="test", timeout=1
    )
    async with running_gateway(workdir, home=None, policy=POLICY, extra_toml=extra) as gw:
        yield gw


async def tool(agent: RawAgent, name: str, **args: Any) -> dict[str, Any]:
    return await agent.tool(name, **args)


async def test_list_tools_shows_the_http_tools(gate: Harness) -> None:
    with trio.fail_after(CEILING):
        async with raw_agent(gate) as agent:
            listed = (await agent.call("list_tools"))["result"]["tools"]
    by_name = {entry["name"]: entry for entry in listed}
    add = by_name["http_kinto_add_item"]
    assert add["args"]["required"] == ["item"]
    assert add["args"]["properties"]["item"]["maxLength"] == 100
    assert add["annotations"] == {
        "readOnlyHint": False,
        "destructiveHint": True,
        "title": "kinto: add item",
    }
    assert by_name["http_kinto_list_items"]["annotations"]["readOnlyHint"] is True
    assert {"http_test_get_record", "http_test_away", "http_test_slow"} <= by_name.keys()


async def test_allowed_call_reads_kinto(gate: Harness, kinto: str) -> None:
    with trio.fail_after(CEILING):
        async with httpx.AsyncClient(auth=(USER, PASSWORD)) as client:
            added = await client.post(
                f"{kinto}/buckets/home/collections/shopping/records",
                json={"data": {"item": "rice"}},
            )
            added.raise_for_status()
        async with raw_agent(gate) as agent:
            reply = await tool(agent, "http_kinto_list_items", _sort="-last_modified")
    result = reply["result"]
    assert result["status"] == "executed"
    assert "rice" in [record["item"] for record in result["data"]["data"]]


async def test_denied_call_sends_nothing(gate: Harness, kinto: str) -> None:
    before = hits(kinto)
    with trio.fail_after(CEILING):
        async with raw_agent(gate) as agent:
            reply = await tool(agent, "http_kinto_remove_item", id="abc-123")
    assert reply["error"]["code"] == -32003
    assert reply["error"]["data"]["signature"] == "http_kinto_remove_item(id=abc-123)"
    assert hits(kinto) == before


async def test_ask_approve_executes_exactly_once(gate: Harness, kinto: str, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    note = "the oat one, please: not soy (ask Sam?)"
    with trio.fail_after(CEILING):
        async with raw_agent(gate) as agent:
            await agent.send(
                {
                    "jsonrpc": "2.0",
                    "id": "add-1",
                    "method": "tool_request",
                    "params": {
                        "tool": "http_kinto_add_item",
                        "args": {"item": "oat milk", "note": note},
                    },
                }
            )
            shown = await gate.scripted.wait_for_card()
            card = shown.card
            assert card.signature.startswith("http_kinto_add_item(item=oat milk, note=sha256:")
            assert card.target == (
                f"POST {kinto}/buckets/home/collections/shopping/records\n"
                f"Authorization: Basic ({USER} and the password in gate.toml)\n"
                "Content-Type: application/json\n\n"
                + json.dumps({"data": {"item": "oat milk", "note": note}}, indent=2)
            )
            assert not [r for r in records(kinto) if r["item"] == "oat milk"]
            assert await gate.scripted.press(card.request_id, "allow") == "approved"
            reply = await agent.recv()
            assert reply["id"] == "add-1"
            assert reply["result"]["data"]["data"]["item"] == "oat milk"
            update = await gate.scripted.wait_for_update(card.request_id)
            assert update.status is Status.EXECUTED
            await gate.settled()
    added = [r for r in records(kinto) if r["item"] == "oat milk"]
    assert len(added) == 1  # sent once, never retried
    assert added[0]["note"] == note
    # the secret is nowhere: not in the card, the audit log, the logs
    for secret in (PASSWORD, PAIR):
        assert secret not in repr(card)
        assert secret not in caplog.text
        assert secret not in audit_text(gate)


def audit_text(gate: Harness) -> str:
    with sqlite3.connect(gate.config.store.path) as conn:
        rows = conn.execute("SELECT * FROM audit_log").fetchall()
        pending = conn.execute("SELECT * FROM pending_requests").fetchall()
    return repr(rows) + repr(pending)


@pytest.mark.parametrize("record_id", ["..", ".", "../../buckets", "a/b", "..\\x", ""], ids=repr)
async def test_path_injection_is_refused_before_sending(
    gate: Harness, kinto: str, record_id: str
) -> None:
    before = hits(kinto)
    with trio.fail_after(CEILING):
        async with raw_agent(gate) as agent:
            reply = await tool(agent, "http_test_get_record", id=record_id)
    assert reply["error"]["code"] == -32602, reply
    assert hits(kinto) == before


@pytest.mark.parametrize("record_id", ["%2e%2e", "a#b&c=d", "x y"], ids=repr)
async def test_path_arguments_stay_one_segment(gate: Harness, kinto: str, record_id: str) -> None:
    with trio.fail_after(CEILING):
        async with raw_agent(gate) as agent:
            reply = await tool(agent, "http_test_get_record", id=record_id)
    error = reply["error"]
    assert error["code"] == -32004
    # Kinto refuses the id as a record id (400): it arrived whole, as that one segment
    assert error["message"].startswith("test answered 400: "), error
    assert error["data"]["status"] == 400
    # the WSGI server decodes the path once: exactly the value, under .../records/
    assert hits(kinto).get(f"GET /v1/buckets/home/collections/shopping/records/{record_id}") == 1


async def test_redirect_to_another_host_is_refused(gate: Harness) -> None:
    with trio.fail_after(CEILING):
        async with raw_agent(gate) as agent:
            reply = await tool(agent, "http_test_away")
    assert reply["error"]["code"] == -32004
    assert "redirect to another host (127.0.0.2): refused" in reply["error"]["message"]


async def test_a_slow_service_times_out(gate: Harness) -> None:
    with trio.fail_after(CEILING):
        async with raw_agent(gate) as agent:
            reply = await tool(agent, "http_test_slow")
    assert reply["error"]["code"] == -32004
    assert reply["error"]["message"] == "test did not answer within 1 s"
