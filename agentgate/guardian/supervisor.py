"""The configured Telegram guardian, kept running: (re)started until it runs.

While the bot cannot start (Bot API unreachable, token refused), cards cannot be sent:
:meth:`TelegramSupervisor.send_card` raises :class:`~agentgate.guardian.GuardianUnavailable`,
so every ask fails closed (-32004) while reads are still served, and the bot is started again
in the background with a growing pause.

Imports: the guardian protocol and card rules; the Telegram module itself only when it runs
(python-telegram-bot is a heavy import, and a gateway without Telegram never needs it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from agentgate.guardian import (
    ApprovalCard,
    CardUpdate,
    Guardian,
    GuardianControl,
    GuardianUnavailable,
)
from agentgate.guardian.card import CardRules

__all__ = ["TELEGRAM_RESTART_DELAYS", "TelegramSupervisor", "supervised_telegram"]

log = logging.getLogger(__name__)

TELEGRAM_RESTART_DELAYS: Final = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # seconds; the last repeats


class TelegramSupervisor:
    """A :class:`~agentgate.guardian.Guardian` that is the Telegram bot whenever it runs."""

    def __init__(self, telegram: Any, control: GuardianControl, cards: CardRules) -> None:
        self._telegram = telegram
        self._control = control
        self._cards = cards
        self.active: Guardian | None = None
        self.problem = "the Telegram guardian is starting"
        self.first_attempt = trio.Event()

    async def send_card(self, card: ApprovalCard) -> str:
        if self.active is None:
            raise GuardianUnavailable(f"guardian unreachable: {self.problem}")
        return await self.active.send_card(card)

    async def update_card(self, card: ApprovalCard, message_ref: str, update: CardUpdate) -> None:
        if self.active is not None:
            await self.active.update_card(card, message_ref, update)

    async def run(self) -> None:
        from agentgate.guardian.telegram import open_telegram_guardian

        failures = 0
        while True:
            try:
                async with open_telegram_guardian(
                    self._telegram, self._control, cards=self._cards
                ) as tg:
                    self.active = tg
                    self.first_attempt.set()
                    failures = 0
                    await trio.sleep_forever()
            except GuardianUnavailable as exc:
                self.problem = exc.message
                delay = TELEGRAM_RESTART_DELAYS[min(failures, len(TELEGRAM_RESTART_DELAYS) - 1)]
                failures += 1
                log.error(
                    "guardian unreachable: %s; every ask fails closed (-32004) until the"
                    " Telegram guardian starts (next attempt in %g s)",
                    exc.message,
                    delay,
                )
                self.first_attempt.set()
                await trio.sleep(delay)
            finally:
                self.active = None


@asynccontextmanager
async def supervised_telegram(
    telegram: Any, control: GuardianControl, cards: CardRules
) -> AsyncIterator[TelegramSupervisor]:
    """Run :class:`TelegramSupervisor` for the block, once its first start has been tried."""
    supervisor = TelegramSupervisor(telegram, control, cards)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.run)
        await supervisor.first_attempt.wait()
        try:
            yield supervisor
        finally:
            nursery.cancel_scope.cancel()
