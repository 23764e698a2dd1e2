"""Processes for the bench: the fake home, the gateway, load workers; RSS and fd counts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


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
    return proc.returncode


@attrs.define
class Home:
    url: str
    proc: subprocess.Popen[str]


@contextmanager
def fake_home() -> Iterator[Home]:
    """The fake Home Assistant in its own process (a stdlib threading HTTP server)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentgate.testing.fake_homeassistant", "--token", HA_TOKEN],
        stdout=subprocess.PIPE,
        text=True,
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
