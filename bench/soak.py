"""``python -m bench.soak [--quick] [--only fuzz,churn,floods,pipeline]``: attack a real
gateway, then run the whole-pipeline property test long.

- **fuzz**: 100,000 hostile frames (``--quick``: 10,000), after a 10,000-frame warm-up, from
  10 connections at once (2 never authenticate; the 8 others authenticate as an agent whose
  policy denies everything): random bytes as binary and text frames, random JSON, wrong types
  and mutated valid requests, truncated JSON, deep nesting (to 20,000 levels), huge strings
  (20,000-120,000 characters, in the id, the method, the tool, an entity id, a token, a key),
  text frames that are not UTF-8, frames over the transport's hard cap, notifications — while
  one well-behaved SDK agent keeps reading. Pass: the gateway never dies; every frame is
  answered (a JSON-RPC error, or a result for a mutation that stayed valid, with its id, or
  null for a frame the gateway could not use) or its connection is closed (a close code;
  after invalid UTF-8, trio-websocket closes the TCP connection without one); notifications
  get no answer; the audit log shows nothing executed for the hostile agent and no write
  executed for anyone; the well-behaved agent's calls all succeed; RSS after the run is within
  5 % of its start (after the warm-up).
- **churn**: 10,000 connect/auth/disconnect cycles (``--quick``: 1,000) and 1,000 abandoned
  handshakes (TCP only, TLS without upgrade, upgrade without auth, idle until the auth
  deadline), with the connection limits raised so every connection goes the whole way. Pass:
  open fds and threads back to their baseline, and no memory growth per cycle between a
  warm-up round and the main round, judged on what the gateway still *uses* (glibc's in-use
  bytes, Python's allocated blocks, RSS after ``malloc_trim``) rather than on raw RSS, which
  also holds the free memory glibc keeps (see :class:`MemoryProbe`).
- **floods**: against the default connection limits, with a well-behaved agent reading
  throughout: hundreds of idle sockets from one address and from a hundred more,
  connect-and-leave cycles (TCP only, TLS then leave, half a ClientHello) from 20 addresses,
  and a hundred connections of one agent at once. Pass: at most 8 idle sockets held per
  address and 256 in all, the rest closed at once; 8 of the agent's connections held, the
  rest answered -32006 and closed 1008; the well-behaved agent always served; fds back to
  their baseline; no traceback.
- **pipeline**: ``tests/test_pipeline_state_machine.py`` (the stateful property test of the
  gateway, its store and queue, and an SDK agent: random interleavings of asks, decisions,
  deadlines, dropped and jammed connections, acknowledgements, crashes, planned restarts and
  failing commits) with 3,000 examples (``--quick``: 300) instead of ``make test``'s 200.
  Pass: pytest passes; its summary lists what the examples exercised.

The gateway and the fake home each run in their own process, the attackers in a third
(``python -m bench.soak --worker fuzz|churn|floods '<json>'``). The gateway is started as
``python -m bench.soak --serve gate.toml``: exactly ``python -m agentgate serve`` plus a
memory probe on SIGUSR1.
"""

from __future__ import annotations

import trio_asyncio  # noqa: F401  # isort: skip  # patch asyncio before httpx, anyio or telegram are imported

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import logging
import os
import random
import re
import signal
import sqlite3
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import trio
import trio_websocket

from agentgate.client import AgentgateError, connect
from agentgate.memory import TRIM_EVERY
from agentgate.testing.harness import write_certificates, write_gate_toml
from bench import procs

VALID: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tool_request",
    "params": {"tool": "ha_get_state", "args": {"entity_id": procs.ENTITY}},
}
METHODS = ["tool_request", "list_tools", "get_pending_results", "auth", "", "x" * 300]
TOOLS = ["ha_get_state", "ha_get_states", "ha_call_service", "ha_fire_event", "nope", ""]
NASTY = ["*", "?", "[", "]", "(", ")", ",", "\x00", "\x1f", "\ud800", "é", "../", "%00", " "]


# -- frames ------------------------------------------------------------------------------------


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, 10**40, -(10**40)])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-308, 3.14])
    if kind in (4, 5):
        n = rng.choice([0, 1, 5, 40])
        return "".join(
            chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x3000)])) for _ in range(n)
        )
    if kind == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["jsonrpc", "id", "method", "params", "tool", "args", "token", "entity_id", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def _mutate(rng: random.Random, frame: dict[str, Any]) -> dict[str, Any] | list[Any]:
    params = frame["params"]
    args = params["args"]
    choice = rng.randrange(14)
    if choice == 0:
        del frame[rng.choice(["jsonrpc", "method", "params", "id", "id"])]
    elif choice == 1:
        frame[rng.choice(["jsonrpc", "method", "params"])] = random_json(rng)
    elif choice == 2:
        frame["method"] = rng.choice(METHODS)
    elif choice == 3:
        params["tool"] = rng.choice(TOOLS)
    elif choice == 4:
        args["entity_id"] = procs.ENTITY[: rng.randrange(30)] + rng.choice(NASTY)
    elif choice == 5:
        args[rng.choice(["area_id", "domain", "service", "event_type", "junk"])] = random_json(rng)
    elif choice == 6:
        params["args"] = random_json(rng)
    elif choice == 7:
        frame["jsonrpc"] = rng.choice(["1.0", "2", 2.0, None])
    elif choice == 8:
        frame["extra"] = random_json(rng)
    elif choice == 9:
        params["tool"] = "ha_call_service"
        params["args"] = {
            "domain": rng.choice(["light", "lock", "switch", "homeassistant"]),
            "service": rng.choice(["turn_on", "unlock", "restart"]),
            "entity_id": rng.choice(["light.kitchen", "lock.front_door", "switch.x"]),
        }
    elif choice == 10:
        return [frame] * rng.randrange(0, 3)  # batch (may be refused)
    elif choice == 11:
        args["blob"] = "x" * rng.choice([1000, 70_000])  # over the 64 KiB polite limit
    elif choice == 12:
        params["args"] = {"entity_id": procs.ENTITY, "nested": _deep(rng.choice([50, 500]))}
    else:
        frame["params"] = rng.choice([[], "x", 1, None])
    return frame


def _deep(n: int) -> Any:
    value: Any = 1
    for _ in range(n):
        value = [value]
    return value


class Frame(NamedTuple):
    """One hostile frame and what the gateway must do with it."""

    payload: str | bytes  # bytes: a binary frame, or (raw) the bytes of a text frame
    expects: str  # "answer", "none" (a notification) or "close"
    expected_id: Any  # the id the answer must echo; ... when it cannot be known
    kind: str
    raw: bool = False  # a text frame sent as these bytes, not as encoded text


HARD_CAP = 1 << 20  # the transport cap with the default max_message_bytes: max(4 * 64 KiB, 1 MiB)
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xc0\xaf"]
HUGE = [20_000, 60_000, 70_000, 120_000]  # characters: around and above the 64 KiB polite limit


def make_frame(rng: random.Random, rpc_id: int) -> Frame:
    """A hostile frame: mostly garbage, wrong types and mutated requests, some huge strings,
    deep nesting and binary frames; a few invalid UTF-8 and oversized ones, which close."""
    roll = rng.random()
    if roll < 0.001:  # over the transport's hard cap: close 1009
        pad = "x" * (HARD_CAP + rng.randrange(1, 4096))
        request = {"jsonrpc": "2.0", "id": rpc_id, "method": "list_tools", "params": {"pad": pad}}
        return Frame(json.dumps(request), "close", None, "oversized")
    if roll < 0.003:  # a text frame that is not UTF-8: the connection closes
        data = json.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": "list_tools"}).encode()
        cut = rng.randrange(len(data))
        return Frame(
            data[:cut] + rng.choice(BAD_UTF8) + data[cut:], "close", None, "bad utf-8", True
        )
    if roll < 0.03:
        return _huge(rng, rpc_id)
    if roll < 0.05:
        return _nested(rng, rpc_id)
    if roll < 0.07:
        return Frame(rng.randbytes(rng.choice([1, 60, 3000])), "answer", None, "binary")
    return _classic(rng, rpc_id)


def _huge(rng: random.Random, rpc_id: int) -> Frame:
    """A request with one huge string: in its id, method, tool, entity id, token or a key."""
    big = "".join(rng.choice('aé€𝄞x\\"') for _ in range(64)) * (rng.choice(HUGE) // 64)
    frame: dict[str, Any] = json.loads(json.dumps(VALID))
    frame["id"] = rpc_id
    where = rng.choice(["id", "method", "tool", "entity_id", "token", "key"])
    if where == "id":
        frame["id"] = big
    elif where == "method":
        frame["method"] = big
    elif where == "tool":
        frame["params"]["tool"] = big
    elif where == "entity_id":
        frame["params"]["args"]["entity_id"] = big
    elif where == "token":
        frame = {"jsonrpc": "2.0", "id": rpc_id, "method": "auth", "params": {"token": big}}
    else:
        frame["params"]["args"][big] = 1
    text = json.dumps(frame, ensure_ascii=rng.random() < 0.5)
    expected = frame["id"] if len(text.encode()) <= 65536 else ...
    return Frame(text, "answer", expected, "huge string")


def _nested(rng: random.Random, rpc_id: int) -> Frame:
    """Deep nesting: bare arrays or objects, or a request carrying them in its arguments."""
    n = rng.choice([100, 1_000, 20_000])
    choice = rng.randrange(3)
    if choice == 0:
        return Frame("[" * n + "]" * n, "answer", None, "deep nesting")
    if choice == 1:
        return Frame('{"a":' * n + "1" + "}" * n, "answer", None, "deep nesting")
    inner = '{"entity_id":"' + procs.ENTITY + '","x":' + "[" * n + "]" * n + "}"
    text = (
        f'{{"jsonrpc":"2.0","id":{rpc_id},"method":"tool_request",'
        f'"params":{{"tool":"ha_get_state","args":{inner}}}}}'
    )
    return Frame(text, "answer", ..., "deep nesting")


def _classic(rng: random.Random, rpc_id: int) -> Frame:
    """Random bytes, random JSON, truncated JSON and mutated valid requests."""
    kind = rng.randrange(10)
    if kind < 2:
        raw = rng.randbytes(rng.choice([0, 1, 7, 200, 3000]))
        if kind == 0:
            return Frame(raw, "answer", None, "binary")
        return Frame(raw.decode("latin-1"), "answer", None, "random text")
    if kind < 4:
        value = random_json(rng)
        label = "random JSON"
    else:
        frame = json.loads(json.dumps(VALID))
        frame["id"] = rpc_id
        value = _mutate(rng, frame)
        label = "mutated request"
        if rng.random() < 0.1:
            text = json.dumps(value)
            return Frame(text[: rng.randrange(max(1, len(text)))], "answer", None, "truncated JSON")
    if (
        isinstance(value, dict)
        and "id" not in value
        and value.get("jsonrpc") == "2.0"
        and isinstance(value.get("method"), str)
    ):
        return Frame(json.dumps(value), "none", None, "notification")  # never answered
    expected = value.get("id", ...) if isinstance(value, dict) else None
    if isinstance(value, dict) and value.get("jsonrpc") != "2.0":
        expected = ...
    if isinstance(value, dict) and not isinstance(expected, (int, str, type(None))):
        expected = ...
    return Frame(json.dumps(value), "answer", expected, label)


def masked(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final WebSocket frame as a client sends it (masked), for bytes no library sends."""
    key = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, 0x80 | size])
    elif size < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", size)
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", size)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


def check_answer(text: str | bytes, expected: Any) -> str:
    """'error', 'result' or a problem description."""
    try:
        reply = json.loads(text)
    except ValueError:
        return "answer is not JSON"
    if not isinstance(reply, dict) or reply.get("jsonrpc") != "2.0":
        return "answer is not JSON-RPC 2.0"
    error = reply.get("error")
    unusable = isinstance(error, dict) and error.get("code") in (-32700, -32600, -32005)
    # a frame the gateway could not use (too large, not decodable) is answered with id null
    wrong = expected is not ... and reply.get("id") != expected
    if wrong and not (unusable and reply.get("id") is None):
        return "answer has the wrong id"
    if isinstance(reply.get("error"), dict) and isinstance(reply["error"].get("code"), int):
        return "error"
    if "result" in reply:
        return "result"
    return "answer has neither error nor result"


# -- workers (run in their own process) ---------------------------------------------------------


@contextlib.contextmanager
def _one_error() -> Iterator[None]:
    """The one error a nursery raised (ConnectionClosed, ...), not its exception group."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        pending: list[BaseException] = [group]
        while pending:
            exc = pending.pop()
            if isinstance(exc, BaseExceptionGroup):
                pending += exc.exceptions
            elif not isinstance(exc, trio.Cancelled):
                leaves.append(exc)
        # The gateway's close, if it is among them (trio-websocket's reader may also fail to
        # answer it while our task is still sending: BusyResourceError).
        closed = [e for e in leaves if isinstance(e, trio_websocket.ConnectionClosed)]
        if closed or len(leaves) == 1:
            raise (closed or leaves)[0] from None
        raise


@contextlib.asynccontextmanager
async def _websocket(
    url: str, ctx: ssl.SSLContext, *, local: str | None = None
) -> Any:  # AsyncIterator[tuple[WebSocketConnection, SSLStream]]
    """A client WebSocket over a TLS stream we own (closed when the block ends), so frames no
    WebSocket library would send can be written to the stream itself."""
    host, port = url.removeprefix("wss://").rstrip("/").rsplit(":", 1)
    tcp = await trio.open_tcp_stream(host, int(port), local_address=local)
    stream = trio.SSLStream(tcp, ctx, server_hostname=host, https_compatible=True)
    try:
        with _one_error():
            async with trio.open_nursery() as nursery:
                ws = await trio_websocket.wrap_client_stream(
                    nursery, stream, host, "/", max_message_size=1 << 22
                )
                try:
                    yield ws, stream
                finally:
                    with trio.move_on_after(2, shield=True):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(2, shield=True):
            await trio.aclose_forcefully(stream)


async def fuzz_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec["frames"]`` hostile frames from ``spec["connections"]`` connections at once (the
    first two never authenticate); an SDK agent keeps reading meanwhile."""
    ctx = ssl.create_default_context(cafile=spec["ca"])
    total = spec["frames"]
    sent = 0
    kinds: dict[str, Counter[str]] = {}  # kind -> "sent", "answered", "closed CODE"
    closes: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    good: Counter[str] = Counter()
    samples: list[str] = []
    ids = itertools.count(1)
    done = trio.Event()

    def problem(what: str, frame: Frame, text: object = "") -> None:
        problems[f"{frame.kind}: {what}"] += 1
        if len(samples) < 8:
            samples.append(
                f"{frame.kind}: {what}: {str(frame.payload)[:120]!r} -> {str(text)[:120]!r}"
            )

    async def answer_to(ws: trio_websocket.WebSocketConnection) -> str | bytes | None:
        """The next frame that is not a notification, or None after 10 s."""
        with trio.move_on_after(10):
            while True:
                text = await ws.get_message()
                parsed = _maybe(text)
                if not (isinstance(parsed, dict) and "id" not in parsed and "method" in parsed):
                    return text
        return None

    async def attacker(n: int, authenticated: bool) -> None:
        nonlocal sent
        rng = random.Random(spec["seed"] * 100 + n)
        pending: Frame | None = None  # sent, its answer or close not seen yet
        while sent < total:
            try:
                async with _websocket(spec["url"], ctx) as (ws, stream):
                    if authenticated:
                        auth = {"token": spec["token"]}
                        await ws.send_message(
                            json.dumps(
                                {"jsonrpc": "2.0", "id": 0, "method": "auth", "params": auth}
                            )
                        )
                        await ws.get_message()
                    while sent < total:
                        frame = pending = make_frame(rng, next(ids))
                        counts = kinds.setdefault(frame.kind, Counter())
                        counts["sent"] += 1
                        sent += 1
                        if frame.raw:
                            assert isinstance(frame.payload, bytes)
                            await stream.send_all(masked(frame.payload))
                        else:
                            await ws.send_message(frame.payload)
                        if frame.expects == "none":
                            pending = None
                            continue
                        text = await answer_to(ws)
                        if text is None:
                            problem("no answer within 10 s", frame)
                        elif frame.expects == "close":
                            problem("answered where a close was due", frame, text)
                        else:
                            verdict = check_answer(text, frame.expected_id)
                            if verdict in ("error", "result"):
                                counts["answered"] += 1
                            else:
                                problem(verdict, frame, text)
                        pending = None
            except trio_websocket.ConnectionClosed as exc:
                code = exc.reason.code if exc.reason else None
                closes[str(code)] += 1
                if pending is not None:
                    kinds[pending.kind][f"closed {code}"] += 1
                    # trio-websocket drops the TCP connection without a close frame after a
                    # text frame that is not UTF-8 (the peer sees 1006): a close all the same.
                    if code in (None, 1006) and pending.kind != "bad utf-8":
                        problem("closed without a close code", pending)
                elif code in (None, 1006):
                    problems["closed without a close code (no frame pending)"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                # the gateway closed while a frame was still being sent: an oversized one, or
                # a frame that is not UTF-8 (its connection is dropped as its bytes arrive)
                closes["while sending"] += 1
                if pending is not None:
                    kinds[pending.kind]["closed while sending"] += 1
                    if pending.kind not in ("oversized", "bad utf-8"):
                        problem("connection broken while sending", pending)
            except trio_websocket.HandshakeError as exc:
                problems[f"handshake failed: {type(exc).__name__}"] += 1
                await trio.sleep(0.1)
            except OSError as exc:
                problems[f"socket error: {exc}"] += 1
                await trio.sleep(0.1)

    async def well_behaved() -> None:
        async with connect(spec["url"], token=spec["good_token"], ca=spec["ca"]) as gw:
            while not done.is_set():
                try:
                    data = await gw.call("ha_get_state", entity_id=procs.ENTITY)
                    good["ok" if data.get("entity_id") == procs.ENTITY else "wrong data"] += 1
                except AgentgateError as exc:
                    good[f"{type(exc).__name__}: {exc.message}"[:120]] += 1
                await trio.sleep(0.01)

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(well_behaved)
        async with trio.open_nursery() as attackers:
            for n in range(spec["connections"]):
                attackers.start_soon(attacker, n, n >= 2)  # 2 of them never authenticate
        done.set()
    return {
        "seconds": round(time.monotonic() - started, 1),
        "sent": sent,
        "kinds": {kind: dict(counts) for kind, counts in sorted(kinds.items())},
        "closes": dict(closes),
        "problems": dict(problems),
        "problem_samples": samples,
        "well_behaved": dict(good),
    }


def _maybe(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


async def churn_worker(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=spec["ca"])
    host, port = spec["url"].removeprefix("wss://").rstrip("/").rsplit(":", 1)
    counts: Counter[str] = Counter()
    cycles = spec["cycles"]
    left = cycles

    async def cycler() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                async with connect(
                    spec["url"], token=spec["token"], ca=spec["ca"], reconnect=False
                ):
                    counts["cycle ok"] += 1
            except AgentgateError as exc:
                counts[f"cycle failed: {type(exc).__name__}"] += 1

    async def abandon(i: int) -> None:
        kind = i % 4
        try:
            stream = await trio.open_tcp_stream(host, int(port))
            if kind == 0:  # TCP only
                await stream.aclose()
            elif kind == 1:  # TLS, no upgrade
                tls = trio.SSLStream(stream, ctx, server_hostname=host)
                await tls.do_handshake()
                await tls.aclose()
            elif kind == 2:  # half a ClientHello, then gone
                await stream.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                await stream.aclose()
            else:  # upgrade, never authenticate: the gateway's auth deadline closes it
                async with trio_websocket.open_websocket_url(spec["url"], ssl_context=ctx) as ws:
                    with trio.move_on_after(spec["auth_deadline"] + 5):
                        await ws.get_message()
            counts[f"abandoned kind {kind}"] += 1
        except (
            OSError,
            trio.BrokenResourceError,
            trio_websocket.ConnectionClosed,
            trio_websocket.HandshakeError,
        ) as exc:
            counts[f"abandoned kind {kind}: {type(exc).__name__}"] += 1

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(spec["parallel"]):
            nursery.start_soon(cycler)
        limiter = trio.CapacityLimiter(50)

        async def guarded(i: int) -> None:
            async with limiter:
                await abandon(i)

        for i in range(spec["abandoned"]):
            nursery.start_soon(guarded, i)
    return {"seconds": round(time.monotonic() - started, 1), "counts": dict(counts)}


async def floods_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Floods against the default connection limits, while an SDK agent keeps reading:

    1. idle sockets: ``idle_one`` from one address and ``idle_many`` x 5 from as many more,
       held silent; how many the gateway keeps (per address, in all) a moment later;
    2. connect-and-leave: ``leave`` TCP-only, TLS-then-leave and half-ClientHello cycles, 50 at
       a time, from 20 addresses;
    3. one agent: ``agent_sockets`` connections with a valid token at once, from as many
       addresses: how many are held, how many refused (-32006, then 1008).
    """
    ctx = ssl.create_default_context(cafile=spec["ca"])
    host, port_text = spec["url"].removeprefix("wss://").rstrip("/").rsplit(":", 1)
    port = int(port_text)
    good: Counter[str] = Counter()
    out: dict[str, Any] = {}
    done = trio.Event()

    async def well_behaved(task_status: trio.TaskStatus[None]) -> None:
        async with connect(spec["url"], token=spec["good_token"], ca=spec["ca"]) as gw:
            task_status.started()
            while not done.is_set():
                try:
                    data = await gw.call("ha_get_state", entity_id=procs.ENTITY)
                    good["ok" if data.get("entity_id") == procs.ENTITY else "wrong data"] += 1
                except AgentgateError as exc:
                    good[f"{type(exc).__name__}: {exc.message}"[:120]] += 1
                await trio.sleep(0.01)

    async def idle() -> None:
        sources = ["127.0.0.2"] * spec["idle_one"]
        for n in range(spec["idle_many"]):
            sources += [f"127.0.1.{n + 1}"] * 5
        streams: list[tuple[str, trio.SocketStream]] = []
        closed: dict[int, float] = {}
        opened = time.monotonic()
        async with trio.open_nursery() as nursery:

            async def watch(i: int, stream: trio.SocketStream) -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.receive_some(1)
                closed[i] = time.monotonic()

            for source in sources:
                stream = await trio.open_tcp_stream(host, port, local_address=source)
                nursery.start_soon(watch, len(streams), stream)
                streams.append((source, stream))
            all_open = time.monotonic()
            await trio.sleep(1.0)
            kept: Counter[str] = Counter(
                source for i, (source, _) in enumerate(streams) if i not in closed
            )
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            for _, stream in streams:
                await trio.aclose_forcefully(stream)
        out["idle"] = {
            "sockets": len(streams),
            "addresses": len(set(sources)),
            "seconds to open": round(all_open - opened, 2),
            "held 1 s later": sum(kept.values()),
            "held from the one address": kept.get("127.0.0.2", 0),
            "most held from one of the others": max(
                (n for s, n in kept.items() if s != "127.0.0.2"), default=0
            ),
            "closed at once": len(streams) - sum(kept.values()),
        }

    async def leave() -> None:
        counts: Counter[str] = Counter()
        limiter = trio.CapacityLimiter(50)

        async def one(i: int) -> None:
            kind = ("tcp", "tls", "half hello")[i % 3]
            async with limiter:
                try:
                    stream = await trio.open_tcp_stream(
                        host, port, local_address=f"127.0.2.{i % 20 + 1}"
                    )
                    if kind == "tcp":
                        await stream.aclose()
                    elif kind == "tls":
                        tls = trio.SSLStream(stream, ctx, server_hostname=host)
                        try:
                            await tls.do_handshake()
                            counts["tls completed"] += 1
                        finally:
                            await trio.aclose_forcefully(tls)
                    else:
                        await stream.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                        await stream.aclose()
                    counts[f"{kind} ok"] += 1
                except (OSError, trio.BrokenResourceError) as exc:
                    counts[f"{kind}: {type(exc).__name__}"] += 1

        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i in range(spec["leave"]):
                nursery.start_soon(one, i)
        out["leave"] = {"seconds": round(time.monotonic() - started, 1), **counts}

    async def one_agent() -> None:
        outcomes: Counter[str] = Counter()
        release = trio.Event()
        settled = trio.Event()

        async def one(i: int) -> None:
            try:
                async with _websocket(spec["url"], ctx, local=f"127.0.3.{i + 1}") as (ws, _):
                    auth = {"token": spec["agent_token"]}
                    await ws.send_message(
                        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "auth", "params": auth})
                    )
                    answer = json.loads(await ws.get_message())
                    if "result" in answer:
                        outcomes["held"] += 1
                        if sum(outcomes.values()) == spec["agent_sockets"]:
                            settled.set()
                        await release.wait()
                        return
                    code = answer.get("error", {}).get("code")
                    try:
                        await ws.get_message()
                        outcomes[f"error {code}, then a frame"] += 1
                    except trio_websocket.ConnectionClosed as exc:
                        close = exc.reason.code if exc.reason else None
                        outcomes[f"refused {code}, closed {close}"] += 1
            except (OSError, trio.BrokenResourceError, trio_websocket.HandshakeError) as exc:
                outcomes[f"failed: {type(exc).__name__}"] += 1
            if sum(outcomes.values()) == spec["agent_sockets"]:
                settled.set()

        async with trio.open_nursery() as nursery:
            for i in range(spec["agent_sockets"]):
                nursery.start_soon(one, i)
            with trio.move_on_after(30):
                await settled.wait()
            release.set()
        out["agent"] = dict(outcomes)

    async with trio.open_nursery() as nursery:
        await nursery.start(well_behaved)
        await idle()
        await leave()
        await one_agent()
        await trio.sleep(1)
        done.set()
    out["well_behaved"] = dict(good)
    return out


WORKERS = {"fuzz": fuzz_worker, "churn": churn_worker, "floods": floods_worker}


# -- the churn gateway's memory probe (runs inside the gateway process) ------------------------

PROBE_ENV = "BENCH_SOAK_PROBE"


class MemoryProbe:
    """On SIGUSR1, write what the gateway's memory is made of to ``$BENCH_SOAK_PROBE`` (JSON).

    Raw RSS is a poor leak detector for a connection churn: glibc keeps freed heap memory
    resident in holes below the top of the heap, and after 10,000+ TLS connections that free
    pool reaches 20-40 MiB while the bytes in use stay flat. So
    the probe reports, besides RSS:

    - ``malloc_inuse_kib``: bytes glibc has handed out and not had back, all arenas
      (``malloc_info``): native memory that is live — OpenSSL, SQLite, Python's large objects;
    - ``malloc_free_kib``: glibc's free pool (the part of RSS that is not a leak);
    - ``py_allocated_kib``: bytes in Python's allocated small-object blocks (pymalloc);
    - ``rss_trimmed_mib``: RSS after ``malloc_trim(0)`` hands glibc's free pages back;
    - ``tls_sessions``: entries in the server's TLS session cache (bounded by OpenSSL).

    On a C library without ``malloc_info``/``malloc_trim`` those fields are ``None``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.contexts: list[ssl.SSLContext] = []
        try:
            self._libc: Any = ctypes.CDLL(None)
            self._libc.malloc_trim.argtypes = [ctypes.c_size_t]
            self._libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
            self._libc.fopen.restype = ctypes.c_void_p
            self._libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            self._libc.fclose.argtypes = [ctypes.c_void_p]
        except (OSError, AttributeError):
            self._libc = None

    def install(self) -> None:
        """Handle SIGUSR1; keep the server's SSL context for its session statistics."""
        from agentgate import gateway

        original = gateway.server_ssl_context

        def keep(config: Any) -> ssl.SSLContext:
            context = original(config)
            self.contexts.append(context)
            return context

        gateway.server_ssl_context = keep
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.measure()))
        tmp.replace(self.path)

    def measure(self) -> dict[str, Any]:
        gc.collect()
        out: dict[str, Any] = {"rss_mib": round(_vm_rss_kib() / 1024, 1)}
        out.update(self._malloc())
        out["py_allocated_kib"] = _pymalloc_allocated_kib()
        out["py_objects"] = len(gc.get_objects())
        if self._libc is not None:
            self._libc.malloc_trim(0)
            out["rss_trimmed_mib"] = round(_vm_rss_kib() / 1024, 1)
        else:
            out["rss_trimmed_mib"] = None
        out["tls_sessions"] = self.contexts[0].session_stats()["number"] if self.contexts else None
        return out

    def _malloc(self) -> dict[str, int | None]:
        none: dict[str, int | None] = {"malloc_inuse_kib": None, "malloc_free_kib": None}
        if self._libc is None:
            return none
        with tempfile.NamedTemporaryFile("r", suffix=".xml") as sink:
            stream = self._libc.fopen(sink.name.encode(), b"w")
            if not stream:
                return none
            self._libc.malloc_info(0, stream)
            self._libc.fclose(stream)
            xml = sink.read()
        totals = xml[xml.rfind("</heap>") :]  # the all-arenas totals follow the last heap

        def total(pattern: str) -> int:
            found = re.search(pattern, totals)
            return int(found.group(1)) if found else 0

        free = total(r'<total type="fast" count="\d+" size="(\d+)"') + total(
            r'<total type="rest" count="\d+" size="(\d+)"'
        )
        mapped = total(r'<total type="mmap" count="\d+" size="(\d+)"')
        system = total(r'<system type="current" size="(\d+)"')
        return {
            "malloc_inuse_kib": (system - free + mapped) // 1024,
            "malloc_free_kib": free // 1024,
        }


def _vm_rss_kib() -> int:
    return procs.rss_kib(os.getpid())["VmRSS"]


def _pymalloc_allocated_kib() -> int | None:
    """'bytes in allocated blocks' from ``sys._debugmallocstats`` (it prints to fd 2)."""
    with tempfile.TemporaryFile("w+") as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        found = re.search(r"# bytes in allocated blocks\s*=\s*([\d,]+)", sink.read())
    return int(found.group(1).replace(",", "")) // 1024 if found else None


def serve_with_probe(path: str) -> int:
    """``python -m agentgate serve PATH`` with :class:`MemoryProbe` installed."""
    from agentgate.serve import run_serve

    MemoryProbe(Path(os.environ[PROBE_ENV])).install()
    return run_serve(path)


@contextlib.contextmanager
def probed_gateway(
    workdir: Path,
    *,
    home: procs.Home,
    tokens: dict[str, str],
    auth_deadline: float,
    limits: dict[str, int] | None = None,
    agent_policies: dict[str, str] | None = None,
) -> Iterator[procs.GatewayProc]:
    """:func:`bench.procs.gateway` (same config, ``limits`` on top), started as ``python -m
    bench.soak --serve``."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca, cert, key = write_certificates(workdir)
    path = write_gate_toml(
        workdir,
        tokens=tokens,
        ha_url=home.url,
        ha_token=procs.HA_TOKEN,
        tls=(cert, key),
        policy=procs.BENCH_POLICY,
        agent_policies=agent_policies,
        gateway={"approval_timeout": 900, "auth_deadline": auth_deadline},
        limits={
            "requests_per_minute": 100_000_000,
            "max_pending_per_agent": 10,
            "failed_auth_per_minute": 1_000_000,
            **(limits or {}),
        },
        ha_timeout=10,
    )
    log = workdir / "gateway.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.soak", "--serve", str(path)],
            stdout=sink,
            stderr=sink,
            env={**os.environ, PROBE_ENV: str(workdir / "probe.json")},
            cwd=str(Path(__file__).resolve().parent.parent),
        )
    try:
        line = procs._wait_line(log, "listening on wss://", proc, 60)
        url = "wss://" + line.split("wss://", 1)[1].split()[0]
        yield procs.GatewayProc(url, ca, dict(tokens), proc, log, workdir)
    finally:
        procs._stop(proc)


def probe(gw: procs.GatewayProc) -> dict[str, Any]:
    """Ask the gateway's :class:`MemoryProbe` for a reading (plus fds and threads)."""
    result = gw.workdir / "probe.json"
    result.unlink(missing_ok=True)
    gw.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 60
    while not result.exists():
        if time.monotonic() > deadline or not gw.alive():
            raise RuntimeError("the gateway's memory probe did not answer")
        time.sleep(0.05)
    reading: dict[str, Any] = json.loads(result.read_text())
    return {**reading, "fds": procs.open_fds(gw.pid), "threads": procs.threads(gw.pid)}


# -- the orchestrator --------------------------------------------------------------------------


class Sampler:
    """The gateway's RSS, fds and threads once a second, in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(1.0):
            try:
                rss = procs.rss_kib(self.pid)["VmRSS"]
                self.samples.append(
                    (time.monotonic() - t0, rss, procs.open_fds(self.pid), procs.threads(self.pid))
                )
            except OSError:
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def snapshot(pid: int) -> dict[str, Any]:
    return {
        "rss_mib": round(procs.rss_kib(pid)["VmRSS"] / 1024, 1),
        "fds": procs.open_fds(pid),
        "threads": procs.threads(pid),
    }


def _run_worker(kind: str, spec: dict[str, Any], limit: float) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.soak", "--worker", kind, json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    return procs.collect(proc, limit)


DENY_ALL = """\
defaults:
  - pattern: "*"
    action: deny
"""
PIPELINE_EXAMPLES = 3_000  # --quick: a tenth
PIPELINE_TEST = "tests/test_pipeline_state_machine.py"


def run_pipeline(examples: int) -> tuple[bool, list[str]]:
    """The whole-pipeline property test under pytest, with ``examples`` examples."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "AGENTGATE_PROPTEST_EXAMPLES": str(examples)}
    command = [sys.executable, "-m", "pytest", "-q", "--hypothesis-show-statistics"]
    started = time.monotonic()
    done = subprocess.run(
        [*command, PIPELINE_TEST], cwd=root, env=env, capture_output=True, text=True
    )
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    lines = [f"  {examples:,} examples of {PIPELINE_TEST} in {elapsed:.0f} s"]
    # Hypothesis's statistics: how often each thing the test notes came up (not its own
    # notes on drawing rules).
    noted = [line.strip() for line in output.splitlines() if "%, " in line]
    lines += [f"  {line}" for line in noted if "draw" not in line and "gave up" not in line]
    if done.returncode != 0:  # each failing example, as Hypothesis shrank it
        shown = ("AssertionError", "Error:", "StepStuck", "state.", "Falsifying")
        failing = [
            line.strip(" |")
            for line in output.splitlines()
            if any(mark in line for mark in shown) and "consistent()" not in line
        ]
        lines += ["  pytest failed:", *(f"    {line}" for line in failing[:120])]
    return done.returncode == 0, lines


FUZZ_LIMITS = {
    # The fuzzers reconnect after every close: room for that (the floods test the limits).
    "max_connections_per_agent": 64,
    "max_unauthenticated_per_address": 64,
}
RSS_BAR = 0.05  # RSS after the run within 5 % of its start


def executions(store: Path) -> Counter[str]:
    """``agent tool decision -> resolution``: what the audit log says happened (a tool name
    that is not one of the gateway's is counted as ``(other)``: the fuzzer invents them)."""
    known = ", ".join(f"'{tool}'" for tool in TOOLS if tool and tool != "nope")
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            f"SELECT agent, CASE WHEN tool IN ({known}) THEN tool ELSE '(other)' END AS t,"
            " decision, resolution, COUNT(*) FROM audit_log"
            " GROUP BY agent, t, decision, resolution"
        ).fetchall()
    finally:
        conn.close()
    return Counter({f"{a} {t} {d} -> {r}": n for a, t, d, r, n in rows})


def run_fuzz(gw: procs.GatewayProc, frames: int) -> tuple[bool, list[str]]:
    tokens = gw.tokens
    spec = {
        "url": gw.url,
        "ca": str(gw.ca),
        "token": tokens["fuzzer"],
        "good_token": tokens["good"],
        "frames": min(10_000, frames),
        "connections": 10,
        "seed": 5,
    }
    fresh = probe(gw)
    warm = _run_worker("fuzz", spec, 1800)  # the first TLS handshakes, imports, caches
    time.sleep(TRIM_EVERY + 3)  # quiet, and the gateway has handed freed memory back
    start = probe(gw)
    with Sampler(gw.pid) as sampler:
        result = _run_worker("fuzz", {**spec, "frames": frames, "seed": 6}, 3600)
    time.sleep(TRIM_EVERY + 5)  # the auth deadline of the last sockets, then quiet (as above)
    end = probe(gw)
    audit = executions(gw.workdir / "agentgate.db")
    fuzzer_ran = {k: n for k, n in audit.items() if k.startswith("fuzzer") and "executed" in k}
    writes_ran = {
        k: n
        for k, n in audit.items()
        if k.endswith("-> executed") and ("ha_call_service" in k or "ha_fire_event" in k)
    }
    good = result["well_behaved"]
    good_ok = set(good) == {"ok"} and set(warm["well_behaved"]) == {"ok"}
    alive = gw.alive()
    raw_ok = end["rss_mib"] <= start["rss_mib"] * (1 + RSS_BAR)
    trimmed_ok = end["rss_trimmed_mib"] is None or (
        end["rss_trimmed_mib"] <= start["rss_trimmed_mib"] * (1 + RSS_BAR)
    )
    peak = max((s[1] for s in sampler.samples), default=0) / 1024
    problems = {**warm["problems"], **result["problems"]}
    kinds = result["kinds"]
    lines = [
        f"fuzz: {result['sent']:,} hostile frames in {result['seconds']} s from 10 connections"
        f" (2 never authenticated; after a {spec['frames']:,}-frame warm-up)",
        *(f"  {kind}: {json.dumps(counts)}" for kind, counts in kinds.items()),
        f"  closes by code: {json.dumps(result['closes'])}",
        f"  problems: {json.dumps(problems) if problems else 'none'}",
        *(f"    e.g. {sample}" for sample in result["problem_samples"]),
        f"  executed for the fuzzer (its policy denies all): {fuzzer_ran or 'nothing'};"
        f" writes executed for anyone: {writes_ran or 'none'}",
        f"  audit rows: {json.dumps(dict(audit))}",
        f"  well-behaved agent: {json.dumps(good)}",
        f"  RSS MiB: fresh {fresh['rss_mib']}, start {start['rss_mib']}, peak {peak:.1f},"
        f" end {end['rss_mib']} ({(end['rss_mib'] / start['rss_mib'] - 1) * 100:+.1f} %;"
        f" bar +{RSS_BAR * 100:.0f} %) -> {'ok' if raw_ok else 'NOT BACK'}",
        f"  RSS after malloc_trim MiB: start {start['rss_trimmed_mib']}, end"
        f" {end['rss_trimmed_mib']} -> {'ok' if trimmed_ok else 'NOT BACK'}",
        f"  gateway alive: {alive}; fds {start['fds']} -> {end['fds']},"
        f" threads {start['threads']} -> {end['threads']}",
    ]
    ok = alive and not problems and good_ok and not fuzzer_ran and not writes_ran and raw_ok
    return ok, lines


LIVE_SLACK_KIB = 512  # live-memory growth allowed between rounds, plus LIVE_BYTES_PER_CYCLE
LIVE_BYTES_PER_CYCLE = 50  # a per-connection leak of one small object is ~100-200 bytes


def _live_kib(reading: dict[str, Any]) -> int | None:
    """Bytes the gateway uses: glibc in-use (all arenas) plus Python's allocated blocks."""
    if reading.get("malloc_inuse_kib") is None or reading.get("py_allocated_kib") is None:
        return None
    return int(reading["malloc_inuse_kib"]) + int(reading["py_allocated_kib"])


def _memory_line(reading: dict[str, Any]) -> str:
    return (
        f"live {_live_kib(reading)} KiB (malloc in use {reading['malloc_inuse_kib']}, Python "
        f"blocks {reading['py_allocated_kib']}), RSS {reading['rss_mib']} MiB (glibc free pool "
        f"{reading['malloc_free_kib']} KiB), RSS after malloc_trim {reading['rss_trimmed_mib']} "
        f"MiB, TLS sessions cached {reading['tls_sessions']}, fds {reading['fds']}, "
        f"threads {reading['threads']}"
    )


def judge_churn_memory(
    before: dict[str, Any], after: dict[str, Any], cycles: int
) -> tuple[bool, list[str]]:
    """Pass if what the gateway *uses* did not grow per cycle between the two readings.

    Judged: live bytes (glibc in use + Python blocks) and RSS after ``malloc_trim``. Raw RSS
    is shown but not judged: it holds glibc's free pool, which grows with heap fragmentation
    and plateaus. Without a probe (no glibc), raw RSS is judged.
    """
    live_before, live_after = _live_kib(before), _live_kib(after)
    lines = []
    if live_before is None or live_after is None or after.get("rss_trimmed_mib") is None:
        ok = after["rss_mib"] <= before["rss_mib"] * 1.05 + 2
        lines.append(f"  memory (raw RSS, no glibc probe): {'ok' if ok else 'GROWING'}")
        return ok, lines
    grown = live_after - live_before
    per_cycle = grown * 1024 / max(cycles, 1)
    live_ok = grown <= LIVE_SLACK_KIB + LIVE_BYTES_PER_CYCLE * cycles / 1024
    trimmed_ok = after["rss_trimmed_mib"] <= before["rss_trimmed_mib"] * 1.05 + 2
    raw = after["rss_mib"] - before["rss_mib"]
    lines += [
        f"  live memory: {grown:+,} KiB over {cycles:,} cycles = {per_cycle:+.0f} bytes/cycle "
        f"(bar: {LIVE_SLACK_KIB} KiB + {LIVE_BYTES_PER_CYCLE} bytes/cycle) -> "
        f"{'flat' if live_ok else 'GROWING'}",
        f"  RSS after malloc_trim: {before['rss_trimmed_mib']} -> {after['rss_trimmed_mib']} MiB "
        f"(bar: +5 % + 2 MiB) -> {'ok' if trimmed_ok else 'GROWING'}",
        f"  raw RSS {raw:+.1f} MiB, not judged: glibc's free pool is "
        f"{after['malloc_free_kib']:,} KiB (freed memory kept in heap holes; it plateaus)",
    ]
    return live_ok and trimmed_ok, lines


def run_churn(
    gw: procs.GatewayProc, cycles: int, abandoned: int, auth_deadline: float
) -> tuple[bool, list[str]]:
    tokens = list(gw.tokens.values())
    spec = {
        "url": gw.url,
        "ca": str(gw.ca),
        "token": tokens[0],
        "cycles": cycles,
        "abandoned": abandoned,
        "parallel": 8,
        "auth_deadline": auth_deadline,
    }
    fresh = probe(gw)
    # A warm-up round first: the allocators keep the high-water mark of the first burst
    # (glibc's free pool, Python's empty pools), so a leak is growth *between* rounds.
    warm = {**spec, "cycles": min(2000, cycles), "abandoned": abandoned}
    warm_result = _run_worker("churn", warm, 1800)
    time.sleep(auth_deadline + 3)
    before = probe(gw)
    result = _run_worker("churn", spec, 3600)
    time.sleep(auth_deadline + 3)
    after = probe(gw)
    counts = result["counts"]
    failed = {k: v for k, v in {**counts, **warm_result["counts"]}.items() if "failed" in k}
    memory_ok, memory_lines = judge_churn_memory(before, after, cycles)
    ok = (
        gw.alive()
        and not failed
        # between rounds, like memory: the store opens its reader connection (2 fds) lazily
        and after["fds"] <= before["fds"] + 1
        and after["threads"] <= before["threads"] + 1
        and memory_ok
    )
    lines = [
        f"churn: {cycles:,} connect/auth/disconnect cycles (8 at a time) and {abandoned:,} "
        f"abandoned handshakes in {result['seconds']} s: {json.dumps(counts)}",
        f"  fresh gateway: {_memory_line(fresh)}",
        f"  after a warm-up round ({warm['cycles']:,} cycles + {abandoned:,} abandoned): "
        f"{_memory_line(before)}",
        f"  after the main round: {_memory_line(after)}"
        f"  ({auth_deadline + 3:.0f} s to settle after each round)",
        *memory_lines,
        "  tasks: not visible from outside the process; every connection task holds a socket, "
        "so a leaked connection task would show as a leaked fd",
    ]
    return ok, lines


# The churn measures what each connection costs: every one goes the whole way (as before the
# connection limits), none refused at accept.
CHURN_LIMITS = {"max_connections": 4096, "max_unauthenticated_per_address": 4096}
FLOODS_AUTH_DEADLINE = 10.0  # idle sockets the gateway admits stay until then
MAX_CONNECTIONS = 256  # the defaults the floods run against
MAX_UNAUTHENTICATED = 8
MAX_PER_AGENT = 8


def run_floods(gw: procs.GatewayProc, quick: bool, auth_deadline: float) -> tuple[bool, list[str]]:
    spec: dict[str, Any] = {
        "url": gw.url,
        "ca": str(gw.ca),
        "good_token": gw.tokens["good"],
        "agent_token": gw.tokens["fuzzer"],
        "idle_one": 100 if quick else 300,
        "idle_many": 60 if quick else 100,  # addresses, 5 idle sockets each
        "leave": 1_000 if quick else 10_000,
        "agent_sockets": 50 if quick else 100,
    }
    before = snapshot(gw.pid)
    with Sampler(gw.pid) as sampler:
        result = _run_worker("floods", spec, 1800)
    time.sleep(auth_deadline + 3)
    after = snapshot(gw.pid)
    peak_fds = max((s[2] for s in sampler.samples), default=after["fds"])
    idle, leave, agent = result["idle"], result["leave"], result["agent"]
    good = result["well_behaved"]
    refused = agent.get("refused -32006, closed 1008", 0)
    log = gw.log.read_text(errors="replace")
    refusal_lines = sum(1 for line in log.splitlines() if " refused" in line)
    checks = {
        "gateway alive": gw.alive(),
        "well-behaved agent served throughout": set(good) == {"ok"},
        f"at most {MAX_UNAUTHENTICATED} idle sockets held from one address": (
            idle["held from the one address"] <= MAX_UNAUTHENTICATED
        ),
        f"at most {MAX_CONNECTIONS} sockets in all (one is the agent's)": (
            idle["held 1 s later"] <= MAX_CONNECTIONS - 1
        ),
        f"{MAX_PER_AGENT} connections of one agent held, the rest -32006 and 1008": (
            agent.get("held") == MAX_PER_AGENT and refused == spec["agent_sockets"] - MAX_PER_AGENT
        ),
        f"peak fds within baseline + {MAX_CONNECTIONS} + 16": (
            peak_fds <= before["fds"] + MAX_CONNECTIONS + 16
        ),
        "fds and threads back to baseline": (
            after["fds"] <= before["fds"] + 2 and after["threads"] <= before["threads"] + 1
        ),
    }
    lines = [
        f"floods (the default limits: max_connections {MAX_CONNECTIONS},"
        f" max_unauthenticated_per_address {MAX_UNAUTHENTICATED}, max_connections_per_agent"
        f" {MAX_PER_AGENT}), with an SDK agent reading throughout:",
        f"  idle sockets: {json.dumps(idle)}",
        f"  connect-and-leave ({spec['leave']:,}, 50 at a time, 20 addresses): {json.dumps(leave)}",
        f"  one agent, {spec['agent_sockets']} connections at once: {json.dumps(agent)}",
        f"  well-behaved agent: {json.dumps(good)}",
        f"  gateway fds: {before['fds']} before, peak {peak_fds}, {after['fds']} after;"
        f" threads {before['threads']} -> {after['threads']}; RSS {before['rss_mib']} ->"
        f" {after['rss_mib']} MiB",
        f"  refusals logged: {refusal_lines} lines (once per address and minute)",
        *(f"  {'ok  ' if passed else 'FAIL'} {name}" for name, passed in checks.items()),
    ]
    return all(checks.values()), lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="10,000 frames, 1,000 cycles, smaller floods, 300 pipeline examples",
    )
    parser.add_argument("--only", default="fuzz,churn,floods,pipeline")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_with_probe(args.serve)
    if args.worker:
        logging.getLogger("agentgate").setLevel(logging.ERROR)
        print(json.dumps(trio.run(WORKERS[args.worker], json.loads(args.spec))))
        return 0
    which = {w.strip() for w in args.only.split(",")}
    frames = 10_000 if args.quick else 100_000
    cycles = 1_000 if args.quick else 10_000
    auth_deadline = 2.0
    verdicts: list[tuple[str, bool]] = []
    out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="agentgate-soak-") as tmp, procs.fake_home() as home:
        tokens = {"fuzzer": "fuzzer-token-0123456789abcdef", "good": "good-token-0123456789abcdef"}
        for name in ("fuzz", "churn", "floods"):
            if name not in which:
                continue
            print(f"--- {name}", file=sys.stderr, flush=True)
            deadline = FLOODS_AUTH_DEADLINE if name == "floods" else auth_deadline
            with probed_gateway(
                Path(tmp) / name,
                home=home,
                tokens=tokens,
                auth_deadline=deadline,
                limits={"fuzz": FUZZ_LIMITS, "churn": CHURN_LIMITS}.get(name),
                agent_policies={"fuzzer": DENY_ALL},
            ) as gw:
                if name == "fuzz":
                    ok, lines = run_fuzz(gw, frames)
                elif name == "churn":
                    ok, lines = run_churn(gw, cycles, 1_000, auth_deadline)
                else:
                    ok, lines = run_floods(gw, args.quick, deadline)
                log = gw.log
            status = gw.proc.returncode
            text = log.read_text(errors="replace")
            lines.append(
                f"  gateway exit status after SIGTERM: {status}; log: "
                f"{text.count('Traceback')} tracebacks, {text.count(' ERROR ')} ERROR lines"
            )
            ok = ok and status == 0 and "Traceback" not in text
            verdicts.append((name, ok))
            out += lines
            print("\n".join(lines), file=sys.stderr, flush=True)
    if "pipeline" in which:
        print("--- pipeline", file=sys.stderr, flush=True)
        examples = PIPELINE_EXAMPLES // 10 if args.quick else PIPELINE_EXAMPLES
        ok, lines = run_pipeline(examples)
        verdicts.append(("pipeline", ok))
        out += lines
        print("\n".join(lines), file=sys.stderr, flush=True)
    print()
    print("\n".join(out))
    print()
    for name, ok in verdicts:
        print(f"{name}: {'PASS' if ok else 'FAIL'}")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
