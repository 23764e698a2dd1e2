"""A scripted guardian for tests, benchmarks and the demo: cards land in a list, a test decides.

It implements the :class:`~agentgate.guardian.Guardian` protocol exactly as Telegram does, so the
broker cannot tell the difference; decisions go back through the gateway's ``GuardianControl``.

Imports: guardian (the protocol).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import attrs
import trio

from agentgate.guardian import (
    Action,
    ApprovalCard,
    CardUpdate,
    GuardianControl,
    GuardianUnavailable,
)


@attrs.define
class ShownCard:
    card: ApprovalCard
    ref: str
    updates: list[CardUpdate] = attrs.field(factory=list)


class ScriptedGuardian:
    """Records every card and its updates; tests decide with :meth:`press`."""

    def __init__(self, *, user: str = "test guardian (1)") -> None:
        self.control: GuardianControl | None = None
        self.user = user
        self.unavailable = False
        self.cards: dict[str, ShownCard] = {}
        self.restored: list[tuple[str, str]] = []
        self.shown: list[tuple[ApprovalCard, str]] = []  # restore_card calls (votes), in order
        self.notices: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        self.silent: list[str] = []  # the notices sent silently (audit checkpoints)
        self._refs = itertools.count(1)
        self._changed = trio.Event()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def send_card(self, card: ApprovalCard) -> str:
        if self.unavailable:
            raise GuardianUnavailable("guardian unreachable: the test guardian is switched off")
        ref = f"card-{next(self._refs)}"
        self.cards[card.request_id] = ShownCard(card, ref)
        self._touch()
        return ref

    async def update_card(self, card: ApprovalCard, message_ref: str, update: CardUpdate) -> None:
        shown = self.cards.get(card.request_id)
        if shown is not None:
            shown.updates.append(update)
            self._touch()

    async def restore_card(self, card: ApprovalCard, message_ref: str) -> None:
        """After a planned restart, or with new votes: recorded in ``restored`` (request id,
        message ref) and ``shown`` (the card as shown)."""
        self.restored.append((card.request_id, message_ref))
        self.shown.append((card, message_ref))
        self._touch()

    async def notify(
        self, text: str, buttons: Sequence[tuple[str, str]] = (), *, silent: bool = False
    ) -> None:
        """Recorded in ``notices`` as (text, buttons); silent ones in ``silent`` too."""
        self.notices.append((text, tuple(buttons)))
        if silent:
            self.silent.append(text)
        self._touch()

    async def wait_for_notice(
        self, predicate: Callable[[str], bool] = lambda text: True
    ) -> tuple[str, tuple[tuple[str, str], ...]]:
        """The first notice whose text satisfies ``predicate`` (caller's deadline)."""
        while True:
            for notice in self.notices:
                if predicate(notice[0]):
                    return notice
            await self._changed.wait()

    async def wait_restored(self, count: int = 1) -> list[tuple[str, str]]:
        """Wait until ``count`` cards have been restored (caller's deadline)."""
        while len(self.restored) < count:
            await self._changed.wait()
        return list(self.restored)

    async def wait_for_card(self, count: int = 1) -> ShownCard:
        """Wait until ``count`` cards have been shown; return the latest (caller's deadline)."""
        while len(self.cards) < count:
            await self._changed.wait()
        return list(self.cards.values())[-1]

    async def card_of(self, request_id: str) -> ShownCard:
        """Wait until the card of ``request_id`` has been shown (caller's deadline): an agent
        can hear "approval pending" before the card reaches the guardian."""
        while request_id not in self.cards:
            await self._changed.wait()
        return self.cards[request_id]

    async def wait_for_update(self, request_id: str) -> CardUpdate:
        while True:
            shown = self.cards.get(request_id)
            if shown is not None and shown.updates:
                return shown.updates[-1]
            await self._changed.wait()

    async def press(
        self, request_id: str, action: str, user: str | None = None, *, on: str | None = None
    ) -> str:
        """Press ``action`` for ``request_id`` on its card (or on the card ref ``on``), as
        ``user`` (default: this guardian's user; each user votes once where several must allow).
        ``undo`` and ``undo!`` (confirmed) press Undo.

        A card shown before a restart is still in the chat: its ref comes from the gateway.
        """
        assert self.control is not None, "connect the guardian to a gateway first"
        if action in ("undo", "undo!"):
            answer = await self.control.undo(
                request_id, user or self.user, confirm=action == "undo!"
            )
            return answer.text
        shown = self.cards.get(request_id)
        ref = on if on is not None else shown.ref if shown is not None else None
        if ref is None:
            earlier = [p for p in await self.control.pending() if p.card.request_id == request_id]
            ref = earlier[0].message_ref if earlier and earlier[0].message_ref else "no card"
        answer = await self.control.decide(
            request_id, Action(action), user or self.user, message_ref=ref
        )
        return answer.text
