"""A hostile or broken agent over real sockets: every abuse gets its code, nobody else notices.

Each test keeps a second agent (``laptop``) connected and checks that it is still served after
every abuse; protocol errors also leave the abusing connection open (docs/protocol.md, "Errors").
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from trio_websocket import ConnectionClosed

from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import Harness, RawAgent, raw_agent, running_gateway

pytestmark = pytest.mark.slow

CEILING = 20
READ = {"tool": "ha_get_state", "args": {"entity_id": "sensor.outdoor_humidity"}}
LIGHT_ON = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}


def entity(home: FakeHomeAssistant, entity_id: str) -> dict[str, Any]:
    found = home.state(entity_id)
    assert found is not None, entity_id
    return found


def request(rpc_id: Any, method: str, params: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


async def assert_served(agent: RawAgent) -> None:
    """The agent's connection still works: a read is executed."""
    reply = await agent.call("tool_request", READ)
    assert reply["result"]["status"] == "executed", reply
    assert reply["result"]["data"]["state"] == "64"


async def notification(agent: RawAgent, method: str) -> dict[str, Any]:
    """The next ``method`` notification for ``agent`` (one already received counts)."""
    while True:
        for index, frame in enumerate(agent.notifications):
            if frame["method"] == method:
                return agent.notifications.pop(index)
        frame = json.loads(await agent.ws.get_message())
        assert "id" not in frame, f"unexpected reply while waiting for {method}: {frame}"
        agent.notifications.append(frame)


@asynccontextmanager
async def two_agents(
    workdir: Path, home: FakeHomeAssistant, **toml: Any
) -> AsyncIterator[tuple[Harness, RawAgent, RawAgent]]:
    """A gateway with ``pi`` (the abuser) and ``laptop`` (the bystander) connected."""
    async with (
        running_gateway(workdir, home=home, **toml) as gw,
        raw_agent(gw, "laptop") as laptop,
        raw_agent(gw, "pi") as pi,
    ):
        yield gw, pi, laptop


@asynccontextmanager
async def bare_socket(gw: Harness) -> AsyncIterator[RawAgent]:
    """An unauthenticated WebSocket to the gateway, over a TLS stream we close ourselves.

    trio-websocket's client leaves its socket open when the *server* closes the WebSocket
    (1008, 1009): the ``ResourceWarning`` is fatal here, so the stream is ours to close.
    """
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", gw.running.port, ssl_context=gw.client_ssl
    )
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", "/")
            try:
                yield RawAgent(ws)
            finally:
                with trio.move_on_after(2, shield=True):
                    await ws.aclose()
    finally:
        await stream.aclose()


def _tool(rpc_id: Any, tool: str, args: Any) -> dict[str, Any]:
    return request(rpc_id, "tool_request", {"tool": tool, "args": args})


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


# (name, frame sent by pi, expected code, expected id in the answer)
MALFORMED: list[tuple[str, Any, int, Any]] = [
    ("not json", "{this is not json", -32700, None),
    ("empty frame", "", -32700, None),
    ("batch", json.dumps([request(1, "list_tools"), request(2, "list_tools")]), -32600, None),
    ("empty batch", "[]", -32600, None),
    ("json scalar", "42", -32600, None),
    ("wrong jsonrpc", {"jsonrpc": "1.0", "id": 3, "method": "list_tools"}, -32600, 3),
    ("no jsonrpc", {"id": 4, "method": "list_tools"}, -32600, 4),
    ("missing method", {"jsonrpc": "2.0", "id": 5}, -32600, 5),
    ("method not a string", {"jsonrpc": "2.0", "id": 6, "method": 6}, -32600, 6),
    ("boolean id", {"jsonrpc": "2.0", "id": True, "method": "list_tools"}, -32600, None),
    ("object id", {"jsonrpc": "2.0", "id": {"a": 1}, "method": "list_tools"}, -32600, None),
    ("params as a string", request(7, "tool_request", "ha_get_states"), -32602, 7),
    ("params as a list", request(8, "tool_request", ["ha_get_states"]), -32602, 8),
    ("args as a list", _tool(9, "ha_get_state", ["sensor.outdoor_humidity"]), -32602, 9),
    ("args as a string", _tool(10, "ha_get_state", "sensor.outdoor_humidity"), -32602, 10),
    ("tool missing", request(11, "tool_request", {"args": {}}), -32602, 11),
    ("tool not a string", request(12, "tool_request", {"tool": 1, "args": {}}), -32602, 12),
    ("unknown tool", _tool(13, "shell_exec", {"cmd": "id"}), -32602, 13),
    ("unknown method", request(14, "format_disk"), -32601, 14),
    ("auth again", request(15, "auth", {"token": "x"}), -32600, 15),
    ("string id echoed", _tool("abc", "ha_get_state", {}), -32602, "abc"),
    ("null id echoed", _tool(None, "ha_get_state", {}), -32602, None),
    ("binary-looking text", "\x00\x01\x02", -32700, None),
    ("binary frame", json.dumps(request(16, "list_tools")).encode(), -32600, None),
    (
        "NaN",
        '{"jsonrpc": "2.0", "id": 17, "method": "list_tools", "params": {"x": NaN}}',
        -32700,
        None,
    ),
    ("deeply nested json", "[" * 30_000 + "]" * 30_000, -32700, None),
    (
        "deeply nested args",
        _tool(18, "ha_call_service", {**LIGHT_ON, "data": _nested(200)}),
        -32602,
        18,
    ),
    (
        "targeting by area",
        _tool(19, "ha_call_service", {**LIGHT_ON, "area_id": "bedroom"}),
        -32602,
        19,
    ),
]
for _name, _value in [
    ("list", ["sensor.outdoor_humidity"]),
    ("number", 42),
    ("object", {"id": "sensor.outdoor_humidity"}),
    ("bool", True),
    ("null", None),
    ("uppercase", "Sensor.Outdoor"),
    ("no domain", "outdoor_humidity"),
    ("path traversal", "../config"),
]:
    MALFORMED.append(
        (f"entity_id {_name}", _tool(20, "ha_get_state", {"entity_id": _value}), -32602, 20)
    )
for _char in ["*", "?", "[", "]", "(", ")", ",", "\x00", "\x07", "\n", "\x1f"]:
    MALFORMED.append(
        (
            f"forbidden {_char!r} in entity_id",
            _tool(21, "ha_get_state", {"entity_id": f"sensor.a{_char}b"}),
            -32602,
            21,
        )
    )
    MALFORMED.append(
        (
            f"forbidden {_char!r} in service data",
            _tool(22, "ha_call_service", {**LIGHT_ON, "effect": f"x{_char}y"}),
            -32602,
            22,
        )
    )


@pytest.mark.parametrize(
    ("frame", "code", "rpc_id"),
    [pytest.param(frame, code, rpc_id, id=name) for name, frame, code, rpc_id in MALFORMED],
)
async def test_malformed_requests_get_their_code_and_hurt_nobody(
    workdir: Path, home: FakeHomeAssistant, frame: Any, code: int, rpc_id: Any
) -> None:
    with trio.fail_after(CEILING):
        async with two_agents(workdir, home) as (gw, pi, laptop):
            calls = len(home.calls)
            if isinstance(frame, bytes):
                await pi.ws.send_message(frame)
            else:
                await pi.send(frame)
            reply = await pi.recv()
            assert reply["jsonrpc"] == "2.0"
            assert reply["error"]["code"] == code, reply
            assert reply["error"]["message"]
            assert "id" in reply
            assert reply["id"] == rpc_id
            assert len(home.calls) == calls  # nothing reached the home
            assert gw.scripted.cards == {}
            await assert_served(pi)  # the connection stays open
            await assert_served(laptop)


async def test_ids_are_echoed_exactly(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with two_agents(workdir, home) as (_gw, pi, laptop):
            for rpc_id in [None, "", "x" * 200, 0, -7, 1.5, 2**53 + 1, "ünïcode"]:
                await pi.send(request(rpc_id, "tool_request", READ))
                reply = await pi.recv()
                assert "id" in reply
                assert reply["id"] == rpc_id
                assert type(reply["id"]) is type(rpc_id)
                assert reply["result"]["status"] == "executed"
            await assert_served(laptop)


async def test_a_notification_gets_no_answer_and_executes_nothing(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with two_agents(workdir, home) as (gw, pi, laptop):
            calls = len(home.calls)
            await pi.send({"jsonrpc": "2.0", "method": "tool_request", "params": READ})
            await pi.send(
                {
                    "jsonrpc": "2.0",
                    "method": "tool_request",
                    "params": {"tool": "ha_call_service", "args": LIGHT_ON},
                }
            )
            await pi.send({"jsonrpc": "2.0", "method": "no_such_method"})
            reply = await pi.call("list_tools")
            assert "tools" in reply["result"]
            assert pi.notifications == []
            assert len(home.calls) == calls
            assert gw.scripted.cards == {}
            await assert_served(laptop)


async def test_oversized_message_under_the_transport_cap(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with two_agents(workdir, home, limits={"max_message_bytes": 4096}) as (
            _gw,
            pi,
            laptop,
        ):
            padding = "a" * 5000
            await pi.send(_tool(1, "ha_call_service", {**LIGHT_ON, "note": padding}))
            reply = await pi.recv()
            assert reply["error"]["code"] == -32600
            assert "too large" in reply["error"]["message"]
            # Multi-byte characters: the limit is in bytes, not characters.
            await pi.send(_tool(2, "ha_call_service", {**LIGHT_ON, "note": "é" * 2500}))
            assert (await pi.recv())["error"]["code"] == -32600
            await assert_served(pi)
            await assert_served(laptop)


async def test_message_over_the_transport_cap_closes_1009(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with (
            running_gateway(workdir, home=home, limits={"max_message_bytes": 4096}) as gw,
            raw_agent(gw, "laptop") as laptop,
        ):
            async with bare_socket(gw) as agent:
                reply = await agent.call("auth", {"token": gw.tokens["pi"]})
                assert reply["result"]["status"] == "authenticated"
                huge = _tool(1, "ha_get_states", {"x": "a" * (2 << 20)})
                with contextlib.suppress(ConnectionClosed):  # the close may cut the send short
                    await agent.send(huge)
                await expect_close(agent, 1009)
            await assert_served(laptop)


async def test_flood_beyond_requests_per_minute(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with two_agents(workdir, home, agents_extra={"pi": {"requests_per_minute": 5}}) as (
            _gw,
            pi,
            laptop,
        ):
            for rpc_id in range(1, 6):
                await pi.send(request(rpc_id, "list_tools"))
            for rpc_id in range(6, 16):
                await pi.send(request(rpc_id, "list_tools"))
            replies = [await pi.recv() for _ in range(15)]
            ok = [r["id"] for r in replies if "result" in r]
            limited = [r for r in replies if "error" in r]
            assert sorted(ok) == [1, 2, 3, 4, 5]
            assert sorted(r["id"] for r in limited) == list(range(6, 16))
            assert {r["error"]["code"] for r in limited} == {-32006}
            assert "requests per minute" in limited[0]["error"]["message"]
            for _ in range(3):
                await assert_served(laptop)
            # Rate limiting is an answer, not a disconnect.
            assert (await pi.call("list_tools"))["error"]["code"] == -32006


async def test_concurrent_asks_beyond_max_pending(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with two_agents(workdir, home, limits={"max_pending_per_agent": 10}) as (
            gw,
            pi,
            laptop,
        ):
            for rpc_id in range(1, 21):
                await pi.send(_tool(rpc_id, "ha_call_service", LIGHT_ON))
            limited: list[dict[str, Any]] = []
            pending: list[dict[str, Any]] = []
            while len(limited) < 10 or len(pending) < 10:
                frame = json.loads(await pi.ws.get_message())
                if frame.get("method") == "approval_pending":
                    pending.append(frame)
                else:
                    limited.append(frame)
            assert {r["error"]["code"] for r in limited} == {-32006}
            assert "pending" in limited[0]["error"]["message"]
            await gw.scripted.wait_for_card(10)
            assert len(gw.scripted.cards) == 10
            assert gw.gateway.broker.waiting("pi") == 10
            refused = {r["id"] for r in limited}
            asked = {c.card.request_id for c in gw.scripted.cards.values()}
            assert {n["params"]["request_id"] for n in pending} == asked
            assert {n["params"]["rpc_id"] for n in pending} == set(range(1, 21)) - refused
            # Another agent has its own budget.
            await laptop.send(_tool("l", "ha_call_service", LIGHT_ON))
            card = await gw.scripted.wait_for_card(11)
            assert card.card.agent == "laptop"
            await assert_served(laptop)
            # Deciding one frees one slot for pi.
            first = next(iter(asked))
            await gw.scripted.press(first, "deny")
            assert (await pi.recv())["error"]["code"] == -32001
            await pi.send(_tool(99, "ha_call_service", LIGHT_ON))
            await gw.scripted.wait_for_card(12)
            await pi.send(_tool(100, "ha_call_service", LIGHT_ON))
            assert (await pi.recv())["error"]["code"] == -32006
            assert sum(1 for m, *_ in home.calls if m == "POST") == 0


async def test_reused_rpc_id_after_reconnect_stays_distinct(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw:
            async with raw_agent(gw) as first:
                await first.send(_tool(1, "ha_call_service", LIGHT_ON))
                old = (await gw.scripted.wait_for_card(1)).card
            await gw.gateway.door.gone("pi")
            async with raw_agent(gw) as second:
                kitchen = {**LIGHT_ON, "entity_id": "light.kitchen"}
                await second.send(_tool(1, "ha_call_service", kitchen))
                new = (await gw.scripted.wait_for_card(2)).card
                assert new.request_id != old.request_id
                assert new.args["entity_id"] == "light.kitchen"

                await gw.scripted.press(new.request_id, "allow")
                reply = await second.recv()
                assert reply["id"] == 1
                assert reply["result"]["request_id"] == new.request_id
                assert [s["entity_id"] for s in reply["result"]["data"]] == ["light.kitchen"]
                assert entity(home, "light.bedroom")["state"] == "off"

                await gw.scripted.press(old.request_id, "deny")
                # The asking connection is gone: the live one is told a result is queued.
                announced = await notification(second, "results_pending")
                assert announced["params"] == {"count": 1}
                queued = await second.call("get_pending_results")
                entries = queued["result"]["results"]
                assert [(e["request_id"], e["rpc_id"], e["status"]) for e in entries] == [
                    (old.request_id, 1, "denied")
                ]
                assert entries[0]["error"]["code"] == -32001
                assert entity(home, "light.kitchen")["state"] == "on"
                assert entity(home, "light.bedroom")["state"] == "off"


# -- authentication ------------------------------------------------------------------------


async def expect_close(agent: RawAgent, code: int) -> None:
    """The gateway closes the WebSocket with ``code``."""
    with pytest.raises(ConnectionClosed) as closed:
        await agent.recv()
    reason = closed.value.reason
    assert reason is not None
    assert reason.code == code


async def until_hangup(stream: trio.abc.ReceiveStream) -> bytes:
    """What the peer sends until it hangs up (EOF or reset); returns only once it has."""
    received = b""
    try:
        while chunk := await stream.receive_some():
            received += chunk
    except trio.BrokenResourceError:
        pass  # a reset (or a TLS connection cut without close_notify) is a hang-up too
    return received


async def test_wrong_token_is_refused_and_closed(workdir: Path, home: FakeHomeAssistant) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw, "laptop") as laptop:
            async with bare_socket(gw) as intruder:
                reply = await intruder.call("auth", {"token": "not-a-token"})
                assert reply["id"] == 1
                assert reply["error"]["code"] == -32005
                await expect_close(intruder, 1008)
            await assert_served(laptop)


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(request(1, "list_tools"), id="list_tools"),
        pytest.param(_tool(1, "ha_get_states", {}), id="tool_request"),
        pytest.param(request(1, "auth"), id="auth without token"),
        pytest.param(request(1, "auth", {"token": 12345}), id="token not a string"),
        pytest.param("not json", id="not json"),
        pytest.param({"jsonrpc": "2.0", "method": "auth", "params": {}}, id="notification"),
    ],
)
async def test_first_message_must_be_auth(
    workdir: Path, home: FakeHomeAssistant, first: Any
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw, "laptop") as laptop:
            calls = len(home.calls)
            async with bare_socket(gw) as intruder:
                await intruder.send(first)
                reply = await intruder.recv()
                assert reply["error"]["code"] == -32005
                await expect_close(intruder, 1008)
            assert len(home.calls) == calls
            await assert_served(laptop)


async def test_silence_past_the_auth_deadline_closes(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with (
            running_gateway(workdir, home=home, gateway={"auth_deadline": 2}) as gw,
            raw_agent(gw, "laptop") as laptop,
        ):
            async with bare_socket(gw) as silent:
                await assert_served(laptop)  # served while the silent socket waits
                reply = await silent.recv()
                assert reply["error"]["code"] == -32005
                assert "deadline" in reply["error"]["message"]
                await expect_close(silent, 1008)
            await assert_served(laptop)


async def test_failed_auth_limit_blocks_even_a_valid_token(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with (
            running_gateway(workdir, home=home, limits={"failed_auth_per_minute": 3}) as gw,
            raw_agent(gw, "laptop") as laptop,
        ):
            for attempt in range(3):
                async with bare_socket(gw) as intruder:
                    reply = await intruder.call("auth", {"token": f"guess-{attempt}"})
                    assert reply["error"]["code"] == -32005
                    await expect_close(intruder, 1008)
            async with bare_socket(gw) as fourth:
                await fourth.send(request(1, "auth", {"token": gw.tokens["pi"]}))
                reply = await fourth.recv()
                assert reply["error"]["code"] == -32006
                assert "failed authentications" in reply["error"]["message"]
                await expect_close(fourth, 1008)
            # Already authenticated connections are not affected.
            await assert_served(laptop)
            assert "pi" not in gw.gateway.door.connections


# -- transport-level garbage -----------------------------------------------------------------


async def test_garbage_bytes_over_tls_do_not_disturb(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw, "laptop") as laptop:
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", gw.running.port, ssl_context=gw.client_ssl
            )
            async with stream:
                await stream.send_all(bytes(range(256)) * 8 + b"\r\n\r\n")
                await assert_served(laptop)
                # The server refuses the non-HTTP handshake and hangs up.
                assert b"101" not in await until_hangup(stream)
            await assert_served(laptop)


async def test_plain_tcp_to_the_tls_port_does_not_disturb(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with running_gateway(workdir, home=home) as gw, raw_agent(gw, "laptop") as laptop:
            async with await trio.open_tcp_stream("127.0.0.1", gw.running.port) as plain:
                await plain.send_all(
                    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                )
                await assert_served(laptop)
                assert b"101" not in await until_hangup(plain)
            async with await trio.open_tcp_stream("127.0.0.1", gw.running.port) as noise:
                await noise.send_all(b"\x00" * 4096)
                await assert_served(laptop)
            await assert_served(laptop)


async def test_abandoned_tls_handshake_does_not_disturb(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with trio.fail_after(CEILING):
        async with (
            running_gateway(workdir, home=home, gateway={"auth_deadline": 2}) as gw,
            raw_agent(gw, "laptop") as laptop,
        ):
            # A TCP connection that starts a ClientHello and never finishes it.
            async with await trio.open_tcp_stream("127.0.0.1", gw.running.port) as half:
                await half.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                # A TLS connection that completes TLS and then never speaks HTTP.
                mute = await trio.open_ssl_over_tcp_stream(
                    "127.0.0.1", gw.running.port, ssl_context=gw.client_ssl
                )
                async with mute:
                    await mute.do_handshake()
                    for _ in range(3):
                        await assert_served(laptop)
                    # The gateway gives up on both at its deadline instead of holding them.
                    assert await until_hangup(mute) == b""
                assert await until_hangup(half) == b""
            await assert_served(laptop)
            async with raw_agent(gw, "pi") as pi:
                await assert_served(pi)


def _bad_request_then_reset(port: int) -> None:
    """Not a WebSocket upgrade, and gone (RST) before the 400 answer can be written."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GARBAGE / HTTP/1.1\r\n\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_a_bad_request_and_a_reset_do_not_take_the_gateway_down(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    # Once took the whole gateway down: trio-websocket's reader raised out of its task.
    with trio.fail_after(CEILING):
        async with (
            running_gateway(workdir, home=home, tls=False) as gw,
            raw_agent(gw, "laptop") as laptop,
        ):
            for _ in range(30):
                await trio.to_thread.run_sync(_bad_request_then_reset, gw.running.port)
            await assert_served(laptop)
            async with raw_agent(gw) as newcomer:
                await assert_served(newcomer)
