"""Profiles of the gateway process with py-spy (sampling, attached by pid, no restart).

py-spy is not a project dependency: install it into a tools venv (``python -m venv
/tmp/benchtools && /tmp/benchtools/bin/pip install py-spy``) and pass ``--profile DIR``;
``--py-spy PATH`` or ``$PY_SPY`` names the binary if it is not on ``PATH`` or in
``/tmp/benchtools/bin``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import attrs

_LINE = re.compile(r":\d+\)$")
# Leaves where a thread waits rather than works: the event loop's epoll wait, Trio's idle
# worker threads. py-spy sometimes counts them as active; they are left out of the report.
IDLE_LEAVES = ("EpollIOManager.get_events (", "WorkerThread._work (")


def find_py_spy(explicit: str | None = None) -> str | None:
    for candidate in (explicit, os.environ.get("PY_SPY"), shutil.which("py-spy")):
        if candidate:
            return candidate
    default = Path("/tmp/benchtools/bin/py-spy")
    return str(default) if default.exists() else None


@attrs.define
class Profiler:
    """Records the gateway during a scenario's window into ``DIR/<scenario>.txt`` (collapsed)."""

    outdir: Path
    binary: str
    rate: int = 250
    _threads: list[threading.Thread] = attrs.field(factory=list)
    files: dict[str, Path] = attrs.field(factory=dict)

    def record(
        self, name: str, pid: int, start_at: float, duration: float, rate: int | None = None
    ) -> None:
        self.outdir.mkdir(parents=True, exist_ok=True)
        out = self.outdir / f"{name}.txt"
        self.files[name] = out
        cmd = [
            self.binary,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, int(duration))),
            "--rate",
            str(rate or self.rate),
            "--format",
            "raw",
            "--nonblocking",
            "-o",
            str(out),
        ]

        def run() -> None:
            time.sleep(max(0.0, start_at - time.time()))
            subprocess.run(cmd, capture_output=True, check=False)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def wait(self) -> None:
        for thread in self._threads:
            thread.join(120)
        self._threads.clear()


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``: entries per function, not per line."""
    frame = _LINE.sub(")", frame.strip())
    head, sep, path = frame.partition(" (")
    if not sep:
        return frame
    path = path.rstrip(")")
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{head} ({short})"


def top_entries(
    collapsed: Path, n: int = 15
) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """(samples, top by own time %, top by total time %) from py-spy's ``--format raw``."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames or frames[-1].startswith(IDLE_LEAVES):
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    if not samples:
        return 0, [], []
    return (
        samples,
        [(k, 100 * v / samples) for k, v in own.most_common(n)],
        [(k, 100 * v / samples) for k, v in total.most_common(n)],
    )


def report(collapsed: Path, n: int = 15) -> str:
    samples, own, total = top_entries(collapsed, n)
    if not samples:
        return f"{collapsed.name}: no samples"
    lines = [f"{collapsed.stem}: {samples} samples (waiting left out)", "", "own time:"]
    lines += [f"  {pct:5.1f} %  {name}" for name, pct in own]
    lines += ["", "total time (function and what it calls):"]
    lines += [f"  {pct:5.1f} %  {name}" for name, pct in total]
    return "\n".join(lines)
