"""Quotas: how many calls a rule let through without a human, per agent, in a rolling window.

A policy rule may carry ``quota: "20/h"`` (:class:`~agentgate.policy.Quota`). What counts is
every call that rule let through without a human: its own allows, and for an ask rule the
allows of grants ("Allow 1 h", "Always allow"). Once ``count`` of them fall inside the window,
the next one is asked instead, and its card says which quota is used up; as the window slides,
calls run unasked again.

The counts are derived from the audit log (every allowed call has its ``allow`` row, written
before it ran), so a restart keeps them: :meth:`Quotas.derive` re-reads the rows of the longest
window and gives each to the rule the current policy decides it by. In between, the pipeline
counts in memory (:meth:`Quotas.admit`, synchronous: concurrent requests cannot overshoot).
A configuration reload keeps the counts of rules that did not change and derives the others.

Imports: policy (the rules and their quotas), store (the audit rows).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Final

from attrs import frozen

from agentgate.policy import Evaluation, Policy, Quota
from agentgate.store import Store

__all__ = ["QuotaKey", "Quotas"]

log = logging.getLogger(__name__)

LONGEST: Final = 86400.0  # seconds: a quota's longest window (per day)


@frozen
class QuotaKey:
    """One agent under one rule (identified by its policy file, place, pattern and quota:
    a rule that moves or changes is a new rule, whose count is derived afresh)."""

    agent: str
    source: str
    index: int
    pattern: str
    quota: Quota


class Quotas:
    """The counts of every quota rule; see the module docstring."""

    def __init__(self) -> None:
        self._hits: dict[QuotaKey, deque[float]] = {}

    @staticmethod
    def key(agent: str, policy: Policy, evaluation: Evaluation) -> QuotaKey | None:
        """The quota that applies to this decision, if the deciding rule has one."""
        matched = evaluation.matched
        if matched.quota is None or matched.index is None or matched.pattern is None:
            return None
        return QuotaKey(agent, policy.source, matched.index, matched.pattern, matched.quota)

    def used(self, key: QuotaKey, now: float) -> int:
        """Calls counted against ``key`` in its window ending ``now``."""
        hits = self._hits.get(key)
        if hits is None:
            return 0
        start = now - key.quota.window
        while hits and hits[0] <= start:
            hits.popleft()
        return len(hits)

    def admit(self, key: QuotaKey, now: float) -> bool:
        """Count one more call against ``key``, unless the quota is used up (False: ask)."""
        if self.used(key, now) >= key.quota.count:
            return False
        self._hits.setdefault(key, deque()).append(now)
        return True

    async def derive(
        self,
        store: Store,
        policies: Mapping[str | None, Policy],
        agents: Iterable[str],
        now: float,
    ) -> Quotas:
        """The counts for ``policies``: those of unchanged rules shared with this object (so
        what it counts until the swap still counts), the others derived from the audit log
        (all of them at start-up). Nothing changes here; swap the result in."""
        keys = self._keys(policies, agents)
        derived = Quotas()
        fresh = set()
        for wanted in keys:
            hits = self._hits.get(wanted)
            if hits is None:
                fresh.add(wanted)
                hits = deque()
            derived._hits[wanted] = hits
        if not fresh:
            return derived
        counted = 0
        for at, agent, signature in await store.allowed_since(now - LONGEST):
            policy = policies.get(agent) or policies.get(None)
            if policy is None:
                continue
            key = self.key(agent, policy, policy.evaluate_signature(signature))
            if key is not None and key in fresh and at > now - key.quota.window:
                derived._hits[key].append(at)
                counted += 1
        if counted:
            log.info("quotas: %d allowed call(s) counted from the audit log", counted)
        return derived

    @staticmethod
    def _keys(policies: Mapping[str | None, Policy], agents: Iterable[str]) -> set[QuotaKey]:
        keys = set()
        for agent in agents:
            policy = policies.get(agent) or policies.get(None)
            if policy is None:
                continue
            for index, rule in enumerate(policy.rules):
                if rule.quota is not None:
                    keys.add(QuotaKey(agent, policy.source, index, rule.pattern, rule.quota))
        return keys
