"""Processes for the bench: the fake home, the echo server, the stack floor, the gateway, load
workers; their RSS, fd counts and CPU time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from agentgate.testing.harness import write_certificates, write_gate_toml

HA_TOKEN = "bench-ha-token"
TG_TOKEN = "123456:BENCH-TOKEN"
TG_CHAT = -1001
TG_USER = 4242

# allow the reads, ask for the lights: S1-S4 exercise allow, S5/S6 the approval path.
BENCH_POLICY = """\
defaults:
  - pattern: "*"
    action: deny
rules:
  - pattern: "ha_get_state(sensor.*)"
    action: allow
    description: sensors are harmless
  - pattern: "ha_get_states"
    action: allow
  - pattern: "ha_call_service(light.*)"
    action: ask
    description: lights need a human
"""

ENTITY = "sensor.living_room_temperature"
ROOT = str(Path(__file__).resolve().parent.parent)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_times(path: Path) -> float:
    text = path.read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, all its threads (``/proc/PID/stat``);
    NaN once it is gone."""
    try:
        return _stat_times(Path(f"/proc/{pid}/stat"))
    except (OSError, ValueError, IndexError):
        return float("nan")


def thread_times(pid: int) -> dict[str, float]:
    """CPU seconds of each live thread, keyed ``"TID name"``, to the nanosecond: the scheduler's
    run time (``/proc/PID/task/TID/schedstat``), where ``/proc/PID/stat`` counts 10 ms ticks."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            out[f"{task.name} {name}"] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return out


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of the live threads: each is a wake-up."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, all CPUs (``/proc/stat``): busy is
    user, nice, system, irq and softirq (with tick accounting, as here, the interrupt ticks are
    also charged to the process they interrupted); stolen is the hypervisor's time for other
    guests."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


class CpuWindow:
    """CPU seconds of some processes over a wall-clock window: a thread samples each process at
    the window's start and at its end (the same window the load workers count in).

    Also the rest of the machine: ``"others"`` is what every other process used meanwhile (the
    machine's busy time less the watched processes'), ``"stolen"`` the hypervisor's share.
    """

    def __init__(self, pids: dict[str, int], start_at: float, duration: float) -> None:
        self.pids = pids
        self.start_at = start_at
        self.end_at = start_at + duration
        self.used: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        time.sleep(max(0.0, self.start_at - time.time()))
        first = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        busy, stolen = machine_busy()
        time.sleep(max(0.0, self.end_at - time.time()))
        used = {name: cpu_seconds(pid) - first[name] for name, pid in self.pids.items()}
        busy_end, stolen_end = machine_busy()
        used["others"] = busy_end - busy - sum(v for v in used.values() if v == v)
        used["stolen"] = stolen_end - stolen
        self.used = used

    def result(self) -> dict[str, float]:
        """Seconds used inside the window, per name (waits for the window's end)."""
        self._thread.join(max(0.0, self.end_at - time.time()) + 5)
        return dict(self.used)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _wait_line(path: Path, needle: str, proc: subprocess.Popen[Any], limit: float) -> str:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        for line in text.splitlines():
            if needle in line:
                return line
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before '{needle}':\n{text}")
        time.sleep(0.05)
    raise RuntimeError(f"no '{needle}' within {limit} s in {path}")


def _stop(proc: subprocess.Popen[Any], grace: float = 10) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()  # the URL line's pipe (a ResourceWarning if left open)
    return proc.returncode


@attrs.define
class Home:
    url: str
    proc: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextmanager
def fake_home(*, fast: bool = False) -> Iterator[Home]:
    """A fake Home Assistant in its own process: the correctness fake (a stdlib threading HTTP
    server, as the soak uses), or with ``fast`` the benchmarks' (:mod:`bench.fasthome`)."""
    module = "bench.fasthome" if fast else "agentgate.testing.fake_homeassistant"
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--token", HA_TOKEN],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"fake home did not start: {url!r}")
        yield Home(url, proc)
    finally:
        _stop(proc)


@attrs.define
class EchoServer:
    url: str
    ca: Path
    proc: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextmanager
def _wss_server(workdir: Path, what: str, module: str, *args: str) -> Iterator[EchoServer]:
    """``python -m module CERT KEY *args`` in its own process (TLS, a fresh certificate): it
    prints its ``wss://`` URL first."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca, cert, key = write_certificates(workdir)
    proc = subprocess.Popen(
        [sys.executable, "-m", module, str(cert), str(key), *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("wss://"):
            raise RuntimeError(f"{what} did not start: {url!r}")
        yield EchoServer(url, ca, proc)
    finally:
        _stop(proc)


@contextmanager
def echo_server(workdir: Path) -> Iterator[EchoServer]:
    """The door's floor, :mod:`bench.door`, in its own process (TLS, a fresh certificate)."""
    with _wss_server(workdir, "echo server", "bench.door") as server:
        yield server


@contextmanager
def stack_floor(workdir: Path, home: Home) -> Iterator[EchoServer]:
    """The stack's floor, :mod:`bench.stackfloor`, in its own process (TLS, a fresh certificate,
    its SQLite file in ``workdir``), calling ``home``."""
    db = workdir / "floor.db"
    with _wss_server(
        workdir, "stack floor", "bench.stackfloor", home.url, HA_TOKEN, str(db)
    ) as server:
        yield server


@attrs.define
class GatewayProc:
    url: str
    ca: Path
    tokens: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path
    workdir: Path
    mcp_url: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> dict[str, int]:
        return rss_kib(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextmanager
def gateway(
    workdir: Path,
    *,
    home: Home,
    tokens: Mapping[str, str],
    telegram_url: str | None = None,
    approval_timeout: float = 900,
    max_pending: int = 10,
    unpaced_telegram: bool = False,
    auth_deadline: float = 10,
    ha_timeout: float = 10,
    proposals: str = "",
    mcp: bool = False,
) -> Iterator[GatewayProc]:
    """``python -m agentgate serve gate.toml`` over TLS on 127.0.0.1, stopped with SIGTERM.

    ``unpaced_telegram`` starts it through :mod:`bench.gateway_unpaced` instead (S6 only):
    the same gateway with the guardian's Telegram send pacing lifted.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ca, cert, key = write_certificates(workdir)
    telegram = None
    if telegram_url is not None:
        telegram = {
            "token": TG_TOKEN,
            "chat_id": TG_CHAT,
            "allowed_users": [TG_USER],
            "base_url": telegram_url,
        }
    path = write_gate_toml(
        workdir,
        tokens=tokens,
        ha_url=home.url,
        ha_token=HA_TOKEN,
        tls=(cert, key),
        policy=BENCH_POLICY,
        gateway={"approval_timeout": approval_timeout, "auth_deadline": auth_deadline},
        limits={
            "requests_per_minute": 100_000_000,
            "max_pending_per_agent": max_pending,
            "failed_auth_per_minute": 1_000_000,
            # S6 holds 1,000 agents' connections, all from 127.0.0.1, 20 handshakes at once
            "max_connections": 4096,
            "max_unauthenticated_per_address": 4096,
        },
        telegram=telegram,
        ha_timeout=ha_timeout,
        mcp={"listen": "127.0.0.1:0"} if mcp else None,
    )
    log = workdir / "gateway.log"
    module = "bench.gateway_unpaced" if unpaced_telegram or proposals else "agentgate"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "serve", str(path)],
            stdout=sink,
            stderr=sink,
            env={**os.environ, "BENCH_PROPOSALS": proposals},
            cwd=str(Path(__file__).resolve().parent.parent),
        )
    try:
        line = _wait_line(log, "listening on wss://", proc, 60)
        url = "wss://" + line.split("wss://", 1)[1].split()[0]
        mcp_url = None
        if mcp:
            line = _wait_line(log, "mcp listening on https://", proc, 60)
            mcp_url = "https://" + line.split("https://", 1)[1].split()[0]
        yield GatewayProc(url, ca, dict(tokens), proc, log, workdir, mcp_url)
    finally:
        _stop(proc)


def run_worker(spec: Mapping[str, Any], *, limit: float) -> subprocess.Popen[str]:
    """Start ``python -m bench.load`` with ``spec``; read its JSON with :func:`collect`."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench.load", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).resolve().parent.parent),
    )


def collect(proc: subprocess.Popen[str], limit: float) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError("load worker did not finish in time") from None
    if proc.returncode != 0:
        raise RuntimeError(f"load worker failed ({proc.returncode})")
    return json.loads(out)  # type: ignore[no-any-return]


def run_workers(specs: list[dict[str, Any]], *, limit: float) -> list[dict[str, Any]]:
    procs = [run_worker(spec, limit=limit) for spec in specs]
    return [collect(p, limit) for p in procs]
