"""The guardian seam: how the approval broker talks to a human, and how the human answers.

The broker builds an :class:`ApprovalCard` (never from agent-supplied prose), hands it to a
:class:`Guardian` (Telegram in production, a scripted one in tests), and later asks the guardian
to show the card's resolution. Decisions and commands flow back through :class:`GuardianControl`,
which the gateway implements; the guardian only checks *who* pressed (``allowed_users``) and
renders. All approval state lives in agentgate's store, so a card's buttons keep working after a
restart: callback data is ``allow:<request_id>``, ``deny:<request_id>``, ``grant:<request_id>``,
``always:<request_id>``, ``undo:<request_id>`` or ``undo!:<request_id>`` (Undo, confirmed).

Imports: errors. The broker, the controls and the guardians import this.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from attrs import frozen

from agentgate.errors import ExecutionFailed


class GuardianUnavailable(ExecutionFailed):
    """The guardian could not be reached after a bounded retry; the ask fails closed."""

    default_message = "guardian unreachable"


class GuardianRefused(GuardianUnavailable):
    """The guardian's service refused the gateway's configuration: a token it does not accept,
    a chat it cannot post to. ``key`` is the configuration key to fix (at start-up this stops
    the gateway; later it is retried, as any outage)."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class Action(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    GRANT = "grant"  # allow, and remember this signature for this agent for one hour
    ALWAYS = "always"  # allow, and remember it for good (a permanent grant, revocable)


class Status(enum.StrEnum):
    """What a card shows once its approval has moved on."""

    APPROVED = "approved"  # allowed, execution under way
    DENIED = "denied"
    TIMED_OUT = "timed_out"
    EXECUTED = "executed"
    FAILED = "failed"
    UNKNOWN = "unknown"  # sent, no answer: it may have run (the detail says the state now)
    QUEUED = "queued"  # executed (or failed) while the agent was offline: result queued
    SHUTDOWN = "shutdown"  # gateway shutting down
    RESTARTING = "restarting"  # a planned restart: still open, buttons back once it is up
    FROZEN = "frozen"  # denied by /freeze
    UNDONE = "undone"  # executed, then put back by a guardian's Undo
    UNDO_FAILED = "undo_failed"  # executed; an Undo was tried and failed


@frozen
class ApprovalCard:
    """Everything a guardian must see to decide; built by the gateway."""

    request_id: str
    agent: str
    tool: str
    args: dict[str, Any]  # every argument, nothing hidden
    signature: str
    matched: str  # what decided "ask", e.g. "rule 4: ha_call_service(light.*) (ask)"
    expires_at: float  # unix time
    target: str | None = None  # e.g. "Front door (lock.front_door) — now: locked"
    via: str | None = None  # the front door that asked: ws, mcp-stdio, mcp-http
    quorum: int = 1  # Allow presses needed, from as many guardians (a rule's approvals: N)
    votes: tuple[str, ...] = ()  # the guardians who pressed Allow so far (quorum > 1)
    approved_before: int | None = None  # set: "Always allow" is offered, after this many
    quota: str | None = None  # asked because a quota is used up: "20 per hour"


@frozen
class CardUpdate:
    """A resolution to render on an existing card."""

    status: Status
    detail: str = ""  # one line: result summary, error, who decided
    by: str | None = None  # the guardian who decided, if any
    at: float = 0.0  # unix time of the resolution
    grant_until: float | None = None  # an "Allow 1 h" holds until then (unix time; inf: always)
    undo_until: float | None = None  # Undo is offered (its window ends then, unix time)


@frozen
class Grant:
    """A remembered "Allow 1 h" (until ``expires_at``) or "Always allow" (``expires_at`` is
    infinite): this signature, this agent."""

    grant_id: str
    agent: str
    signature: str
    granted_by: str
    expires_at: float

    @property
    def permanent(self) -> bool:
        return math.isinf(self.expires_at)


@frozen
class UndoItem:
    """An executed call that Undo can put back (``/undo`` lists them)."""

    request_id: str
    agent: str
    signature: str
    executed_at: float
    until: float  # the end of its undo window (unix time)
    decided_by: str | None  # the guardian who allowed it; None: the policy did
    restores: str  # what an Undo would set: "light.kitchen: off"


@frozen
class GatewayStatus:
    agents_connected: dict[str, int]  # agent name -> open connections
    pending: int
    frozen: bool


class PressAnswer(NamedTuple):
    """How a guardian's press is answered, and whether it decided the approval.

    A press that decided is answered once its card shows the outcome; any other at once.
    """

    text: str
    decided: bool = False


@frozen
class PendingCard:
    card: ApprovalCard
    message_ref: str | None


class Guardian(Protocol):
    """What the broker needs from a guardian."""

    async def send_card(self, card: ApprovalCard) -> str:
        """Show a new approval card; return an opaque message reference for later edits.

        Raises :class:`GuardianUnavailable` once a bounded retry has failed.
        """
        ...

    async def update_card(self, card: ApprovalCard, message_ref: str, update: CardUpdate) -> None:
        """Render a resolution on the card. Best effort: never raises for delivery failures.
        ``update.undo_until`` set: the card keeps an Undo button."""
        ...

    async def restore_card(self, card: ApprovalCard, message_ref: str) -> None:
        """Show the card as it was asked, buttons included (after a planned restart edited it
        to say the gateway was restarting). Best effort, like :meth:`update_card`; may wait
        until the guardian can reach its chat (the caller bounds the wait). Also used to show
        a card again with its votes (two-person approval)."""
        ...

    async def notify(
        self, text: str, buttons: Sequence[tuple[str, str]] = (), *, silent: bool = False
    ) -> None:
        """A message for the guardians (plain text), with buttons as ``(label, callback
        data)``: an Undo's result when the call had no card, the confirmation an Undo asks
        for, a configuration reload, an audit checkpoint (``silent``: no sound, no alert on
        the phone). Best effort: never raises for delivery failures."""
        ...


class GuardianControl(Protocol):
    """What a guardian can ask of the gateway (implemented by the gateway)."""

    async def decide(
        self,
        request_id: str,
        action: Action,
        by: str,
        *,
        message_ref: str,
        voter: str | None = None,
    ) -> PressAnswer:
        """Apply a guardian's decision; return how to answer the press.

        ``voter`` identifies the guardian for two-person approval (a Telegram user id; by
        default ``by``): one guardian's Allow counts once.

        ``message_ref`` is the card the button was pressed on: a press decides only the
        approval whose card it is (the one :meth:`Guardian.send_card` returned, or a copy
        registered with :meth:`card_copied`); any other press decides nothing and is audited.
        The text is e.g. "approved", "denied", "allowed for 1 h" (``decided``), or starts with
        "expired" when the approval is unknown, expired, already resolved ("expired: already
        approved") or not on that card.
        """
        ...

    async def card_copied(self, request_id: str, message_ref: str) -> None:
        """A copy of an approval's card was sent (``/pending``): its buttons count too, and it
        is edited with the outcome."""
        ...

    async def refused(self, user: str, what: str) -> None:
        """Audit a press or command from someone not in ``allowed_users``."""
        ...

    async def pending(self) -> list[PendingCard]: ...

    async def grants(self) -> list[Grant]: ...

    async def revoke_grant(self, grant_id: str, by: str) -> bool: ...

    async def undo(self, request_id: str, by: str, *, confirm: bool = False) -> PressAnswer:
        """Put back what the executed call ``request_id`` changed (an Undo press); the answer
        says what happened, or why nothing ran (``confirm`` overrides a passed window or a
        change made since the call, see :data:`agentgate.approvals.UNDO_CONFIRM`)."""
        ...

    async def undoable(self) -> list[UndoItem]:
        """The executed calls an Undo can put back now (their window still open)."""
        ...

    async def set_frozen(self, frozen: bool, by: str) -> None: ...

    async def status(self) -> GatewayStatus: ...
