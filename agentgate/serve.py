"""``agentgate serve gate.toml``: logging, signals and exit status around :func:`serve_gateway`.

Imports: gateway, config, inert, _compat.
"""

from __future__ import annotations

import logging
import signal
import sys
from functools import partial
from pathlib import Path

import trio

# trio_asyncio patches asyncio; imported after anyio or httpx, every Telegram request inside
# open_loop() fails with "no running event loop".
import trio_asyncio  # noqa: F401

from agentgate._compat import import_telegram_without_passport
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


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.warning("%s received: shutting down", signal.Signals(signum).name)
            stop.set()
            return


async def _main(path: Path, insecure: bool, cancel_pending: bool) -> None:
    config = load_config(path, insecure=insecure)
    stop = trio.Event()
    refused: ConfigError | None = None  # found at start-up (a token or chat refused)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, stop)
        try:
            await serve_gateway(config, insecure=insecure, stop=stop, cancel_pending=cancel_pending)
        except ConfigError as exc:
            refused = exc  # raised below, not inside this nursery's exception group
        nursery.cancel_scope.cancel()
    if refused is not None:
        raise refused


def run_serve(
    path: str | Path,
    *,
    insecure: bool = False,
    log_level: str = "INFO",
    cancel_pending: bool = False,
) -> int:
    """Run the gateway until SIGINT/SIGTERM. 0 after a clean shutdown, 2 for a config error.

    Pending approvals stay pending across the stop, unless ``cancel_pending``."""
    setup_logging(log_level)
    try:
        config = load_config(path, insecure=insecure)  # fail fast, before anything starts
    except ConfigError as exc:
        print(f"agentgate: {exc}", file=sys.stderr)
        return 2
    if config.guardian.telegram is not None:
        import_telegram_without_passport()  # before trio.run: the gateway would import it later
    try:
        trio.run(partial(_main, Path(path), insecure, cancel_pending))
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
