"""S1-S7 (project issue 6): each starts its own gateway process and measures its floor.

Throughput scenarios run their load in separate worker processes (:mod:`bench.load`), all
measuring one shared wall-clock window. S5/S6 press the fake Telegram's buttons from this
process; S6's 1,000 agents live in one worker process.
"""

from __future__ import annotations

import trio_asyncio  # noqa: F401  # isort: skip  # patch asyncio before httpx, anyio or telegram are imported

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from agentgate.testing.fake_telegram import FakeMessage, FakeTelegram
from bench import fasthome, legs, procs
from bench.profile import Profiler
from bench.stats import Row, median, percentile


@attrs.define
class Settings:
    """Durations and sizes; ``quick()`` is for a fast smoke run."""

    s1_seconds: float = 20
    floor_seconds: float = 6
    s2_seconds: float = 20
    s3_seconds: float = 20
    s4_seconds: float = 60
    s4_edge: float = 10
    s5_asks: int = 30
    s6_agents: int = 1000
    s6_per_agent: int = 10
    s6_timeout: float = 120  # every card is out in ~50 s: no approval expires before its card
    s6_probes: int = 20
    idle_seconds: float = 120
    warmup: float = 2

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            s1_seconds=5,
            floor_seconds=3,
            s2_seconds=5,
            s3_seconds=5,
            s4_seconds=15,
            s4_edge=3,
            s5_asks=10,
            s6_agents=200,
            s6_per_agent=10,
            s6_timeout=30,
            s6_probes=10,
            idle_seconds=20,
        )


@attrs.define
class Context:
    settings: Settings
    home: procs.Home
    tg: FakeTelegram
    workdir: Path
    profiler: Profiler | None = None
    floors: dict[str, float] = attrs.field(factory=dict)
    proposals: str = ""
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)
    _n: int = 0

    def fresh_dir(self, name: str) -> Path:
        self._n += 1
        return self.workdir / f"{self._n:02d}-{name}"


def _tokens(n: int, prefix: str = "agent") -> dict[str, str]:
    return {f"{prefix}{i:04d}": f"{prefix}-{i:04d}-token-0123456789abcdef" for i in range(n)}


@contextmanager
def _gateway(
    ctx: Context, name: str, tokens: dict[str, str], **kw: Any
) -> Iterator[procs.GatewayProc]:
    with procs.gateway(
        ctx.fresh_dir(name),
        home=ctx.home,
        tokens=tokens,
        telegram_url=ctx.tg.base_url,
        proposals=ctx.proposals,
        **kw,
    ) as gw:
        yield gw
        if not gw.alive():
            raise RuntimeError(f"{name}: the gateway died (see {gw.log})")


def _gw_spec(gw: procs.GatewayProc, start_at: float, duration: float, **kw: Any) -> dict[str, Any]:
    return {
        "mode": "gateway",
        "url": gw.url,
        "ca": str(gw.ca),
        "tokens": list(gw.tokens.values()),
        "entity": procs.ENTITY,
        "start_at": start_at,
        "duration": duration,
        **kw,
    }


def _floor_spec(ctx: Context, start_at: float, duration: float, **kw: Any) -> dict[str, Any]:
    return {
        "mode": "floor",
        "ha_url": ctx.home.url,
        "ha_token": procs.HA_TOKEN,
        "entity": procs.ENTITY,
        "start_at": start_at,
        "duration": duration,
        **kw,
    }


def _measure(
    ctx: Context,
    specs: list[dict[str, Any]],
    duration: float,
    *,
    setup: float,
    profile: tuple[str, int] | None = None,
    cpu: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run the workers over one window; merge counts, latencies, per-second counts, errors.

    ``cpu`` names processes (``{"gateway": pid}``) whose CPU seconds are sampled at the window's
    start and end, as are the workers' (summed as ``"workers"``): ``m["cpu"]``.
    """
    start_at = time.time() + setup + ctx.settings.warmup
    for spec in specs:
        spec["start_at"] = start_at
        spec["duration"] = duration
    workers = [procs.run_worker(spec, limit=0) for spec in specs]
    watched = {**(cpu or {}), **{f"worker{i}": w.pid for i, w in enumerate(workers)}}
    sampler = procs.CpuWindow(watched, start_at, duration)
    if profile is not None and ctx.profiler is not None:
        ctx.profiler.record(profile[0], profile[1], start_at, duration)
    results = [procs.collect(w, setup + ctx.settings.warmup + duration + 120) for w in workers]
    used = sampler.result()
    used["workers"] = sum(v for k, v in used.items() if k.startswith("worker"))
    if used.get("others", 0) / duration > BUSY:
        ctx.log(f"    other processes used {used['others'] / duration:.0%} of a core meanwhile")
    latencies: list[float] = []
    per_second = [0] * len(results[0]["per_second"])
    errors: dict[str, int] = {}
    for r in results:
        latencies.extend(r["latencies_ms"])
        per_second = [a + b for a, b in zip(per_second, r["per_second"], strict=False)]
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    count = sum(r["count"] for r in results)
    return {
        "rate": count / duration,
        "count": count,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "per_second": per_second,
        "errors": errors,
        "late_start": max(r["late_start_s"] for r in results),
        "cpu": used,
        "duration": duration,
    }


# Other processes using more than this share of a core during a window are worth a warning.
BUSY = 0.1


def _elsewhere(m: dict[str, Any], duration: float) -> str:
    """What the rest of the machine did during ``m``'s window, for a row's note."""
    others, stolen = m["cpu"].get("others", math.nan), m["cpu"].get("stolen", 0.0)
    text = f"rest of the machine {max(0.0, others) / duration:.0%} of a core"  # ticks round
    return text + (f", stolen {stolen / duration:.0%}" if stolen / duration >= 0.01 else "")


def _per_request_us(m: dict[str, Any], process: str) -> float:
    """Microseconds of ``process``'s CPU per call answered in the window."""
    return m["cpu"].get(process, math.nan) / m["count"] * 1e6 if m["count"] else math.nan


def _errors_note(m: dict[str, Any]) -> str:
    n = sum(m["errors"].values())
    return f"{n} errors: {next(iter(m['errors']))}" if n else ""


# -- floors ------------------------------------------------------------------------------------
#
# Three floors, each sequential (one call at a time) and with 100 in flight, each the same work
# with none of agentgate in the way:
#   service: the fast fake home (bench/fasthome.py) driven by its bare asyncio client;
#   httpx:   a bare httpx.AsyncClient under Trio calling it (what the gateway's executor does);
#   door:    a bare trio-websocket echo over TLS with a result-sized answer (bench/door.py).
# A scenario is bounded by the lowest of its floors; each floor's CPU per call is measured in
# the process that plays the gateway's part (the home, the httpx client, the echo server).
# A fourth, composite floor bounds S1, S4 and S2U as a whole rather than piecewise:
#   stack:   one process doing all of an allowed read with none of agentgate, driven by the
#            SDK (bench/stackfloor.py): frame in, fsync'd decision row, httpx GET, frame out.

FLOOR_KINDS = ("service", "httpx", "door")
# 100 in flight through httpx in one process (the gateway is one): the executor's own shape
# (10 connections, requests queued on a Trio limiter rather than in httpcore's pool, whose
# waiter loop costs more the more requests wait), and one connection per client. The floor is
# the better of the two. (One client with a pool of 100 collapses to ~100-150 req/s here.)
HTTPX_SHAPES: dict[str, dict[str, Any]] = {
    "1 client (pool 10, 10 slots)": {"clients": 1, "pool": 10, "slots": 10},
    "10 clients (pool 1)": {"clients": 10, "pool": 1},
}


def _service_spec(ctx: Context, connections: int) -> dict[str, Any]:
    return {
        "url": ctx.home.url,
        "token": procs.HA_TOKEN,
        "entity": procs.ENTITY,
        "connections": connections,
    }


def _measure_service(ctx: Context, connections: int) -> dict[str, Any]:
    """The fast home's bare asyncio client (``python -m bench.fasthome drive``) over one window."""
    s = ctx.settings
    start_at = time.time() + 1 + s.warmup
    spec = {**_service_spec(ctx, connections), "start_at": start_at, "duration": s.floor_seconds}
    worker = subprocess.Popen(
        [sys.executable, "-m", "bench.fasthome", "drive", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    sampler = procs.CpuWindow(
        {"home": ctx.home.pid, "worker0": worker.pid}, start_at, s.floor_seconds
    )
    result = procs.collect(worker, 1 + s.warmup + s.floor_seconds + 60)
    return {
        "rate": result["count"] / s.floor_seconds,
        "count": result["count"],
        "p50": percentile(result["latencies_ms"], 50),
        "errors": result["errors"],
        "cpu": sampler.result(),
        "duration": s.floor_seconds,
    }


def _echo_spec(echo: procs.EchoServer, connections: int, in_flight: int) -> dict[str, Any]:
    return {
        "mode": "echo",
        "url": echo.url,
        "ca": str(echo.ca),
        "connections": connections,
        "in_flight": in_flight,
    }


def floors(ctx: Context) -> list[Row]:
    """The service, the httpx call and the door, each alone (no gateway running)."""
    s = ctx.settings
    f = ctx.floors
    measured: dict[str, dict[str, Any]] = {}
    measured["service seq"] = _measure_service(ctx, 1)
    measured["service par"] = _measure_service(ctx, 100)
    for key in ("service seq", "service par"):
        f[f"cpu {key}"] = _per_request_us(measured[key], "home")
    home = {"home": ctx.home.pid}
    measured["httpx seq"] = _measure(
        ctx, [_floor_spec(ctx, 0, 0, clients=1, in_flight=1)], s.floor_seconds, setup=1, cpu=home
    )
    f["cpu httpx seq"] = _per_request_us(measured["httpx seq"], "workers")
    shapes = {
        name: _measure(
            ctx,
            [_floor_spec(ctx, 0, 0, in_flight=100, **shape)],
            s.floor_seconds,
            setup=1,
            cpu=home,
        )
        for name, shape in HTTPX_SHAPES.items()
    }
    best = max(shapes, key=lambda k: shapes[k]["rate"])
    measured["httpx par"] = shapes[best]
    f["cpu httpx par"] = _per_request_us(shapes[best], "workers")
    with procs.echo_server(ctx.workdir / "door") as echo:
        for key, in_flight in (("door seq", 1), ("door par", 100)):
            measured[key] = _measure(
                ctx,
                [_echo_spec(echo, 1, in_flight)],
                s.floor_seconds,
                setup=1,
                cpu={"door": echo.pid},
            )
            f[f"cpu {key}"] = _per_request_us(measured[key], "door")
    stack = _measure_stack(ctx)
    for key, m in measured.items():
        f[key] = m["rate"]
    for shape in ("seq", "par"):
        f[shape] = min(f[f"{kind} {shape}"] for kind in FLOOR_KINDS)
        # The least CPU a gateway's request costs on this stack: one httpx call as the client
        # and one frame in and out as the WebSocket server.
        f[f"cpu {shape}"] = f[f"cpu httpx {shape}"] + f[f"cpu door {shape}"]
    ctx.log(
        "floors: "
        + ", ".join(f"{k} {m['rate']:,.0f} req/s" for k, m in (measured | stack).items())
        + "; httpx 100 in flight: "
        + ", ".join(f"{k} {m['rate']:,.0f}" for k, m in shapes.items())
    )

    def row(key: str, label: str, what: str, cpu_of: str) -> Row:
        m = measured.get(key) or stack[key]
        errors = _errors_note(m)
        return Row(
            f"floor {label}",
            m["rate"],
            "req/s",
            "-",
            None,
            note=f"{what}; {cpu_of} CPU {f['cpu ' + key]:,.0f} µs/req; "
            + _elsewhere(m, s.floor_seconds)
            + (f"; {errors}" if errors else ""),
            extra={"cpu_us_per_request": f["cpu " + key], "p50_ms": m["p50"]},
        )

    one = "1 connection, 1 call at a time"
    hundred = "100 connections, 1 call each"
    return [
        row(
            "service seq", "service, sequential", f"fast home ← bare asyncio client, {one}", "home"
        ),
        row(
            "service par",
            "service, 100 in flight",
            f"fast home ← bare asyncio client, {hundred}",
            "home",
        ),
        row(
            "httpx seq",
            "httpx, sequential",
            "bare httpx.AsyncClient on Trio → fast home, 1 task",
            "client",
        ),
        Row(
            "floor httpx, 100 in flight",
            measured["httpx par"]["rate"],
            "req/s",
            "-",
            None,
            note=f"best in 1 process: {best}, 100 tasks; client CPU "
            f"{f['cpu httpx par']:,.0f} µs/req; "
            + ", ".join(f"{k} {m['rate']:,.0f}" for k, m in shapes.items())
            + "; "
            + _elsewhere(shapes[best], s.floor_seconds),
            extra={
                "cpu_us_per_request": f["cpu httpx par"],
                "shapes": {k: m["rate"] for k, m in shapes.items()},
            },
        ),
        row(
            "door seq",
            "door, sequential",
            "bare trio-websocket echo over TLS, 1 connection, 1 frame at a time",
            "server",
        ),
        row(
            "door par",
            "door, 100 in flight",
            "bare trio-websocket echo over TLS, 1 connection, 100 frames in flight",
            "server",
        ),
    ] + [
        row(
            key,
            f"stack, {'sequential' if key == 'stack seq' else '100 in flight'}",
            f"SDK → bare trio-websocket over TLS, fsync'd decision, httpx GET (bench.stackfloor), "
            f"{one if key == 'stack seq' else '1 connection, 100 calls in flight, 100 entities'}",
            "server",
        )
        for key in stack
    ]


# The stack floor, in each shape: (SDK calls in flight, entities they read). With 100 in flight
# each call reads its own entity, as in S2U: the floor shares no read, so it bounds S2U, not S2.
STACK_SHAPES: dict[str, tuple[int, list[str] | None]] = {
    "stack seq": (1, None),
    "stack par": (100, fasthome.SPREAD),
}


def _measure_stack(ctx: Context) -> dict[str, dict[str, Any]]:
    """The stack floor (:mod:`bench.stackfloor`) in both shapes, into ``ctx.floors`` ("stack
    seq", "cpu stack seq", ...). A failure is logged and leaves the other floors standing (the
    rows then say "stack -")."""
    s, f = ctx.settings, ctx.floors
    measured: dict[str, dict[str, Any]] = {}
    try:
        with procs.stack_floor(ctx.workdir / "stack", ctx.home) as floor:
            for key, (in_flight, entities) in STACK_SHAPES.items():
                spec = {
                    "mode": "gateway",
                    "url": floor.url,
                    "ca": str(floor.ca),
                    "tokens": ["stack-floor"],  # the floor takes any token
                    "entity": procs.ENTITY,
                    "connections": 1,
                    "in_flight": in_flight,
                }
                if entities:
                    spec["entities"] = entities
                m = measured[key] = _measure(
                    ctx,
                    [spec],
                    s.floor_seconds,
                    setup=1,
                    cpu={"stack": floor.pid, "home": ctx.home.pid},
                )
                f[key] = m["rate"]
                f[f"cpu {key}"] = _per_request_us(m, "stack")
    except Exception as exc:  # the new floor must not take the three others with it
        ctx.log(f"stack floor FAILED: {exc!r}")
    return measured


def _versus_stack(ctx: Context, shape: str, m: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """The gateway against the stack floor of ``shape``: its rate ÷ the floor's, and the
    floor's CPU per request ÷ the gateway's (both "higher is better"), for a row's note."""
    rate = ctx.floors.get(f"stack {shape}", math.nan)
    cpu = ctx.floors.get(f"cpu stack {shape}", math.nan)
    gateway = _per_request_us(m, "gateway")
    figures = {
        "rate": rate,
        "rate_ratio": m["rate"] / rate if rate else math.nan,
        "cpu_us": cpu,
        "cpu_ratio": cpu / gateway if gateway else math.nan,
    }
    if rate != rate:
        return "stack floor -", figures
    return (
        f"vs stack {figures['rate_ratio']:.2f}x ({rate:,.0f} req/s), CPU {gateway:,.0f} µs "
        f"against its {cpu:,.0f} ({figures['cpu_ratio']:.2f}x)",
        figures,
    )


def _bound(ctx: Context, shape: str, rate: float) -> tuple[float, str]:
    """The lowest of the floors of ``shape`` ("seq" or "par"), and the gateway's ratio to each."""
    f = ctx.floors
    ratios = ", ".join(f"{kind} {rate / f[f'{kind} {shape}']:.2f}x" for kind in FLOOR_KINDS)
    lowest = min(FLOOR_KINDS, key=lambda kind: f[f"{kind} {shape}"])
    return f[shape], f"bound by {lowest}; vs {ratios}"


def cpu_row(ctx: Context, label: str, m: dict[str, Any], shape: str, target: str = "-") -> Row:
    """The gateway's CPU per answered request over ``m``'s window, against the stack's least
    (one httpx call + one WebSocket frame each way, at the same concurrency ``shape``).

    For every throughput scenario, the MCP row's too: measure with ``cpu={"gateway": pid,
    "home": home_pid}`` and add this row.
    """
    value = _per_request_us(m, "gateway")
    floor = ctx.floors[f"cpu {shape}"]
    httpx_us, door_us = ctx.floors[f"cpu httpx {shape}"], ctx.floors[f"cpu door {shape}"]
    home = _per_request_us(m, "home")
    stack = ctx.floors.get(f"cpu stack {shape}", math.nan)
    return Row(
        f"{label} gateway CPU per request",
        value,
        "µs",
        target,
        None,
        floor,
        floor / value if value else math.nan,
        note=f"{m['cpu'].get('gateway', math.nan):.2f} s CPU for {m['count']:,} answers; floor = "
        f"httpx {httpx_us:,.0f} + door {door_us:,.0f} µs; stack floor {stack:,.0f} µs "
        f"({stack / value if value else math.nan:.2f}x); fast home {home:,.0f} µs/req; "
        + _elsewhere(m, m["duration"]),
        extra={
            "headline": f"cpu_us_per_request.{label.split()[0]}",
            "cpu_s": m["cpu"],
        },
    )


# -- S1-S4 ------------------------------------------------------------------------------------


def s1(ctx: Context) -> list[Row]:
    s = ctx.settings
    with _gateway(ctx, "s1", _tokens(1)) as gw:
        m = _measure(
            ctx,
            [_gw_spec(gw, 0, 0, connections=1, in_flight=1)],
            s.s1_seconds,
            setup=2,
            profile=("s1", gw.pid),
            cpu={"gateway": gw.pid, "home": ctx.home.pid},
        )
    floor, versus = _bound(ctx, "seq", m["rate"])
    stack, stack_figures = _versus_stack(ctx, "seq", m)
    ratio = m["rate"] / floor
    ok = m["rate"] >= 1200 and ratio >= 0.5 and not m["errors"]
    return [
        Row(
            "S1 sequential",
            m["rate"],
            "req/s",
            "≥ 1,200 req/s and ≥ 0.5x floor",
            ok,
            floor,
            ratio,
            note=f"p50 {m['p50']:.2f} ms, p99 {m['p99']:.2f} ms; {versus}; {stack} "
            + _errors_note(m),
            extra={"stack_floor": stack_figures},
        ),
        cpu_row(ctx, "S1", m, "seq"),
    ]


def s2(ctx: Context) -> list[Row]:
    s = ctx.settings
    with _gateway(ctx, "s2", _tokens(1), max_pending=10) as gw:
        m = _measure(
            ctx,
            [_gw_spec(gw, 0, 0, connections=1, in_flight=100)],
            s.s2_seconds,
            setup=2,
            profile=("s2", gw.pid),
            cpu={"gateway": gw.pid, "home": ctx.home.pid},
        )
    floor, versus = _bound(ctx, "par", m["rate"])
    ctx.floors["s2"] = m["rate"]
    return [
        Row(
            "S2 100 in flight, 1 conn",
            m["rate"],
            "req/s",
            "≥ 4,000 req/s",
            m["rate"] >= 4000 and not m["errors"],
            floor,
            m["rate"] / floor,
            note=f"{_errors_note(m) or '1 SDK client process'}; {versus}",
        ),
        Row("S2 p99", m["p99"], "ms", "≤ 30 ms", m["p99"] <= 30, note=f"p50 {m['p50']:.1f} ms"),
        cpu_row(ctx, "S2", m, "par"),
    ]


def s2u(ctx: Context) -> list[Row]:
    """S2 with each of the 100 calls in flight reading its own entity: no two share a GET, so
    every call costs the gateway one Home Assistant request (S2's all read one entity)."""
    s = ctx.settings
    with _gateway(ctx, "s2u", _tokens(1), max_pending=10) as gw:
        m = _measure(
            ctx,
            [_gw_spec(gw, 0, 0, connections=1, in_flight=100, entities=fasthome.SPREAD)],
            s.s2_seconds,
            setup=2,
            profile=("s2u", gw.pid),
            cpu={"gateway": gw.pid, "home": ctx.home.pid},
        )
    floor, versus = _bound(ctx, "par", m["rate"])
    stack, stack_figures = _versus_stack(ctx, "par", m)
    return [
        Row(
            "S2U 100 in flight, 100 entities",
            m["rate"],
            "req/s",
            "-",
            None,
            floor,
            m["rate"] / floor,
            note=f"{_errors_note(m) or '1 SDK client process'}; {versus}; {stack}",
            extra={"stack_floor": stack_figures},
        ),
        Row("S2U p99", m["p99"], "ms", "-", None, note=f"p50 {m['p50']:.1f} ms"),
        cpu_row(ctx, "S2U", m, "par"),
    ]


def s3(ctx: Context) -> list[Row]:
    s = ctx.settings
    tokens = _tokens(50)
    names = list(tokens)
    with _gateway(ctx, "s3", tokens) as gw:
        specs = []
        for half in (names[:25], names[25:]):  # two client processes, 25 agents each
            spec = _gw_spec(gw, 0, 0, connections=25, in_flight=20)
            spec["tokens"] = [tokens[n] for n in half]
            specs.append(spec)
        m = _measure(
            ctx,
            specs,
            s.s3_seconds,
            setup=4,
            profile=("s3", gw.pid),
            cpu={"gateway": gw.pid, "home": ctx.home.pid},
        )
    floor, versus = _bound(ctx, "par", m["rate"])
    s2_rate = ctx.floors.get("s2", math.nan)
    return [
        Row(
            "S3 50 agents x 20",
            m["rate"],
            "req/s",
            "no errors; ≥ S2",
            not m["errors"] and m["rate"] >= s2_rate,
            floor,
            m["rate"] / floor,
            note=(_errors_note(m) or "0 errors") + f"; S2 was {s2_rate:,.0f}; {versus}",
        ),
        Row("S3 p99", m["p99"], "ms", "≤ 50 ms", m["p99"] <= 50, note=f"p50 {m['p50']:.1f} ms"),
        cpu_row(ctx, "S3", m, "par"),
    ]


def s4(ctx: Context) -> list[Row]:
    s = ctx.settings
    with _gateway(ctx, "s4", _tokens(1)) as gw:
        rss0 = gw.rss()["VmRSS"]
        m = _measure(
            ctx,
            [_gw_spec(gw, 0, 0, connections=1, in_flight=1)],
            s.s4_seconds,
            setup=2,
            cpu={"gateway": gw.pid},
        )
        rss1 = gw.rss()["VmRSS"]
    stack, stack_figures = _versus_stack(ctx, "seq", m)
    edge = int(s.s4_edge)
    ps = m["per_second"]
    first, last = sum(ps[:edge]) / edge, sum(ps[-edge:]) / edge
    drift = last / first - 1 if first else math.nan
    return [
        Row(
            f"S4 sustained {s.s4_seconds:.0f} s",
            m["rate"],
            "req/s",
            f"last {edge} s within 10 % of first",
            abs(drift) <= 0.10 and not m["errors"],
            ctx.floors["seq"],
            m["rate"] / ctx.floors["seq"],
            note=f"first {first:,.0f}, last {last:,.0f} req/s ({drift:+.1%}); "
            f"RSS {rss0 / 1024:.0f}→{rss1 / 1024:.0f} MiB; {stack} " + _errors_note(m),
            extra={"drift": drift, "per_second": ps, "stack_floor": stack_figures},
        )
    ]


# -- S5, S6: the approval path through the fake Telegram ---------------------------------------


async def _press_round_trips(
    tg: FakeTelegram,
    gw: procs.GatewayProc,
    token: str,
    n: int,
    warm: int = 2,
    pause: float = legs.PRESS_PAUSE,
) -> tuple[list[float], list[float]]:
    """Ask ``n + warm`` times from a worker process; press Allow on each card ``pause`` seconds
    after it arrives (0: at once); time press → result and the whole ask (call → result), ms.

    The agent is a ``bench.load`` worker (``presses`` mode) in its own process, as in the other
    scenarios: it prints each card's request id as the ``approval_pending`` notice arrives and,
    at the end, when each result arrived. Press and result are both wall-clock times on this
    machine.
    """
    spec = {
        "mode": "presses",
        "url": gw.url,
        "ca": str(gw.ca),
        "token": token,
        "asks": n + warm,
        "entity": "light.kitchen",
    }
    pressed: dict[str, float] = {}
    lines: list[dict[str, Any]] = []
    command = [sys.executable, "-m", "bench.load", json.dumps(spec)]
    with trio.fail_after(60 + 10 * (n + warm)):
        worker = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, cwd=ROOT)
        try:
            assert worker.stdout is not None
            buffer = b""
            async for chunk in worker.stdout:
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for line in complete:
                    message = json.loads(line)
                    lines.append(message)
                    if "pending" in message:
                        rid = message["pending"]
                        data = f"allow:{rid}"
                        card = await tg.wait_for_message(partial(_has_button, data))
                        if pause:  # the card is sent; humans take seconds
                            await trio.sleep(pause)
                        pressed[rid] = time.time()
                        tg.press(card.message_id, data, user_id=procs.TG_USER)
            if await worker.wait() != 0:
                raise RuntimeError(f"presses worker failed ({worker.returncode})")
        finally:
            if worker.returncode is None:
                worker.kill()
                with trio.CancelScope(shield=True):
                    await worker.wait()
    results: dict[str, float] = lines[-1]["results"]
    started: dict[str, float] = lines[-1]["started"]
    order = [m["pending"] for m in lines if "pending" in m][warm:]
    return (
        [(results[rid] - pressed[rid]) * 1000 for rid in order],
        [(results[rid] - started[rid]) * 1000 for rid in order],
    )


ROOT = str(Path(__file__).resolve().parent.parent)


def _has_button(data: str, message: FakeMessage) -> bool:
    return any(button == data for _, button in message.buttons)


def s5(ctx: Context) -> list[Row]:
    s = ctx.settings
    tokens = _tokens(1)
    with _gateway(ctx, "s5", tokens, unpaced_telegram=True) as gw:
        token = tokens["agent0000"]
        times, _ = trio.run(_press_round_trips, ctx.tg, gw, token, s.s5_asks)
        # The same with no human delay at all: the press leaves the moment the card arrives, as
        # when a guardian clears several cards in a row or an automated approver decides.
        zero_press, zero_ask = trio.run(
            partial(_press_round_trips, ctx.tg, gw, token, s.s5_asks, pause=0)
        )
    # The floor: the path's three exchanges alone, at S5's rhythm (bench/legs.py).
    n = max(s.s5_asks, 20)
    bot_api = trio.run(legs.bot_api_leg, ctx.tg, n)
    home = trio.run(legs.home_leg, ctx.home, n)
    wss = trio.run(legs.wss_leg, ctx.workdir / "s5-wss", n)
    floor = bot_api + home + wss
    med = median(times)
    return [
        Row(
            "S5 ask round trip (median)",
            med,
            "ms",
            "≤ 4 ms",
            med <= 4,
            floor,
            floor / med,
            note=f"press → result, n={len(times)}, p90 {percentile(times, 90):.1f} ms; floor = "
            f"Bot API {bot_api:.2f} + HA POST {home:.2f} + WSS frame {wss:.2f} ms, each alone",
            extra={"bot_api": bot_api, "home_post": home, "wss_frame": wss},
        ),
        Row(
            "S5 zero delay: ask round trip (median)",
            median(zero_ask),
            "ms",
            "≤ 0.6x main (issue 17)",
            None,
            note=f"call → result, pressed the moment the card arrives, n={len(zero_ask)}, "
            f"p90 {percentile(zero_ask, 90):.1f} ms",
        ),
        Row(
            "S5 zero delay: press → result (median)",
            median(zero_press),
            "ms",
            "≤ 0.6x main (issue 17)",
            None,
            note=f"n={len(zero_press)}, p90 {percentile(zero_press, 90):.1f} ms; no floor: "
            "the legs above are measured at the 50 ms rhythm",
        ),
    ]


def s6(ctx: Context) -> list[Row]:
    s = ctx.settings
    tokens = _tokens(s.s6_agents)
    probe = {"probe": "probe-token-0123456789abcdef"}
    total = s.s6_agents * s.s6_per_agent
    with _gateway(
        ctx,
        "s6",
        {**tokens, **probe},
        unpaced_telegram=True,
        approval_timeout=s.s6_timeout,
        max_pending=max(20, s.s6_per_agent),
    ) as gw:
        idle = gw.rss()["VmRSS"]
        base = len(ctx.tg.messages)
        spec = {
            "mode": "asks",
            "url": gw.url,
            "ca": str(gw.ca),
            "tokens": list(tokens.values()),
            "per_agent": s.s6_per_agent,
            "approval_timeout": s.s6_timeout,
        }
        worker = procs.run_worker(spec, limit=0)
        # Read the worker's result as soon as it is written: 10,000 lateness figures do not fit
        # in a pipe's buffer, and the worker would block on them while this thread waits below.
        output: dict[str, str] = {}
        drain = threading.Thread(
            target=lambda: output.update(out=worker.communicate()[0]), daemon=True
        )
        drain.start()
        started = time.monotonic()
        cards, last_new, stalled = 0, started, False
        while time.monotonic() - started < s.s6_timeout + 120:
            now_cards = len(ctx.tg.messages) - base
            if now_cards > cards:
                cards, last_new = now_cards, time.monotonic()
            if cards >= total or worker.poll() is not None:
                break
            if cards and time.monotonic() - last_new > 15:  # cards stopped coming: say so, go on
                stalled = True
                break
            time.sleep(0.5)
        all_pending = time.monotonic() - started
        rss_pending = gw.rss()
        ctx.log(f"S6: {cards} cards after {all_pending:.1f} s (stalled: {stalled}), {rss_pending}")
        profile_until = time.time()
        probes, _ = trio.run(_press_round_trips, ctx.tg, gw, probe["probe"], s.s6_probes)
        ctx.log(f"S6: probes {[round(p, 1) for p in probes]}")
        drain.join(s.s6_timeout + 400)
        if drain.is_alive() or worker.returncode != 0 or "out" not in output:
            raise RuntimeError(f"S6 load worker failed ({worker.returncode})")
        result = json.loads(output["out"])
        rss_end = gw.rss()
        del profile_until
    late = result["lateness_s"]
    timed_out = result["outcomes"].get("ApprovalTimedOut", 0)
    peak = rss_pending["VmHWM"] / 1024
    med = median(probes)
    on_time = timed_out == total and late and percentile(late, 99) <= 1.0
    return [
        Row(
            f"S6 RSS, {total:,} pending",
            peak,
            "MiB",
            "≤ 200 MiB",
            peak <= 200,
            note=f"{s.s6_agents} agents; idle {idle / 1024:.0f} MiB, all pending "
            f"{rss_pending['VmRSS'] / 1024:.0f}, end {rss_end['VmRSS'] / 1024:.0f}, peak "
            f"{rss_end['VmHWM'] / 1024:.0f}; {cards} cards in {all_pending:.0f} s; "
            f"connect {result['connected_s']:.0f} s",
        ),
        Row(
            "S6 decision under load (median)",
            med,
            "ms",
            "≤ 10 ms",
            med <= 10,
            note=f"press → result, n={len(probes)}, p90 {percentile(probes, 90):.1f} ms",
        ),
        Row(
            "S6 timeouts on schedule",
            timed_out,
            f"of {total}",
            "all, p99 late ≤ 1 s",
            bool(on_time),
            note=f"outcomes {json.dumps(result['outcomes'])}; late p50 "
            f"{percentile(late, 50):.2f} s, p99 {percentile(late, 99):.2f} s, "
            f"max {max(late, default=math.nan):.2f} s",
        ),
    ]


def s7(ctx: Context) -> list[Row]:
    """Idle RSS, then CPU per idle hour: no agent, the guardian long-polling the fake Bot API
    (which holds each ``getUpdates`` for its full timeout, as Telegram does)."""
    s = ctx.settings
    with _gateway(ctx, "s7", _tokens(1)) as gw:
        time.sleep(3)
        rss = gw.rss()["VmRSS"] / 1024
        time.sleep(IDLE_SETTLE)
        idle = _idle(ctx, gw, s.idle_seconds)
    return [
        Row(
            "S7 idle RSS",
            rss,
            "MiB",
            "≤ 50 MiB",
            rss <= 50,
            note="Telegram guardian + Home Assistant configured, no agent",
        ),
        idle,
    ]


# Trio's cached worker threads (start-up work) end after 10 s without work: idle starts then.
IDLE_SETTLE = 10


def _idle(ctx: Context, gw: procs.GatewayProc, seconds: float) -> Row:
    """The gateway's CPU over ``seconds`` of idling, scaled to an hour, with what it went to.

    Idle, the gateway uses a few tens of milliseconds a minute: ``/proc/PID/stat``'s 10 ms ticks
    are too coarse for that, so the figure is the threads' own run time in nanoseconds
    (``schedstat``); a thread that ended within the window would be missing from it, so the
    ticks are kept beside it as a check.
    """
    polls = len(ctx.tg.calls_to("getUpdates"))
    threads = procs.thread_times(gw.pid)
    switches = procs.context_switches(gw.pid)
    began, ticks = time.monotonic(), procs.cpu_seconds(gw.pid)
    if ctx.profiler is not None:
        ctx.profiler.record("idle", gw.pid, time.time(), seconds, rate=1000)
    time.sleep(seconds)
    ticks = procs.cpu_seconds(gw.pid) - ticks
    elapsed = time.monotonic() - began
    polls = len(ctx.tg.calls_to("getUpdates")) - polls
    switches = procs.context_switches(gw.pid) - switches
    by_thread = {
        key: value - threads.get(key, 0.0) for key, value in procs.thread_times(gw.pid).items()
    }
    used = sum(by_thread.values())
    gone = [key for key in threads if key not in by_thread]
    per_hour = 3600 / elapsed
    main = sum(v for k, v in by_thread.items() if k.startswith(f"{gw.pid} "))
    return Row(
        "S7 idle CPU per hour",
        used * per_hour,
        "s",
        "measured, then halved (issue 17)",
        None,
        note=f"{used * 1000:.0f} ms in {elapsed:.0f} s ({100 * used / elapsed:.3f} % of a core; "
        f"ticks say {ticks * 1000:.0f} ms); main thread {main * per_hour:.2f} s/h, "
        f"{len(by_thread) - 1} other threads {(used - main) * per_hour:.2f} s/h"
        + (f" ({len(gone)} ended meanwhile, not counted)" if gone else "")
        + f"; {polls} getUpdates long polls ({polls * per_hour:,.0f}/h, "
        f"{1000 * used / polls if polls else math.nan:.1f} ms of CPU each if they were all of "
        f"it); {switches * per_hour:,.0f} wake-ups/h",
        extra={
            "headline": "cpu_s_per_idle_hour",
            "window_s": elapsed,
            "cpu_s": used,
            "ticks_s": ticks,
            "polls": polls,
            "wakeups_per_hour": switches * per_hour,
            "threads_s": by_thread,
        },
    )


# -- M1: the MCP door beside the WebSocket door, same gateway, same run ------------------------


def m1(ctx: Context) -> list[Row]:
    """Allowed reads over the MCP HTTP door (the official client, one session) and over the
    WebSocket door (the SDK), sequential and 20 in flight, on one gateway."""
    s = ctx.settings
    rows: list[Row] = []
    with _gateway(ctx, "m1", _tokens(1), mcp=True) as gw:
        for in_flight in (1, 20):
            ws = _measure(
                ctx, [_gw_spec(gw, 0, 0, connections=1, in_flight=in_flight)], s.s1_seconds, setup=2
            )
            spec = {**_gw_spec(gw, 0, 0, in_flight=in_flight), "mode": "mcp", "mcp_url": gw.mcp_url}
            mcp = _measure(ctx, [spec], s.s1_seconds, setup=3)
            label = "sequential" if in_flight == 1 else f"{in_flight} in flight"
            rows.append(
                Row(
                    f"M1 MCP HTTP {label}",
                    mcp["rate"],
                    "req/s",
                    "-",
                    None,
                    ws["rate"],
                    mcp["rate"] / ws["rate"] if ws["rate"] else math.nan,
                    note=(
                        f"p50 {mcp['p50']:.1f} ms; WebSocket (floor column) p50"
                        f" {ws['p50']:.1f} ms " + (_errors_note(mcp) or _errors_note(ws))
                    ),
                )
            )
    return rows


SCENARIOS: dict[str, Callable[[Context], list[Row]]] = {
    "floors": floors,
    "S1": s1,
    "S2": s2,
    "S3": s3,
    "S2U": s2u,
    "S4": s4,
    "S5": s5,
    "S6": s6,
    "S7": s7,
    "M1": m1,
}
