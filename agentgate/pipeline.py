"""The decision pipeline: one tool request from any front door, to its outcome.

Every front door (the WebSocket protocol, MCP) hands an authenticated agent's request to
:meth:`Pipeline.submit` and gets a typed outcome back, so the checks below exist once::

    submit(agent, tool, args, reply, reply_to)
      unknown tool, invalid arguments ──────────── audited ──▶ InvalidParams (-32602)
      signature (every entity), policy
      frozen by the guardian ────────────────────── audited ──▶ DeniedByPolicy (-32003)
      deny ─────────────────────────────────────── audited ──▶ DeniedByPolicy (-32003)
      ask ─┬─ a grant covers it (one guardian is enough, and the rule's quota is not
           │  used up) ──▶ allow
           ├─ the card cannot show everything ──── audited ──▶ InvalidParams (-32602)
           └─ broker.ask (pending limit, recorded) ─────────▶ Asked; the result comes later
      allow ─┬─ the rule's quota is used up ──▶ ask (no grant applies; the card says so)
             └─ decision fsync'd (else nothing runs: -32004) ── [undo snapshot] ── execute
                                                             ├──▶ Executed
                                                             ├──▶ ExecutionFailed
                                             sent, no answer └──▶ OutcomeUnknown

What it owns: the order of those checks, the policies, the per-agent request rate, the quota
counts (:mod:`agentgate.quotas`), the audit of every decision, the executor's calls, and the
registry of live reply handles per agent. A configuration reload swaps :attr:`Pipeline.config`
and :attr:`Pipeline.policies` at once (:mod:`agentgate.reload`).
What it does not: the wire (each door encodes its own replies), the guardian's controls
(:mod:`agentgate.controls`: freeze and grants live there), approvals once asked
(:mod:`agentgate.broker`).

Imports: tools, policy, store, broker, controls, guardian (the card and its rules), services
(the Executor protocol), approvals, quotas, undo, limits, config, protocol (ids), errors. Never a
front door.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, NamedTuple

import attrs
import trio

from agentgate import tools
from agentgate.approvals import Decision, Outcome, ReplyHandle
from agentgate.broker import Broker
from agentgate.config import Config
from agentgate.controls import Controls
from agentgate.errors import (
    AgentgateError,
    AuthenticationFailed,
    DeniedByPolicy,
    ExecutionFailed,
    GatewayShuttingDown,
    InvalidParams,
    OutcomeUnknown,
    RateLimited,
)
from agentgate.guardian import ApprovalCard
from agentgate.guardian.card import CardRules, CardTooLarge
from agentgate.limits import TokenBucket
from agentgate.policy import Evaluation, Policy
from agentgate.protocol import MAX_ACK, MAX_REQUEST_ID_CHARS, JsonId
from agentgate.quotas import Quotas
from agentgate.services import Executor
from agentgate.store import AuditEntry, PendingRow, Store
from agentgate.undo import Undo

__all__ = ["Asked", "Executed", "Pipeline", "Sessions"]

log = logging.getLogger(__name__)


def request_ids(value: object) -> list[str]:
    """An agent's list of request ids to acknowledge; InvalidParams (-32602) if it is not a
    list of at most ``MAX_ACK`` strings."""
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise InvalidParams("ack must be a list of request ids (strings)")
    if len(value) > MAX_ACK:
        raise InvalidParams(f"ack: at most {MAX_ACK} request ids per call, got {len(value)}")
    if any(len(item) > MAX_REQUEST_ID_CHARS for item in value):
        raise InvalidParams(f"ack: a request id longer than {MAX_REQUEST_ID_CHARS} characters")
    return list(value)


INTERRUPTED: Final = (
    "outcome unknown: the call was interrupted while it executed (it may have run; it is not"
    " run again)"
)


class Executed(NamedTuple):
    """The call ran at once; ``data`` is the service's answer."""

    request_id: str
    data: Any


class Asked(NamedTuple):
    """A guardian decides; the result reaches the reply handle (or the agent's queue) later."""

    request_id: str


class Sessions:
    """The live reply handles of each agent, across every front door."""

    def __init__(self) -> None:
        self._by_agent: dict[str, set[ReplyHandle]] = defaultdict(set)

    def add(self, handle: ReplyHandle) -> None:
        self._by_agent[handle.agent].add(handle)

    def discard(self, handle: ReplyHandle) -> None:
        handles = self._by_agent.get(handle.agent)
        if handles is not None:
            handles.discard(handle)
            if not handles:
                del self._by_agent[handle.agent]

    def of(self, agent: str) -> list[ReplyHandle]:
        return list(self._by_agent.get(agent, ()))

    def counts(self) -> dict[str, int]:
        """Agent name → live connections."""
        return {agent: len(handles) for agent, handles in self._by_agent.items() if handles}


@attrs.define(eq=False)
class _Reading:
    """A target being described; asks for the same target meanwhile wait for its text."""

    done: trio.Event = attrs.field(factory=trio.Event)
    text: str | None = None
    finished: bool = False


class Pipeline:
    """See the module docstring. Built by :func:`agentgate.gateway.open_gateway`."""

    def __init__(
        self,
        config: Config,
        *,
        store: Store,
        policies: dict[str | None, Policy],
        executor: Executor | None,
        controls: Controls,
        sessions: Sessions,
        cards: CardRules,
        now: Callable[[], float],
    ) -> None:
        self.config = config
        self.store = store
        self.policies = policies
        self.executor = executor
        self.controls = controls
        self.sessions = sessions
        self.cards = cards
        self.now = now
        self.broker: Broker | None = None  # set by open_gateway: the broker needs us too
        self.undo: Undo | None = None  # set by open_gateway when there is a service
        self.quotas = Quotas()  # loaded by open_gateway from the audit log
        self.closing = False  # shutting down: new requests are refused (-32007)
        self._buckets: dict[str, TokenBucket] = {}
        self._readings: dict[str, _Reading] = {}  # target -> its describe in flight

    # -- admission ----------------------------------------------------------------------------

    def admit(self, agent: str) -> None:
        """Every request of every front door passes here first (each entry point below calls
        it): refused while shutting down (-32007), then one token of the agent's
        ``requests_per_minute``, shared by every door (-32006 when none is left)."""
        if self.closing:
            raise GatewayShuttingDown()
        self.take_rate(agent)

    def take_rate(self, agent: str) -> None:
        """One request of ``agent`` against its ``requests_per_minute`` (RateLimited if none)."""
        if agent not in self.config.agents:  # removed by a reload while its request was read
            raise AuthenticationFailed("agent removed by a configuration reload")
        rpm, _ = self.config.agent_limits(agent)
        bucket = self._buckets.get(agent)
        if bucket is None or bucket.capacity != rpm:
            bucket = self._buckets[agent] = TokenBucket(rpm, 60.0)
        if not bucket.try_take():
            raise RateLimited(
                f"rate limited: over {bucket.capacity:.0f} requests per minute;"
                f" retry in {bucket.retry_after():.1f} s"
            )

    # -- one request --------------------------------------------------------------------------

    async def submit(
        self,
        agent: str,
        tool: str,
        args: dict[str, Any],
        reply: ReplyHandle,
        reply_to: JsonId,
    ) -> Executed | Asked:
        """Decide and run (or ask about) one request; see the module docstring.

        ``reply`` hears about an ask later; ``reply_to`` is the door's handle on the request,
        echoed with its late result. Raises the :class:`~agentgate.errors.AgentgateError` the
        agent should get.
        """
        self.admit(agent)
        now = self.now()
        if tool not in self.offered:
            await self._audit_refusal(
                agent, tool, args, None, "invalid", f"unknown tool: {tool}", via=reply.via
            )
            raise InvalidParams(f"unknown tool: {tool}")
        policy = self.policies.get(agent) or self.policies[None]
        try:
            evaluation = policy.evaluate(tool, args, specs=self.offered)
        except InvalidParams as exc:
            await self._audit_refusal(
                agent, tool, args, None, "invalid", exc.message, via=reply.via
            )
            raise
        signature, decision = evaluation.signature, evaluation.decision
        # A rule's own text repeats from request to request: one shared string (10,000 pending
        # approvals share it). A reason naming the agent's entities is never interned.
        matched = sys.intern(evaluation.reason) if evaluation.checked is None else evaluation.reason
        request_id = str(uuid.uuid4())
        data = {"request_id": request_id, "signature": signature}
        if self.controls.frozen:
            await self._audit_refusal(
                agent, tool, args, signature, "deny", "frozen by guardian", request_id, reply.via
            )
            raise DeniedByPolicy("frozen by guardian", data=data)
        if decision == "deny":
            await self._audit_refusal(
                agent, tool, args, signature, "deny", matched, request_id, reply.via
            )
            raise DeniedByPolicy(f"denied by policy: {matched}", data=data)
        quota = None
        granted = None  # the grant that allowed it, for Undo's listing
        if decision == "ask":
            # One guardian's grant never stands for the several a two-person rule needs.
            grant = None
            if evaluation.matched.approvals <= 1:
                grant = self.controls.grant_for(agent, tool, args, signature, now)
            if grant is not None:
                quota = self._quota_used_up(agent, policy, evaluation, now)
            if grant is not None and quota is None:
                decision, matched = "allow", f"grant {grant.grant_id} by {grant.granted_by}"
                granted = matched
            else:
                return await self._ask(
                    agent,
                    tool,
                    args,
                    signature,
                    matched,
                    request_id,
                    reply,
                    reply_to,
                    quorum=evaluation.matched.approvals,
                    quota=quota,
                )
        elif (quota := self._quota_used_up(agent, policy, evaluation, now)) is not None:
            return await self._ask(
                agent, tool, args, signature, matched, request_id, reply, reply_to, quota=quota
            )
        # allow: the decision is on disk before anything executes (fail closed; fsync'd, so a
        # power cut cannot leave a call that ran without its row).
        await self.store.audit(
            AuditEntry(
                time=now,
                agent=agent,
                request_id=request_id,
                tool=tool,
                args=args,
                signature=signature,
                decision="allow",
                matched=matched,
                via=reply.via,
            ),
            durable=True,
        )
        # Read before the call, so that Undo knows what it changed (one read per entity).
        snapshot = None if self.undo is None else await self.undo.before(tool, args)
        try:
            result = await self.execute(tool, args)
        except OutcomeUnknown as exc:  # it may have run: recorded as such, never retried
            exc.data.update(data)
            log.warning("%s (%s, agent %s, request %s)", exc.message, signature, agent, request_id)
            after = {"state_after": exc.data.get("state_after")}
            await self._resolve_quietly(
                request_id, Outcome.UNKNOWN, error=exc.message, result=after
            )
            raise
        except AgentgateError as exc:
            exc.data.update(data)
            await self._resolve_quietly(request_id, Outcome.FAILED, error=exc.message)
            raise
        except trio.Cancelled:
            # Cut off mid-call (the shutdown bound, a front door's own bound): it may have run.
            log.warning("%s (%s, agent %s, request %s)", INTERRUPTED, signature, agent, request_id)
            with trio.CancelScope(shield=True):
                await self._resolve_quietly(request_id, Outcome.UNKNOWN, error=INTERRUPTED)
            raise
        await self._resolve_quietly(request_id, Outcome.EXECUTED, result=result)
        if snapshot is not None and self.undo is not None:
            self.store.post_undo(
                self.undo.record(
                    snapshot,
                    result,
                    request_id=request_id,
                    agent=agent,
                    tool=tool,
                    args=args,
                    signature=signature,
                    decided_by=granted,
                )
            )
        return Executed(request_id, result)

    def _quota_used_up(
        self, agent: str, policy: Policy, evaluation: Evaluation, now: float
    ) -> str | None:
        """Count this call against its rule's quota; the quota (as the card says it) if it is
        used up instead: then a human is asked. Synchronous: no request can overtake."""
        key = self.quotas.key(agent, policy, evaluation)
        if key is None or self.quotas.admit(key, now):
            return None
        return str(key.quota)

    async def _ask(
        self,
        agent: str,
        tool: str,
        args: dict[str, Any],
        signature: str,
        matched: str,
        request_id: str,
        reply: ReplyHandle,
        reply_to: JsonId,
        *,
        quorum: int = 1,
        quota: str | None = None,
    ) -> Asked:
        data = {"request_id": request_id, "signature": signature}
        if quota is not None:
            matched = f"quota reached: {quota} ({matched})"
        card = ApprovalCard(
            request_id=request_id,
            agent=agent,
            tool=tool,
            args=args,
            signature=signature,
            matched=matched,
            expires_at=self.now() + self.config.gateway.approval_timeout,
            via=reply.via,
            target=self._preview(tool, args),  # an HTTP request's text counts in the layout
            quorum=quorum,
            quota=quota,
        )
        try:
            self.cards.layout(card)  # what the guardian will be shown: everything, or nothing
        except CardTooLarge as exc:
            await self._audit_refusal(
                agent, tool, args, signature, "invalid", f"{exc} ({matched})", request_id, reply.via
            )
            limits = {"size": exc.size, "limit": exc.limit}
            raise InvalidParams(str(exc), data={**data, **limits}) from None
        if self.broker is None:
            raise GatewayShuttingDown()
        _, max_pending = self.config.agent_limits(agent)
        request_id = await self.broker.ask(
            reply,
            reply_to,
            tool,
            args,
            signature,
            matched,
            max_pending=max_pending,
            quorum=quorum,
            quota=quota,
        )
        return Asked(request_id)

    def recheck(self, row: PendingRow) -> tuple[Decision, str | None, str] | None:
        """An approval found pending at start, checked against today's configuration: None if
        it is still asked; else how it ends (the agent removed, the tool gone, the policy now
        denies it, or the gateway frozen)."""
        if self.controls.frozen:
            return Decision.FROZEN, None, "frozen by guardian"
        why = None
        if row.agent not in self.config.agents:
            why = f"agent {row.agent} is no longer configured"
        elif row.tool not in self.offered:
            why = f"unknown tool: {row.tool}"
        else:
            policy = self.policies.get(row.agent) or self.policies[None]
            try:
                evaluation = policy.evaluate(row.tool, row.args, specs=self.offered)
            except InvalidParams as exc:
                why = exc.message
            else:
                if evaluation.decision == "deny":
                    why = evaluation.reason
        if why is None:
            return None
        return Decision.REVOKED, None, f"{why} (changed while the gateway was down)"

    @property
    def offered(self) -> Mapping[str, tools.ToolSpec]:
        """The tools this gateway offers: its executor's (none without a service)."""
        return self.executor.tools if self.executor is not None else {}

    def list_tools(self, agent: str) -> list[dict[str, Any]]:
        """The ``list_tools`` entries (name, description, JSON Schema) of the offered tools."""
        self.admit(agent)
        return [spec.to_wire() for spec in self.offered.values()]

    async def execute(self, tool: str, args: dict[str, Any]) -> Any:
        """Run an already decided call on its service."""
        if self.executor is None:
            raise ExecutionFailed(
                f"no service is configured for {tool}: add [services.homeassistant] to gate.toml"
            )
        return await self.executor.execute(tool, args)

    async def state_after(self, tool: str, args: dict[str, Any]) -> dict[str, Any] | None:
        """The states of the entities a call names, read now (after an unknown outcome)."""
        if self.executor is None:
            return None
        return await self.executor.state_after(tool, args)

    def _preview(self, tool: str, args: dict[str, Any]) -> str | None:
        spec = self.offered.get(tool)
        return spec.preview(args) if spec is not None and spec.preview is not None else None

    async def describe(self, tool: str, args: dict[str, Any]) -> str | None:
        """The card's target line, from the service (for an HTTP tool: the request as sent).

        Single flight: an ask whose target is being read right now joins that read instead of
        queueing one more request (10,000 asks at once would otherwise wait behind each other
        for the service's connections, past its timeout).
        """
        entity_id = args.get("entity_id")
        if self.executor is None:
            return None
        if not isinstance(entity_id, str):
            return self._preview(tool, args)
        while (reading := self._readings.get(entity_id)) is not None:
            await reading.done.wait()
            if reading.finished:
                return reading.text
            # that read was cancelled (its approval ended): read it ourselves
        reading = self._readings[entity_id] = _Reading()
        try:
            reading.text = await self.executor.describe(tool, args)
            reading.finished = True
        finally:
            del self._readings[entity_id]
            reading.done.set()
        return reading.text

    # -- queued results -----------------------------------------------------------------------

    async def take_queued(self, agent: str) -> list[dict[str, Any]]:
        """The agent's queued results, each handed out once."""
        self.admit(agent)
        return await self.store.take_queued(agent)

    async def hand_out(self, agent: str) -> list[dict[str, Any]]:
        """The agent's queued results for one frame, each handed out once: they stay queued
        until :meth:`written` (or go back with :meth:`requeue`)."""
        self.admit(agent)
        return await self.store.hand_out(agent)

    async def list_queued(self, agent: str, *, acknowledge: object = ()) -> list[dict[str, Any]]:
        """Acknowledged delivery: drop the results ``acknowledge`` names from the agent's queue
        (ids it does not hold are ignored), then list what is still queued, leaving it there
        until a later call acknowledges it. ``acknowledge`` is the agent's own list, checked
        here (:func:`request_ids`)."""
        self.admit(agent)
        ids = request_ids(acknowledge)
        return await self.store.list_queued(agent, acknowledge=ids)

    async def acknowledge_queued(self, agent: str, ids: object) -> int:
        """The agent has these results (checked as for :meth:`list_queued`): they leave its
        queue. Returns how many did."""
        self.admit(agent)
        return await self.store.acknowledge_queued(agent, request_ids(ids))

    async def result_of(self, agent: str, request_id: str, wait: float) -> dict[str, Any]:
        """The outcome of ``agent``'s request ``request_id``: its queued-result entry
        (docs/protocol.md), waiting up to ``wait`` seconds while it is still open, then
        ``{"status": "pending", "request_id", "expires_at"}``. Only requests that were asked
        have a stored outcome; any other id, or another agent's, is ``InvalidParams`` ("unknown
        request"). Reading an outcome delivers it (it leaves the queue); nothing executes.
        """
        self.admit(agent)
        row = await self.store.result_of(agent, request_id)
        if row is None:
            raise InvalidParams(
                "unknown request: no approval of this agent has that request_id",
                data={"request_id": request_id},
            )
        if row.entry is None and self.broker is not None and wait > 0:
            with trio.move_on_after(wait):
                await self.broker.finished(request_id)
            row = await self.store.result_of(agent, request_id)
            assert row is not None  # rows are never deleted
        if row.entry is None:
            return {"status": "pending", "request_id": request_id, "expires_at": row.expires_at}
        return row.entry

    async def queued_count(self, agent: str) -> int:
        try:
            return await self.store.queued_count(agent)
        except ExecutionFailed:
            return 0

    def written(self, request_ids: Iterable[str]) -> None:
        """These results' frames were written to the agent's socket: they leave its queue (a
        write nobody waits for: if it is lost, the result is handed out again, at least once)."""
        self.store.mark_delivered(request_ids)

    def unwritten(self, request_ids: Iterable[str]) -> None:
        """These results' frames will never be written: still queued (only a written frame
        takes a result out of the queue), they are listed again from now on."""
        self.store.release(request_ids)

    async def requeue(self, agent: str, request_ids: Iterable[str]) -> None:
        """Results whose frames were never written (see :meth:`unwritten`): the agent hears
        they wait in its queue."""
        ids = list(request_ids)
        self.store.release(ids)
        if ids and self.broker is not None:
            await self.broker.announce_queued(agent)

    # -- audit --------------------------------------------------------------------------------

    async def _resolve_quietly(self, request_id: str, resolution: Outcome, **kw: Any) -> None:
        # The decision row was committed before execution; the resolution joins the next group
        # commit without holding up the reply (a failure to write it is logged by the store).
        await self.store.resolve_audit(
            request_id, resolution, resolved_by=None, resolved_at=self.now(), wait=False, **kw
        )

    async def _audit_refusal(
        self,
        agent: str,
        tool: str,
        args: dict[str, Any],
        signature: str | None,
        decision: str,
        matched: str,
        request_id: str | None = None,
        via: str | None = None,
    ) -> None:
        now = self.now()
        await self.store.audit(
            AuditEntry(
                time=now,
                agent=agent,
                request_id=request_id,
                tool=tool,
                args=args,
                signature=signature,
                decision=decision,
                matched=matched,
                resolution=Outcome.DENIED if decision == "deny" else Outcome.REJECTED,
                resolved_at=now,
                via=via,
            )
        )
