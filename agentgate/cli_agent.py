"""The agent-side commands of the ``agentgate`` CLI: ``call``, ``tools`` and ``pending``.

They act as an agent through the SDK (:mod:`agentgate.client`, under Trio), one connection per
invocation. Their arguments are declared in :mod:`agentgate.cli` (one ``Command`` each); the
logic lives here so the CLI module stays small and ``agentgate check`` does not import the SDK.

Where to connect (flags win over the environment)::

    --url URL      AGENTGATE_URL     wss://host:port/ (ws:// only for a gateway run --insecure)
    --token TOKEN  AGENTGATE_TOKEN   the agent's token; ``--token -`` reads it from stdin, so it
                                     appears neither in shell history nor in ``ps``
    --ca FILE      AGENTGATE_CA      a PEM CA to trust IN ADDITION to the system store
                                     (which honours SSL_CERT_FILE / SSL_CERT_DIR)

Exit status (:func:`exit_status`; also in README.md and `agentgate call --help`)::

    0  ok
    1  denied: by policy (-32003) or by the guardian (-32001)
    2  invalid input: -32602 invalid params, -32600 / -32601 / -32700 (protocol misuse),
       bad key=value arguments, a missing --url/--token, a bad URL or CA file
    3  connection/auth: unreachable, TLS failure, connection lost, -32005 authentication
       failed, -32007 gateway shutting down (try again later)
    4  execution failed (-32004), and -32603 / unknown codes (the gateway misbehaved)
    5  approval timed out (-32002)
    6  rate limited (-32006)

Errors go to stderr as ``agentgate: denied by policy: MESSAGE (signature: ..., request_id:
...)``. With ``--json`` an error is also printed on stdout as ``{"error": {"code", "message",
"data"}}``, so scripts can read both outcomes from one stream.

Imports: cli (the arguments, usage errors), client (the SDK).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

import trio

from agentgate.cli import UsageError, error, parse_tool_args
from agentgate.client import (
    AgentgateError,
    ApprovalTimedOut,
    AuthenticationFailed,
    ConnectionLost,
    DeniedByGuardian,
    DeniedByPolicy,
    ExecutionFailed,
    Gateway,
    GatewayShuttingDown,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    ParseError,
    RateLimited,
    connect,
)

__all__ = [
    "ENV_CA",
    "ENV_TOKEN",
    "ENV_URL",
    "EXIT_CONNECTION",
    "EXIT_DENIED",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_RATE_LIMITED",
    "EXIT_TIMED_OUT",
    "EXIT_USAGE",
    "Connection",
    "connection_from_args",
    "describe_error",
    "exit_status",
    "run_call",
    "run_pending",
    "run_tools",
]

ENV_URL: Final = "AGENTGATE_URL"
ENV_TOKEN: Final = "AGENTGATE_TOKEN"  # noqa: S105 - a variable name, not a secret
ENV_CA: Final = "AGENTGATE_CA"

EXIT_OK: Final = 0
EXIT_DENIED: Final = 1
EXIT_USAGE: Final = 2
EXIT_CONNECTION: Final = 3
EXIT_FAILED: Final = 4
EXIT_TIMED_OUT: Final = 5
EXIT_RATE_LIMITED: Final = 6

# (class, exit status, label): the first matching class wins.
_OUTCOMES: Final[list[tuple[type[AgentgateError], int, str]]] = [
    (DeniedByPolicy, EXIT_DENIED, "denied by policy"),
    (DeniedByGuardian, EXIT_DENIED, "denied by the guardian"),
    (InvalidParams, EXIT_USAGE, "invalid arguments"),
    (InvalidRequest, EXIT_USAGE, "invalid request"),
    (MethodNotFound, EXIT_USAGE, "method not found"),
    (ParseError, EXIT_USAGE, "parse error"),
    (ConnectionLost, EXIT_CONNECTION, "connection failed"),
    (AuthenticationFailed, EXIT_CONNECTION, "authentication failed"),
    (GatewayShuttingDown, EXIT_CONNECTION, "gateway shutting down"),
    (ExecutionFailed, EXIT_FAILED, "execution failed"),
    (ApprovalTimedOut, EXIT_TIMED_OUT, "approval timed out"),
    (RateLimited, EXIT_RATE_LIMITED, "rate limited"),
    (InternalError, EXIT_FAILED, "gateway error"),
]


def exit_status(err: AgentgateError) -> int:
    """The CLI's exit status for an SDK error (see the module docstring)."""
    for cls, status, _ in _OUTCOMES:
        if isinstance(err, cls):
            return status
    return EXIT_FAILED  # an error code this CLI does not know: the call did not succeed


# A connection failure the SDK explains with its own parameter names, said the CLI's way.
_CLI_FIXES: Final = {
    "tls_untrusted": "certificate not trusted ({detail}): pass --ca FILE (the gateway's"
    " certificate, or the CA that signed it) or set SSL_CERT_FILE",
}


def describe_error(err: AgentgateError) -> str:
    """One line for stderr: ``LABEL: MESSAGE (signature: ..., request_id: ...)``; the label is
    left out when the message already starts with it."""
    label = next((lbl for cls, _, lbl in _OUTCOMES if isinstance(err, cls)), None)
    label = label or f"error {err.code}"
    message = err.message
    fix = _CLI_FIXES.get(str(err.data.get("reason"))) if isinstance(err, ConnectionLost) else None
    if fix is not None:
        where = message.split(": ", 1)[0]
        message = f"{where}: {fix.format(detail=err.data.get('detail', ''))}"
    if message == label or message.startswith(label):
        text = message
    else:
        text = f"{label}: {message}" if message else label
    extra = [f"{key}: {err.data[key]}" for key in ("signature", "request_id") if err.data.get(key)]
    return f"{text} ({', '.join(extra)})" if extra else text


# --- where to connect -------------------------------------------------------------------------


class Connection:
    """Resolved connection settings: URL, token and TLS context (``None`` for ``ws://``)."""

    def __init__(self, url: str, token: str, ssl_context: ssl.SSLContext | None) -> None:
        self.url = url
        self.token = token
        self.ssl_context = ssl_context

    def open(self, **options: Any) -> Any:
        """``agentgate.client.connect(...)`` for these settings (an async context manager)."""
        return connect(self.url, token=self.token, ssl_context=self.ssl_context, **options)


def _read_token_from_stdin() -> str:
    try:
        token = sys.stdin.readline()
    except UnicodeDecodeError as exc:
        raise UsageError(f"--token -: the token on stdin is not UTF-8 ({exc.reason})") from exc
    token = token.strip()
    if not token:
        raise UsageError("--token -: no token on stdin")
    return token


def _tls_context(ca: str | None) -> ssl.SSLContext:
    # The system store (create_default_context honours SSL_CERT_FILE / SSL_CERT_DIR), plus --ca.
    context = ssl.create_default_context()
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--ca {ca}: cannot load a PEM CA certificate ({exc})") from exc
    return context


def connection_from_args(args: argparse.Namespace) -> Connection:
    """``--url``/``--token``/``--ca``, else ``AGENTGATE_URL``/``_TOKEN``/``_CA``.

    Raises :class:`~agentgate.cli.UsageError` for anything missing or unusable.
    """
    url = args.url or os.environ.get(ENV_URL, "")
    if not url:
        raise UsageError(f"no gateway URL: pass --url wss://HOST:PORT/ or set {ENV_URL}")
    token = args.token if args.token is not None else os.environ.get(ENV_TOKEN, "")
    if token == "-":  # noqa: S105 - "read it from stdin"
        token = _read_token_from_stdin()
    if not token:
        raise UsageError(f"no token: pass --token - (reads stdin) or set {ENV_TOKEN}")
    ca = args.ca if args.ca is not None else os.environ.get(ENV_CA) or None
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "wss":
        context: ssl.SSLContext | None = _tls_context(ca)
    elif scheme == "ws":
        if ca:
            raise UsageError("--ca needs a wss:// URL")
        context = None
    else:
        raise UsageError(f"the gateway URL must start with wss:// (or ws://), got {url!r}")
    return Connection(url, token, context)


# --- running one session ----------------------------------------------------------------------


def _expiry(value: object) -> str:
    """``approval_pending.expires_at`` (Unix seconds) as ``HH:MM:SS UTC``."""
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            moment = datetime.fromtimestamp(value, UTC)
        elif isinstance(value, str):
            moment = datetime.fromisoformat(value).astimezone(UTC)
        else:
            return "unknown"
    except (ValueError, OverflowError, OSError):
        return "unknown"
    return moment.strftime("%H:%M:%S UTC")


_waiting: list[dict[str, Any]] = []  # approval_pending params of this invocation's calls


def _announce_pending(params: dict[str, Any]) -> None:
    _waiting.append(params)
    print(
        f"agentgate: waiting for the guardian (expires {_expiry(params.get('expires_at'))})...",
        file=sys.stderr,
        flush=True,
    )


def _still_pending() -> None:
    """Ctrl-C while a call waits: the gateway keeps it, and says so."""
    for params in _waiting:
        print(
            f"agentgate: still pending (request {params.get('request_id')}): the guardian can"
            " still decide until it expires; `agentgate pending` will collect the result",
            file=sys.stderr,
            flush=True,
        )


def _session(
    args: argparse.Namespace, work: Callable[[Gateway], Awaitable[Any]]
) -> tuple[Any, AgentgateError | None]:
    """Connect, run ``work`` under ``trio.run``, and return ``(result, None)`` or ``(None, err)``.

    One-shot: no reconnect. If the connection drops while a call waits for the guardian, the
    gateway still finishes it and queues the outcome: ``agentgate pending`` collects it.
    Queued results are never collected in the background (``collect=False``): they stay on
    the gateway for ``agentgate pending``, and no request is spent on them.
    """
    conn = connection_from_args(args)

    async def main() -> tuple[Any, AgentgateError | None]:
        try:
            async with conn.open(
                reconnect=False, on_pending=_announce_pending, collect=False
            ) as gw:
                return await work(gw), None
        except AgentgateError as exc:
            return None, exc
        except (OSError, ssl.SSLError) as exc:  # the SDK maps these; belt and braces
            return None, ConnectionLost(f"cannot reach the gateway at {conn.url}: {exc}")

    _waiting.clear()
    try:
        return trio.run(main)
    except ValueError as exc:  # connect(): a URL it cannot use
        raise UsageError(str(exc)) from exc
    except KeyboardInterrupt:
        _still_pending()
        raise


def _fail(args: argparse.Namespace, err: AgentgateError) -> int:
    error(describe_error(err))
    if getattr(args, "json", False):
        wire = {"code": err.code, "message": err.message}
        if err.data:
            wire["data"] = err.data
        print(json.dumps({"error": wire}))
    return exit_status(err)


def _print_json(value: Any, *, compact: bool) -> None:
    print(json.dumps(value) if compact else json.dumps(value, indent=2, ensure_ascii=False))


def run_call(args: argparse.Namespace) -> int:
    """``agentgate call TOOL key=value ...``: print the result's ``data`` as JSON.

    ``--json`` prints the whole result ``{"status", "request_id", "data"}`` on one line.
    """
    tool_args = parse_tool_args(args.args)
    waiting = 0

    async def work(gw: Gateway) -> dict[str, Any]:
        nonlocal waiting
        try:
            return await gw.request(args.tool, tool_args)
        finally:
            waiting = gw.results_waiting  # announced right after auth, before any answer

    result, err = _session(args, work)
    if err is not None:
        status = _fail(args, err)
    else:
        if args.json:
            _print_json(result, compact=True)
        else:
            _print_json(result["data"], compact=False)
        status = EXIT_OK
    if waiting:
        many = waiting != 1
        error(
            f"{waiting} queued result{'s' if many else ''} wait{'' if many else 's'} for this"
            f" agent: `agentgate pending` prints {'them' if many else 'it'}"
        )
    return status


def run_tools(args: argparse.Namespace) -> int:
    """``agentgate tools``: one ``NAME  DESCRIPTION`` line per tool; ``--json`` the raw list."""

    async def work(gw: Gateway) -> list[dict[str, Any]]:
        return await gw.list_tools()

    tools, err = _session(args, work)
    if err is not None:
        return _fail(args, err)
    if args.json:
        _print_json(tools, compact=True)
        return EXIT_OK
    width = max((len(str(t.get("name", ""))) for t in tools), default=0)
    for tool in tools:
        description = str(tool.get("description", "")).strip().splitlines() or [""]
        print(f"{tool.get('name', '')!s:<{width}}  {description[0]}".rstrip())
    return EXIT_OK


def run_pending(args: argparse.Namespace) -> int:
    """``agentgate pending``: print the queued results as JSON, then acknowledge them.

    Prints a JSON list of ``{"request_id", "rpc_id", "tool", "signature", "status", "data" |
    "error"}`` (``--json``: on one line). Exit status 0 even if some results are errors: they
    are results; read their ``status``. A result leaves the gateway's queue only once it has
    been printed: if stdout fails (or the acknowledgement cannot reach the gateway), the next
    ``agentgate pending`` prints it again.
    """
    unprinted: list[OSError] = []

    async def work(gw: Gateway) -> list[dict[str, Any]]:
        results = await gw.pending_results(acknowledge=False)
        try:
            _print_json(results, compact=args.json)
            sys.stdout.flush()
        except OSError as exc:
            unprinted.append(exc)
            return results
        try:
            await gw.acknowledge(results)
        except AgentgateError as exc:
            error(
                f"printed, but not acknowledged ({describe_error(exc)}): the next"
                " `agentgate pending` prints them again"
            )
        return results

    _, err = _session(args, work)
    if unprinted:
        if isinstance(unprinted[0], BrokenPipeError):
            raise unprinted[0]  # the reader is gone (`| head`): main() says nothing
        error(f"cannot print the queued results ({unprinted[0]}): they stay queued")
        return EXIT_FAILED
    if err is not None:
        return _fail(args, err)
    return EXIT_OK
