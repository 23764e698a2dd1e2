"""A fully compromised agent against the shipped policy: every path to the front door, closed.

Each test is an attack that worked before it was closed: the agent holds its own token and
speaks raw JSON-RPC to the real gateway over TLS; the guardian is the real python-telegram-bot
code against the fake Bot API; Home Assistant is the fake home, which reproduces scenes the way
Home Assistant does (a lock's ``"unlocked"`` unlocks it). The policy is the repository's own
``permissions.yaml``, unless a test says otherwise.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import wsproto
import wsproto.events

from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.fake_telegram import FakeMessage, FakeTelegram, run_fake_telegram
from agentgate.testing.harness import Harness, RawAgent, raw_agent, running_gateway
from agentgate.testing.processes import gateway_process, write_gateway_files

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SHIPPED = (REPO / "permissions.yaml").read_text(encoding="utf-8")
TOKEN = "123456:BYPASS-GUARDIAN-TOKEN"
CHAT = -1001
ALICE = 111
MALLORY = 666
CEILING = 30

UNLOCK_BY_SCENE = {
    "domain": "scene",
    "service": "apply",
    "entities": {"light.kitchen": "on", "lock.front_door": "unlocked"},
}
LIGHTS_SCENE = {"domain": "scene", "service": "apply", "entities": {"light.kitchen": "on"}}


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with run_fake_telegram(token=TOKEN, chat_id=CHAT) as fake:
        yield fake


@asynccontextmanager
async def guarded(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram, **toml: Any
) -> AsyncIterator[tuple[Harness, RawAgent]]:
    """The real gateway under the shipped policy, guarded through Telegram, and an agent."""
    telegram = {"token": TOKEN, "chat_id": CHAT, "allowed_users": [ALICE], "base_url": tg.base_url}
    toml.setdefault("policy", SHIPPED)
    async with (
        running_gateway(workdir, home=home, use_telegram=True, telegram=telegram, **toml) as gw,
        raw_agent(gw) as agent,
    ):
        yield gw, agent


def service_posts(home: FakeHomeAssistant) -> list[tuple[str, Any]]:
    return [(path, body) for method, path, body in home.calls if method == "POST"]


def assert_locked(home: FakeHomeAssistant) -> None:
    state = home.state("lock.front_door")
    assert state is not None
    assert state["state"] == "locked"


async def denied(agent: RawAgent, args: dict[str, Any]) -> dict[str, Any]:
    reply = await agent.tool("ha_call_service", **args)
    assert "error" in reply, reply
    error: dict[str, Any] = reply["error"]
    assert error["code"] == -32003, error
    return error


async def asked(agent: RawAgent, rpc_id: str, args: dict[str, Any]) -> str:
    """Send a call that needs the guardian; its request id once the gateway says so."""
    params = {"tool": "ha_call_service", "args": args}
    await agent.send({"jsonrpc": "2.0", "id": rpc_id, "method": "tool_request", "params": params})
    while True:
        frame = json.loads(await agent.ws.get_message())
        assert frame.get("id") != rpc_id, f"answered instead of asking: {frame}"
        if frame.get("method") == "approval_pending" and frame["params"]["rpc_id"] == rpc_id:
            return str(frame["params"]["request_id"])


async def card_of(tg: FakeTelegram, request_id: str) -> FakeMessage:
    return await tg.wait_for_message(lambda m: f"allow:{request_id}" in [d for _, d in m.buttons])


async def press(
    tg: FakeTelegram, message_id: int, data: str, *, user: int = ALICE, **kw: Any
) -> str:
    first = "Alice" if user == ALICE else "Mallory"
    kw.setdefault("first_name", first)
    return str((await tg.press(message_id, data, user, **kw).wait_answer()).text)


async def reply_to(agent: RawAgent, rpc_id: str) -> dict[str, Any]:
    while True:
        frame = json.loads(await agent.ws.get_message())
        if frame.get("id") == rpc_id:
            return frame  # type: ignore[no-any-return]


def messages_sent(tg: FakeTelegram) -> list[dict[str, Any]]:
    """Messages sent to the guardians, the audit log's silent checkpoints left out."""
    return [p for p in tg.calls_to("sendMessage") if not p.get("disable_notification")]


async def guardian_rows(gw: Harness, decision: str, count: int) -> list[Any]:
    """The guardian rows with ``decision`` (a refused press is audited before it is answered)."""
    rows = [r for r in await gw.gateway.store.audit_rows(decision=decision) if r.kind == "guardian"]
    assert len(rows) == count, rows
    return rows


# -- 1. every entity a call names is in its signature ------------------------------------------


async def test_scene_apply_with_a_lock_is_denied(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    with trio.fail_after(CEILING):
        async with guarded(workdir, home, tg) as (_, agent):
            error = await denied(agent, UNLOCK_BY_SCENE)
    assert error["data"]["signature"] == (
        "ha_call_service(scene.apply, light.kitchen, lock.front_door)"
    )
    assert "ha_call_service(*, lock.*)" in error["message"]
    assert service_posts(home) == []
    assert messages_sent(tg) == []  # nobody was even asked
    assert_locked(home)


@pytest.mark.parametrize(
    "args",
    [
        {
            "domain": "scene",
            "service": "create",
            "scene_id": "evening",
            "entities": {"lock.front_door": "unlocked"},
        },
        {
            "domain": "scene",
            "service": "create",
            "scene_id": "evening",
            "snapshot_entities": ["light.kitchen", "lock.front_door"],
        },
        # nested at any depth, in a service the policy would otherwise only ask for
        {
            "domain": "light",
            "service": "turn_on",
            "entity_id": "light.kitchen",
            "data": {"then": [{"entity_id": "lock.front_door"}]},
        },
        # a script variable holding the lock, plain and as Home Assistant would still read it
        {
            "domain": "script",
            "service": "turn_on",
            "entity_id": "script.echo",
            "variables": {"door": "lock.front_door"},
        },
        {"domain": "script", "service": "echo", "variables": {"door": " Lock.Front_Door"}},
        {"domain": "script", "service": "echo", "variables": {"door": "loc\u212a.front_door"}},
        # the lock as a key of something else
        {"domain": "script", "service": "echo", "variables": {"lock.front_door": "unlocked"}},
    ],
    ids=[
        "scene.create entities",
        "scene.create snapshot_entities",
        "nested entity_id",
        "script variable",
        "script variable, spaced and capitalised",
        "script variable with a Kelvin sign",
        "key",
    ],
)
async def test_a_lock_named_anywhere_is_denied(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram, args: dict[str, Any]
) -> None:
    with trio.fail_after(CEILING):
        async with guarded(workdir, home, tg) as (_, agent):
            error = await denied(agent, args)
    assert "lock.front_door" in error["data"]["signature"]
    assert service_posts(home) == []
    assert messages_sent(tg) == []


async def test_a_lock_nested_in_an_allowed_service_is_denied(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    # An operator who lets the agent run lights on its own still never lets it near a lock.
    policy = 'rules:\n  - {pattern: "ha_call_service(light.*)", action: allow}\n'
    policy += '  - {pattern: "ha_call_service(*, lock.*)", action: deny}\n'
    args = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}
    with trio.fail_after(CEILING):
        async with guarded(workdir, home, tg, policy=policy) as (_, agent):
            ok = await agent.tool("ha_call_service", **args)
            assert ok["result"]["status"] == "executed"
            await denied(agent, {**args, "extra": {"entity_id": "lock.front_door"}})
    assert [path for path, _ in service_posts(home)] == ["/api/services/light/turn_on"]
    assert_locked(home)


async def test_where_home_assistant_wants_an_entity_only_an_entity_passes(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    # "all" would target every entity of the domain; a non-entity key could hide anything.
    with trio.fail_after(CEILING):
        async with guarded(workdir, home, tg) as (_, agent):
            for data in ({"entity_id": "all"}, {"entities": {"all": "unlocked"}}):
                args = {"domain": "scene", "service": "apply", "nested": data}
                reply = await agent.tool("ha_call_service", **args)
                assert reply["error"]["code"] == -32602, reply
                assert "is not an entity id" in reply["error"]["message"]
    assert service_posts(home) == []


# -- 2. grants are as narrow as what the guardian saw --------------------------------------


async def test_a_lights_grant_does_not_let_the_lock_through(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    with trio.fail_after(CEILING):
        async with guarded(workdir, home, tg) as (gw, agent):
            request_id = await asked(agent, "lights", LIGHTS_SCENE)
            card = await card_of(tg, request_id)
            assert "Signature: ha_call_service(scene.apply, light.kitchen)" in card.text
            assert await press(tg, card.message_id, f"grant:{request_id}") == "allowed for 1 h"
            assert (await reply_to(agent, "lights"))["result"]["status"] == "executed"
            # The same call again: the grant covers it, no card.
            again = await agent.tool("ha_call_service", **LIGHTS_SCENE)
            assert again["result"]["status"] == "executed"
            # The lock rides along: denied, whatever was granted.
            await denied(agent, UNLOCK_BY_SCENE)
            # Any other set of entities is another signature: the guardian is asked again.
            other = {**LIGHTS_SCENE, "entities": {"light.kitchen": "on", "light.bedroom": "on"}}
            other_id = await asked(agent, "other", other)
            await card_of(tg, other_id)
            assert gw.gateway.broker.waiting("pi") == 1
    assert [path for path, _ in service_posts(home)] == ["/api/services/scene/apply"] * 2
    assert_locked(home)


# -- 3. the guardian sees everything or nothing is asked -----------------------------------


def lights(count: int) -> dict[str, str]:
    return {f"light.room_{n:03}": "on" for n in range(count)}


async def test_a_card_cannot_hide_the_lock_behind_150_lights(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    # The lock goes last, where a cut-off card once stopped showing the arguments.
    hidden = {"domain": "scene", "service": "apply", "entities": lights(150)}
    hidden["entities"]["lock.front_door"] = "unlocked"
    with trio.fail_after(CEILING):
        async with guarded(workdir, home, tg) as (_, agent):
            await denied(agent, hidden)
            # Without the lock it is a scene the guardian would be asked about, but its card
            # cannot show everything in one message: refused, nothing sent to anyone.
            del hidden["entities"]["lock.front_door"]
            reply = await agent.tool("ha_call_service", **hidden)
            error = reply["error"]
            assert error["code"] == -32602, reply
            assert error["message"].startswith("arguments too large to show the guardian")
            assert error["data"]["limit"] == 4096
    assert messages_sent(tg) == []
    assert service_posts(home) == []


async def test_a_long_card_can_send_every_argument_as_a_document(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    args = {"domain": "scene", "service": "apply", "entities": lights(150)}
    settings = {"card_overflow": "document"}
    with trio.fail_after(CEILING):
        async with guarded(workdir, home, tg, guardian_settings=settings) as (_, agent):
            request_id = await asked(agent, "long", args)
            card = await card_of(tg, request_id)
            document = tg.messages[card.message_id - 1].document
            assert document is not None
            assert json.loads(document.content) == args
            assert f"{len(document.content):,} characters, in the file" in card.text
            # /pending re-sends the same complete content: the document, then the card.
            tg.send_command("/pending", ALICE)
            copy = await tg.wait_for_message(
                lambda m: m.message_id > card.message_id and bool(m.buttons)
            )
            again = tg.messages[copy.message_id - 1].document
            assert again is not None
            assert again.content == document.content
            assert copy.text.split("\nExpires")[0] == card.text.split("\nExpires")[0]


# -- 4. presses are bound to their card and chat -------------------------------------------


async def test_a_press_decides_only_the_card_it_was_pressed_on(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    kitchen = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}
    bedroom = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}
    with trio.fail_after(CEILING):
        async with guarded(workdir, home, tg) as (gw, agent):
            first_id = await asked(agent, "kitchen", kitchen)
            second_id = await asked(agent, "bedroom", bedroom)
            first = await card_of(tg, first_id)
            second = await card_of(tg, second_id)
            # Card #1's message carrying card #2's data: decides nothing.
            answer = await press(tg, first.message_id, f"allow:{second_id}")
            assert answer.startswith("expired")
            # Card #2 pressed from another chat (a forwarded or forged copy): decides nothing.
            answer = await press(tg, second.message_id, f"allow:{second_id}", in_chat=-2002)
            assert answer.startswith("expired")
            refused = await guardian_rows(gw, "refused", 2)
            assert all("not that approval's card" in str(r.matched) for r in refused)
            assert [r.resolved_by for r in refused] == ["Alice (111)"] * 2
            assert gw.gateway.broker.waiting("pi") == 2
            assert service_posts(home) == []
            # On its own card, in the guardians' chat, the press counts.
            assert await press(tg, second.message_id, f"allow:{second_id}") == "approved"
            assert (await reply_to(agent, "bedroom"))["result"]["status"] == "executed"
    assert [path for path, _ in service_posts(home)] == ["/api/services/light/turn_on"]


async def test_strangers_are_audited_a_few_times_a_minute_and_always_answered(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    args = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}
    with trio.fail_after(CEILING):
        async with guarded(workdir, home, tg) as (gw, agent):
            request_id = await asked(agent, "ask", args)
            card = await card_of(tg, request_id)
            presses = [
                tg.press(card.message_id, f"allow:{request_id}", MALLORY, first_name="Mallory")
                for _ in range(12)
            ]
            for p in presses:
                assert (await p.wait_answer()).text == "not authorised"
            # A stranger's press is audited before it is answered: every row is in by now.
            rows = await gw.gateway.store.audit_rows(decision="refused")
            assert [r.resolved_by for r in rows] == ["Mallory (666)"] * 3
            assert gw.gateway.broker.waiting("pi") == 1


# -- 5. operator surfaces are inert --------------------------------------------------------

ESCAPES = "\x1b[2J\x1b[H\x1b]0;owned\x07\x9b31m\u202e"


async def run_audit(*argv: str) -> str:
    done = await trio.run_process(
        [sys.executable, "-m", "agentgate", "audit", *argv], capture_stdout=True, check=True
    )
    return done.stdout.decode("utf-8")


def assert_inert(text: str) -> None:
    for char in "\x1b\x07\x9b\u202e\r":
        assert char not in text, (char, text)


async def test_escape_sequences_in_agent_and_stranger_strings_stay_inert_in_audit(
    workdir: Path, home: FakeHomeAssistant, tg: FakeTelegram
) -> None:
    args = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}
    with trio.fail_after(CEILING):
        async with guarded(workdir, home, tg) as (gw, agent):
            reply = await agent.call("tool_request", {"tool": ESCAPES, "args": {"x": ESCAPES}})
            assert reply["error"]["code"] == -32602
            request_id = await asked(agent, "ask", args)
            card = await card_of(tg, request_id)
            name = f"Mallory{ESCAPES}\r\nforged"
            data = f"allow:{request_id}"
            answer = await press(tg, card.message_id, data, user=MALLORY, first_name=name)
            assert answer == "not authorised"
            await guardian_rows(gw, "refused", 1)
    store = str(workdir / "agentgate.db")
    table = await run_audit("--store", store)
    assert_inert(table)
    assert "\\x1b[2J" in table  # shown, escaped
    lines = (await run_audit("--store", store, "--json")).splitlines()
    assert_inert("\n".join(lines))
    assert any(json.loads(line)["tool"] == ESCAPES for line in lines)  # the record is exact
    argv = [sys.executable, "-m", "agentgate", "audit", "--store", store, "--follow"]
    follow = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    try:
        assert follow.stdout is not None
        seen = b""
        with trio.fail_after(CEILING):
            while b"Mallory" not in seen:
                seen += await follow.stdout.receive_some()
    finally:
        follow.kill()
        await follow.wait()
        assert follow.stdout is not None
        await follow.stdout.aclose()
    assert_inert(seen.decode("utf-8"))


async def test_a_line_break_in_a_first_frame_cannot_forge_a_log_line(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    files = write_gateway_files(workdir, home=home)
    forged = "2030-01-01 00:00:00,000 INFO    agentgate: agent pi authorised by the guardian"
    member = f"x\r\n{forged}\n\x1b[1A"
    frame = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "auth", member: 1})
    with trio.fail_after(CEILING):
        async with gateway_process(files) as gw:
            async with raw_websocket(gw.url, files.client_ssl()) as ws:
                await ws.send(frame)
                answer = json.loads(await ws.receive())
            assert answer["error"]["code"] == -32005
            await gw.process.wait_for_output("authentication from")
    log = gw.output()
    assert not any(line.startswith("2030-01-01") for line in log.splitlines()), log
    assert "x\\x0d\\x0a2030-01-01" in log  # shown, escaped, on the line it belongs to
    assert "\x1b" not in log


# -- 6. the failed-auth limiter counts attempts when they start -----------------------------


async def test_parallel_sockets_get_no_more_guesses_than_the_limit(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    limit = 5
    # 60 sockets from one address at once: room for them before auth (this tests the guesses)
    limits = {"failed_auth_per_minute": limit, "max_unauthenticated_per_address": 100}
    async with running_gateway(workdir, home=home, limits=limits) as gw:
        with trio.fail_after(CEILING):
            ready = trio.Event()  # every socket is open
            opened = 0
            codes: list[int] = []

            async def guess(n: int) -> None:
                nonlocal opened
                async with raw_websocket(gw.url, gw.client_ssl) as ws:
                    opened += 1
                    if opened == 60:
                        ready.set()
                    refusal: str | None = None
                    async with trio.open_nursery() as race:  # refused as soon as it connected?

                        async def listen() -> None:
                            nonlocal refusal
                            refusal = await ws.receive()
                            race.cancel_scope.cancel()

                        async def all_open() -> None:
                            await ready.wait()
                            race.cancel_scope.cancel()

                        race.start_soon(listen)
                        race.start_soon(all_open)
                    if refusal is None:  # no guess before every socket is open
                        token = f"guess-{n:04}-0123456789abcdef"
                        message = {
                            "jsonrpc": "2.0",
                            "id": n,
                            "method": "auth",
                            "params": {"token": token},
                        }
                        with contextlib.suppress(trio.BrokenResourceError):  # refused meanwhile
                            await ws.send(json.dumps(message))
                        refusal = await ws.receive()
                    codes.append(json.loads(refusal)["error"]["code"])

            async with trio.open_nursery() as nursery:
                for n in range(60):
                    nursery.start_soon(guess, n)
    assert codes.count(-32005) <= limit  # guesses that were checked against the tokens
    assert codes.count(-32006) == 60 - codes.count(-32005)


# -- 7. bounded memory per connection ------------------------------------------------------


async def test_an_agent_that_stops_reading_cannot_grow_the_gateway(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    home.set_state("sensor.big", "1", {"blob": "x" * (1 << 20)})  # a 1 MiB entity
    files = write_gateway_files(
        workdir, home=home, policy=SHIPPED, limits={"requests_per_minute": 100_000}
    )
    read = {"tool": "ha_get_state", "args": {"entity_id": "sensor.big"}}
    small = {"tool": "ha_get_state", "args": {"entity_id": "sensor.living_room_temperature"}}
    with trio.fail_after(4 * CEILING):
        async with (
            gateway_process(files) as gw,
            raw_websocket(gw.url, files.client_ssl()) as greedy,
        ):
            await greedy.send(auth(files.tokens["pi"]))
            assert "result" in json.loads(await greedy.receive())
            for n in range(300):  # ~300 MiB of answers, and it reads none of them
                await greedy.send(request(n, read))
            await gw.process.wait_for_output("is not reading")
            # Everyone else is still served, at once.
            async with raw_websocket(gw.url, files.client_ssl()) as other:
                await other.send(auth(files.tokens["laptop"]))
                assert "result" in json.loads(await other.receive())
                await other.send(request(1, small))
                assert json.loads(await other.receive())["result"]["status"] == "executed"
            # What it had asked for ran; the rest was never read.
            await gw.process.wait_for_output("agent pi disconnected")
            peak = peak_rss_mib(gw.pid)
    # Every read read before the close runs (a few dozen to all 300, as the fsync'd decision
    # commits and Home Assistant's answers interleave), so the peak varies with that count.
    assert peak < 350, f"gateway peak RSS {peak:.0f} MiB"


def auth(token: str) -> str:
    return request("auth", {"token": token}, method="auth")


def request(rpc_id: object, params: dict[str, Any], *, method: str = "tool_request") -> str:
    return json.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params})


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


class RawWebSocket:
    """A WebSocket client that reads only when told to: a peer that can stop reading.

    (trio-websocket's client reads in the background, buffering whatever the server sends.)
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.parts: list[str] = []

    async def open(self, host: str) -> None:
        await self.stream.send_all(self.ws.send(wsproto.events.Request(host=host, target="/")))
        while not any(isinstance(e, wsproto.events.AcceptConnection) for e in await self._read()):
            pass

    async def _read(self) -> list[wsproto.events.Event]:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("closed by the gateway")
        self.ws.receive_data(data)
        return list(self.ws.events())

    async def send(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(wsproto.events.TextMessage(data=text)))

    async def receive(self) -> str:
        while True:
            for event in await self._read():
                if isinstance(event, wsproto.events.TextMessage):
                    self.parts.append(event.data)
                    if event.message_finished:
                        text, self.parts = "".join(self.parts), []
                        if '"method":"approval_pending"' not in text:
                            return text


@asynccontextmanager
async def raw_websocket(url: str, context: ssl.SSLContext | None) -> AsyncIterator[RawWebSocket]:
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    tcp = await trio.open_tcp_stream(host, int(port))
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # a reader that stops, stops
    stream: trio.abc.Stream = tcp
    if context is not None:
        stream = trio.SSLStream(tcp, context, server_hostname=host)
    try:
        ws = RawWebSocket(stream)
        await ws.open(host)
        yield ws
    finally:
        with trio.move_on_after(2, shield=True):
            await trio.aclose_forcefully(stream)
