"""Hot reload: re-read ``gate.toml`` and its policies, check everything, then swap at once.

``SIGHUP`` and ``agentgate reload --config gate.toml`` (through the control socket,
:mod:`agentgate.control_socket`) both call :meth:`Reloader.reload`::

    read gate.toml (secrets from the gateway's environment as it started) ── ConfigError? ─┐
    read every policy (bytes once: parsed and hashed)  ───────────────────── PolicyError? ─┤
    approvals: N within the guardians there are  ──────────────────────────── too many?  ──┤
    quota counts for new or changed rules (from the audit log)                             │
    ── swap, with no await in between: policies, agents, limits, timeouts, guardian        │
       settings; every request decided from here on sees the new ones                      │
    ── close (1008) every connection of an agent removed or whose token changed            │
    ── audit row "reload" (each policy file's sha256), tell the guardians                  │
                                               failed: the old configuration stays ◀───────┘
                                               audit row "reload_failed", log, guardians told

What a reload changes: ``[policy]`` and every agent's policy, ``[agents.*]`` (added, removed,
tokens, per-agent limits), ``[limits]`` (but ``max_message_bytes`` and ``max_connections``),
``[gateway] approval_timeout`` and ``auth_deadline``, ``[guardian] undo_window`` and
``suggest_after``. What needs a restart (the reload applies the rest and names these):
``[gateway] listen``, TLS files, ``control_socket``; ``[store]``; ``[mcp]``; ``[services]``;
``[guardian.telegram]``, ``max_card_chars``, ``card_overflow``; ``[limits] max_message_bytes``,
``max_connections``. Decisions already made and approvals already pending keep what they got
(a pending approval keeps its deadline and its quorum).

Imports: config, errors, policy, quotas, store (audit rows); the gateway's parts (its type only).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from attrs import frozen

from agentgate.config import Config, ConfigError, load_config
from agentgate.errors import ExecutionFailed
from agentgate.policy import Policy, PolicyError, parse_policy, quorum_problems
from agentgate.quotas import Quotas
from agentgate.store import AuditEntry

if TYPE_CHECKING:
    from agentgate.gateway import Gateway

__all__ = ["RESTART_KEYS", "ReloadResult", "Reloader"]

log = logging.getLogger(__name__)

RESTART_KEYS: Final = (
    "gateway.listen",
    "gateway.tls_cert",
    "gateway.tls_key",
    "gateway.control_socket",
    "store",
    "mcp",
    "services",
    "guardian.telegram",
    "guardian.max_card_chars",
    "guardian.card_overflow",
    "limits.max_message_bytes",
    "limits.max_connections",
)
"""What a reload cannot change (dotted keys of gate.toml): it says so when they differ."""


@frozen
class ReloadResult:
    """How a reload went: ``ok``, and lines that say what changed (or every problem)."""

    ok: bool
    lines: tuple[str, ...]
    restart: tuple[str, ...] = ()  # keys that changed but need a restart
    closed: int = 0  # connections closed (1008): their agent was removed, or its token changed

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _get(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _keep(new: Config, old: Config) -> Config:
    """``new``, but with what needs a restart as it runs now (``old``)."""
    return attrs.evolve(
        new,
        gateway=attrs.evolve(
            new.gateway,
            listen=old.gateway.listen,
            tls_cert=old.gateway.tls_cert,
            tls_key=old.gateway.tls_key,
            control_socket=old.gateway.control_socket,
        ),
        store=old.store,
        mcp=old.mcp,
        services=old.services,
        guardian=attrs.evolve(
            new.guardian,
            telegram=old.guardian.telegram,
            max_card_chars=old.guardian.max_card_chars,
            card_overflow=old.guardian.card_overflow,
        ),
        limits=attrs.evolve(
            new.limits,
            max_message_bytes=old.limits.max_message_bytes,
            max_connections=old.limits.max_connections,
        ),
    )


def _read_policy(path: Path) -> tuple[Policy, str]:
    """The policy and the sha256 of the very bytes it was parsed from."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: cannot read: {exc}") from exc
    return parse_policy(text, str(path)), hashlib.sha256(data).hexdigest()


class Reloader:
    """Reloads one running gateway; see the module docstring. One reload at a time.

    ``insecure`` and ``ignore`` are how ``serve`` read the file (``--insecure``,
    ``--terminal-guardian``); ``guardians`` is how many people can press Allow (None: not
    checked), for rules with ``approvals: N``.
    """

    def __init__(
        self,
        gateway: Gateway,
        *,
        insecure: bool = False,
        ignore: Sequence[str] = (),
        guardians: int | None = None,
    ) -> None:
        self.gateway = gateway
        self.insecure = insecure
        self.ignore = tuple(ignore)
        self.guardians = guardians
        self._lock = trio.Lock()
        self.reloads = 0  # reloads that succeeded (tests)

    @property
    def source(self) -> Path:
        return self.gateway.config.source

    async def reload(self, by: str) -> ReloadResult:
        """Re-read and swap, or keep everything as it is and say why; audited either way."""
        async with self._lock:
            try:
                prepared = await self._prepare()
            except (ConfigError, PolicyError) as exc:
                result = ReloadResult(False, tuple(str(exc).splitlines()))
            else:
                result = self._swap(*prepared)
            await self._report(result, by)
            return result

    async def _prepare(
        self,
    ) -> tuple[Config, Config, dict[str | None, Policy], dict[str, str], Quotas]:
        gateway = self.gateway
        # Read on the event loop: a few small files, once per reload (a worker thread would
        # cost more than the read, and tests on a fake clock would see time jump meanwhile).
        loaded = self._load()
        files: list[tuple[str | None, str, Path]] = [(None, "policy.file", loaded.policy.file)]
        for name, agent in loaded.agents.items():
            if agent.policy is not None:
                files.append((name, f"agents.{name}.policy", agent.policy))
        policies: dict[str | None, Policy] = {}
        digests: dict[str, str] = {}
        problems: list[str] = []
        who = (
            "guardian.telegram.allowed_users"
            if gateway.config.guardian.telegram is not None
            else "the terminal guardian"
        )
        for owner, label, path in files:
            try:
                policy, digest = _read_policy(path)
            except PolicyError as exc:
                problems.append(str(exc))
                continue
            policies[owner], digests[label] = policy, digest
            for warning in policy.warnings:
                log.warning("%s", warning)
            if self.guardians is not None:
                problems += quorum_problems(policy, self.guardians, who)
        if problems:
            raise PolicyError("\n".join(problems))
        applied = _keep(loaded, gateway.config)
        quotas = await gateway.pipeline.quotas.derive(
            gateway.store, policies, applied.agents, gateway.pipeline.now()
        )
        return loaded, applied, policies, digests, quotas

    def _load(self) -> Config:
        return load_config(self.source, insecure=self.insecure, ignore=self.ignore)

    def _swap(
        self,
        loaded: Config,
        new: Config,
        policies: dict[str | None, Policy],
        digests: dict[str, str],
        quotas: Quotas,
    ) -> ReloadResult:
        """Everything at once: no await from the first assignment to the last."""
        gateway = self.gateway
        old = gateway.config
        restart = tuple(k for k in RESTART_KEYS if _get(loaded, k) != _get(old, k))
        removed = sorted(set(old.agents) - set(new.agents))
        added = sorted(set(new.agents) - set(old.agents))
        rekeyed = sorted(
            name
            for name in set(old.agents) & set(new.agents)
            if old.agents[name].digest != new.agents[name].digest
        )
        gateway.apply(new, policies, quotas)
        closed = 0
        for name in (*removed, *rekeyed):
            why = "agent removed" if name in removed else "token changed"
            closed += gateway.disconnect(name, f"{why} by a configuration reload")
        self.reloads += 1
        lines = [
            "policies: "
            + ", ".join(f"{label} sha256 {digest}" for label, digest in digests.items())
        ]
        if added or removed or rekeyed:
            change = [f"+{n}" for n in added] + [f"-{n}" for n in removed]
            change += [f"{n} (new token)" for n in rekeyed]
            lines.append(f"agents: {', '.join(change)}")
        if closed:
            lines.append(f"connections closed (1008): {closed}")
        if restart:
            lines.append(f"needs a restart to take effect: {', '.join(restart)}")
        return ReloadResult(True, tuple(lines), restart, closed)

    async def _report(self, result: ReloadResult, by: str) -> None:
        gateway = self.gateway
        decision = "reload" if result.ok else "reload_failed"
        text = "; ".join(result.lines)
        if result.ok:
            log.warning("configuration reloaded by %s: %s", by, text)
        else:
            log.error(
                "configuration reload by %s failed, the running configuration stays: %s", by, text
            )
        try:
            await gateway.store.audit(
                AuditEntry.guardian(
                    gateway.pipeline.now(), decision, f"{self.source.name}: {text}", by
                )
            )
        except ExecutionFailed:
            log.exception("could not audit the configuration reload")
        guardian = gateway.broker.guardian
        if guardian is None:
            return
        if result.ok:
            notice = f"🔄 Configuration reloaded by {by}.\n" + "\n".join(result.lines)
        else:
            notice = (
                f"⚠ Configuration reload by {by} failed: the running configuration stays.\n"
                + "\n".join(result.lines)
            )
        with trio.move_on_after(10):
            try:
                await guardian.notify(notice)
            except Exception:
                log.exception("could not tell the guardians about the reload")
