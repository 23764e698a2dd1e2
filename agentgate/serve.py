"""``agentgate serve gate.toml``: logging, signals and exit status around :func:`serve_gateway`."""

from __future__ import annotations

import logging
import signal
import sys
from functools import partial
from pathlib import Path

import trio

# trio_asyncio must patch asyncio before httpx, anyio or telegram are imported (PITFALLS.md).
import trio_asyncio  # noqa: F401

from agentgate.config import ConfigError, load_config
from agentgate.errors import AgentgateError
from agentgate.gateway import serve_gateway
from agentgate.inert import InertFormatter
from agentgate.policy import PolicyError

log = logging.getLogger("agentgate")


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr; messages are made inert (agents' strings cannot forge lines)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(InertFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    # httpx logs every request at INFO: far too chatty for a gateway's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("telegram").setLevel(logging.WARNING)


def import_telegram_guardian() -> None:
    """Import the Telegram guardian, leaving python-telegram-bot's Telegram Passport support out.

    PTB imports ``cryptography``, when it is installed, only to decrypt Telegram Passport data
    (its optional ``passport`` extra), which the guardian never asks for. ``cryptography`` is in
    a development environment for trustme, not for the gateway, and costs ~7.5 MiB of RSS. Hiding
    it during this import leaves PTB as a plain ``pip install agentgate`` has it; ``import
    cryptography`` works again afterwards. If PTB or cryptography is already imported, this is a
    plain import.
    """
    hide = "telegram" not in sys.modules and "cryptography" not in sys.modules
    if hide:
        # A None entry makes `import cryptography...` raise ModuleNotFoundError: PTB's fallback.
        sys.modules["cryptography"] = None  # type: ignore[assignment]
    try:
        import agentgate.guardian.telegram  # noqa: F401
    finally:
        if hide and sys.modules.get("cryptography", False) is None:
            del sys.modules["cryptography"]


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.warning("%s received: shutting down", signal.Signals(signum).name)
            stop.set()
            return


async def _main(path: Path, insecure: bool) -> None:
    config = load_config(path, insecure=insecure)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, stop)
        await serve_gateway(config, insecure=insecure, stop=stop)
        nursery.cancel_scope.cancel()


def run_serve(path: str | Path, *, insecure: bool = False, log_level: str = "INFO") -> int:
    """Run the gateway until SIGINT/SIGTERM. 0 after a clean shutdown, 2 for a config error."""
    setup_logging(log_level)
    try:
        config = load_config(path, insecure=insecure)  # fail fast, before anything starts
    except ConfigError as exc:
        print(f"agentgate: {exc}", file=sys.stderr)
        return 2
    if config.guardian.telegram is not None:
        import_telegram_guardian()  # before trio.run: the gateway imports it lazily otherwise
    try:
        trio.run(partial(_main, Path(path), insecure))
    except (ConfigError, PolicyError) as exc:
        print(f"agentgate: {exc}", file=sys.stderr)
        return 2
    except AgentgateError as exc:
        print(f"agentgate: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"agentgate: {exc}", file=sys.stderr)
        return 1
    log.info("stopped cleanly")
    return 0
