"""An approval's states, and what each way of ending it means everywhere: one table.

Stored states (``pending_requests.state``) and their only transitions::

    PENDING ──(a decision to execute: Allow, Allow 1 h)──▶ EXECUTING ──▶ DONE
       └────(deny, freeze, timeout, shutdown, undeliverable card)──────▶ DONE

``PENDING → EXECUTING`` happens at most once per approval (the store's exactly-once gate); an
approval found ``EXECUTING`` after a restart was interrupted mid-call and is never run again:
its outcome is ``unknown``, as is that of a call whose answer never came (it may have run).

What ended the wait is a :class:`Decision`. :data:`MEANINGS` says, for each, what the audit log
records (:class:`Outcome`), what the card shows (:class:`~agentgate.guardian.Status`), which
error the agent gets and how a guardian's press is answered — the broker, the store, the card
and the wire all read this table, nothing compares message texts.

    ============== ============ ============== ===================== ============================
    decision       outcome      card           error to the agent     press answer
    ============== ============ ============== ===================== ============================
    ALLOW          executed, failed or unknown, as the call went      "approved"
    GRANT          executed, failed or unknown, as the call went      "allowed for 1 h"
    ALWAYS         executed, failed or unknown, as the call went      "allowed always"
    DENY           denied       denied         DeniedByGuardian      "denied"
    FROZEN         denied       frozen         DeniedByPolicy        "denied (frozen)"
    TIMEOUT        timed_out    timed_out      ApprovalTimedOut      "timed out"
    SHUTDOWN       shutdown     shutdown       GatewayShuttingDown   "cancelled (gateway ...)"
    UNDELIVERABLE  failed       failed         ExecutionFailed       "failed (guardian ...)"
    REVOKED        denied       denied         DeniedByPolicy        "denied (policy changed)"
    ============== ============ ============== ===================== ============================

A press on an approval that already ended is answered ``"expired: already <answer>"``.

**Two-person approval.** A rule with ``approvals: N`` needs N Allow presses from N different
guardians: each Allow is a :class:`Vote` (:func:`count_vote`); only the vote that completes the
quorum is the ``ALLOW`` decision, any Deny decides at once, the deadline covers the whole.

    ========= ======================================== =====================================
    vote      when                                     press answer
    ========= ======================================== =====================================
    COUNTED   a new guardian allows, more are needed   "counted: 1 of 2 — ..."
    REPEATED  this guardian allowed already            "already counted: 1 of 2 — ..."
    DECIDES   the last Allow needed                    "approved (2 of 2)"
    ========= ======================================== =====================================

**Undo.** An executed call on an undoable entity (:mod:`agentgate.undo`) keeps a snapshot of
what it changed; its own small state machine is :data:`UNDO_TRANSITIONS` (the store guards it
as it guards approvals, so an Undo runs at most once)::

    AVAILABLE ──(a press, checks passed)──▶ UNDOING ──▶ UNDONE
                                               └──────▶ FAILED   (failed, unknown or interrupted)

What an Undo press is answered is :data:`UNDO_ANSWERS`, by :class:`UndoCheck`.

Imports: errors, guardian (the protocol's types), protocol (ids). Nothing that runs.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final, NamedTuple, Protocol

from agentgate.errors import (
    AgentgateError,
    ApprovalTimedOut,
    DeniedByGuardian,
    DeniedByPolicy,
    ExecutionFailed,
    GatewayShuttingDown,
)
from agentgate.guardian import Action, Status
from agentgate.protocol import JsonId

__all__ = [
    "EXECUTION_CARDS",
    "MEANINGS",
    "TRANSITIONS",
    "UNDO_ANSWERS",
    "UNDO_CONFIRM",
    "UNDO_TRANSITIONS",
    "VOTE_ANSWERS",
    "Decision",
    "Meaning",
    "Outcome",
    "ReplyHandle",
    "Result",
    "State",
    "UndoCheck",
    "UndoState",
    "Vote",
    "count_vote",
    "decision_for",
    "sources",
    "undo_sources",
]


class State(enum.StrEnum):
    """An approval's state in the store."""

    PENDING = "pending"
    EXECUTING = "executing"
    DONE = "done"


TRANSITIONS: Final[Mapping[State, frozenset[State]]] = {
    State.PENDING: frozenset({State.EXECUTING, State.DONE}),
    State.EXECUTING: frozenset({State.DONE}),
    State.DONE: frozenset(),
}
"""Every state change the store may make (it guards its updates with this table, and a trigger
refuses any other)."""


def sources(target: State) -> frozenset[State]:
    """The states from which an approval may move to ``target``."""
    return frozenset(state for state, targets in TRANSITIONS.items() if target in targets)


class Outcome(enum.StrEnum):
    """How a request ended: the audit log's resolution, a queued result's ``status``.

    The values are stored: a new member needs no migration, but an older agentgate reading a
    store that holds it would not know it.
    """

    EXECUTED = "executed"
    DENIED = "denied"
    TIMED_OUT = "timed_out"
    FAILED = "failed"
    SHUTDOWN = "shutdown"
    REJECTED = "rejected"  # invalid before any decision (unknown tool, bad arguments)
    UNKNOWN = "unknown"  # sent, but its answer never came: it may have run (never retried)


class Decision(enum.Enum):
    """What ended an approval's wait; the first one wins."""

    ALLOW = "allow"
    GRANT = "grant"
    ALWAYS = "always"  # allow, and a permanent grant for this agent and signature
    DENY = "deny"
    FROZEN = "frozen"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"
    UNDELIVERABLE = "undeliverable"
    REVOKED = "revoked"  # found pending at start, no longer asked: the policy or agent changed


class Meaning(NamedTuple):
    """One row of the table (see the module docstring).

    ``outcome``, ``card`` and ``error`` are None for the decisions that execute: the call's own
    outcome decides them (:data:`EXECUTION_CARDS`). ``message`` is the agent's error message,
    with ``{by}`` (who decided) and ``{detail}`` filled in.
    """

    outcome: Outcome | None
    card: Status | None
    error: type[AgentgateError] | None
    message: str
    answer: str

    @property
    def executes(self) -> bool:
        return self.outcome is None

    def error_for(self, *, by: str | None, detail: str, data: dict[str, Any]) -> AgentgateError:
        """The agent's error for this decision (only for decisions that do not execute)."""
        assert self.error is not None, "a decision that executes has no error of its own"
        return self.error(self.message.format(by=by, detail=detail), data=data)


MEANINGS: Final[Mapping[Decision, Meaning]] = {
    Decision.ALLOW: Meaning(None, None, None, "", "approved"),
    Decision.GRANT: Meaning(None, None, None, "", "allowed for 1 h"),
    Decision.ALWAYS: Meaning(None, None, None, "", "allowed always"),
    Decision.DENY: Meaning(
        Outcome.DENIED, Status.DENIED, DeniedByGuardian, "denied by the guardian ({by})", "denied"
    ),
    Decision.FROZEN: Meaning(
        Outcome.DENIED, Status.FROZEN, DeniedByPolicy, "frozen by guardian", "denied (frozen)"
    ),
    Decision.TIMEOUT: Meaning(
        Outcome.TIMED_OUT,
        Status.TIMED_OUT,
        ApprovalTimedOut,
        "approval timed out: {detail}",
        "timed out",
    ),
    Decision.SHUTDOWN: Meaning(
        Outcome.SHUTDOWN,
        Status.SHUTDOWN,
        GatewayShuttingDown,
        "gateway shutting down: the approval was cancelled",
        "cancelled (gateway shutting down)",
    ),
    Decision.UNDELIVERABLE: Meaning(
        Outcome.FAILED,
        Status.FAILED,
        ExecutionFailed,
        "guardian unreachable: {detail}",
        "failed (guardian unreachable)",
    ),
    Decision.REVOKED: Meaning(
        Outcome.DENIED,
        Status.DENIED,
        DeniedByPolicy,
        "denied by policy: {detail}",
        "denied (the policy changed)",
    ),
}

EXECUTION_CARDS: Final[Mapping[Outcome, Status]] = {
    Outcome.EXECUTED: Status.EXECUTED,
    Outcome.FAILED: Status.FAILED,
    Outcome.UNKNOWN: Status.UNKNOWN,
}
"""The card of a decision that executed, by how the call went."""

_BY_ACTION: Final[Mapping[Action, Decision]] = {
    Action.ALLOW: Decision.ALLOW,
    Action.DENY: Decision.DENY,
    Action.GRANT: Decision.GRANT,
    Action.ALWAYS: Decision.ALWAYS,
}


def decision_for(action: Action) -> Decision:
    """The decision a guardian's button stands for (not Undo: that is no decision)."""
    return _BY_ACTION[action]


# -- two-person approval ------------------------------------------------------------------------


class Vote(enum.Enum):
    """What one Allow press on a card that needs several approvals did (see the docstring)."""

    COUNTED = "counted"
    REPEATED = "repeated"
    DECIDES = "decides"


VOTE_ANSWERS: Final[Mapping[Vote, str]] = {
    Vote.COUNTED: "counted: {have} of {need} — another guardian must allow",
    Vote.REPEATED: "already counted: {have} of {need} — another guardian must allow",
    Vote.DECIDES: "approved ({have} of {need})",
}
"""How each vote's press is answered; ``{have}`` and ``{need}`` are filled in."""


def count_vote(need: int, voters: tuple[str, ...], voter: str) -> tuple[Vote, tuple[str, ...]]:
    """One guardian's Allow on an approval that needs ``need`` of them and has ``voters``
    already: what it is, and the voters after it. A guardian counts once, however often they
    press."""
    if voter in voters:
        return Vote.REPEATED, voters
    after = (*voters, voter)
    return (Vote.DECIDES if len(after) >= need else Vote.COUNTED), after


# -- undo ---------------------------------------------------------------------------------------


class UndoState(enum.StrEnum):
    """An undoable call's state in the store (``undo_snapshots.state``)."""

    AVAILABLE = "available"
    UNDOING = "undoing"
    UNDONE = "undone"
    FAILED = "failed"


UNDO_TRANSITIONS: Final[Mapping[UndoState, frozenset[UndoState]]] = {
    UndoState.AVAILABLE: frozenset({UndoState.UNDOING}),
    UndoState.UNDOING: frozenset({UndoState.UNDONE, UndoState.FAILED}),
    UndoState.UNDONE: frozenset(),
    UndoState.FAILED: frozenset(),
}
"""Every state change of an undo (``AVAILABLE → UNDOING`` happens once: the exactly-once gate;
an undo found ``UNDOING`` at start-up was interrupted and becomes ``FAILED``, never rerun)."""


def undo_sources(target: UndoState) -> frozenset[UndoState]:
    """The undo states from which a snapshot may move to ``target``."""
    return frozenset(s for s, targets in UNDO_TRANSITIONS.items() if target in targets)


class UndoCheck(enum.Enum):
    """What an Undo press found, before or after running (its answer: :data:`UNDO_ANSWERS`)."""

    UNKNOWN = "unknown"  # no snapshot: not an undoable call, or not executed
    RUNNING = "running"  # another press is restoring it now
    DONE = "done"  # undone already
    BROKEN = "broken"  # tried already, and it failed (never run twice)
    LATE = "late"  # the window has passed: nothing runs unless confirmed
    CHANGED = "changed"  # an entity changed since the call: nothing runs unless confirmed
    UNDONE = "undone"  # this press restored it
    FAILED = "failed"  # this press tried, and the restore failed


UNDO_ANSWERS: Final[Mapping[UndoCheck, str]] = {
    UndoCheck.UNKNOWN: "nothing to undo: no undoable call has that id",
    UndoCheck.RUNNING: "already being undone",
    UndoCheck.DONE: "already undone{detail}",
    UndoCheck.BROKEN: "not undone: it was tried already and failed{detail}",
    UndoCheck.LATE: "not undone yet: the undo window has passed{detail}; confirm to restore",
    UndoCheck.CHANGED: "not undone yet: {detail} changed since the call; confirm to restore",
    UndoCheck.UNDONE: "undone{detail}",
    UndoCheck.FAILED: "undo failed{detail}",
}
"""How an Undo press is answered; ``{detail}`` is filled in (it may be empty)."""

UNDO_CONFIRM: Final = frozenset({UndoCheck.LATE, UndoCheck.CHANGED})
"""The checks a guardian may override by confirming (everything else is final)."""


class Result(NamedTuple):
    """How one request ended, for the front door that asked (or the agent's queue).

    ``reply_to`` is the front door's own handle on the request (the JSON-RPC id it echoes).
    """

    request_id: str
    reply_to: JsonId
    tool: str
    signature: str
    outcome: Outcome
    data: Any = None
    error: AgentgateError | None = None

    def queued(self) -> dict[str, Any]:
        """The queued-result entry of ``get_pending_results`` (docs/protocol.md)."""
        entry: dict[str, Any] = {
            "request_id": self.request_id,
            "rpc_id": self.reply_to,
            "tool": self.tool,
            "signature": self.signature,
            "status": self.outcome.value,
        }
        if self.error is None:
            entry["data"] = self.data
        else:
            entry["error"] = {"code": self.error.code, "message": self.error.message}
            if self.outcome is Outcome.UNKNOWN:  # what the agent needs to decide what next
                known = ("outcome", "state_after")
                entry["error"]["data"] = {
                    k: self.error.data[k] for k in known if k in self.error.data
                }
        return entry


class ReplyHandle(Protocol):
    """How a front door hears about a request after it was asked (its "reply handle").

    The WebSocket door turns these into frames on the connection that asked; a door that is
    gone answers ``deliver`` with False and the result waits in the agent's queue. The outcome
    is recorded (queued) before ``deliver``; ``deliver`` returning True takes it out of the
    queue, unless the handle's ``confirms_delivery`` is true: it then calls
    ``Store.mark_delivered`` itself once the result has really gone out (or ``Store.release``).
    """

    @property
    def agent(self) -> str: ...

    @property
    def confirms_delivery(self) -> bool:
        """Whether the door marks a delivered result itself, once its frame is written."""
        ...

    @property
    def via(self) -> str:
        """The front door, for the audit log and the card: ``ws``, ``mcp-stdio``, ``mcp-http``."""
        ...

    def approval_pending(self, request_id: str, reply_to: JsonId, expires_at: float) -> None:
        """The request waits for a guardian (until ``expires_at``, unix time)."""
        ...

    def deliver(self, result: Result) -> bool:
        """Hand over a late result; False if it cannot be (it is then queued for the agent)."""
        ...

    def results_waiting(self, count: int) -> None:
        """``count`` results are queued for this agent (``get_pending_results``)."""
        ...

    async def drained(self) -> None:
        """Return once what was handed over so far has gone out (or can never go)."""
        ...
