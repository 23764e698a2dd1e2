"""The approval broker: owns every pending approval, from ask to delivered result.

Lifecycle of one approval (DESIGN §6)::

    ask() ── persist (audit + pending row, one commit) ── start a broker task ──┐
                                                                                │
    task: describe the target ── send the card ── wait ─┬─ guardian allow/grant ─┤── execute once
                                                        ├─ guardian deny ────────┤
                                                        ├─ deadline (cancel scope from expires_at)
                                                        ├─ shutdown / freeze ────┤
                                                        └─ card undeliverable ───┘
                                       finish: store outcome ── answer the asking connection, or
                                       queue the result for the agent ── edit the card

The first resolution wins through :meth:`Approval.resolve`, a one-shot value plus a
``trio.Event``; later ones are no-ops and say so. Approvals belong to the broker, not to the
connection: when the agent goes away the approval goes on and its result is queued. Execution
is gated by the store (``pending`` → ``executing`` happens once), so a decision can never run a
call twice, even across a restart.
"""

from __future__ import annotations

import enum
import logging
import math
import sys
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs
import trio

from agentgate import tools
from agentgate.errors import (
    AgentgateError,
    ApprovalTimedOut,
    DeniedByGuardian,
    DeniedByPolicy,
    ExecutionFailed,
    GatewayShuttingDown,
    RateLimited,
)
from agentgate.guardian import (
    Action,
    ApprovalCard,
    CardUpdate,
    Guardian,
    GuardianUnavailable,
    PendingCard,
    Status,
)
from agentgate.protocol import JsonId, encode_error, encode_notification, encode_result
from agentgate.store import AuditEntry, PendingRow, Store

log = logging.getLogger(__name__)


class Outcome(enum.StrEnum):
    EXECUTED = "executed"
    DENIED = "denied"
    TIMED_OUT = "timed_out"
    FAILED = "failed"
    SHUTDOWN = "shutdown"


class Kind(enum.Enum):
    """Why an approval stopped waiting."""

    ALLOW = "allow"
    GRANT = "grant"
    DENY = "deny"
    FROZEN = "frozen"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"
    UNDELIVERABLE = "undeliverable"


class Session(Protocol):
    """The broker's view of an agent connection."""

    agent: str

    def try_send(self, text: str, request_id: str | None = None) -> bool:
        """Queue a frame for this connection; False if it is closed (or hopelessly behind).

        ``request_id`` tags a result frame, so a frame that never reaches the socket can be
        put back in the agent's queue.
        """
        ...

    async def drained(self) -> None:
        """Return once every frame queued so far has been written (or the connection closed)."""
        ...


Execute = Callable[[str, dict[str, Any]], Awaitable[Any]]
Describe = Callable[[str, dict[str, Any]], Awaitable[str | None]]
OnGrant = Callable[[str, str, str], Awaitable[None]]
Sessions = Callable[[str], Sequence[Session]]


@attrs.define(eq=False)
class Approval:
    """One pending approval. Kept small: 10,000 of them may wait at once (bench S6).

    Its task waits in its deadline's cancel scope; :meth:`resolve` wakes it by cancelling that
    scope (``wake``), which is only set while the task is parked waiting for a decision, so a
    resolution never interrupts a card being sent.
    """

    row: PendingRow
    session: Session | None
    kind: Kind | None = None
    by: str | None = None
    detail: str = ""
    wake: trio.CancelScope | None = None
    copies: list[str] | None = None  # message refs of the card's copies (/pending)

    def shown_on(self, message_ref: str) -> bool:
        """Whether ``message_ref`` is this approval's card or one of its copies."""
        return message_ref == self.row.message_ref or message_ref in (self.copies or ())

    @property
    def request_id(self) -> str:
        return self.row.request_id

    def resolve(self, kind: Kind, by: str | None = None, detail: str = "") -> bool:
        """First resolution wins; returns False (and changes nothing) for every later one."""
        if self.kind is not None:
            return False
        self.kind, self.by, self.detail = kind, by, detail
        if self.wake is not None:
            self.wake.cancel()
        return True

    def card(self) -> ApprovalCard:
        r = self.row
        return ApprovalCard(
            request_id=r.request_id,
            agent=r.agent,
            tool=r.tool,
            args=r.args,
            signature=r.signature,
            matched=r.matched,
            expires_at=r.expires_at,
            target=r.target,
        )


_TASK_NAME = "agentgate.broker.approval"  # one shared string, not one per task
DRAIN_WAIT = 0.25  # seconds an outcome's bookkeeping waits for the agent's frame to be written
UNDELIVERED = "the approval card could not be delivered (the gateway's log says why)"
COPIES = 8  # copies of one card (/pending) whose buttons count; older ones answer "expired"


def _grammar(kind: Kind) -> str:
    return {
        Kind.ALLOW: "approved",
        Kind.GRANT: "allowed for 1 h",
        Kind.DENY: "denied",
        Kind.FROZEN: "denied (frozen)",
        Kind.TIMEOUT: "timed out",
        Kind.SHUTDOWN: "cancelled (gateway shutting down)",
        Kind.UNDELIVERABLE: "failed (guardian unreachable)",
    }[kind]


class Broker:
    """Owns pending approvals. Run :meth:`run` in a nursery; see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        execute: Execute,
        describe: Describe,
        sessions: Sessions,
        on_grant: OnGrant,
        now: Callable[[], float],
        approval_timeout: float,
        guardian: Guardian | None = None,
    ) -> None:
        self.store = store
        self.guardian = guardian
        self._execute = execute
        self._describe = describe
        self._sessions = sessions
        self._on_grant = on_grant
        self._now = now
        self.approval_timeout = approval_timeout
        self.approvals: dict[str, Approval] = {}
        self._waiting: dict[str, int] = defaultdict(int)  # agent -> undecided approvals
        self._nursery: trio.Nursery | None = None
        self._closing = False  # shutdown began: new approvals resolve at once
        self._idle: trio.Event | None = None  # set when the last approval is done (idle())
        self.executions = 0

    # -- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resume what the store holds (after a restart or a crash), then host approval tasks."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._resume()
            task_status.started()
            await trio.sleep_forever()

    async def _resume(self) -> None:
        assert self._nursery is not None
        now = self._now()
        for row in await self.store.open_pending():
            approval = Approval(row, session=None)
            self.approvals[row.request_id] = approval
            if row.state == "executing":
                # The gateway stopped while this call was executing: its outcome is unknown and
                # it must not run twice. Report it honestly instead.
                approval.resolve(Kind.ALLOW, row.decided_by)
                self._nursery.start_soon(self._finish_unknown, approval, name=_TASK_NAME)
                continue
            self._waiting[row.agent] += 1
            if row.expires_at <= now:
                approval.resolve(Kind.TIMEOUT, None, "expired while the gateway was down")
            self._nursery.start_soon(self._run_approval, approval, name=_TASK_NAME)
        if self.approvals:
            log.info("resumed %d open approval(s) from the store", len(self.approvals))

    # -- asking -------------------------------------------------------------------------------

    async def ask(
        self,
        session: Session,
        rpc_id: JsonId,
        tool: str,
        args: dict[str, Any],
        signature: str,
        matched: str,
        *,
        max_pending: int,
    ) -> str:
        """Register an ask; the broker answers the agent later. Returns the request_id.

        Raises ``RateLimited`` over the agent's pending limit, ``StoreUnavailable`` if the
        decision cannot be recorded (nothing is then shown to the guardian or executed).
        """
        agent = session.agent
        # Atomic: no await between the check and the increment.
        if self._waiting[agent] >= max_pending:
            raise RateLimited(
                f"too many pending approvals for agent {agent} (limit {max_pending})",
                data={"signature": signature},
            )
        if self._nursery is None:
            raise GatewayShuttingDown()
        self._waiting[agent] += 1
        # A shared string for the tool (a small fixed set). What matched is shared by the caller
        # when it is a rule's own text; the agent's strings are never interned: interned
        # strings can outlive their use (immortal on Python 3.12).
        tool = sys.intern(tool)
        try:
            request_id = str(uuid.uuid4())
            now = self._now()
            row = PendingRow(
                request_id=request_id,
                agent=agent,
                rpc_id=rpc_id,
                tool=tool,
                args=args,
                signature=signature,
                matched=matched,
                target=None,
                message_ref=None,
                created_at=now,
                expires_at=now + self.approval_timeout,
                state="pending",
            )
            entry = AuditEntry(
                time=now,
                agent=agent,
                request_id=request_id,
                tool=tool,
                args=args,
                signature=signature,
                decision="ask",
                matched=matched,
            )
            await self.store.add_pending(entry, row)
        except BaseException:
            self._waiting[agent] -= 1
            raise
        approval = Approval(row, session)
        self.approvals[request_id] = approval
        if self._closing:  # shutdown began while this ask was being recorded
            approval.resolve(Kind.SHUTDOWN, None, "gateway shutting down")
        self._nursery.start_soon(self._run_approval, approval, name=_TASK_NAME)
        session.try_send(
            encode_notification(
                "approval_pending",
                {"rpc_id": rpc_id, "request_id": request_id, "expires_at": row.expires_at},
            )
        )
        return request_id

    # -- deciding -----------------------------------------------------------------------------

    def misplaced(self, request_id: str, message_ref: str) -> bool:
        """Whether a press on ``message_ref`` names an approval whose card that is not."""
        approval = self.approvals.get(request_id)
        return approval is not None and not approval.shown_on(message_ref)

    def add_copy(self, request_id: str, message_ref: str) -> None:
        """A copy of the approval's card was sent: its buttons count, it shows the outcome."""
        approval = self.approvals.get(request_id)
        if approval is not None and approval.kind is None:
            approval.copies = [*(approval.copies or ()), message_ref][-COPIES:]

    async def decide(self, request_id: str, action: Action, by: str) -> str:
        """A guardian's decision; returns the text to answer the button press with.

        The caller has checked that the press was on this approval's card (:meth:`misplaced`).
        """
        approval = self.approvals.get(request_id)
        if approval is None:
            return "expired or unknown approval"
        if approval.kind is not None:
            return f"expired: already {_grammar(approval.kind)}"
        if self._now() >= approval.row.expires_at:
            approval.resolve(Kind.TIMEOUT)
            return "expired: the approval timed out"
        if action is Action.GRANT and not tools.grantable(approval.row.tool, approval.row.args):
            # The button is not offered: the signature leaves out what the call really does.
            return "not decided: Allow 1 h is not offered for this call; press Allow or Deny"
        kind = {Action.ALLOW: Kind.ALLOW, Action.DENY: Kind.DENY, Action.GRANT: Kind.GRANT}[action]
        approval.resolve(kind, by)
        return _grammar(kind)

    def resolve_all(self, kind: Kind, by: str | None = None, detail: str = "") -> int:
        """Resolve every undecided approval the same way (freeze, shutdown)."""
        count = 0
        for approval in list(self.approvals.values()):
            if approval.resolve(kind, by, detail):
                count += 1
        return count

    async def shutdown(self) -> None:
        """Resolve everything still waiting as ``shutdown`` and let each approval finish."""
        self._closing = True
        self.resolve_all(Kind.SHUTDOWN, None, "gateway shutting down")
        await self.idle()

    async def idle(self) -> None:
        """Return once no approval is in flight (each has delivered and recorded its outcome)."""
        if self.approvals:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()

    def waiting(self, agent: str | None = None) -> int:
        if agent is None:
            return sum(self._waiting.values())
        return self._waiting[agent]

    def pending_cards(self) -> list[PendingCard]:
        return [
            PendingCard(a.card(), a.row.message_ref)
            for a in self.approvals.values()
            if a.kind is None
        ]

    # -- one approval -------------------------------------------------------------------------

    def _deadline(self, expires_at: float) -> float:
        remaining = expires_at - self._now()
        return trio.current_time() + remaining if math.isfinite(remaining) else math.inf

    async def _run_approval(self, approval: Approval) -> None:
        try:
            with trio.CancelScope(deadline=self._deadline(approval.row.expires_at)) as scope:
                if approval.row.message_ref is None and approval.kind is None:
                    await self._show(approval)
                if approval.kind is None:
                    # Park until resolve() or the deadline cancels this scope.
                    approval.wake = scope
                    await trio.sleep_forever()
            approval.wake = None
            approval.resolve(Kind.TIMEOUT)
            self._waiting[approval.row.agent] -= 1
            with trio.CancelScope(shield=True):
                await self._conclude(approval)
        finally:
            approval.wake = None
            self._finished(approval)

    def _finished(self, approval: Approval) -> None:
        self.approvals.pop(approval.request_id, None)
        if self._idle is not None and not self.approvals:
            self._idle.set()
            self._idle = None

    async def _show(self, approval: Approval) -> None:
        row = approval.row
        if self.guardian is None:
            approval.resolve(Kind.UNDELIVERABLE, None, "no guardian is configured")
            return
        target = await self._describe(row.tool, row.args)
        approval.row = row = attrs.evolve(row, target=target)
        try:
            ref = await self.guardian.send_card(approval.card())
        except GuardianUnavailable as exc:
            # The agent hears that, not why: the reason names the Bot API's address.
            log.warning("card for %s undeliverable, the ask fails closed: %s", row.request_id, exc)
            approval.resolve(Kind.UNDELIVERABLE, None, UNDELIVERED)
            return
        except Exception:  # a guardian bug must not leave the approval hanging
            log.exception("guardian failed to send a card")
            approval.resolve(Kind.UNDELIVERABLE, None, UNDELIVERED)
            return
        approval.row = attrs.evolve(row, message_ref=ref)
        try:
            await self.store.set_message_ref(row.request_id, ref, target)
        except ExecutionFailed:
            log.exception("could not record the card of %s", row.request_id)

    async def _conclude(self, approval: Approval) -> None:
        row, kind = approval.row, approval.kind
        assert kind is not None
        result: Any = None
        error: AgentgateError | None = None
        outcome: Outcome
        data = {"request_id": row.request_id, "signature": row.signature}
        if kind in (Kind.ALLOW, Kind.GRANT):
            outcome, result, error = await self._execute_once(approval)
        elif kind is Kind.DENY:
            outcome = Outcome.DENIED
            error = DeniedByGuardian(f"denied by the guardian ({approval.by})", data=data)
        elif kind is Kind.FROZEN:
            outcome = Outcome.DENIED
            error = DeniedByPolicy("frozen by guardian", data=data)
        elif kind is Kind.TIMEOUT:
            outcome = Outcome.TIMED_OUT
            detail = approval.detail or "no decision before the deadline"
            error = ApprovalTimedOut(f"approval timed out: {detail}", data=data)
        elif kind is Kind.SHUTDOWN:
            outcome = Outcome.SHUTDOWN
            error = GatewayShuttingDown(
                "gateway shutting down: the approval was cancelled", data=data
            )
        else:
            outcome = Outcome.FAILED
            detail = approval.detail or "guardian unreachable"
            if not detail.startswith("guardian unreachable"):
                detail = f"guardian unreachable: {detail}"
            error = ExecutionFailed(detail, data=data)
        await self._deliver(approval, outcome, result, error)

    async def _execute_once(self, approval: Approval) -> tuple[Outcome, Any, AgentgateError | None]:
        row = approval.row
        data = {"request_id": row.request_id, "signature": row.signature}
        by = approval.by or "guardian"
        try:
            if not await self.store.begin_execution(row.request_id, by, self._now()):
                return Outcome.FAILED, None, ExecutionFailed("already resolved", data=data)
            if approval.kind is Kind.GRANT:
                await self._on_grant(row.agent, row.signature, by)
        except AgentgateError as exc:
            exc.data.update(data)
            return Outcome.FAILED, None, exc
        try:
            self.executions += 1
            result = await self._execute(row.tool, row.args)
        except AgentgateError as exc:
            exc.data.update(data)
            return Outcome.FAILED, None, exc
        except Exception as exc:
            log.exception("executing %s failed unexpectedly", row.request_id)
            return Outcome.FAILED, None, ExecutionFailed(f"execution failed: {exc}", data=data)
        return Outcome.EXECUTED, result, None

    async def _finish_unknown(self, approval: Approval) -> None:
        row = approval.row
        data = {"request_id": row.request_id, "signature": row.signature}
        error = ExecutionFailed(
            "the gateway stopped while this call was executing; its outcome is unknown and it"
            " was not run again",
            data=data,
        )
        try:
            with trio.CancelScope(shield=True):
                await self._deliver(approval, Outcome.FAILED, None, error)
        finally:
            self._finished(approval)

    async def _deliver(
        self,
        approval: Approval,
        outcome: Outcome,
        result: Any,
        error: AgentgateError | None,
    ) -> None:
        row = approval.row
        entry: dict[str, Any] = {
            "request_id": row.request_id,
            "rpc_id": row.rpc_id,
            "tool": row.tool,
            "signature": row.signature,
            "status": outcome.value,
        }
        if error is None:
            entry["data"] = result
            text = encode_result(
                row.rpc_id, {"status": "executed", "request_id": row.request_id, "data": result}
            )
        else:
            entry["error"] = {"code": error.code, "message": error.message}
            text = encode_error(row.rpc_id, error)
        session = approval.session
        delivered = session is not None and session.try_send(text, row.request_id)
        if session is not None and delivered:
            # The agent's frame goes out first; the outcome's commit and card edit would
            # otherwise compete with its TLS/WebSocket send for the event loop (S5).
            with trio.move_on_after(DRAIN_WAIT):
                await session.drained()
        try:
            await self.store.finish_pending(
                row.request_id,
                outcome.value,
                decided_by=approval.by,
                at=self._now(),
                entry=entry,
                delivered=delivered,
                result=result,
                error=None if error is None else error.message,
            )
        except ExecutionFailed:
            log.exception("could not record the outcome of %s", row.request_id)
        if not delivered:
            await self.announce_queued(row.agent)
        await self._edit_card(approval, outcome, result, error, delivered)

    async def announce_queued(self, agent: str) -> None:
        sessions = self._sessions(agent)
        if not sessions:
            return
        try:
            count = await self.store.queued_count(agent)
        except ExecutionFailed:
            return
        text = encode_notification("results_pending", {"count": count})
        for session in sessions:
            session.try_send(text)

    async def _edit_card(
        self,
        approval: Approval,
        outcome: Outcome,
        result: Any,
        error: AgentgateError | None,
        delivered: bool,
    ) -> None:
        refs = [approval.row.message_ref, *(approval.copies or ())]
        if self.guardian is None or refs[0] is None:
            return
        status = {
            Outcome.EXECUTED: Status.EXECUTED,
            Outcome.DENIED: Status.FROZEN if approval.kind is Kind.FROZEN else Status.DENIED,
            Outcome.TIMED_OUT: Status.TIMED_OUT,
            Outcome.FAILED: Status.FAILED,
            Outcome.SHUTDOWN: Status.SHUTDOWN,
        }[outcome]
        if outcome is Outcome.EXECUTED:
            detail = _summary(result)
        else:
            detail = error.message if error is not None else ""
        if not delivered and outcome in (Outcome.EXECUTED, Outcome.FAILED):
            status, detail = Status.QUEUED, f"{outcome.value}: {detail}"
        update = CardUpdate(status=status, detail=detail, by=approval.by, at=self._now())
        with trio.move_on_after(10):
            for ref in refs:
                try:
                    await self.guardian.update_card(approval.card(), str(ref), update)
                except Exception:
                    log.exception("could not update the card of %s", approval.request_id)


def _summary(result: Any, limit: int = 200) -> str:
    """A one-line summary of a service result for the card."""
    if isinstance(result, list):
        # HA lists every state a call went through (locking, locked): show the last of each.
        last = {
            str(s["entity_id"]): s.get("state")
            for s in result
            if isinstance(s, dict) and "entity_id" in s
        }
        states = [f"{entity}: {state}" for entity, state in last.items()]
        text = ", ".join(states) if states else "no state changed"
    elif isinstance(result, dict) and "entity_id" in result:
        text = f"{result.get('entity_id')}: {result.get('state')}"
    elif isinstance(result, dict) and "message" in result:
        text = str(result["message"])
    else:
        text = "done"
    return text if len(text) <= limit else text[: limit - 1] + "…"
