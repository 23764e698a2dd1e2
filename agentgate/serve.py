"""``agentgate serve gate.toml``: logging, signals and exit status around :func:`serve_gateway`.

A gateway that cannot start says why in one line naming the key, and exits 2, before anything
runs: the configuration, the policies and what the machine must offer (:mod:`agentgate.preflight`:
the listen address, the store, the TLS files) are checked first, as ``config check`` does. What
still fails while starting (a race, a Telegram token refused) is mapped to the same kind of line;
the traceback is logged only with ``--log-level debug``. After the gateway listens, an error
that stops it is a bug: logged with its traceback, exit 1.

``--terminal-guardian`` runs :class:`~agentgate.guardian.terminal.TerminalGuardian` instead of
Telegram: cards in this terminal, keys decide.

``SIGHUP`` reloads the configuration (:mod:`agentgate.reload`; ``agentgate reload`` asks the
same over the control socket), SIGINT and SIGTERM stop the gateway.

Imports: gateway, config, preflight, policy, store, errors, inert, _compat, http_tools (tool
names); guardian.terminal only when asked for.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
import sqlite3
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import TYPE_CHECKING, Final

import trio

# trio_asyncio patches asyncio; imported after anyio or httpx, every Telegram request inside
# open_loop() fails with "no running event loop".
import trio_asyncio  # noqa: F401

from agentgate import preflight
from agentgate._compat import import_telegram_without_passport
from agentgate.config import Config, ConfigError, load_config, policy_files
from agentgate.errors import AgentgateError
from agentgate.gateway import card_rules, serve_gateway
from agentgate.inert import InertFormatter, inert
from agentgate.policy import PolicyError, load_policy, quorum_problems
from agentgate.store import StoreUnavailable

if TYPE_CHECKING:
    from agentgate.guardian.terminal import TerminalGuardian

log = logging.getLogger("agentgate")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2
TELEGRAM: Final = "guardian.telegram"

COLLECTOR_THRESHOLDS: Final = (10_000, 10, 10)
"""The cyclic garbage collector's thresholds for a serving gateway (CPython's are 700, 10, 10).
With thousands of approvals open, every object that outlives a few young collections is
promoted, and a full collection then scans all of them, with the event loop held: the
deadlines of many approvals falling due together came late by as long. A larger young
generation lets a request's short-lived objects die young, and full collections become rare;
a much larger one keeps more garbage alive between collections (the resident memory grows)."""


def tune_collector() -> None:
    """Set :data:`COLLECTOR_THRESHOLDS` for this process (``serve`` only: not on import)."""
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr; messages are made inert (agents' strings cannot forge lines)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(InertFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    # httpx logs every request at INFO: far too chatty for a gateway's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("telegram").setLevel(logging.WARNING)


def _say(message: str) -> None:
    for line in message.splitlines() or [""]:
        print(f"agentgate: {line}", file=sys.stderr, flush=True)


async def _watch_signals(stop: trio.Event, state: _State) -> None:
    hangup = getattr(signal, "SIGHUP", None)
    wanted = [signal.SIGINT, signal.SIGTERM, *([hangup] if hangup is not None else [])]
    with trio.open_signal_receiver(*wanted) as signals:
        async with trio.open_nursery() as nursery:
            async for signum in signals:
                if signum == hangup:
                    if state.reload is None:
                        log.warning("SIGHUP received while starting: nothing reloaded")
                    else:
                        nursery.start_soon(state.reload, "SIGHUP")
                    continue
                log.warning("%s received: shutting down", signal.Signals(signum).name)
                stop.set()
                return


class _State:
    started = False
    reload: Callable[[str], Awaitable[object]] | None = None


async def _main(
    config: Config,
    insecure: bool,
    guardian: TerminalGuardian | None,
    state: _State,
    cancel_pending: bool = False,
) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as outer:
        outer.start_soon(_watch_signals, stop, state)
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                partial(
                    serve_gateway,
                    config,
                    insecure=insecure,
                    stop=stop,
                    guardian=guardian,
                    cancel_pending=cancel_pending,
                    ignore=[TELEGRAM] if guardian is not None else [],
                    guardians=guardian_count(config, terminal=guardian is not None),
                )
            )
            state.started = True
            state.reload = running.gateway.reloader.reload
            if guardian is not None:
                guardian.control = running.gateway.controls
                outer.start_soon(guardian.run)
        outer.cancel_scope.cancel()  # the gateway has stopped: so do the signals and the keys


def guardian_count(config: Config, *, terminal: bool) -> int | None:
    """How many people can press Allow: the terminal is one, Telegram its ``allowed_users``;
    None without a guardian (every ask fails closed then anyway)."""
    if terminal:
        return 1
    if config.guardian.telegram is not None:
        return len(set(config.guardian.telegram.allowed_users))
    return None


def guardian_source(config: Config, *, terminal: bool) -> str:
    return "the terminal guardian" if terminal else "guardian.telegram.allowed_users"


def _preflight(config: Config, *, insecure: bool, terminal: bool = False) -> list[str]:
    """Every reason the gateway cannot start, as lines; warnings are logged."""
    problems = []
    for finding in preflight.check_machine(config, insecure=insecure):
        if finding.error:
            problems.append(finding.line(config))
        else:
            log.warning("%s", finding.line(config))
    known = None
    if config.services.http:
        from agentgate.http_tools import known_tools

        try:
            known = known_tools(config)
        except ConfigError as exc:
            problems.extend(exc.problems)
    guardians = guardian_count(config, terminal=terminal)
    for path in policy_files(config).values():
        try:
            policy = load_policy(path, known=known)
        except PolicyError as exc:
            problems.append(str(exc))
            continue
        for message in policy.warnings:
            log.warning("%s", message)
        if guardians is not None:
            who = guardian_source(config, terminal=terminal)
            problems += quorum_problems(policy, guardians, who)
    return problems


def run_serve(
    path: str | os.PathLike[str],
    *,
    insecure: bool = False,
    log_level: str = "INFO",
    terminal_guardian: bool = False,
    cancel_pending: bool = False,
) -> int:
    """Run the gateway until SIGINT/SIGTERM. 0 after a clean shutdown, 2 when it cannot start
    (one line naming the key), 1 when it stopped on an unexpected error. Pending approvals
    stay pending across the stop, unless ``cancel_pending`` (decommissioning)."""
    setup_logging(log_level)
    debug = log_level.upper() == "DEBUG"
    try:
        config = load_config(
            path, insecure=insecure, ignore=[TELEGRAM] if terminal_guardian else []
        )
    except ConfigError as exc:
        _say(str(exc))
        return EXIT_CONFIG
    problems = _preflight(config, insecure=insecure, terminal=terminal_guardian)
    if problems:
        _say("\n".join(problems))
        return EXIT_CONFIG
    guardian = None
    if terminal_guardian:
        guardian = _terminal_guardian(config)
    elif config.guardian.telegram is not None:
        import_telegram_without_passport()  # before trio.run: the gateway would import it later
    state = _State()
    tune_collector()
    try:
        with _keyboard(guardian):
            trio.run(partial(_main, config, insecure, guardian, state, cancel_pending))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # each one becomes an exit status and a line
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            raise leaf from None
        if state.started and not isinstance(leaf, ConfigError | PolicyError):
            log.critical("the gateway stopped on an unexpected error: %r", leaf, exc_info=leaf)
            return EXIT_FAILED
        status, message = _explain(leaf, config)
        if debug:
            log.error("start-up failed", exc_info=leaf)
        elif status != EXIT_CONFIG:
            message += " (--log-level debug shows the traceback)"
        _say(message)
        return status
    log.info("stopped cleanly")
    return EXIT_OK


def _terminal_guardian(config: Config) -> TerminalGuardian:
    import getpass

    from agentgate.guardian.terminal import KeySource, TerminalGuardian

    keys = KeySource(sys.stdin.fileno()) if _stdin_open() else None
    user = f"{getpass.getuser()} (terminal)"
    guardian = TerminalGuardian(user=user, keys=keys, cards=card_rules(config))
    print(guardian.banner(), flush=True)
    return guardian


def _stdin_open() -> bool:
    try:
        return sys.stdin is not None and not sys.stdin.closed and sys.stdin.fileno() >= 0
    except (OSError, ValueError):
        return False


def _keyboard(guardian: TerminalGuardian | None) -> AbstractContextManager[object]:
    """Single keys without echo on a TTY while the terminal guardian runs (restored after)."""
    if guardian is None or guardian.keys is None:
        return nullcontext()
    from agentgate.guardian.terminal import cbreak

    return cbreak(guardian.keys.fd)


# --- start-up failures, one line each --------------------------------------------------------


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _leaf(exc: BaseException) -> BaseException:
    """The exception that matters in what Trio's nurseries raised: not a cancellation."""
    leaves = list(_leaves(exc))
    return next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])


def _explain(exc: BaseException, config: Config) -> tuple[int, str]:
    """``(exit status, one line)`` for what stopped the gateway before it listened."""
    file = preflight.display(config.source)
    if isinstance(exc, ConfigError | PolicyError):
        return EXIT_CONFIG, str(exc)
    if isinstance(exc, sqlite3.Error):
        return EXIT_CONFIG, f"{file}: store.path: cannot open {config.store.path}: {exc}"
    if isinstance(exc, ssl.SSLError):
        return EXIT_CONFIG, f"{file}: gateway.tls_cert: {exc.reason or exc}"
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            why = preflight.check_listen(config.gateway.host, config.gateway.port)
            return EXIT_CONFIG, f"{file}: gateway.listen: {why or exc.strerror}"
        name = os.fsdecode(exc.filename) if exc.filename is not None else ""
        store = os.fspath(config.store.path)
        if name and (name == store or name.startswith(store + "-") or store.startswith(name)):
            return EXIT_CONFIG, f"{file}: store.path: {exc.strerror}: {name}"
        where = f": {name}" if name else ""
        return EXIT_CONFIG, f"cannot start: {exc.strerror or exc}{where}"
    if isinstance(exc, StoreUnavailable):
        return EXIT_CONFIG, f"{file}: store.path: {exc.message}"
    if isinstance(exc, AgentgateError):
        return EXIT_CONFIG, f"cannot start: {exc.message}"
    return EXIT_FAILED, f"cannot start: unexpected {type(exc).__name__}: {inert(str(exc))}"
