"""The approval broker: owns every pending approval, from ask to delivered result.

Lifecycle of one approval::

    ask() ── persist (audit + pending row, one commit) ── start a broker task ──┐
                                                                                │
    task: describe the target ── send the card ── wait ─┬─ guardian allow/grant ─┤── execute once
                                                        │   (N votes if it needs │   (snapshot
                                                        │    N guardians)        │    first, if
                                                        ├─ guardian deny ────────┤    undoable)
                                                        ├─ deadline (cancel scope from expires_at)
                                                        ├─ shutdown / freeze ────┤
                                                        └─ card undeliverable ───┘
                                       finish: record the outcome, its result queued ── answer
                                       the asking connection (written: it leaves the queue), or
                                       tell the agent it is queued ── edit the card (once no
                                       other outcome is being told: answers before edits)

The first resolution wins through :meth:`Approval.resolve`, a one-shot value plus a
``trio.Event``; later ones are no-ops and say so. What each resolution means (its outcome, its
card, the agent's error, the press answer) is :data:`agentgate.approvals.MEANINGS`. Approvals
belong to the broker, not to the front door that asked: when the agent goes away the approval
goes on and its result is queued. Execution is gated by the store (``pending`` → ``executing``
happens once), so a decision can never run a call twice, even across a restart. Nothing is told
that the store does not hold: an outcome the store refuses is retried, and told once recorded
(if the gateway stops first, the store still holds the approval open for the next start).

A card that needs several guardians (a rule's ``approvals: N``) counts Allow presses as votes,
one per guardian, kept in the store (:func:`agentgate.approvals.count_vote`): the vote that
completes the quorum is the decision; until then the card is shown again with who allowed it.
"Allow 1 h" and "Always allow" are offered only where one guardian decides and no quota asked;
"Always allow" only once the signature was approved ``suggest_after`` times in 30 days with no
denial (counted from the audit log). An executed undoable call keeps its snapshot
(:mod:`agentgate.undo`) and its card an Undo button.

A planned restart (:meth:`Broker.shutdown`) *suspends* what is still undecided instead of
ending it: the asking door hears -32007 (its result will be queued), the card is edited once to
say the gateway is restarting (without buttons: a press while it is down could not be
answered), and the store keeps the approval pending. The next start resumes it as after a
crash, and edits its card back with its buttons. ``cancel_pending=True`` (decommissioning)
resolves everything as ``shutdown`` instead.

Imports: approvals, store, guardian (the protocol), tools (which calls a grant may cover),
undo (snapshots), errors, protocol (ids). Results reach front doors through their
:class:`~agentgate.approvals.ReplyHandle`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

import attrs
import trio

from agentgate import tools
from agentgate.approvals import (
    EXECUTION_CARDS,
    MEANINGS,
    VOTE_ANSWERS,
    Decision,
    Outcome,
    ReplyHandle,
    Result,
    State,
    Vote,
    count_vote,
    decision_for,
)
from agentgate.errors import (
    AgentgateError,
    ExecutionFailed,
    GatewayShuttingDown,
    OutcomeUnknown,
    RateLimited,
)
from agentgate.guardian import (
    Action,
    ApprovalCard,
    CardUpdate,
    Guardian,
    GuardianUnavailable,
    PendingCard,
    PressAnswer,
    Status,
)
from agentgate.protocol import JsonId
from agentgate.store import AuditEntry, PendingRow, Store
from agentgate.undo import Snapshot, Undo

log = logging.getLogger(__name__)

Execute = Callable[[str, dict[str, Any]], Awaitable[Any]]
Describe = Callable[[str, dict[str, Any]], Awaitable[str | None]]
ReadBack = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]
OnGrant = Callable[[str, str, str, bool], Awaitable[float | None]]
"""Remembers an "Allow 1 h" or, with the last argument true, an "Always allow" (agent,
signature, by, permanent); returns when the grant ends (infinite: never), if it says."""
Sessions = Callable[[str], Sequence[ReplyHandle]]
Recheck = Callable[[PendingRow], tuple[Decision, str | None, str] | None]
"""Is an approval found pending at start still asked? None, or how to end it (decision, by,
detail)."""


@attrs.define(eq=False)
class Approval:
    """One pending approval. Kept small: 10,000 of them may wait at once.

    Its task waits in its deadline's cancel scope; :meth:`resolve` wakes it by cancelling that
    scope (``wake``), which is only set while the task is parked waiting for a decision, so a
    resolution never interrupts a card being sent.
    """

    row: PendingRow
    session: ReplyHandle | None
    kind: Decision | None = None
    by: str | None = None
    detail: str = ""
    wake: trio.CancelScope | None = None
    copies: list[str] | None = None  # message refs of the card's copies (/pending)
    suspended: bool = False  # a planned restart: stays pending in the store, undecided
    restore: bool = False  # its card says "restarting": edit it back with its buttons
    restoring: trio.Event | None = None  # set once the card's restore is done (or given up)
    voters: tuple[str, ...] = ()  # who pressed Allow so far (two-person approval), by identity
    votes: tuple[str, ...] = ()  # ... and by name, as the card shows them
    always: int | None = None  # "Always allow" offered: the signature's approvals so far

    def shown_on(self, message_ref: str) -> bool:
        """Whether ``message_ref`` is this approval's card or one of its copies."""
        return message_ref == self.row.message_ref or message_ref in (self.copies or ())

    @property
    def request_id(self) -> str:
        return self.row.request_id

    def resolve(self, kind: Decision, by: str | None = None, detail: str = "") -> bool:
        """First resolution wins; returns False (and changes nothing) for every later one, and
        for a suspended approval (it is decided after the restart)."""
        if self.kind is not None or self.suspended:
            return False
        self.kind, self.by, self.detail = kind, by, detail
        if self.wake is not None:
            self.wake.cancel()
        return True

    def suspend(self) -> bool:
        """Leave it undecided for the next start (a planned restart); False if decided."""
        if self.kind is not None or self.suspended:
            return False
        self.suspended = True
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
            via=r.via,
            quorum=r.quorum,
            votes=self.votes,
            approved_before=self.always,
            quota=r.quota,
        )

    @property
    def grants_offered(self) -> bool:
        """Whether "Allow 1 h" (and maybe "Always allow") may decide this approval: one
        guardian decides, no quota asked it, and the signature says what runs."""
        r = self.row
        return r.quorum <= 1 and r.quota is None and tools.grantable(r.tool, r.args)


_TASK_NAME: Final = "agentgate.broker.approval"  # one shared string, not one per task
# Seconds an outcome's card edit waits for the agent's frame to be written: it would otherwise
# compete with that frame's send for the event loop.
DRAIN_WAIT: Final = 0.25
# Seconds an outcome's card edit waits while other approvals' outcomes are still being recorded
# and told: when many approvals end together (their deadlines), the edits would take the event
# loop from the agents' answers. Bounded: a stuck outcome (a failing store) does not hold the
# cards for longer.
TELL_FIRST_WAIT: Final = 10.0
# Seconds between attempts to record an outcome the store refused (doubling up to the max).
RECORD_RETRY: Final = 1.0
RECORD_RETRY_MAX: Final = 30.0
# A press on an approval that is over, by its recorded outcome: a call that ran (or may have)
# was approved, as the press on a card still in memory would say.
STALE_ANSWERS: Final[Mapping[Outcome, str]] = {
    Outcome.EXECUTED: "approved",
    Outcome.UNKNOWN: "approved",
    Outcome.DENIED: "denied",
    Outcome.TIMED_OUT: "timed out",
    Outcome.SHUTDOWN: "cancelled (gateway shutting down)",
}
UNDELIVERED = "the approval card could not be delivered (the gateway's log says why)"
UNRECORDED: Final = "its outcome could not be recorded (a store error): the next start resumes it"
DEFAULT_DETAIL: Final = {
    Decision.TIMEOUT: "no decision before the deadline",
    Decision.UNDELIVERABLE: UNDELIVERED,
}
CARD_WAIT: Final = 15.0  # seconds a press may wait for its card's send to return (its budget)
RESTORE_WAIT: Final = 10.0  # seconds an outcome's card edit waits for the card's restore
# Set by a planned restart: the next start edits the pending cards back with their buttons.
RESTARTING_KEY: Final = "restarting_since"
RESTARTING_ANSWER: Final = "not decided: the gateway is restarting; press again once it is back"
COPIES = 8  # copies of one card (/pending) whose buttons count; older ones answer "expired"
SUGGEST_WINDOW: Final = 30 * 86400.0  # seconds of approvals that can suggest "Always allow"


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
        read_back: ReadBack | None = None,
        recheck: Recheck | None = None,
        undo: Undo | None = None,
        suggest_after: int = 0,
    ) -> None:
        self.store = store
        self.guardian = guardian
        self.undo = undo
        self.suggest_after = suggest_after  # 0: "Always allow" is never offered
        self._execute = execute
        self._describe = describe
        self._read_back = read_back
        self._recheck: Recheck = recheck or (lambda row: None)
        self._sessions = sessions
        self._on_grant = on_grant
        self._now = now
        self.approval_timeout = approval_timeout
        self.approvals: dict[str, Approval] = {}
        self._waiting: dict[str, int] = defaultdict(int)  # agent -> undecided approvals
        self._nursery: trio.Nursery | None = None
        self._closing = False  # shutdown began: new approvals resolve (or suspend) at once
        self._suspending = False  # a planned restart: undecided approvals stay pending
        self._idle: trio.Event | None = None  # set when the last approval is done (idle())
        self._sending: dict[str, trio.Event] = {}  # request id -> set once its card is sent
        self._stopping = trio.Event()  # set when the gateway stops: unrecorded outcomes wait
        self._watched: dict[str, trio.Event] = {}  # request id -> set once it is finished
        self._telling = 0  # outcomes being recorded and told now (their card edits wait)
        self._all_told = trio.Event()  # set whenever _telling is 0
        self._all_told.set()
        self.executions = 0

    # -- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resume what the store holds (after a restart or a crash), then host approval tasks."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._resume()
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:  # cancelled: outcomes still waiting to be recorded give up (_record)
                self._stopping.set()

    async def _resume(self) -> None:
        assert self._nursery is not None
        now = self._now()
        restarted = await self._planned_restart()
        for row in await self.store.open_pending():
            approval = Approval(row, session=None)
            self.approvals[row.request_id] = approval
            if row.state == State.EXECUTING:
                # The gateway stopped while this call was executing: its outcome is unknown and
                # it must not run twice. Report it honestly instead.
                approval.resolve(Decision.ALLOW, row.decided_by)
                self._nursery.start_soon(self._finish_unknown, approval, name=_TASK_NAME)
                continue
            self._waiting[row.agent] += 1
            if row.quorum > 1:
                votes = await self.store.votes(row.request_id)
                approval.voters = tuple(voter for voter, _ in votes)
                approval.votes = tuple(name for _, name in votes)
            if row.expires_at <= now:
                approval.resolve(Decision.TIMEOUT, None, "expired while the gateway was down")
            elif (revoked := self._recheck(row)) is not None:
                # A restart is how an operator tightens the policy, removes an agent or keeps
                # a freeze: an ask that would not be asked now is not offered again.
                approval.resolve(*revoked)
            elif restarted and row.message_ref is not None:
                approval.restore, approval.restoring = True, trio.Event()
            self._nursery.start_soon(self._run_approval, approval, name=_TASK_NAME)
        if self.approvals:
            log.info("resumed %d open approval(s) from the store", len(self.approvals))

    async def _planned_restart(self) -> bool:
        """Whether the last stop was a planned restart (its cards say so); forgets it."""
        try:
            since = await self.store.get_setting(RESTARTING_KEY)
            if since:
                await self.store.set_setting(RESTARTING_KEY, "")
        except ExecutionFailed:
            log.exception("could not read whether the last stop was a planned restart")
            return False
        return bool(since)

    # -- asking -------------------------------------------------------------------------------

    async def ask(
        self,
        reply: ReplyHandle,
        reply_to: JsonId,
        tool: str,
        args: dict[str, Any],
        signature: str,
        matched: str,
        *,
        max_pending: int,
        quorum: int = 1,
        quota: str | None = None,
    ) -> str:
        """Register an ask; its result reaches ``reply`` later. Returns the request_id.

        ``reply_to`` is the front door's handle on the request, echoed with the result.
        ``quorum``: guardians who must allow it; ``quota``: the quota whose use asked it
        (no grant is offered then). Raises
        ``RateLimited`` over the agent's pending limit, ``StoreUnavailable`` if the decision
        cannot be recorded (nothing is then shown to the guardian or executed).
        """
        agent = reply.agent
        # Atomic: no await between the check and the increment.
        if self._waiting[agent] >= max_pending:
            raise RateLimited(
                f"too many pending approvals for agent {agent} (limit {max_pending})",
                data={"signature": signature},
            )
        if self._nursery is None:
            raise GatewayShuttingDown()
        self._waiting[agent] += 1
        # A shared string for the tool (a small fixed set); the agent's strings are never
        # interned: interned strings can outlive their use (immortal on Python 3.12).
        tool = sys.intern(tool)
        try:
            request_id = str(uuid.uuid4())
            now = self._now()
            row = PendingRow(
                request_id=request_id,
                agent=agent,
                rpc_id=reply_to,
                tool=tool,
                args=args,
                signature=signature,
                matched=matched,
                target=None,
                message_ref=None,
                created_at=now,
                expires_at=now + self.approval_timeout,
                state=State.PENDING,
                via=reply.via,
                quorum=quorum,
                quota=quota,
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
                via=reply.via,
            )
            await self.store.add_pending(entry, row)
        except BaseException:
            self._waiting[agent] -= 1
            raise
        approval = Approval(row, reply)
        self.approvals[request_id] = approval
        if self._suspending:  # a planned restart began while this ask was being recorded
            approval.suspend()
        elif self._closing:  # shutdown began while this ask was being recorded
            approval.resolve(Decision.SHUTDOWN, None, "gateway shutting down")
        self._nursery.start_soon(self._run_approval, approval, name=_TASK_NAME)
        reply.approval_pending(request_id, reply_to, row.expires_at)
        return request_id

    # -- deciding -----------------------------------------------------------------------------

    async def card_known(self, request_id: str) -> None:
        """Return once the approval's card ref is known (its card is not being sent now)."""
        sending = self._sending.get(request_id)
        if sending is not None:
            with trio.move_on_after(CARD_WAIT):
                await sending.wait()

    def misplaced(self, request_id: str, message_ref: str) -> bool:
        """Whether a press on ``message_ref`` names an approval whose card that is not."""
        approval = self.approvals.get(request_id)
        return approval is not None and not approval.shown_on(message_ref)

    def add_copy(self, request_id: str, message_ref: str) -> None:
        """A copy of the approval's card was sent: its buttons count, it shows the outcome."""
        approval = self.approvals.get(request_id)
        if approval is not None and approval.kind is None:
            approval.copies = [*(approval.copies or ()), message_ref][-COPIES:]

    async def decide(
        self, request_id: str, action: Action, by: str, *, voter: str | None = None
    ) -> PressAnswer:
        """A guardian's decision, and how to answer the button press.

        The caller has checked that the press was on this approval's card (:meth:`misplaced`).
        ``voter`` is the guardian's identity for two-person approval (default: ``by``).
        """
        approval = self.approvals.get(request_id)
        if approval is not None and approval.kind is not None:
            return PressAnswer(f"expired: already {MEANINGS[approval.kind].answer}")
        if self._suspending:  # a planned restart: it is decided once the gateway is back
            return PressAnswer(RESTARTING_ANSWER)
        if approval is None:
            return PressAnswer(await self._stale_answer(request_id))
        if self._now() >= approval.row.expires_at:
            approval.resolve(Decision.TIMEOUT)
            return PressAnswer("expired: the approval timed out")
        if action in (Action.GRANT, Action.ALWAYS):
            refusal = await self._grant_refusal(approval, action)
            if refusal is not None:
                return PressAnswer(refusal)
            if approval.kind is not None:  # decided while the history was read
                return PressAnswer(f"expired: already {MEANINGS[approval.kind].answer}")
        if action is Action.ALLOW and approval.row.quorum > 1:
            return await self._vote(approval, by, voter or by)
        decision = decision_for(action)
        approval.resolve(decision, by)
        return PressAnswer(MEANINGS[decision].answer, decided=True)

    async def _stale_answer(self, request_id: str) -> str:
        """How to answer a press on an approval that is over: what the store recorded."""
        try:
            row = await self.store.pending_row(request_id)
        except ExecutionFailed:
            row = None
        if row is None or row.outcome is None:
            return "expired or unknown approval"
        return f"expired: already {STALE_ANSWERS.get(row.outcome, row.outcome.value)}"

    async def _grant_refusal(self, approval: Approval, action: Action) -> str | None:
        """Why "Allow 1 h" or "Always allow" may not decide this approval (their buttons are
        not on its card), or None."""
        label = "Allow 1 h" if action is Action.GRANT else "Always allow"
        row = approval.row
        if row.quorum > 1:
            return (
                f"not decided: {label} is not offered where {row.quorum} guardians must allow;"
                " press Allow or Deny"
            )
        if row.quota is not None:
            return (
                f"not decided: {label} is not offered when a quota asked ({row.quota});"
                " press Allow or Deny"
            )
        if not tools.grantable(row.tool, row.args):
            # The signature leaves out what the call really does.
            return f"not decided: {label} is not offered for this call; press Allow or Deny"
        if action is Action.ALWAYS and await self._approved_before(row) is None:
            return (
                "not decided: Always allow is offered only once this request was approved"
                f" {self.suggest_after} times in 30 days and never denied; press Allow or Deny"
            )
        return None

    async def _approved_before(self, row: PendingRow) -> int | None:
        """How often ``row``'s signature was approved for its agent in the last 30 days, if
        that makes "Always allow" an offer (``suggest_after`` times or more, no denial)."""
        if self.suggest_after <= 0:
            return None
        try:
            history = await self.store.history(
                row.agent, row.signature, self._now() - SUGGEST_WINDOW
            )
        except ExecutionFailed:
            log.exception("could not count the approvals of %s", row.signature)
            return None
        if history.denied or history.approved < self.suggest_after:
            return None
        return history.approved

    async def _vote(self, approval: Approval, by: str, voter: str) -> PressAnswer:
        """One guardian's Allow on a card that needs several (see the module docstring)."""
        row = approval.row
        need = row.quorum
        vote, _ = count_vote(need, approval.voters, voter)
        if vote is Vote.REPEATED:
            answer = VOTE_ANSWERS[vote].format(have=len(approval.voters), need=need)
            return PressAnswer(answer)
        now = self._now()
        try:
            names = await self.store.add_vote(row.request_id, voter, by, now)
            await self.store.audit(
                AuditEntry.guardian(
                    now,
                    "vote",
                    f"{row.agent}: {row.signature} (allow {len(names)} of {need})",
                    by,
                    request_id=row.request_id,
                )
            )
        except ExecutionFailed as exc:
            return PressAnswer(f"not counted: {exc.message}")
        if approval.kind is not None:  # decided (denied, timed out) while the vote was written
            return PressAnswer(f"expired: already {MEANINGS[approval.kind].answer}")
        if voter not in approval.voters:
            approval.voters = (*approval.voters, voter)
        approval.votes = names
        if len(names) >= need:
            approval.resolve(Decision.ALLOW, " + ".join(names))
            answer = VOTE_ANSWERS[Vote.DECIDES].format(have=len(names), need=need)
            return PressAnswer(answer, decided=True)
        self._show_votes(approval)
        return PressAnswer(VOTE_ANSWERS[Vote.COUNTED].format(have=len(names), need=need))

    def _show_votes(self, approval: Approval) -> None:
        """The card (and its copies) shown again, with who allowed it so far; in the
        background: the press is answered at once."""
        guardian = self.guardian
        refs = [r for r in (approval.row.message_ref, *(approval.copies or ())) if r]
        if guardian is None or self._nursery is None or not refs:
            return

        async def show() -> None:
            with trio.move_on_after(10):
                for ref in refs:
                    if approval.kind is not None:
                        return  # decided meanwhile: its outcome edits the card
                    try:
                        await guardian.restore_card(approval.card(), ref)
                    except Exception:
                        log.exception("could not show the votes of %s", approval.request_id)

        self._nursery.start_soon(show, name=_TASK_NAME)

    def resolve_all(self, kind: Decision, by: str | None = None, detail: str = "") -> int:
        """Resolve every undecided approval the same way (freeze, shutdown)."""
        count = 0
        for approval in list(self.approvals.values()):
            if approval.resolve(kind, by, detail):
                count += 1
        return count

    async def shutdown(self, *, cancel_pending: bool = False) -> None:
        """Stop: suspend every undecided approval for the next start (a planned restart), or
        with ``cancel_pending`` resolve them as ``shutdown``; let each approval finish either
        way (a call already executing completes and records its outcome)."""
        self._closing = True
        self._stopping.set()
        if cancel_pending:
            self.resolve_all(Decision.SHUTDOWN, None, "gateway shutting down")
        else:
            self._suspending = True
            try:  # first: whatever happens next, the next start restores the cards
                await self.store.set_setting(RESTARTING_KEY, str(time.time()))
            except ExecutionFailed:
                log.exception("could not record the planned restart")
            suspended = sum(a.suspend() for a in list(self.approvals.values()))
            if suspended:
                log.info("%d approval(s) stay pending for the next start", suspended)
        await self.idle()

    async def idle(self) -> None:
        """Return once no approval is in flight (each has recorded and told its outcome)."""
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
            if approval.restore:
                self._restore_card(approval)
            with trio.CancelScope(deadline=self._deadline(approval.row.expires_at)) as scope:
                undecided = approval.kind is None and not approval.suspended
                if approval.row.message_ref is None and undecided:  # else shown, or later
                    await self._show(approval)
                if approval.kind is None and not approval.suspended:
                    # Park until resolve(), suspend() or the deadline cancels this scope.
                    approval.wake = scope
                    await trio.sleep_forever()
            approval.wake = None
            if approval.suspended:
                self._waiting[approval.row.agent] -= 1
                with trio.CancelScope(shield=True):
                    await self._suspended(approval)
                return
            approval.resolve(Decision.TIMEOUT)
            self._waiting[approval.row.agent] -= 1
            with trio.CancelScope(shield=True):
                await self._conclude(approval)
        finally:
            approval.wake = None
            self._finished(approval)

    async def finished(self, request_id: str) -> None:
        """Return once the approval ``request_id`` is over (at once if it is not open): its
        outcome is then in the store. Made for front doors that wait on a request by id."""
        if request_id not in self.approvals:
            return
        event = self._watched.get(request_id)
        if event is None:
            event = self._watched[request_id] = trio.Event()
        await event.wait()

    def _finished(self, approval: Approval) -> None:
        self.approvals.pop(approval.request_id, None)
        watched = self._watched.pop(approval.request_id, None)
        if watched is not None:
            watched.set()
        if self._idle is not None and not self.approvals:
            self._idle.set()
            self._idle = None

    async def _show(self, approval: Approval) -> None:
        row = approval.row
        if self.guardian is None:
            approval.resolve(Decision.UNDELIVERABLE, None, "no guardian is configured")
            return
        if approval.grants_offered:
            approval.always = await self._approved_before(row)
        target = await self._describe(row.tool, row.args)
        approval.row = row = attrs.evolve(row, target=target)
        # A press can come back before send_card does (the Bot API already has the message):
        # presses for this approval wait until its card's ref is known (card_known).
        sending = self._sending[row.request_id] = trio.Event()
        try:
            ref = await self.guardian.send_card(approval.card())
        except GuardianUnavailable as exc:
            # The agent hears that, not why: the reason names the Bot API's address.
            log.warning("card for %s undeliverable, the ask fails closed: %s", row.request_id, exc)
            approval.resolve(Decision.UNDELIVERABLE, None, UNDELIVERED)
            return
        except Exception:  # a guardian bug must not leave the approval hanging
            log.exception("guardian failed to send a card")
            approval.resolve(Decision.UNDELIVERABLE, None, UNDELIVERED)
            return
        else:
            approval.row = attrs.evolve(row, message_ref=ref)
        finally:
            del self._sending[row.request_id]
            sending.set()
        try:
            await self.store.set_message_ref(row.request_id, ref, target, at=self._now())
        except ExecutionFailed:
            log.exception("could not record the card of %s", row.request_id)

    async def _suspended(self, approval: Approval, detail: str | None = None) -> None:
        """A planned restart: the asking door hears -32007 (the result will be queued), and the
        card says the gateway is restarting (``detail``: why it is still open). The store keeps
        the approval pending."""
        row = approval.row
        data = {
            "request_id": row.request_id,
            "signature": row.signature,
            "pending": True,
            "expires_at": row.expires_at,
        }
        error = GatewayShuttingDown(
            "gateway restarting: the approval stays open until its deadline and its result will"
            " be queued for you (get_pending_results after reconnecting)",
            data=data,
        )
        if approval.session is not None:
            # A reply to this request, not its outcome (that is queued later; nothing is stored).
            approval.session.deliver(
                Result(
                    row.request_id,
                    row.rpc_id,
                    row.tool,
                    row.signature,
                    Outcome.SHUTDOWN,
                    None,
                    error,
                )
            )
        if self.guardian is None or row.message_ref is None:
            return
        update = CardUpdate(
            status=Status.RESTARTING,
            detail=detail or "open until its deadline; its buttons come back when the gateway does",
            at=self._now(),
        )
        with trio.move_on_after(10):
            try:
                await self.guardian.update_card(approval.card(), row.message_ref, update)
            except Exception:
                log.exception("could not update the card of %s", row.request_id)

    def _restore_card(self, approval: Approval) -> None:
        """After a planned restart: the card gets its buttons back, once the guardian can."""
        assert self._nursery is not None
        if approval.restoring is None:
            approval.restoring = trio.Event()
        done = approval.restoring

        async def restore() -> None:
            ref = approval.row.message_ref
            try:
                if approval.grants_offered:
                    approval.always = await self._approved_before(approval.row)
                with trio.move_on_after(max(0.0, approval.row.expires_at - self._now())):
                    if self.guardian is not None and ref is not None and approval.kind is None:
                        await self.guardian.restore_card(approval.card(), ref)
            except Exception:
                log.exception("could not restore the card of %s", approval.request_id)
            finally:
                done.set()

        self._nursery.start_soon(restore, name=_TASK_NAME)

    async def _conclude(self, approval: Approval) -> None:
        row, kind = approval.row, approval.kind
        assert kind is not None  # _run_approval resolved it before concluding
        meaning = MEANINGS[kind]
        grant_until = None
        snapshot = None
        if meaning.executes:
            outcome, result, error, grant_until, snapshot = await self._execute_once(approval)
        else:
            assert meaning.outcome is not None
            data = {"request_id": row.request_id, "signature": row.signature}
            detail = approval.detail or DEFAULT_DETAIL.get(kind, "")
            detail = detail.removeprefix("guardian unreachable: ")  # the message says it once
            outcome, result = meaning.outcome, None
            error = meaning.error_for(by=approval.by, detail=detail, data=data)
        await self._deliver(approval, outcome, result, error, grant_until, snapshot)

    async def _execute_once(
        self, approval: Approval
    ) -> tuple[Outcome, Any, AgentgateError | None, float | None, Snapshot | None]:
        """Run the call once; also says until when an "Allow 1 h" it began holds, and what
        an Undo would put back."""
        row = approval.row
        data = {"request_id": row.request_id, "signature": row.signature}
        by = approval.by or "guardian"
        until = None
        try:
            snapshot, began = await self._begin_execution(approval, by)
            if not began:
                failed = ExecutionFailed("already resolved", data=data)
                return Outcome.FAILED, None, failed, None, None
            if approval.kind in (Decision.GRANT, Decision.ALWAYS):
                permanent = approval.kind is Decision.ALWAYS
                until = await self._on_grant(row.agent, row.signature, by, permanent)
        except AgentgateError as exc:
            exc.data.update(data)
            return Outcome.FAILED, None, exc, None, None
        try:
            self.executions += 1
            result = await self._execute(row.tool, row.args)
        except OutcomeUnknown as exc:  # it may have run: never retried, reported as such
            exc.data.update(data)
            log.warning("%s (%s, request %s)", exc.message, row.signature, row.request_id)
            return Outcome.UNKNOWN, None, exc, until, None
        except AgentgateError as exc:
            exc.data.update(data)
            return Outcome.FAILED, None, exc, until, None
        except Exception as exc:
            log.exception("executing %s failed unexpectedly", row.request_id)
            failed = ExecutionFailed(f"execution failed: {exc}", data=data)
            return Outcome.FAILED, None, failed, until, None
        return Outcome.EXECUTED, result, None, until, snapshot

    async def _begin_execution(self, approval: Approval, by: str) -> tuple[Snapshot | None, bool]:
        """Record that the call executes (``pending`` → ``executing``, fsync'd), then read what
        an Undo would put back (one read per entity; it changes nothing). The snapshot, and
        whether the call may run; raises the store's :class:`AgentgateError` when it could not
        record it. The read waits for the row: a call whose row failed sends nothing to the
        service, reads included."""
        row = approval.row
        if not await self.store.begin_execution(row.request_id, by, self._now()):
            return None, False
        if self.undo is None:
            return None, True
        try:
            return await self.undo.before(row.tool, row.args), True
        except Exception:  # no Undo for this call; the call itself runs all the same
            log.exception("could not read the state before %s", row.request_id)
            return None, True

    async def _finish_unknown(self, approval: Approval) -> None:
        row = approval.row
        data = {"request_id": row.request_id, "signature": row.signature}
        error = OutcomeUnknown(
            "outcome unknown: the gateway stopped while this call was executing; it may have"
            " run and was not run again",
            data=data,
        )
        log.warning("%s (%s, request %s)", error.message, row.signature, row.request_id)
        try:
            with trio.CancelScope(shield=True):
                if self._read_back is not None:
                    after = await self._read_back(row.tool, row.args)
                    if after is not None:
                        error.data["state_after"] = after
                await self._deliver(approval, Outcome.UNKNOWN, None, error)
        finally:
            self._finished(approval)

    async def _deliver(
        self,
        approval: Approval,
        outcome: Outcome,
        result: Any,
        error: AgentgateError | None,
        grant_until: float | None = None,
        snapshot: Snapshot | None = None,
    ) -> None:
        row = approval.row
        late = Result(row.request_id, row.rpc_id, row.tool, row.signature, outcome, result, error)
        # Recorded first, queued (delivered=0), then told: a WebSocket connection takes it out
        # of the queue once its writer wrote the frame (confirms_delivery), so a crash or a drop
        # anywhere from here leaves it queued, and nothing is told that the store does not hold.
        telling = self.store.telling  # listings skip it until its delivery is recorded
        telling.add(row.request_id)
        told = self._tell_begins()
        try:
            if not await self._record(approval, late, outcome, result, error, refused=told):
                # The gateway stops before the outcome could be recorded: nothing was told, and
                # the store still holds the approval (pending, or executing: unknown) for the
                # next start.
                self.store.release([row.request_id])
                await self._suspended(approval, UNRECORDED)
                return
            session = approval.session
            delivered = session is not None and session.deliver(late)
            if session is None or not delivered:
                self.store.release([row.request_id])
            elif not session.confirms_delivery:
                self.store.mark_delivered([row.request_id])  # handed over is delivered
            if session is not None and delivered:
                # The agent's frame goes out first; the card edit would otherwise compete with
                # its send for the event loop.
                with trio.move_on_after(DRAIN_WAIT):
                    await session.drained()
        finally:
            told()
        at = self._now()  # the card says when it ended, not when its edit got its turn
        undo_until = await self._remember_undo(approval, snapshot, result)
        if not delivered:
            await self.announce_queued(row.agent)
        await self._tell_first()
        await self._edit_card(
            approval, outcome, result, error, delivered, grant_until, undo_until, at=at
        )

    def _tell_begins(self) -> Callable[[], None]:
        """Count an outcome as being told until the returned callable is called (once)."""
        self._telling += 1
        if self._all_told.is_set():
            self._all_told = trio.Event()
        done = False

        def told() -> None:
            nonlocal done
            if done:
                return
            done = True
            self._telling -= 1
            if not self._telling:
                self._all_told.set()

        return told

    async def _tell_first(self) -> None:
        """Wait (at most :data:`TELL_FIRST_WAIT`) until no other outcome is being told: the
        agents' answers go out before the cards' edits."""
        if not self._all_told.is_set():
            with trio.move_on_after(TELL_FIRST_WAIT):
                await self._all_told.wait()

    async def _record(
        self,
        approval: Approval,
        late: Result,
        outcome: Outcome,
        result: Any,
        error: AgentgateError | None,
        *,
        refused: Callable[[], None] = lambda: None,
    ) -> bool:
        """Commit the outcome with its result queued; retried while the store refuses (a full
        or failing disk), until it is written (True) or the gateway stops (False). ``refused``
        is called when the store first refuses."""
        row = approval.row
        delay = RECORD_RETRY
        while True:
            try:
                await self.store.finish_pending(
                    row.request_id,
                    outcome,
                    decided_by=approval.by,
                    at=self._now(),
                    entry=late.queued(),
                    delivered=False,
                    result=result,
                    error=None if error is None else error.message,
                )
                return True
            except ExecutionFailed as exc:
                refused()
                if delay == RECORD_RETRY:
                    log.exception("could not record the outcome of %s", row.request_id)
                else:
                    log.warning("still cannot record the outcome of %s: %s", row.request_id, exc)
            if self._stopping.is_set():
                log.warning(
                    "the outcome of %s was not recorded or told: the next start resumes it",
                    row.request_id,
                )
                return False
            with trio.move_on_after(delay):
                await self._stopping.wait()
            delay = min(2 * delay, RECORD_RETRY_MAX)

    async def _remember_undo(
        self, approval: Approval, snapshot: Snapshot | None, result: Any
    ) -> float | None:
        """Keep what an Undo would put back; until when it is offered (None: it is not)."""
        if snapshot is None or self.undo is None:
            return None
        row = approval.row
        refs = tuple(r for r in (row.message_ref, *(approval.copies or ())) if r)
        undo_row = self.undo.record(
            snapshot,
            result,
            request_id=row.request_id,
            agent=row.agent,
            tool=row.tool,
            args=row.args,
            signature=row.signature,
            decided_by=approval.by,
            message_refs=refs[1:],
        )
        try:
            await self.store.add_undo(undo_row)
        except ExecutionFailed:
            log.exception("could not record the undo snapshot of %s", row.request_id)
            return None
        return undo_row.expires_at

    async def announce_queued(self, agent: str) -> None:
        sessions = self._sessions(agent)
        if not sessions:
            return
        try:
            count = await self.store.queued_count(agent)
        except ExecutionFailed:
            return
        for session in sessions:
            session.results_waiting(count)

    async def _edit_card(
        self,
        approval: Approval,
        outcome: Outcome,
        result: Any,
        error: AgentgateError | None,
        delivered: bool,
        grant_until: float | None = None,
        undo_until: float | None = None,
        *,
        at: float | None = None,
    ) -> None:
        refs = [approval.row.message_ref, *(approval.copies or ())]
        if self.guardian is None or refs[0] is None:
            return
        if approval.restoring is not None:  # its buttons must not come back after the outcome
            with trio.move_on_after(RESTORE_WAIT):
                await approval.restoring.wait()
        assert approval.kind is not None
        status = MEANINGS[approval.kind].card or EXECUTION_CARDS[outcome]
        if outcome is Outcome.EXECUTED:
            detail = _summary(result)
        elif outcome is Outcome.UNKNOWN and error is not None:
            detail = _unknown_summary(error)
        else:
            detail = error.message if error is not None else ""
        if not delivered and outcome in (Outcome.EXECUTED, Outcome.FAILED, Outcome.UNKNOWN):
            status, detail = Status.QUEUED, f"{outcome.value}: {detail}"
        update = CardUpdate(
            status=status,
            detail=detail,
            by=approval.by,
            at=self._now() if at is None else at,
            grant_until=grant_until,
            undo_until=undo_until,
        )
        card = approval.card()
        with trio.move_on_after(10):
            if outcome is Outcome.EXECUTED and card.target is not None:
                # The card read the target before the call ("now: off"): say what it is now.
                target = await self._describe(card.tool, card.args)
                card = attrs.evolve(card, target=target or card.target)
            for ref in refs:
                try:
                    await self.guardian.update_card(card, str(ref), update)
                except Exception:
                    log.exception("could not update the card of %s", approval.request_id)


def _unknown_summary(error: AgentgateError) -> str:
    """``outcome unknown — now: lock.front_door: unlocked (why)`` for the card."""
    after = error.data.get("state_after")
    if isinstance(after, dict) and after:
        now = ", ".join(f"{entity}: {state}" for entity, state in after.items())
    else:
        now = "its state could not be read"
    why = error.message.removeprefix("outcome unknown: ")
    return f"outcome unknown — now: {now} ({why})"


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
