"""``python -m bench.soak [--quick] [--only fuzz,churn]``: fuzz and churn a real gateway.

- **fuzz**: 100,000 frames (``--quick``: 10,000) from 10 connections — random bytes, random
  JSON, mutated valid requests — while one well-behaved SDK agent keeps calling. Pass: the
  gateway never dies, every frame is answered with a JSON-RPC error (or a result, for a
  mutation that stayed valid) or its connection is closed with a close code, notifications get
  no answer, the well-behaved agent's calls all succeed, RSS is flat over the second half.
- **churn**: 10,000 connect/auth/disconnect cycles (``--quick``: 1,000) and 1,000 abandoned
  handshakes (TCP only, TLS without upgrade, upgrade without auth, idle until the auth
  deadline). Pass: open fds and threads back to their baseline, and no memory growth per
  cycle between a warm-up round and the main round, judged on what the gateway still *uses*
  (glibc's in-use bytes, Python's allocated blocks, RSS after ``malloc_trim``) rather than on
  raw RSS, which also holds the free memory glibc keeps (see :class:`MemoryProbe`).

The gateway and the fake home each run in their own process, the attackers in a third
(``python -m bench.soak --worker fuzz|churn '<json>'``). The churn gateway is started as
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
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import trio
import trio_websocket

from agentgate.client import AgentgateError, connect
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


def make_frame(rng: random.Random, rpc_id: int) -> tuple[str | bytes, bool, Any]:
    """(frame, expects_answer, expected id or ... when unknown)."""
    kind = rng.randrange(10)
    if kind < 2:
        raw = rng.randbytes(rng.choice([0, 1, 7, 200, 3000]))
        if kind == 0:
            return raw, True, None
        return raw.decode("latin-1"), True, None
    if kind < 4:
        if rng.random() < 0.05:
            return "[" * 20_000 + "]" * 20_000, True, None
        value = random_json(rng)
    else:
        frame = json.loads(json.dumps(VALID))
        frame["id"] = rpc_id
        value = _mutate(rng, frame)
        if rng.random() < 0.1:
            text = json.dumps(value)
            return text[: rng.randrange(max(1, len(text)))], True, None  # truncated
    if (
        isinstance(value, dict)
        and "id" not in value
        and value.get("jsonrpc") == "2.0"
        and isinstance(value.get("method"), str)
    ):
        return json.dumps(value), False, None  # a notification: no answer by design (§13)
    expected = value.get("id", ...) if isinstance(value, dict) else None
    if isinstance(value, dict) and value.get("jsonrpc") != "2.0":
        expected = ...
    if isinstance(value, dict) and not isinstance(expected, (int, str, type(None))):
        expected = ...
    return json.dumps(value), True, expected


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


async def fuzz_worker(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=spec["ca"])
    total = spec["frames"]
    sent = 0
    stats: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    good: Counter[str] = Counter()
    samples: list[str] = []
    ids = itertools.count(1)
    done = trio.Event()

    async def attacker(n: int, authenticated: bool) -> None:
        nonlocal sent
        rng = random.Random(spec["seed"] * 100 + n)
        while sent < total:
            try:
                async with trio_websocket.open_websocket_url(
                    spec["url"], ssl_context=ctx, max_message_size=1 << 22
                ) as ws:
                    if authenticated:
                        await ws.send_message(
                            json.dumps(
                                {
                                    "jsonrpc": "2.0",
                                    "id": 0,
                                    "method": "auth",
                                    "params": {"token": spec["token"]},
                                }
                            )
                        )
                        await ws.get_message()
                    while sent < total:
                        frame, expects, expected = make_frame(rng, next(ids))
                        await ws.send_message(frame)
                        sent += 1
                        stats["sent"] += 1
                        if not expects:
                            stats["notification"] += 1
                            continue
                        with trio.move_on_after(10) as waited:
                            while True:
                                text = await ws.get_message()
                                parsed = _maybe(text)
                                if (
                                    isinstance(parsed, dict)
                                    and "id" not in parsed
                                    and "method" in parsed
                                ):
                                    continue  # a notification from the gateway
                                break
                        if waited.cancelled_caught:
                            problems["no answer within 10 s"] += 1
                            continue
                        verdict = check_answer(text, expected)
                        if verdict in ("error", "result"):
                            stats[verdict] += 1
                        else:
                            problems[verdict] += 1
                            if len(samples) < 5:
                                samples.append(f"{str(frame)[:150]!r} -> {str(text)[:150]!r}")
            except trio_websocket.ConnectionClosed as exc:
                code = exc.reason.code if exc.reason else None
                closes[str(code)] += 1
                if code in (None, 1006):
                    problems["closed without a close code"] += 1
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
        "frames": dict(stats),
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


WORKERS = {"fuzz": fuzz_worker, "churn": churn_worker}


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
    workdir: Path, *, home: procs.Home, tokens: dict[str, str], auth_deadline: float
) -> Iterator[procs.GatewayProc]:
    """:func:`bench.procs.gateway` (same config), started as ``python -m bench.soak --serve``."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca, cert, key = write_certificates(workdir)
    path = write_gate_toml(
        workdir,
        tokens=tokens,
        ha_url=home.url,
        ha_token=procs.HA_TOKEN,
        tls=(cert, key),
        policy=procs.BENCH_POLICY,
        gateway={"approval_timeout": 900, "auth_deadline": auth_deadline},
        limits={
            "requests_per_minute": 100_000_000,
            "max_pending_per_agent": 10,
            "failed_auth_per_minute": 1_000_000,
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


def run_fuzz(gw: procs.GatewayProc, frames: int) -> tuple[bool, list[str]]:
    tokens = list(gw.tokens.values())
    spec = {
        "url": gw.url,
        "ca": str(gw.ca),
        "token": tokens[0],
        "good_token": tokens[1],
        "frames": frames,
        "connections": 10,
        "seed": 6,
    }
    before = snapshot(gw.pid)
    with Sampler(gw.pid) as sampler:
        result = _run_worker("fuzz", spec, 3600)
    time.sleep(2)
    after = snapshot(gw.pid)
    rss = [s[1] / 1024 for s in sampler.samples] or [after["rss_mib"]]
    half = rss[len(rss) // 2]
    peak_second_half = max(rss[len(rss) // 2 :])
    flat = after["rss_mib"] <= half * 1.10 + 2 and peak_second_half <= half * 1.15 + 4
    good = result["well_behaved"]
    good_ok = set(good) == {"ok"}
    alive = gw.alive()
    lines = [
        f"fuzz: {result['frames'].get('sent', 0):,} frames in {result['seconds']} s "
        f"from 10 connections (2 unauthenticated): {json.dumps(result['frames'])}",
        f"  closes by code: {json.dumps(result['closes'])}",
        f"  problems: {json.dumps(result['problems']) if result['problems'] else 'none'}",
        *(f"    e.g. {sample}" for sample in result["problem_samples"]),
        f"  well-behaved agent: {json.dumps(good)}",
        f"  gateway alive: {alive}; before {before}, after {after}",
        f"  RSS MiB: start {rss[0]:.1f}, half-way {half:.1f}, max of 2nd half "
        f"{peak_second_half:.1f}, end {after['rss_mib']:.1f} -> {'flat' if flat else 'GROWING'}",
    ]
    ok = alive and not result["problems"] and good_ok and flat
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10,000 frames, 1,000 cycles")
    parser.add_argument("--only", default="fuzz,churn")
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
        for name in ("fuzz", "churn"):
            if name not in which:
                continue
            print(f"--- {name}", file=sys.stderr, flush=True)
            start = procs.gateway if name == "fuzz" else probed_gateway
            with start(
                Path(tmp) / name, home=home, tokens=tokens, auth_deadline=auth_deadline
            ) as gw:
                if name == "fuzz":
                    ok, lines = run_fuzz(gw, frames)
                else:
                    ok, lines = run_churn(gw, cycles, 1_000, auth_deadline)
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
    print()
    print("\n".join(out))
    print()
    for name, ok in verdicts:
        print(f"{name}: {'PASS' if ok else 'FAIL'}")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
