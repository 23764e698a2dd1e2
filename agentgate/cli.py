"""The ``agentgate`` command line (README.md; each command's ``--help``; docs/operations.md).

One function per subcommand, registered in :data:`COMMANDS`: a :class:`Command` names the
subcommand, adds its arguments to its parser and runs it, returning the exit status. To add a
subcommand, write ``_configure_x(parser)`` and ``_run_x(args) -> int`` and add a ``Command``
to the table. Exit status 2 always means invalid input or usage (argparse's own errors too).

Implemented here: ``serve``, ``check``, ``config check``, ``hash-token``, ``audit``, and the
operator's ``reload``, ``grants`` and ``undo`` (which talk to the running gateway over its
control socket, :mod:`agentgate.control_socket`); the agent-side ``call``, ``tools`` and
``pending`` declare their arguments here and run in :mod:`agentgate.cli_agent` (exit statuses
and connection settings are documented there).

Imports: tools, policy, errors, agentgate's ``__version__``; and, each only in the command that
runs it, config, preflight, _compat and serve, audit, cli_audit, inert, store, http_tools,
cli_agent, mcp.stdio, control_socket, guardian.card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

from attrs import frozen

from agentgate import __version__, tools
from agentgate.errors import InvalidParams
from agentgate.policy import Policy, PolicyError, load_policy
from agentgate.tools import is_known_tool

if TYPE_CHECKING:
    from agentgate.config import Config

__all__ = ["COMMANDS", "Command", "UsageError", "build_parser", "main", "parse_tool_args"]

PROG: Final = "agentgate"

EXIT_OK: Final = 0
EXIT_DENY: Final = 1
EXIT_USAGE: Final = 2
EXIT_ASK: Final = 3
DECISION_EXIT: Final = {"allow": EXIT_OK, "deny": EXIT_DENY, "ask": EXIT_ASK}


class UsageError(Exception):
    """Invalid input on the command line: printed as ``agentgate: MESSAGE``, exit status 2."""


@frozen
class Command:
    """One subcommand: its name, one-line help, argument setup and runner."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def error(message: str) -> None:
    """Print ``agentgate: MESSAGE`` to stderr (one line per line of ``message``)."""
    for line in message.splitlines() or [""]:
        print(f"{PROG}: {line}", file=sys.stderr)


def warn(message: str) -> None:
    """Print ``agentgate: warning: MESSAGE`` to stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# --- key=value arguments ---------------------------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def parse_tool_args(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` → a string; ``key:=JSON`` → a JSON value. Raises :class:`UsageError`."""
    args: dict[str, Any] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals:
            raise UsageError(f"expected key=value or key:=JSON, got {item!r}")
        as_json = key.endswith(":")
        key = key.removesuffix(":")
        if not key:
            raise UsageError(f"missing key in {item!r}")
        if key in args:
            raise UsageError(f"argument {key!r} given twice")
        if as_json:
            try:
                args[key] = json.loads(value, parse_constant=_reject_constant)
            except ValueError as exc:
                raise UsageError(f"{key}: not JSON: {value!r} ({exc})") from exc
        else:
            args[key] = value
    return args


# --- check -------------------------------------------------------------------------------------


def _configure_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", metavar="FILE", help="the policy file (wins over --config)")
    parser.add_argument("--config", metavar="GATE_TOML", help="take the policy from this config")
    parser.add_argument(
        "--agent", metavar="NAME", help="with --config: that agent's policy (else the default)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("tool", metavar="TOOL", help="tool name, e.g. ha_call_service")
    parser.add_argument(
        "args", metavar="key=value", nargs="*", help="an argument; key:=JSON for a JSON value"
    )


def _check_config(args: argparse.Namespace) -> Config | None:
    """The ``--config`` file (None without one): its policy path and its HTTP tools."""
    if args.config is None:
        return None
    # Neither TLS files nor secrets are needed to evaluate a request.
    return _config_without_secrets(args.config)


def _check_specs(config: Config | None) -> dict[str, tools.ToolSpec] | None:
    """Home Assistant's tools and the config's HTTP tools (None: Home Assistant's only)."""
    if config is None or not config.services.http:
        return None
    from agentgate.config import ConfigError
    from agentgate.http_tools import known_tools

    try:
        return known_tools(config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


def _check_policy_path(args: argparse.Namespace, config: Config | None) -> Path:
    if args.policy is not None:
        return Path(args.policy)
    if config is None:
        raise UsageError("check: need --policy FILE, or --config gate.toml [--agent NAME]")
    if args.agent is None:
        return config.policy.file
    agent = config.agents.get(args.agent)
    if agent is None:
        known = ", ".join(sorted(config.agents)) or "none"
        raise UsageError(f"check: no agent {args.agent!r} in {args.config} (agents: {known})")
    return agent.policy or config.policy.file


def _config_without_secrets(path: str) -> Config:
    """gate.toml for tools that read it but use no secret and no TLS file."""
    from agentgate.config import ConfigError, load_config

    try:
        return load_config(path, insecure=True, secrets=False)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


def _quota_used(args: argparse.Namespace, policy: Policy, evaluation: Any) -> int | None:
    """How much of the deciding rule's quota the agent used, read from the store (with
    ``--config``; the default agent is the only one with that policy, else ``--agent``)."""
    if args.config is None or evaluation.matched.quota is None:
        return None
    config = _config_without_secrets(args.config)
    agent = args.agent
    if agent is None:
        users = [n for n, a in config.agents.items() if a.policy is None]
        if len(users) != 1:
            return None
        agent = users[0]
    path = config.store.path
    if not path.is_file():
        return 0
    import time

    from agentgate.store import read_only

    quota = evaluation.matched.quota
    since = time.time() - quota.window
    conn = read_only(path)
    try:
        rows = conn.execute(
            "SELECT signature FROM audit_log WHERE time >= ? AND agent = ? AND decision = 'allow'"
            " AND kind = 'request'",
            (since, agent),
        ).fetchall()
    finally:
        conn.close()
    index = evaluation.matched.index
    return sum(
        1
        for (signature,) in rows
        if signature
        and policy.evaluate_signature(signature).matched.index == index
        and policy.evaluate_signature(signature).matched.quota == quota
    )


def _load_policy(path: Path, known: dict[str, tools.ToolSpec] | None = None) -> Policy:
    try:
        policy = load_policy(path, known=known)
    except PolicyError as exc:
        raise UsageError(str(exc)) from exc
    for message in policy.warnings:
        warn(message)
    return policy


def _run_check(args: argparse.Namespace) -> int:
    if args.agent is not None and args.config is None and args.policy is None:
        raise UsageError("check: --agent needs --config gate.toml")
    tool_args = parse_tool_args(args.args)
    config = _check_config(args)
    specs = _check_specs(config)
    policy = _load_policy(_check_policy_path(args, config), specs)
    try:
        evaluation = policy.evaluate(args.tool, tool_args, allow_unknown=True, specs=specs)
    except InvalidParams as exc:
        raise UsageError(f"invalid params: {exc.message}") from exc
    if not is_known_tool(args.tool) and (specs is None or args.tool not in specs):
        warn(f"{args.tool} is not a known tool: the gateway refuses it whatever the policy says")
    entities = tools.references(args.tool, tool_args)
    indirect = tools.indirect_reason(args.tool, tool_args)
    try:
        used = _quota_used(args, policy, evaluation)
    except Exception as exc:  # the store's count is a courtesy here: never fatal
        warn(f"quota use unknown: {exc}")
        used = None
    quota = evaluation.matched.quota
    if args.json:
        found = [{"entity_id": ref.entity_id, "why": ref.why} for ref in entities]
        extra: dict[str, Any] = {}
        if used is not None:
            extra["quota_used"] = used
        print(json.dumps({**evaluation.to_dict(), "entities": found, **extra}))
    else:
        matched = evaluation.matched
        print(f"signature: {evaluation.signature}")
        for index, ref in enumerate(entities):
            print(f"{'entities:' if index == 0 else '':<11}{ref}")
        print(f"decision:  {evaluation.decision}")
        print(f"matched:   {evaluation.reason}")
        if matched.description:
            print(f"           {matched.description}")
        if matched.approvals > 1:
            print(f"approvals: {matched.approvals} guardians must press Allow (two-person rule)")
        if quota is not None:
            usage = "" if used is None else f"; {used} used in the last {quota.unit}"
            print(f"quota:     {quota} for this agent, then it asks{usage}")
        if indirect:
            what = args.tool
            if args.tool == "ha_call_service":
                what = f"{tool_args.get('domain')}.{tool_args.get('service')}"
            print(f"indirect:  {what} {indirect}")
    return DECISION_EXIT[evaluation.decision]


# --- config check ------------------------------------------------------------------------------


def _configure_config(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    check = sub.add_parser(
        "check",
        help="check gate.toml, every policy it names and what serve needs, without starting",
        description="Check gate.toml, every policy it names, and what `agentgate serve` needs"
        " from this machine (the listen address, the store directory, the TLS files), without"
        " starting anything. Every problem is reported in one run. Exit status 0 ok, 2 not.",
    )
    check.add_argument("config", metavar="GATE_TOML")
    check.add_argument(
        "--insecure", action="store_true", help="allow no TLS files (plain ws://, as serve)"
    )
    check.add_argument(
        "--no-secrets",
        action="store_true",
        help="do not read the tokens' ${VAR}s from the environment (check everything else)",
    )
    check.add_argument(
        "--no-bind",
        action="store_true",
        help="skip the listen-address check (e.g. while the gateway runs and holds it)",
    )
    check.add_argument(
        "--allow-unknown-tools",
        action="store_true",
        help="a policy rule naming a tool the gateway does not have is a warning, not an error",
    )
    check.add_argument(
        "--terminal-guardian",
        action="store_true",
        help="as serve --terminal-guardian: [guardian.telegram] is not used, nor checked",
    )


def _run_config(args: argparse.Namespace) -> int:
    from agentgate import preflight
    from agentgate.config import ConfigError, inspect_config, policy_files
    from agentgate.policy import UNKNOWN_TOOL

    try:
        config, found = inspect_config(
            args.config,
            insecure=args.insecure,
            secrets=not args.no_secrets,
            ignore=["guardian.telegram"] if args.terminal_guardian else [],
        )
    except ConfigError as exc:  # unreadable, or not TOML: nothing more to check
        raise UsageError(str(exc)) from exc
    problems = [line for _, line in found]
    reported = [key for key, _ in found]
    if config is None:
        raise UsageError("\n".join(problems))

    # What serve needs from this machine, for the keys that are not wrong already.
    for finding in preflight.check_machine(config, insecure=args.insecure, bind=not args.no_bind):
        if _follows(finding.key, reported):
            continue
        if finding.error:
            problems.append(finding.line(config))
        else:
            warn(finding.line(config))

    known = None
    if config.services.http:  # the tools files: those whose table is not wrong already
        import attrs

        from agentgate.http_tools import known_tools

        readable = {
            name: service
            for name, service in config.services.http.items()
            if not _follows(f"services.http.{name}.tools", reported)
        }
        try:
            known = known_tools(
                attrs.evolve(config, services=attrs.evolve(config.services, http=readable))
            )
        except ConfigError as exc:
            problems.extend(exc.problems)

    from agentgate.policy import quorum_problems
    from agentgate.serve import guardian_count, guardian_source

    shown = []
    guardians = guardian_count(config, terminal=args.terminal_guardian)
    for label, path in policy_files(config).items():
        if _follows(label, reported):
            continue
        try:
            policy = load_policy(path, known=known)
        except PolicyError as exc:
            problems.append(str(exc))
            continue
        if guardians is not None:
            who = guardian_source(config, terminal=args.terminal_guardian)
            problems += quorum_problems(policy, guardians, who)
        shown.append(f"{label} ({_display_path(path)})")
        for message in policy.warnings:
            if f": {UNKNOWN_TOOL} " in message and not args.allow_unknown_tools:
                problems.append(f"{message}; --allow-unknown-tools accepts it")
            else:
                warn(message)
    if problems:
        raise UsageError("\n".join(problems))
    agents = len(config.agents)
    print(f"ok: {agents} agent{'s' if agents != 1 else ''}, policies: {', '.join(shown)}")
    return EXIT_OK


def _follows(key: str, reported: Sequence[str]) -> bool:
    """Whether a check of ``key`` would repeat a problem already reported (the same key, or
    one inside the other: a table that could not be read, or a value in it)."""
    parts = key.split(".")
    for seen in reported:
        other = seen.split(".")
        if seen and (parts[: len(other)] == other or other[: len(parts)] == parts):
            return True
    return False


def _display_path(path: Path) -> str:
    try:
        return os.fspath(path.relative_to(Path.cwd()))
    except ValueError:
        return os.fspath(path)


# --- hash-token --------------------------------------------------------------------------------


def _configure_hash_token(parser: argparse.ArgumentParser) -> None:
    del parser  # no arguments: the token comes from stdin, never from argv (shell history)


def _run_hash_token(args: argparse.Namespace) -> int:
    import getpass

    try:
        token = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.read()
    except UnicodeDecodeError as exc:
        raise UsageError(f"hash-token: the token is not UTF-8 ({exc.reason})") from exc
    token = token.rstrip("\r\n")
    if not token:
        raise UsageError("hash-token: empty token on stdin")
    from agentgate.config import MIN_TOKEN_LENGTH

    if len(token) < MIN_TOKEN_LENGTH:
        warn(f"the token is shorter than {MIN_TOKEN_LENGTH} characters")
    print(hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest())
    return EXIT_OK


# --- serve -------------------------------------------------------------------------------------


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="GATE_TOML")
    parser.add_argument(
        "--insecure", action="store_true", help="plain ws:// without TLS (loopback only!)"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="INFO by default; DEBUG also shows the traceback of a start-up failure",
    )
    parser.add_argument(
        "--terminal-guardian",
        action="store_true",
        help="decide approvals in this terminal (keys a, d, h) instead of Telegram:"
        " try an ask before you create a bot",
    )
    parser.add_argument(
        "--cancel-pending",
        action="store_true",
        help="on SIGTERM/SIGINT, resolve every pending approval as shutdown (-32007) instead of"
        " keeping it for the next start: for decommissioning, not for restarts",
    )


def _run_serve(args: argparse.Namespace) -> int:
    from agentgate._compat import import_httpx_without_extras

    import_httpx_without_extras()  # before agentgate.serve imports httpx
    from agentgate.serve import run_serve

    return run_serve(
        args.config,
        insecure=args.insecure,
        log_level=args.log_level,
        terminal_guardian=args.terminal_guardian,
        cancel_pending=args.cancel_pending,
    )


# --- audit -------------------------------------------------------------------------------------

DECISIONS: Final = (
    *("allow", "deny", "ask", "invalid"),  # a request's (pipeline, broker)
    *("grant", "revoke", "refused", "freeze", "unfreeze", "vote"),  # a guardian's own (controls)
    "undo",  # an Undo of a request (its own row, the request's id)
    *("reload", "reload_failed"),  # a configuration reload (SIGHUP, agentgate reload)
)
"""Every ``decision`` the audit log holds, for ``audit --decision``."""


def _configure_audit(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="GATE_TOML", help="find the store through gate.toml")
    where.add_argument("--store", metavar="FILE", help="the SQLite store file itself")
    parser.add_argument("--agent", help="only this agent")
    parser.add_argument("--tool", help="only this tool")
    parser.add_argument(
        "--decision",
        choices=DECISIONS,
        metavar="DECISION",
        help=f"only this decision: {', '.join(DECISIONS)}",
    )
    parser.add_argument("--since", help="only rows since: 10m, 2h, 1d or an ISO time (UTC)")
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per line (times in ISO 8601 UTC)"
    )
    parser.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="keep printing new rows, and each request again (↳) once it is resolved",
    )
    parser.epilog = (
        "With an ACTION: verify (prove nothing was changed or removed), proof REQUEST_ID"
        " (inclusion proofs), key (the public key that signs checkpoints), compact (prune old"
        " events, audited). agentgate audit ACTION --help says more."
    )
    actions = parser.add_subparsers(dest="audit_action", metavar="ACTION")
    verify = actions.add_parser(
        "verify",
        help="recompute every hash, the tree and every checkpoint's signature",
        description="Check that nothing in the audit log was changed (integrity) or removed"
        " (completeness). Exit status: 0 both hold, 1 either does not, 2 invalid input.",
    )
    _audit_where(verify)
    verify.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="TEXT_OR_FILE",
        help="a checkpoint kept elsewhere: the chat message's text, a file of them (the"
        " witness file), or - for stdin; may be repeated",
    )
    verify.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="NAME+HASH+KEY",
        help="the public key checkpoints must be signed with (as agentgate audit key printed"
        " it); default: the key the log names",
    )
    verify.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    proof = actions.add_parser(
        "proof",
        help="inclusion proofs of a request's events against the latest checkpoint",
        description="RFC 9162 inclusion proofs of REQUEST_ID's events in the tree the latest"
        " stored checkpoint signed. Exit status: 0, 1 no event of it is covered yet.",
    )
    proof.add_argument("request_id", metavar="REQUEST_ID")
    _audit_where(proof)
    proof.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    key = actions.add_parser(
        "key",
        help="the public key that signs the audit log's checkpoints",
        description="Print the log's verifier key (NAME+HASH+KEY): keep it, and give it to"
        " verify --key.",
    )
    _audit_where(key)
    compact = actions.add_parser(
        "compact",
        help="prune events older than [store] keep_days (audited and signed)",
        description="Prune the audit events older than --keep-days (default [store] keep_days):"
        " the pruned range's root is kept and signed, so verify still works across it. Safe"
        " next to a running gateway.",
    )
    _audit_where(compact)
    compact.add_argument("--keep-days", type=float, metavar="DAYS")


def _audit_where(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="GATE_TOML", default=argparse.SUPPRESS, help="gate.toml")
    where.add_argument(
        "--store", metavar="FILE", default=argparse.SUPPRESS, help="the store file itself"
    )


def _audit_store(args: argparse.Namespace) -> Path:
    if args.store:
        path = Path(args.store)
    else:
        from agentgate.config import ConfigError, load_config

        try:  # only the store's path is needed: no secret, no TLS file
            config = load_config(args.config or "gate.toml", insecure=True, secrets=False)
        except ConfigError as exc:
            raise UsageError(str(exc)) from exc
        path = config.store.path
    if not path.is_file():
        raise UsageError(f"no store at {path}: has the gateway run yet?")
    return path


def _run_audit(args: argparse.Namespace) -> int:
    import sqlite3

    if getattr(args, "audit_action", None):
        from agentgate import cli_audit

        return cli_audit.run(args, _audit_store(args))

    from agentgate import audit
    from agentgate.inert import inert_json
    from agentgate.store import read_only

    path = _audit_store(args)
    try:
        since = None if args.since is None else audit.parse_since(args.since)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    filters = audit.Filters(args.agent, args.tool, args.decision, since)
    try:
        if args.follow:

            def emit(entry: Any, update: bool) -> None:
                if args.json:
                    print(inert_json(audit.to_json(entry)), flush=True)
                else:
                    mark = "↳ " if update else ""
                    print(audit.follow_line(audit.table_rows([entry])[0], mark), flush=True)

            if not args.json:
                print(audit.follow_header(), flush=True)
            audit.follow(path, filters, emit)
            return EXIT_OK
        conn = read_only(path)
        try:
            audit.print_entries(audit.query(conn, filters), as_json=args.json)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise UsageError(f"cannot read the audit log in {path}: {exc}") from exc
    return EXIT_OK


# --- reload / grants / undo (the operator's, through the running gateway) --------------------

EXIT_FAILED: Final = 1
EXIT_UNREACHABLE: Final = 3
EXIT_EXECUTION: Final = 4


def _configure_reload(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "The running gateway re-reads gate.toml and every policy, checks everything, then"
        " swaps at once; if anything is wrong the old configuration stays. Exit status: 0"
        " reloaded, 2 invalid (nothing changed), 3 no running gateway answers. SIGHUP to the"
        " gateway does the same (systemctl reload)."
    )
    parser.add_argument(
        "--config", metavar="GATE_TOML", default="gate.toml", help="the gateway's gate.toml"
    )


def _control_path(config_path: str) -> Path:
    return _config_without_secrets(config_path).control_socket()


def _ask_gateway(config_path: str, message: dict[str, Any]) -> dict[str, Any] | None:
    """The running gateway's answer, or None (and a line saying why) if none answers."""
    import getpass

    from agentgate.control_socket import ControlUnavailable, request

    try:
        user = getpass.getuser()
    except Exception:
        user = "operator"
    try:
        return request(_control_path(config_path), {**message, "user": user})
    except ControlUnavailable as exc:
        error(str(exc))
        return None


def _run_reload(args: argparse.Namespace) -> int:
    answer = _ask_gateway(
        args.config, {"command": "reload", "config": os.path.abspath(args.config)}
    )
    if answer is None:
        return EXIT_UNREACHABLE
    lines = [str(line) for line in answer.get("lines", [])]
    if answer.get("ok"):
        print(f"reloaded: {args.config}")
        for line in lines:
            print(f"  {line}")
        return EXIT_OK
    error(str(answer.get("message", "reload failed")))
    for line in lines:
        error(f"  {line}")
    return EXIT_USAGE


def _configure_grants(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Lists the active grants (Allow 1 h and Always allow) from the store. --revoke asks the"
        " running gateway to revoke one (audited); with no gateway running it is revoked in the"
        " store, and the next start knows. Exit status: 0, 1 no such active grant."
    )
    parser.add_argument(
        "--config", metavar="GATE_TOML", default="gate.toml", help="the gateway's gate.toml"
    )
    parser.add_argument("--revoke", metavar="ID", help="revoke the grant with this id")
    parser.add_argument("--json", action="store_true", help="one JSON object per grant")


def _run_grants(args: argparse.Namespace) -> int:
    import getpass
    import math
    import time
    from datetime import UTC, datetime

    from agentgate import store as stores
    from agentgate.guardian.card import utc

    def iso(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).isoformat()

    config = _config_without_secrets(args.config)
    path = config.store.path
    if args.revoke is not None:
        from agentgate.control_socket import ControlUnavailable, request

        try:
            user = getpass.getuser()
        except Exception:
            user = "operator"
        try:
            answer = request(
                config.control_socket(),
                {"command": "revoke", "grant_id": args.revoke, "user": user},
            )
        except ControlUnavailable:
            if not path.is_file():
                raise UsageError(f"no store at {path}: has the gateway run yet?") from None
            by = f"{user} (shell, uid {os.getuid()}, gateway not running)"
            revoked = stores.revoke_grant_offline(path, args.revoke, by, time.time())
            answer = {
                "ok": revoked,
                "message": "grant revoked (in the store: the gateway is not running)"
                if revoked
                else f"no active grant {args.revoke}",
            }
        if answer.get("ok"):
            print(str(answer.get("message")))
            return EXIT_OK
        error(str(answer.get("message")))
        return EXIT_FAILED
    if not path.is_file():
        raise UsageError(f"no store at {path}: has the gateway run yet?")
    grants = stores.read_active_grants(path, time.time())
    if args.json:
        for grant in grants:
            permanent = math.isinf(grant.expires_at)
            print(
                json.dumps(
                    {
                        "grant_id": grant.grant_id,
                        "agent": grant.agent,
                        "signature": grant.signature,
                        "granted_by": grant.granted_by,
                        "created_at": iso(grant.created_at),
                        "expires_at": None if permanent else iso(grant.expires_at),
                        "permanent": permanent,
                    }
                )
            )
        return EXIT_OK
    if not grants:
        print("no active grants")
        return EXIT_OK
    from agentgate.inert import inert

    for grant in grants:
        until = (
            "always (until revoked)"
            if math.isinf(grant.expires_at)
            else f"until {utc(grant.expires_at)}"
        )
        print(
            f"{grant.grant_id}  {inert(grant.agent)}  {inert(grant.signature)}  {until}"
            f"  (by {inert(grant.granted_by)})"
        )
    return EXIT_OK


def _configure_undo(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Asks the running gateway to put back what the call REQUEST_ID changed, as the card's"
        " ↩ Undo button does (docs/guardian.md). Exit status: 0 undone, 1 nothing ran (already"
        " undone, not undoable, or it needs --confirm), 3 no running gateway, 4 the restore"
        " failed."
    )
    parser.add_argument("request_id", metavar="REQUEST_ID", help="the call's request id")
    parser.add_argument(
        "--config", metavar="GATE_TOML", default="gate.toml", help="the gateway's gate.toml"
    )
    parser.add_argument(
        "--confirm",
        action="store_true",
        help="restore even after the undo window, or when the entity changed since the call",
    )


def _run_undo(args: argparse.Namespace) -> int:
    answer = _ask_gateway(
        args.config,
        {"command": "undo", "request_id": args.request_id, "confirm": bool(args.confirm)},
    )
    if answer is None:
        return EXIT_UNREACHABLE
    message = str(answer.get("message", ""))
    check = answer.get("check")
    if answer.get("ok"):
        print(message)
        return EXIT_OK
    if check in ("late", "changed"):
        error(f"{message.removesuffix('; confirm to restore')}: run again with --confirm")
        return EXIT_FAILED
    error(message)
    return EXIT_EXECUTION if check == "failed" else EXIT_FAILED


# --- call / tools / pending (as an agent; logic in agentgate.cli_agent) ------------------------


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", metavar="URL", help="gateway URL, wss://HOST:PORT/ (default: $AGENTGATE_URL)"
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help="the agent's token; '-' reads it from stdin, which keeps it out of shell history"
        " and ps (default: $AGENTGATE_TOKEN)",
    )
    parser.add_argument(
        "--ca",
        metavar="FILE",
        help="a PEM CA to trust in addition to the system store and $SSL_CERT_FILE"
        " (default: $AGENTGATE_CA)",
    )


def _configure_call(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "exit status: 0 ok, 1 denied (policy or guardian), 2 invalid arguments,"
        " 3 connection/auth (also: gateway shutting down), 4 execution failed,"
        " 5 approval timed out, 6 rate limited"
    )
    _add_connection_args(parser)
    parser.add_argument(
        "--json", action="store_true", help="print the whole result (status, request_id, data)"
    )
    parser.add_argument("tool", metavar="TOOL", help="tool name, e.g. ha_get_state")
    parser.add_argument(
        "args", metavar="key=value", nargs="*", help="an argument; key:=JSON for a JSON value"
    )


def _run_call(args: argparse.Namespace) -> int:
    from agentgate.cli_agent import run_call

    return run_call(args)


def _configure_tools(parser: argparse.ArgumentParser) -> None:
    _add_connection_args(parser)
    parser.add_argument("--json", action="store_true", help="print the raw list of tools")


def _run_tools(args: argparse.Namespace) -> int:
    from agentgate.cli_agent import run_tools

    return run_tools(args)


def _configure_pending(parser: argparse.ArgumentParser) -> None:
    _add_connection_args(parser)
    parser.add_argument("--json", action="store_true", help="print the JSON list on one line")


def _run_pending(args: argparse.Namespace) -> int:
    from agentgate.cli_agent import run_pending

    return run_pending(args)


# --- mcp (an MCP server on stdio; logic in agentgate.mcp.stdio) ------------------------------


def _configure_mcp(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "An MCP host starts this as a subprocess (docs/mcp.md); stdout is the protocol."
        " Exit status: 0 once stdin closes, 2 usage, 3 the gateway cannot be reached."
    )
    parser.add_argument(
        "--url", metavar="URL", help="gateway URL, wss://HOST:PORT/ (default: $AGENTGATE_URL)"
    )
    token = parser.add_mutually_exclusive_group()
    token.add_argument(
        "--token-file",
        metavar="FILE",
        help="a file holding the agent's token (default: $AGENTGATE_TOKEN)",
    )
    token.add_argument(
        "--token", metavar="-", help="'-' reads the token from the first line of stdin"
    )
    parser.add_argument(
        "--ca",
        metavar="FILE",
        help="a PEM CA to trust in addition to the system store and $SSL_CERT_FILE"
        " (default: $AGENTGATE_CA)",
    )
    parser.add_argument(
        "--wait",
        metavar="SECONDS",
        type=float,
        default=50.0,
        help="how long a call waits for the guardian before answering 'pending' (default 50)",
    )
    parser.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )


def _run_mcp(args: argparse.Namespace) -> int:
    from agentgate.mcp.stdio import run

    return run(args)


# --- dispatch ----------------------------------------------------------------------------------

COMMANDS: list[Command] = [
    Command("serve", "run the gateway", _configure_serve, _run_serve),
    Command("check", "explain the policy decision for one request", _configure_check, _run_check),
    Command(
        "config",
        "check gate.toml and what serve needs (config check)",
        _configure_config,
        _run_config,
    ),
    Command(
        "hash-token", "sha256 of a token read from stdin", _configure_hash_token, _run_hash_token
    ),
    Command("audit", "read the audit log", _configure_audit, _run_audit),
    Command(
        "reload",
        "reload gate.toml and the policies in the running gateway",
        _configure_reload,
        _run_reload,
    ),
    Command(
        "grants", "list or revoke grants (Allow 1 h, Always allow)", _configure_grants, _run_grants
    ),
    Command("undo", "undo an executed call in the running gateway", _configure_undo, _run_undo),
    Command("call", "call one tool as an agent; print the JSON result", _configure_call, _run_call),
    Command("tools", "list the gateway's tools, as an agent", _configure_tools, _run_tools),
    Command(
        "pending", "collect queued results, as an agent (JSON)", _configure_pending, _run_pending
    ),
    Command("mcp", "an MCP server on stdio, forwarding to the gateway", _configure_mcp, _run_mcp),
]
"""Every subcommand, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command in :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="agentgate: an execution gateway for AI agents."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``agentgate`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 for usage errors, 0 for --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:  # bare `agentgate`: what it can do, as a usage error
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    del parser
    try:
        return run(args)
    except UsageError as exc:
        error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `agentgate audit | head`: the reader is gone, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
