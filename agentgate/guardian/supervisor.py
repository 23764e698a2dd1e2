"""The configured Telegram guardian, kept running: (re)started until it runs, whatever fails.

While the bot cannot start (Bot API unreachable, answering 5xx or 409, a token refused after
start-up), cards cannot be sent: :meth:`TelegramSupervisor.send_card` raises
:class:`~agentgate.guardian.GuardianUnavailable`, so every ask fails closed (-32004) while reads
are still served, and the bot is started again in the background with a growing pause (1, 2, 5,
10, 30, then every 60 s), logged when the problem begins or changes. Once it runs, polling rides
out Telegram's outages by itself (:mod:`agentgate.guardian.telegram`).

At start-up only, a configuration Telegram refuses (the token, the chat) is not an outage: the
first attempt's :class:`~agentgate.guardian.GuardianRefused` becomes a
:class:`~agentgate.config.ConfigError` naming the key, and ``agentgate serve`` exits 2.

Imports: guardian (the protocol), guardian.card (card rules), config (ConfigError);
guardian.telegram only when it runs (python-telegram-bot is a heavy import, and a gateway
without Telegram never needs it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import trio

from agentgate.config import ConfigError
from agentgate.guardian import (
    ApprovalCard,
    CardUpdate,
    GuardianControl,
    GuardianRefused,
    GuardianUnavailable,
)
from agentgate.guardian.card import CardRules

if TYPE_CHECKING:
    from agentgate.guardian.telegram import TelegramGuardian

__all__ = ["TELEGRAM_RESTART_DELAYS", "TelegramSupervisor", "supervised_telegram"]

log = logging.getLogger(__name__)

TELEGRAM_RESTART_DELAYS: Final = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # seconds; the last repeats


class TelegramSupervisor:
    """A :class:`~agentgate.guardian.Guardian` that is the Telegram bot whenever it runs."""

    def __init__(
        self, telegram: Any, control: GuardianControl, cards: CardRules, source: str = "gate.toml"
    ) -> None:
        self._telegram = telegram
        self._control = control
        self._cards = cards
        self._source = source
        self.active: TelegramGuardian | None = None
        self.problem = "the Telegram guardian is starting"
        self.first_attempt = trio.Event()
        self.fatal: ConfigError | None = None  # the first start found the configuration refused
        self.starts = 0  # times the bot started (tests wait on it)
        self._running = trio.Event()  # set while ``active``

    async def send_card(self, card: ApprovalCard) -> str:
        if self.active is None:
            raise GuardianUnavailable(f"guardian unreachable: {self.problem}")
        return await self.active.send_card(card)

    async def update_card(self, card: ApprovalCard, message_ref: str, update: CardUpdate) -> None:
        if self.active is not None:
            await self.active.update_card(card, message_ref, update)

    async def restore_card(self, card: ApprovalCard, message_ref: str) -> None:
        """Waits until the bot runs (the caller bounds the wait), then restores the card."""
        while self.active is None:
            await self._running.wait()
        await self.active.restore_card(card, message_ref)

    async def notify(
        self, text: str, buttons: Sequence[tuple[str, str]] = (), *, silent: bool = False
    ) -> None:
        """Sent if the bot runs; dropped (logged) while it cannot: a notice is best effort."""
        if self.active is None:
            log.warning("guardian unreachable, a notice was not sent: %s", text.splitlines()[0])
            return
        await self.active.notify(text, buttons, silent=silent)

    async def run(self) -> None:
        from agentgate.guardian.telegram import open_telegram_guardian

        failures = 0
        reported: str | None = None
        while True:
            try:
                async with open_telegram_guardian(
                    self._telegram, self._control, cards=self._cards
                ) as tg:
                    self.active = tg
                    self.starts += 1
                    self._running.set()
                    if reported is not None:
                        log.info("Telegram guardian running again (it failed: %s)", reported)
                    failures, reported = 0, None
                    self.first_attempt.set()
                    await trio.sleep_forever()
            except GuardianRefused as exc:
                if not self.first_attempt.is_set():
                    self.fatal = ConfigError(f"{self._source}: {exc.key}: {exc.message}")
                    self.first_attempt.set()
                    return
                problem = f"{exc.message} ({exc.key})"
            except GuardianUnavailable as exc:
                problem = exc.message
            except Exception as exc:  # anything else while starting: retried all the same
                problem = f"the Telegram guardian failed: {exc!r}"
                if problem != reported:
                    log.exception("the Telegram guardian failed")
            finally:
                self.active = None
                if self._running.is_set():
                    self._running = trio.Event()
            self.problem = problem
            delay = TELEGRAM_RESTART_DELAYS[min(failures, len(TELEGRAM_RESTART_DELAYS) - 1)]
            failures += 1
            if problem != reported:  # once per change of state, not at every attempt
                log.error(
                    "guardian unreachable: %s; every ask fails closed (-32004) until the"
                    " Telegram guardian starts (retrying, next in %g s, then at most every %g s)",
                    problem,
                    delay,
                    TELEGRAM_RESTART_DELAYS[-1],
                )
                reported = problem
            self.first_attempt.set()
            await trio.sleep(delay)


@asynccontextmanager
async def supervised_telegram(
    telegram: Any, control: GuardianControl, cards: CardRules, *, source: str = "gate.toml"
) -> AsyncIterator[TelegramSupervisor]:
    """Run :class:`TelegramSupervisor` for the block, once its first start has been tried.

    Raises :class:`~agentgate.config.ConfigError` if that first start found the token or the
    chat refused (``source`` names the configuration file in the message).
    """
    supervisor = TelegramSupervisor(telegram, control, cards, source)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.run)
        await supervisor.first_attempt.wait()
        if supervisor.fatal is None:
            try:
                yield supervisor
            finally:
                nursery.cancel_scope.cancel()
    if supervisor.fatal is not None:  # raised here, outside the nursery: not in a group
        raise supervisor.fatal
