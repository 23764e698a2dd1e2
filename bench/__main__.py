"""``python -m bench [--quick] [--runs N] [--only S1,S2] [--profile DIR] [--json FILE]``.

Starts the fake home (own process), the fake Telegram Bot API (a thread here), and for each
scenario a fresh gateway (``python -m agentgate serve``, TLS on 127.0.0.1); drives it from
separate load processes and prints one table (median of ``--runs``), with floors and ratios.
"""

from __future__ import annotations

import trio_asyncio  # noqa: F401  # isort: skip  # patch asyncio before httpx, anyio or telegram are imported

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import attrs

from agentgate.testing.fake_telegram import serve_fake_telegram
from bench import procs
from bench.profile import Profiler, find_py_spy, report
from bench.scenarios import SCENARIOS, Context, Settings
from bench.stats import Row, combine, fmt, headline, table

NEEDS_FLOORS = {"S1", "S2", "S3", "S2U", "S4"}
PROPOSALS = ""  # set from --proposals


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, load average at start {load[0]:.2f}"
    )


def one_run(
    names: list[str], settings: Settings, workdir: Path, profiler: Profiler | None
) -> list[Row]:
    rows: list[Row] = []
    with (
        procs.fake_home(fast=True) as home,
        serve_fake_telegram(procs.TG_TOKEN, chat_id=procs.TG_CHAT) as tg,
    ):
        ctx = Context(settings=settings, home=home, tg=tg, workdir=workdir, profiler=profiler)
        ctx.proposals = PROPOSALS
        if NEEDS_FLOORS & set(names):
            names = ["floors", *names]
        for name in names:
            began = time.monotonic()
            ctx.log(f"--- {name}")
            try:
                rows += SCENARIOS[name](ctx)
            except Exception as exc:  # one broken scenario must not lose the others
                ctx.log(f"{name} FAILED: {exc!r}")
                rows.append(Row(name, float("nan"), "", "-", False, note=f"failed: {exc!r}"[:200]))
            # Other work on the machine moves every figure: say how busy it was.
            ctx.log(
                f"    {name} took {time.monotonic() - began:.0f} s; load average "
                f"{os.getloadavg()[0]:.2f} at its end"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short windows, 2,000 asks in S6")
    parser.add_argument("--runs", type=int, default=1, help="repeat and report the median")
    parser.add_argument("--only", default="", help="comma-separated, e.g. S1,S2 (default: all)")
    parser.add_argument("--profile", type=Path, help="py-spy the gateway in S1-S3, S2U into DIR")
    parser.add_argument("--py-spy", dest="py_spy", help="path to the py-spy binary")
    parser.add_argument("--json", type=Path, help="write every row of every run here")
    parser.add_argument("--workdir", type=Path, help="keep gateway dirs and logs here")
    parser.add_argument(
        "--proposals",
        default="",
        help="e.g. P1: measure a proposed change (bench/gateway_unpaced.py)",
    )
    args = parser.parse_args(argv)
    global PROPOSALS
    PROPOSALS = args.proposals

    names = [n.strip().upper() for n in args.only.split(",") if n.strip()] or [
        n for n in SCENARIOS if n != "floors"
    ]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    settings = Settings.quick() if args.quick else Settings()
    profiler = None
    if args.profile:
        binary = find_py_spy(args.py_spy)
        if binary is None:
            parser.error("--profile needs py-spy (see bench/README.md)")
        profiler = Profiler(args.profile, binary)

    host = machine()  # its load average is the one at the start
    print(host, file=sys.stderr)
    started = datetime.now(UTC)
    runs: list[list[Row]] = []
    with tempfile.TemporaryDirectory(prefix="agentgate-bench-") as tmp:
        base = args.workdir or Path(tmp)
        for n in range(args.runs):
            print(f"=== run {n + 1}/{args.runs}", file=sys.stderr, flush=True)
            rows = one_run(names, settings, base / f"run{n + 1}", profiler)
            runs.append(rows)
            if args.runs > 1:
                print(table(rows), file=sys.stderr, flush=True)
            if profiler is not None:
                profiler.wait()
                profiler = None  # profile the first run only
    combined = combine(runs)
    print()
    print(f"agentgate bench — {started:%Y-%m-%d %H:%M} UTC — {host}")
    print(f"command: python -m bench {' '.join(argv if argv is not None else sys.argv[1:])}")
    if PROPOSALS:
        print(f"WITH PROPOSALS {PROPOSALS} applied by bench/gateway_unpaced.py")
    print(f"median of {len(runs)} run(s); ratio = gateway / floor (1.00 = as fast as the floor)")
    print()
    print(table(combined))
    figures = headline(combined)
    if figures:
        print()
        print("headline: " + ", ".join(f"{k} = {fmt(v)}" for k, v in figures.items()))
    if args.profile:
        for path in sorted(args.profile.glob("*.txt")):
            print()
            print(report(path))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": host,
                    "load_average_at_end": os.getloadavg()[0],
                    "started": started.isoformat(),
                    "runs": [[attrs.asdict(r) for r in rows] for rows in runs],
                    "median": [attrs.asdict(r) for r in combined],
                    "headline": headline(combined),
                },
                default=str,
            )
        )
    return 0 if all(r.ok is not False for r in combined) else 1


if __name__ == "__main__":
    sys.exit(main())
