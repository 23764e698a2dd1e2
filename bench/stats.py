"""Small statistics and the result row every scenario returns."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

import attrs


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of unsorted values; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Window:
    """Completions and latencies inside a measuring window (wall clock, shared by the workers).

    No event loop of its own: the Trio workers (:mod:`bench.load`) and the asyncio ones
    (:mod:`bench.fasthome`) both use it.
    """

    def __init__(self, start_at: float, duration: float) -> None:
        self.start = start_at
        self.end = start_at + duration
        self.latencies: list[float] = []
        self.per_second = [0] * (math.ceil(duration) + 1)
        self.errors: Counter[str] = Counter()

    def done(self, begun: float, ended: float) -> None:
        if self.start <= ended <= self.end:
            self.latencies.append(round((ended - begun) * 1000, 3))
            self.per_second[int(ended - self.start)] += 1

    def failed(self, exc: BaseException, ended: float) -> None:
        if self.start <= ended <= self.end:
            self.errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1

    def result(self, setup_late: float) -> dict[str, Any]:
        """What a worker prints: count, latencies, per-second counts, errors."""
        return {
            "count": len(self.latencies),
            "duration": self.end - self.start,
            "latencies_ms": self.latencies,
            "per_second": self.per_second[:-1],
            "errors": dict(self.errors),
            "late_start_s": round(setup_late, 3),
        }


@attrs.define
class Row:
    """One line of the table: a figure, its floor, the ratio, the target and the verdict.

    ``ratio`` is always "higher is better, 1.0 = as good as the floor": rate / floor rate for
    throughput, floor latency / latency for latency.
    """

    key: str  # e.g. "S2 req/s"
    value: float
    unit: str
    target: str
    ok: bool | None
    floor: float | None = None
    ratio: float | None = None
    note: str = ""
    extra: dict[str, Any] = attrs.field(factory=dict)


def combine(runs: list[list[Row]]) -> list[Row]:
    """The median of each row over several runs (rows matched by key, order of the first run)."""
    if len(runs) == 1:
        return runs[0]
    by_key: dict[str, list[Row]] = {}
    for rows in runs:
        for row in rows:
            by_key.setdefault(row.key, []).append(row)
    out = []
    for key, rows in by_key.items():
        value = median([r.value for r in rows])
        floors = [r.floor for r in rows if r.floor is not None]
        ratios = [r.ratio for r in rows if r.ratio is not None]
        oks = [r.ok for r in rows if r.ok is not None]
        first = rows[0]
        note = f"{sum(oks)}/{len(oks)} runs met it" if oks else first.note
        extra = {"runs": [r.value for r in rows]} | {
            k: v for k, v in first.extra.items() if k == "headline"
        }
        stack = _stack_medians(rows)
        if stack:
            extra["stack_floor"] = stack
            note += (
                f"; vs stack {stack['rate_ratio']:.2f}x, CPU {stack['cpu_ratio']:.2f}x (medians)"
            )
        out.append(
            Row(
                key=key,
                value=value,
                unit=first.unit,
                target=first.target,
                ok=(sum(oks) * 2 > len(oks)) if oks else None,
                floor=median(floors) if floors else None,
                ratio=median(ratios) if ratios else None,
                note=note,
                extra=extra,
            )
        )
    return out


def _stack_medians(rows: list[Row]) -> dict[str, float]:
    """The median of each of the rows' ``extra["stack_floor"]`` figures (the gateway against
    the stack floor, :mod:`bench.scenarios`); empty if the rows have none."""
    runs = [r.extra["stack_floor"] for r in rows if "stack_floor" in r.extra]
    if not runs:
        return {}
    return {k: median([run[k] for run in runs if run[k] == run[k]]) for k in runs[0]}


def headline(rows: list[Row]) -> dict[str, float]:
    """The figures named as headlines (CPU per request, CPU per idle hour), by their names."""
    return {r.extra["headline"]: r.value for r in rows if "headline" in r.extra}


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or value != value:
        return "-"
    if unit in ("req/s",) or abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def table(rows: list[Row]) -> str:
    """A Markdown table (also readable in a terminal)."""
    head = ["scenario", "measured", "floor", "ratio", "target", "met", "notes"]
    lines = [head]
    for r in rows:
        met = "-" if r.ok is None else ("yes" if r.ok else "NO")
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(
            [r.key, fmt(r.value, r.unit), fmt(r.floor, r.unit), ratio, r.target, met, r.note]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)
