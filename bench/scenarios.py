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
from bench import legs, procs
from bench.profile import Profiler
from bench.stats import Row, median, percentile


@attrs.define
class Settings:
    """Durations and sizes; ``quick()`` is for a fast smoke run."""

    s1_seconds: float = 20
    floor_seconds: float = 10
    s2_seconds: float = 20
    s3_seconds: float = 20
    s4_seconds: float = 60
    s4_edge: float = 10
    s5_asks: int = 30
    s6_agents: int = 1000
    s6_per_agent: int = 10
    s6_timeout: float = 120  # every card is out in ~50 s: no approval expires before its card
    s6_probes: int = 20
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
) -> dict[str, Any]:
    """Run the workers over one window; merge counts, latencies, per-second counts, errors."""
    start_at = time.time() + setup + ctx.settings.warmup
    for spec in specs:
        spec["start_at"] = start_at
        spec["duration"] = duration
    workers = [procs.run_worker(spec, limit=0) for spec in specs]
    if profile is not None and ctx.profiler is not None:
        ctx.profiler.record(profile[0], profile[1], start_at, duration)
    results = [procs.collect(w, setup + ctx.settings.warmup + duration + 120) for w in workers]
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
    }


def _errors_note(m: dict[str, Any]) -> str:
    n = sum(m["errors"].values())
    return f"{n} errors: {next(iter(m['errors']))}" if n else ""


# -- floors ------------------------------------------------------------------------------------


def floors(ctx: Context) -> list[Row]:
    """The fake home driven directly by httpx.AsyncClient under Trio (no gateway running)."""
    s = ctx.settings
    seq = _measure(ctx, [_floor_spec(ctx, 0, 0, clients=1, in_flight=1)], s.floor_seconds, setup=1)
    variants = {
        "1 process, 1 client, 100 tasks": [_floor_spec(ctx, 0, 0, clients=1, in_flight=100)],
        "1 process, 1 client (pool 10), 100 tasks": [
            _floor_spec(ctx, 0, 0, clients=1, in_flight=100, pool=10)
        ],
        "1 process, 10 clients (pool 1), 100 tasks": [
            _floor_spec(ctx, 0, 0, clients=10, in_flight=100, pool=1)
        ],
        "1 process, 10 clients (pool 10), 100 tasks": [
            _floor_spec(ctx, 0, 0, clients=10, in_flight=100)
        ],
        "2 processes x (5 clients (pool 1), 50 tasks)": [
            _floor_spec(ctx, 0, 0, clients=5, in_flight=50, pool=1) for _ in range(2)
        ],
    }
    rates = {}
    for name, specs in variants.items():
        rates[name] = _measure(ctx, specs, s.floor_seconds, setup=1)["rate"]
    best = max(rates, key=lambda k: rates[k])
    ctx.floors.update(seq=seq["rate"], seq_p50=seq["p50"], par=rates[best])
    ctx.log(f"floors: sequential {seq['rate']:.0f} req/s; 100 in flight: {rates}")
    one = rates["1 process, 1 client, 100 tasks"]
    return [
        Row("floor sequential", seq["rate"], "req/s", "-", None, note="1 httpx client, 1 task"),
        Row(
            "floor 100 in flight",
            rates[best],
            "req/s",
            "-",
            None,
            note=f"best: {best}; 1 client/100 tasks {one:,.0f}",
            extra={"variants": rates},
        ),
    ]


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
        )
    floor = ctx.floors["seq"]
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
            note=f"p50 {m['p50']:.2f} ms, p99 {m['p99']:.2f} ms " + _errors_note(m),
        )
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
        )
    floor = ctx.floors["par"]
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
            note=_errors_note(m) or "1 SDK client process",
        ),
        Row("S2 p99", m["p99"], "ms", "≤ 30 ms", m["p99"] <= 30, note=f"p50 {m['p50']:.1f} ms"),
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
        m = _measure(ctx, specs, s.s3_seconds, setup=4, profile=("s3", gw.pid))
    floor = ctx.floors["par"]
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
            note=(_errors_note(m) or "0 errors") + f"; S2 was {s2_rate:,.0f}",
        ),
        Row("S3 p99", m["p99"], "ms", "≤ 50 ms", m["p99"] <= 50, note=f"p50 {m['p50']:.1f} ms"),
    ]


def s4(ctx: Context) -> list[Row]:
    s = ctx.settings
    with _gateway(ctx, "s4", _tokens(1)) as gw:
        rss0 = gw.rss()["VmRSS"]
        m = _measure(ctx, [_gw_spec(gw, 0, 0, connections=1, in_flight=1)], s.s4_seconds, setup=2)
        rss1 = gw.rss()["VmRSS"]
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
            f"RSS {rss0 / 1024:.0f}→{rss1 / 1024:.0f} MiB " + _errors_note(m),
            extra={"drift": drift, "per_second": ps},
        )
    ]


# -- S5, S6: the approval path through the fake Telegram ---------------------------------------


async def _press_round_trips(
    tg: FakeTelegram, gw: procs.GatewayProc, token: str, n: int, warm: int = 2
) -> list[float]:
    """Ask ``n + warm`` times from a worker process; press Allow on each card; time press →
    result (ms).

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
                        await trio.sleep(legs.PRESS_PAUSE)  # the card is sent; humans take seconds
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
    order = [m["pending"] for m in lines if "pending" in m]
    return [(results[rid] - pressed[rid]) * 1000 for rid in order[warm:]]


ROOT = str(Path(__file__).resolve().parent.parent)


def _has_button(data: str, message: FakeMessage) -> bool:
    return any(button == data for _, button in message.buttons)


def s5(ctx: Context) -> list[Row]:
    s = ctx.settings
    tokens = _tokens(1)
    with _gateway(ctx, "s5", tokens, unpaced_telegram=True) as gw:
        times = trio.run(_press_round_trips, ctx.tg, gw, tokens["agent0000"], s.s5_asks)
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
        )
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
        probes = trio.run(_press_round_trips, ctx.tg, gw, probe["probe"], s.s6_probes)
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
    with _gateway(ctx, "s7", _tokens(1)) as gw:
        time.sleep(3)
        rss = gw.rss()["VmRSS"] / 1024
    return [
        Row(
            "S7 idle RSS",
            rss,
            "MiB",
            "≤ 50 MiB",
            rss <= 50,
            note="Telegram guardian + Home Assistant configured, no agent",
        )
    ]


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
    "S4": s4,
    "S5": s5,
    "S6": s6,
    "S7": s7,
    "M1": m1,
}
