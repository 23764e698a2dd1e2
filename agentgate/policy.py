"""The policy engine: ``permissions.yaml`` in, an explained allow/deny/ask decision out.

A policy has ``rules`` (``{pattern, action, description?}``) and ``defaults`` (an ordered
list of ``{pattern, action}``); patterns are case-sensitive fnmatch globs on the request's
signature (see :mod:`agentgate.tools`). Precedence (docs/policy.md), whatever is more specific::

    any matching deny rule   -> deny
    any matching allow rule  -> allow
    any matching ask rule    -> ask
    first matching default   -> its action
    nothing matched          -> ask (fallback)

A service call that names several entities is decided on its full signature and on each
entity alone (:func:`agentgate.tools.signature_checks`); the strictest of those decisions
wins (deny, then ask, then allow), so a deny rule for ``lock.*`` holds wherever in the call a
lock is named.

Two optional fields of a rule make it stricter, never looser:

- ``approvals: N`` (ask rules): N guardians must press Allow (two-person approval). Of the ask
  rules that match, the one asking for most approvals decides.
- ``quota: "20/h"`` (allow or ask rules; ``/min``, ``/h``, ``/day``): at most that many calls
  this rule lets through without a human (its allows; for an ask rule, what grants allow) per
  agent in a rolling window; past it the call is asked (:mod:`agentgate.quotas` counts). Of
  the allow rules that match, one with a quota decides.

Indices count from 0, as in the error paths: ``rule 3`` is ``rules[3]`` in the file.

Imports: tools (signatures and the per-entity checks).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final, Literal, cast, get_args

import attrs
import yaml
from attrs import field, frozen

from agentgate import tools

__all__ = [
    "MAX_APPROVALS",
    "Action",
    "Evaluation",
    "Matched",
    "Policy",
    "PolicyError",
    "Quota",
    "Rule",
    "load_policy",
    "parse_policy",
    "parse_quota",
    "quorum_problems",
]

Action = Literal["allow", "deny", "ask"]
ACTIONS: Final[tuple[Action, ...]] = get_args(Action)


class PolicyError(Exception):
    """A policy file that cannot be used; the message names the file and the key path."""


MAX_APPROVALS: Final = 20
_QUOTA = re.compile(r"^\s*(\d{1,9})\s*/\s*(min|minute|h|hour|d|day)\s*$")
_QUOTA_UNITS: Final = {
    "min": (60.0, "minute"),
    "minute": (60.0, "minute"),
    "h": (3600.0, "hour"),
    "hour": (3600.0, "hour"),
    "d": (86400.0, "day"),
    "day": (86400.0, "day"),
}


@frozen
class Quota:
    """A rule's ``quota``: at most ``count`` calls per ``window`` seconds, per agent."""

    count: int
    window: float
    unit: str  # minute, hour, day

    def __str__(self) -> str:
        return f"{self.count} per {self.unit}"


def parse_quota(text: object) -> Quota:
    """``"20/h"`` (also ``/min``, ``/day``) as a :class:`Quota`; ValueError if it is not one."""
    match = _QUOTA.match(text) if isinstance(text, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValueError('expected a quota such as "20/h" (per /min, /h or /day)')
    window, unit = _QUOTA_UNITS[match.group(2)]
    return Quota(int(match.group(1)), window, unit)


@frozen
class Rule:
    """One entry of ``rules`` or ``defaults`` (only rules carry ``approvals`` and ``quota``)."""

    pattern: str
    action: Action
    description: str = ""
    approvals: int = 1
    quota: Quota | None = None

    def matches(self, signature: str) -> bool:
        """Whether this entry's glob matches ``signature`` (case-sensitive)."""
        return fnmatchcase(signature, self.pattern)


@frozen
class Matched:
    """What decided: a rule, a default, or the fallback when nothing matched."""

    kind: Literal["rule", "default", "fallback"]
    action: Action
    index: int | None = None
    pattern: str | None = None
    description: str = ""
    approvals: int = 1  # guardians who must press Allow (an ask rule's approvals)
    quota: Quota | None = None

    def __str__(self) -> str:
        if self.kind == "fallback":
            return f"fallback ({self.action})"
        return f"{self.kind} {self.index}: {self.pattern} ({self.action})"


@frozen
class Evaluation:
    """A decision and its explanation, for the audit log, Telegram and ``agentgate check``.

    ``checked`` is the one-entity signature the deciding rule matched when that made a
    multi-entity call stricter than its full signature did (else None).
    """

    signature: str
    decision: Action
    matched: Matched
    checked: str | None = None

    @property
    def reason(self) -> str:
        """What decided, as the audit log, the card and ``check`` show it."""
        if self.checked is None:
            return str(self.matched)
        return f"{self.matched} on {self.checked}"

    def to_dict(self) -> dict[str, Any]:
        """``{"signature", "decision", "matched"}`` with ``matched`` in its string form, plus
        ``approvals`` (when more than one) and ``quota`` (its text) when the rule sets them."""
        found: dict[str, Any] = {
            "signature": self.signature,
            "decision": self.decision,
            "matched": self.reason,
        }
        if self.matched.approvals > 1:
            found["approvals"] = self.matched.approvals
        if self.matched.quota is not None:
            found["quota"] = str(self.matched.quota)
        return found


UNKNOWN_TOOL: Final = "no known tool is called"
"""How the lint warning about a rule naming no known tool begins (``config check`` makes it an
error)."""

_FALLBACK: Final = Matched(kind="fallback", action="ask")
_MEMO_SIZE: Final = 4096
_MEMO_LONGEST: Final = 512  # longer signatures (many entities) are decided afresh each time
_STRICTNESS: Final[dict[Action, int]] = {"deny": 0, "ask": 1, "allow": 2}


def _weight(evaluation: Evaluation) -> tuple[int, int, int]:
    """Lower is stricter: the decision first, then more approvals, then a quota."""
    matched = evaluation.matched
    return (
        _STRICTNESS[evaluation.decision],
        -matched.approvals,
        0 if matched.quota is not None else 1,
    )


@frozen
class Policy:
    """A loaded policy; ``warnings`` lists lint findings (each naming file and index)."""

    source: str
    rules: tuple[Rule, ...] = ()
    defaults: tuple[Rule, ...] = ()
    warnings: tuple[str, ...] = ()
    # Decisions are a pure function of the signature: remembered, a bounded number of them.
    _memo: dict[str, Evaluation] = field(factory=dict, init=False, eq=False, repr=False)

    def evaluate(
        self,
        tool: object,
        args: object,
        *,
        allow_unknown: bool = False,
        specs: Mapping[str, tools.ToolSpec] | None = None,
    ) -> Evaluation:
        """Validate ``args``, build the signature and decide.

        Raises :class:`~agentgate.errors.InvalidParams` for invalid arguments, and for an
        unknown tool unless ``allow_unknown`` (policy tooling only; never for execution).
        ``specs`` are the tools known (default: Home Assistant's; a gateway passes its own).
        """
        signature = tools.signature(tool, args, allow_unknown=allow_unknown, specs=specs)
        return self.evaluate_signature(signature)

    def evaluate_signature(self, signature: str) -> Evaluation:
        """Decide for an already built ``signature``: the strictest decision of its checks."""
        found = self._memo.get(signature)
        if found is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            checks = tools.signature_checks(signature)
            found = self._decide(signature)
            for check in checks[1:]:
                narrower = self._decide(check)
                if _weight(narrower) < _weight(found):
                    found = attrs.evolve(narrower, signature=signature, checked=check)
            if len(signature) <= _MEMO_LONGEST:  # bounded memory: at most 4096 short ones
                self._memo[signature] = found
        return found

    def _decide(self, signature: str) -> Evaluation:
        for wanted in ("deny", "allow", "ask"):
            found: Evaluation | None = None
            for index, rule in enumerate(self.rules):
                if rule.action == wanted and rule.matches(signature):
                    matched = Matched(
                        "rule",
                        rule.action,
                        index,
                        rule.pattern,
                        rule.description,
                        rule.approvals,
                        rule.quota,
                    )
                    candidate = Evaluation(signature, rule.action, matched)
                    if found is None or _weight(candidate) < _weight(found):
                        found = candidate  # the first one, unless a later one is stricter
            if found is not None:
                return found
        for index, default in enumerate(self.defaults):
            if default.matches(signature):
                return Evaluation(
                    signature,
                    default.action,
                    Matched("default", default.action, index, default.pattern, default.description),
                )
        return Evaluation(signature, "ask", _FALLBACK)


def load_policy(
    path: str | os.PathLike[str], *, known: Mapping[str, tools.ToolSpec] | None = None
) -> Policy:
    """Read and check a policy file; raise :class:`PolicyError` naming the file and key.
    ``known`` are the tools its lint knows (default: Home Assistant's)."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PolicyError(f"{source}: cannot read: {reason}") from exc
    return parse_policy(text, source, known=known)


def parse_policy(
    text: str, source: str = "<policy>", *, known: Mapping[str, tools.ToolSpec] | None = None
) -> Policy:
    """Parse policy YAML ``text``; ``source`` names it in errors and warnings, ``known`` are
    the tools its lint knows (default: Home Assistant's)."""
    try:
        document = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: invalid YAML: {_yaml_reason(exc)}") from exc
    if document is None:
        raise PolicyError(f"{source}: empty policy: expected a mapping with rules and defaults")
    if not isinstance(document, dict):
        raise PolicyError(
            f"{source}: expected a mapping with rules and defaults, got {_kind(document)}"
        )
    _check_keys(source, "", document, required=(), optional=("defaults", "rules"))
    rules = _entries(source, "rules", document.get("rules", []))
    defaults = _entries(source, "defaults", document.get("defaults", []))
    return Policy(source, rules, defaults, _lint(source, rules, defaults, known or tools.TOOLS))


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (the last one would silently win); the tools
    file (:mod:`agentgate.http_tools`) is read with it too."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key if isinstance(key, str) else id(key))
        return super().construct_mapping(node, deep=deep)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1} column {mark.column + 1}: {problem}"
    return str(problem)


def _entries(source: str, name: str, value: object) -> tuple[Rule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PolicyError(f"{source}: {name}: expected a list, got {_kind(value)}")
    entries = []
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise PolicyError(
                f"{source}: {where}: expected a mapping with pattern and action, got {_kind(item)}"
            )
        extras = ("approvals", "quota") if name == "rules" else ()
        _check_keys(source, where, item, ("pattern", "action"), ("description", *extras))
        pattern = item["pattern"]
        if not isinstance(pattern, str) or not pattern:
            raise PolicyError(
                f"{source}: {where}.pattern: expected a non-empty string, got {_shown(pattern)}"
            )
        action = item["action"]
        if action not in ACTIONS:
            raise PolicyError(
                f"{source}: {where}.action: expected one of {', '.join(ACTIONS)}, "
                f"got {_shown(action)}"
            )
        description = item.get("description", "")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise PolicyError(
                f"{source}: {where}.description: expected a string, got {_shown(description)}"
            )
        approvals = _approvals(source, where, item, action)
        quota = _quota(source, where, item, action)
        entries.append(Rule(pattern, cast(Action, action), description, approvals, quota))
    return tuple(entries)


def _approvals(source: str, where: str, item: Mapping[str, Any], action: object) -> int:
    if "approvals" not in item:
        return 1
    value = item["approvals"]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_APPROVALS:
        raise PolicyError(
            f"{source}: {where}.approvals: expected a number of guardians from 1 to"
            f" {MAX_APPROVALS}, got {_shown(value)}"
        )
    if action != "ask" and value > 1:
        raise PolicyError(
            f"{source}: {where}.approvals: only an ask rule asks guardians (this rule is"
            f" {action}); use action: ask"
        )
    return value


def _quota(source: str, where: str, item: Mapping[str, Any], action: object) -> Quota | None:
    if "quota" not in item:
        return None
    try:
        quota = parse_quota(item["quota"])
    except ValueError as exc:
        raise PolicyError(f"{source}: {where}.quota: {exc}, got {_shown(item['quota'])}") from None
    if action == "deny":
        raise PolicyError(
            f"{source}: {where}.quota: a deny rule lets nothing through, so a quota means"
            " nothing here; put it on an allow or ask rule"
        )
    return quota


def quorum_problems(policy: Policy, guardians: int, who: str) -> list[str]:
    """Rules asking for more approvals than there are ``guardians`` (``who`` says where they
    come from, e.g. ``guardian.telegram.allowed_users``): nobody could ever allow them."""
    return [
        f"{policy.source}: rules[{index}].approvals: {rule.approvals} guardians must allow,"
        f" but {who} has {guardians}"
        for index, rule in enumerate(policy.rules)
        if rule.approvals > guardians
    ]


def _check_keys(
    source: str,
    where: str,
    mapping: Mapping[Any, Any],
    required: tuple[str, ...],
    optional: tuple[str, ...],
) -> None:
    prefix = f"{source}: {where}: " if where else f"{source}: "
    known = required + optional
    for key in mapping:
        if key not in known:
            raise PolicyError(f"{prefix}unknown key {_shown(key)} (expected {', '.join(known)})")
    for key in required:
        if key not in mapping:
            raise PolicyError(f"{prefix}missing required key {_shown(key)}")


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return _shown(value)


def _shown(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


# --- lint ----------------------------------------------------------------------------------

_GLOB = re.compile(r"[*?\[]")
_BRACKET = re.compile(r"\[[^\]]*\]")
_NEVER_IN_ARGS: Final = frozenset("()") | frozenset(map(chr, range(0x20))) | {"\x7f"}


def _lint(
    source: str,
    rules: tuple[Rule, ...],
    defaults: tuple[Rule, ...],
    known: Mapping[str, tools.ToolSpec],
) -> tuple[str, ...]:
    warnings: list[str] = []
    for kind, entries in (("rules", rules), ("defaults", defaults)):
        for index, entry in enumerate(entries):
            where = f"{source}: {kind}[{index}] {entry.pattern!r}"
            problems = _pattern_problems(entry.pattern, known)
            problems.extend(_shadowing(kind, entries, index))
            warnings.extend(f"{where}: {problem}" for problem in problems)
    for index, rule in enumerate(rules):
        where = f"{source}: rules[{index}] {rule.pattern!r}"
        warnings.extend(f"{where}: {problem}" for problem in _reach_problems(rule, rules))
    return tuple(warnings)


_DOMAIN_DENY = re.compile(r"^ha_call_service\(([a-z_][a-z0-9_]*)\.\*\)$")


def _reach_problems(rule: Rule, rules: tuple[Rule, ...]) -> list[str]:
    """Why a deny rule is narrower than it looks."""
    if rule.action == "deny":
        found = _DOMAIN_DENY.match(rule.pattern)
        if found and found.group(1) in tools.ENTITY_DOMAINS:
            wide = f"ha_call_service(*, {found.group(1)}.*)"
            if not any(other.action == "deny" and other.pattern == wide for other in rules):
                return [
                    f"denies the {found.group(1)} services only: a call that names one of its "
                    "entities elsewhere (homeassistant.turn_off, scene.apply, ...) is not "
                    f"denied; add {wide!r} to deny those too"
                ]
    return []


def _shadowing(kind: str, entries: tuple[Rule, ...], index: int) -> list[str]:
    """Why ``entries[index]`` never decides anything, if another entry always comes first."""
    entry = entries[index]
    for other_index, other in enumerate(entries[:index]):
        if (other.pattern, other.action) == (entry.pattern, entry.action):
            return [f"duplicate of {kind}[{other_index}]"]
    if kind == "defaults":
        for other_index, other in enumerate(entries[:index]):
            if _covers(other.pattern, entry.pattern):
                return [
                    f"never used: defaults[{other_index}] {other.pattern!r} comes first and "
                    "matches everything this one does"
                ]
    elif entry.action != "deny":
        for other_index, other in enumerate(entries):
            if other.action == "deny" and _covers(other.pattern, entry.pattern):
                return [
                    f"never used: deny rule rules[{other_index}] {other.pattern!r} matches "
                    f"everything this {entry.action} rule does, and deny wins"
                ]
    return []


def _covers(wide: str, narrow: str) -> bool:
    """Whether glob ``wide`` surely matches every signature glob ``narrow`` matches."""
    return wide in ("*", narrow) or (_GLOB.search(narrow) is None and fnmatchcase(narrow, wide))


def _pattern_problems(pattern: str, known: Mapping[str, tools.ToolSpec]) -> list[str]:
    """Reasons why ``pattern`` can never match a valid signature."""
    problems: list[str] = []
    tool, paren, rest = pattern.partition("(")
    if _GLOB.search(tool) is None and tool not in known:
        close = difflib.get_close_matches(tool, list(known), n=1)
        meant = f"did you mean {close[0]}?" if close else "a typo?"
        problems.append(f"{UNKNOWN_TOOL} {tool!r} ({meant})")
    if paren:
        args = rest.rstrip("*")
        args = args[:-1] if args.endswith(")") else args
        bad = sorted({char for char in args if char in _NEVER_IN_ARGS})
        if bad:
            shown = ", ".join(repr(char) for char in bad)
            problems.append(
                f"never matches: {shown} cannot appear inside arguments (validation refuses it)"
            )
        if re.search(r",(?![ *?\[])", args):
            problems.append("never matches: arguments in a signature are separated by ', '")
        if tool in known:
            if known[tool].has_parts is False:
                problems.append(
                    f"never matches: {tool} takes no arguments, its signature is {tool}"
                )
            elif tool in tools.TOOLS and re.search(r"[A-Z]", _BRACKET.sub("", args)):
                problems.append("never matches: Home Assistant identifiers are lowercase")
    elif tool in known and known[tool].has_parts is True:
        problems.append(f"never matches: {tool}'s signature always has arguments, e.g. {tool}(*)")
    return problems
