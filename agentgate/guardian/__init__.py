"""The guardian seam: how the approval broker talks to a human, and how the human answers.

The broker builds an :class:`ApprovalCard` (never from agent-supplied prose), hands it to a
:class:`Guardian` (Telegram in production, a scripted one in tests), and later asks the guardian
to show the card's resolution. Decisions and commands flow back through :class:`GuardianControl`,
which the gateway implements; the guardian only checks *who* pressed (``allowed_users``) and
renders. All approval state lives in agentgate's store, so a card's buttons keep working after a
restart: callback data is ``allow:<request_id>``, ``deny:<request_id>`` or ``grant:<request_id>``.

Imports: errors. The broker, the controls and the guardians import this.
"""

from __future__ import annotations

import enum
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


@frozen
class CardUpdate:
    """A resolution to render on an existing card."""

    status: Status
    detail: str = ""  # one line: result summary, error, who decided
    by: str | None = None  # the guardian who decided, if any
    at: float = 0.0  # unix time of the resolution
    grant_until: float | None = None  # an "Allow 1 h" holds until then (unix time)


@frozen
class Grant:
    """A remembered "Allow 1 h": this signature, this agent, until ``expires_at``."""

    grant_id: str
    agent: str
    signature: str
    granted_by: str
    expires_at: float


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
        """Render a resolution on the card. Best effort: never raises for delivery failures."""
        ...

    async def restore_card(self, card: ApprovalCard, message_ref: str) -> None:
        """Show the card as it was asked, buttons included (after a planned restart edited it
        to say the gateway was restarting). Best effort, like :meth:`update_card`; may wait
        until the guardian can reach its chat (the caller bounds the wait)."""
        ...


class GuardianControl(Protocol):
    """What a guardian can ask of the gateway (implemented by the gateway)."""

    async def decide(
        self, request_id: str, action: Action, by: str, *, message_ref: str
    ) -> PressAnswer:
        """Apply a guardian's decision; return how to answer the press.

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

    async def set_frozen(self, frozen: bool, by: str) -> None: ...

    async def status(self) -> GatewayStatus: ...
