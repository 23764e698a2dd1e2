"""Run the fake home, the fake Bot API and ``agentgate serve`` as subprocesses.

For tests that must kill the gateway for real (``kill -9``, SIGTERM), for benchmarks and for the
demo. Every process writes its output to a log file (so a chatty process never blocks on a full
pipe) and is killed when its ``async with`` block ends, whatever happens::

    files = write_gateway_files(workdir, home=home, telegram={...}, gateway={...})
    async with gateway_process(files) as gw:          # waits for "listening on wss://..."
        async with trio_websocket.open_websocket_url(gw.url, ssl_context=files.client_ssl()):
            ...
        gw.kill()                                     # SIGKILL; or gw.terminate() for SIGTERM
        status = await gw.wait()

Waits have no deadline of their own: hold one (``with trio.fail_after(...)``). The fakes can
also run in-process (``run_fake_homeassistant``, ``run_fake_telegram``), which is what tests
that press buttons need; :func:`fake_home_process` and :func:`fake_telegram_process` are for
demos and benchmarks that want them in their own processes.

Imports: testing.harness (the files a gateway needs, its certificates).
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket

from agentgate.testing.harness import (
    DEFAULT_POLICY,
    DEFAULT_TOKENS,
    client_ssl_context,
    write_certificates,
    write_gate_toml,
)

__all__ = [
    "GatewayFiles",
    "GatewayProcess",
    "Spawned",
    "agent_websocket",
    "fake_home_process",
    "fake_telegram_process",
    "gateway_process",
    "spawn",
    "write_gateway_files",
]

POLL = 0.02  # seconds between looks at a log file or a process


@attrs.define
class Spawned:
    """A child process whose stdout and stderr go to ``log``."""

    popen: subprocess.Popen[bytes]
    log: Path
    argv: tuple[str, ...]

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended (negative: killed by that signal)."""
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything the process wrote so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def send_signal(self, signum: int) -> None:
        if self.alive():
            with suppress(ProcessLookupError):
                self.popen.send_signal(signum)

    def terminate(self) -> None:
        """SIGTERM: a clean shutdown for ``agentgate serve``."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL (``kill -9``): no cleanup of any kind."""
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Wait for the exit status (under the caller's deadline)."""
        while (status := self.popen.poll()) is None:  # noqa: ASYNC110 - a child, not an event
            await trio.sleep(POLL)
        return status

    async def wait_for_output(self, needle: str) -> str:
        """Wait until a line containing ``needle`` was written; return that line.

        Raises ``RuntimeError`` with the output so far if the process exits first.
        """
        while True:  # another process's log file: nothing to wait on but the file itself
            text = self.output()
            for line in text.splitlines():
                if needle in line:
                    return line
            if not self.alive():
                raise RuntimeError(
                    f"{' '.join(self.argv)} exited with {self.popen.returncode} before"
                    f" writing {needle!r}:\n{text}"
                )
            await trio.sleep(POLL)

    def close(self) -> None:
        """Kill the process if it still runs and reap it (blocks at most a moment)."""
        if self.alive():
            self.kill()
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


def spawn(argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None) -> Spawned:
    """Start ``argv`` with stdout and stderr appended to ``log`` (stdin closed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("ab") as sink:
        popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, env=full_env
        )
    return Spawned(popen, log, tuple(argv))


@asynccontextmanager
async def _spawned(argv: Sequence[str], log: Path) -> AsyncIterator[Spawned]:
    process = spawn(argv, log)
    try:
        yield process
    finally:
        process.close()


# -- the gateway ----------------------------------------------------------------------------


@attrs.define
class GatewayFiles:
    """A gateway's directory: ``gate.toml``, the policy, TLS files, the store."""

    workdir: Path
    config: Path
    ca_path: Path | None
    tokens: dict[str, str]
    store: Path

    def client_ssl(self) -> ssl.SSLContext | None:
        """An SSL context trusting the gateway's throw-away CA (None without TLS)."""
        return None if self.ca_path is None else client_ssl_context(self.ca_path)


def write_gateway_files(
    workdir: Path,
    *,
    home: Any | None,
    tls: bool = True,
    tokens: Mapping[str, str] | None = None,
    policy: str = DEFAULT_POLICY,
    **toml: Any,
) -> GatewayFiles:
    """Write everything ``agentgate serve`` needs into ``workdir`` (listening on port 0).

    ``home`` has ``url`` and ``token`` (a fake or real Home Assistant). Other keywords go to
    :func:`agentgate.testing.harness.write_gate_toml`, e.g. ``telegram={...}``,
    ``gateway={"approval_timeout": 6}``, ``limits={...}``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    tokens = dict(tokens or DEFAULT_TOKENS)
    ca_path = None
    tls_files = None
    if tls:
        ca_path, cert, key = write_certificates(workdir)
        tls_files = (cert, key)
    config = write_gate_toml(
        workdir,
        tokens=tokens,
        ha_url=None if home is None else home.url,
        ha_token=None if home is None else home.token,
        tls=tls_files,
        policy=policy,
        **toml,
    )
    return GatewayFiles(workdir, config, ca_path, tokens, workdir / "agentgate.db")


@attrs.define
class GatewayProcess:
    """A running ``agentgate serve`` and where to reach it."""

    process: Spawned
    url: str
    files: GatewayFiles

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.process.output()

    def alive(self) -> bool:
        return self.process.alive()

    def terminate(self) -> None:
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()

    async def wait(self) -> int:
        return await self.process.wait()


def serve_argv(config: Path, *, insecure: bool = False, extra: Sequence[str] = ()) -> list[str]:
    """The command line of ``agentgate serve`` with this interpreter (``extra``: more flags)."""
    argv = [sys.executable, "-m", "agentgate", "serve", str(config), *extra]
    return [*argv, "--insecure"] if insecure else argv


@asynccontextmanager
async def gateway_process(
    files: GatewayFiles, *, log: Path | None = None, extra: Sequence[str] = ()
) -> AsyncIterator[GatewayProcess]:
    """``python -m agentgate serve gate.toml`` until the block ends (then SIGKILL if alive).

    Waits for ``listening on wss://HOST:PORT`` (or ``ws://``) under the caller's deadline.
    Several processes may share ``files`` one after the other (a restart on the same store);
    their output goes to the same ``gateway.log`` unless ``log`` says otherwise. ``extra``:
    more flags for ``serve`` (e.g. ``--cancel-pending``).
    """
    argv = serve_argv(files.config, insecure=files.ca_path is None, extra=extra)
    log = log or files.workdir / "gateway.log"
    start = log.stat().st_size if log.exists() else 0
    async with _spawned(argv, log) as process:
        while True:  # the gateway's log file, written by another process: nothing to wait on
            text = process.output()[start:]
            line = next((x for x in text.splitlines() if "listening on " in x), None)
            if line is not None:
                break
            if not process.alive():
                raise RuntimeError(
                    f"agentgate serve exited with {process.returncode} before listening:\n{text}"
                )
            await trio.sleep(POLL)
        address = line.split("listening on ", 1)[1].split()[0]
        scheme, _, hostport = address.partition("://")
        host, _, port = hostport.rpartition(":")
        if host in ("0.0.0.0", ""):  # a wildcard bind is reached over loopback
            host = "127.0.0.1"
        yield GatewayProcess(process, f"{scheme}://{host}:{port}/", files)


_ClientStream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


@asynccontextmanager
async def agent_websocket(
    url: str, ssl_context: ssl.SSLContext | None
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A client WebSocket whose TCP (or TLS) stream is closed when the block ends.

    trio-websocket's own client leaves its socket open when the *server* goes away or closes
    the WebSocket (a ``ResourceWarning``, fatal under ``filterwarnings = error``); a gateway
    that is killed or shut down does exactly that.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    if ssl_context is not None:
        stream: _ClientStream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=ssl_context
        )
    else:
        stream = await trio.open_tcp_stream(host, port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, host, parts.path or "/")
            try:
                yield ws
            finally:
                with trio.move_on_after(2, shield=True):
                    await ws.aclose()
    finally:
        with trio.move_on_after(2, shield=True), suppress(trio.BrokenResourceError):
            await stream.aclose()


# -- the fakes ------------------------------------------------------------------------------


@attrs.define
class FakeProcess:
    """A fake service in its own process: its URL (and the token it expects)."""

    process: Spawned
    url: str
    token: str


@asynccontextmanager
async def fake_home_process(
    log: Path, *, token: str = "fake-ha-token", port: int = 0
) -> AsyncIterator[FakeProcess]:
    """``python -m agentgate.testing.fake_homeassistant`` (``url``/``token`` fit
    :func:`write_gateway_files`'s ``home``)."""
    argv = [sys.executable, "-m", "agentgate.testing.fake_homeassistant"]
    argv += ["--token", token, "--port", str(port)]
    async with _spawned(argv, log) as process:
        line = await process.wait_for_output("http://")
        url = "http://" + line.split("http://", 1)[1].split()[0]
        yield FakeProcess(process, url, token)


@asynccontextmanager
async def fake_telegram_process(
    log: Path, *, token: str = "123456:TEST-TOKEN", chat_id: int = -1001, port: int = 0
) -> AsyncIterator[FakeProcess]:
    """``python -m agentgate.testing.fake_telegram``; ``url`` is the ``base_url`` for
    ``[guardian.telegram]``. It prints every card it gets; nobody presses its buttons."""
    argv = [sys.executable, "-m", "agentgate.testing.fake_telegram"]
    argv += ["--token", token, "--chat-id", str(chat_id), "--port", str(port)]
    async with _spawned(argv, log) as process:
        line = await process.wait_for_output("fake Telegram Bot API on ")
        url = line.split(" on ", 1)[1].split()[0]
        yield FakeProcess(process, url, token)
