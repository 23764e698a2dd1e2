"""The demo's "guardian phone": Telegram in a terminal, on top of the fake Bot API.

It watches the messages the real Telegram guardian (python-telegram-bot) sent to the fake Bot API,
draws each new approval card the way the Telegram app would (text, then the inline buttons), and
presses a button *through the fake* as the guardian user, so the press travels the same road a
real one does: Bot API update → PTB long poll → the guardian → the gateway. Card edits (approved,
executed, denied, timed out) are drawn too.

Keys come from :class:`KeyReader` (``a`` Allow, ``d`` Deny, ``h`` Allow 1 h; ``u`` Undo on an
executed card, ``k`` keep); with ``auto=True`` the phone presses Allow (and Undo) by itself after
a short pause, so it runs with no TTY and no stdin.

Imports: guardian.terminal (how a card is drawn, the keys), testing.fake_telegram.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

import trio

from agentgate.guardian.terminal import KEYS, Style, bubble, cbreak, condensed, html_to_text
from agentgate.testing.fake_telegram import FakeMessage, FakeTelegram

__all__ = ["KEYS", "KeyReader", "Phone", "Style", "cbreak"]


def visible(message: FakeMessage, style: Style) -> str:
    """What the Telegram app shows for ``message``, with bold and code marked up for a TTY."""
    if not style.enabled or message.parse_mode != "HTML":
        return message.text
    return html_to_text(message.raw_text, style)


def _is_card(message: FakeMessage) -> bool:
    return any(data.startswith("allow:") for _, data in message.buttons)


def _undo_button(message: FakeMessage) -> str | None:
    return next((data for _, data in message.buttons if data.startswith("undo:")), None)


class KeyReader:
    """Single key presses from stdin, read in a worker thread that never blocks the event loop.

    ``os.read`` (no Python-level buffer, so no lock held at interpreter exit) in an abandonable
    thread: stdin is never switched to non-blocking mode, which would also hit stdout on a TTY.
    """

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.eof = False
        self._buffer: list[str] = []

    async def get(self) -> str | None:
        """The next key (lower-cased), or None once stdin is closed."""
        while not self._buffer:
            if self.eof:
                return None
            try:
                data = await trio.to_thread.run_sync(os.read, self.fd, 64, abandon_on_cancel=True)
            except OSError:
                data = b""
            if not data:
                self.eof = True
                return None
            self._buffer += [c.lower() for c in data.decode(errors="replace") if not c.isspace()]
        return self._buffer.pop(0)


class Phone:
    """The guardian's phone: draws the chat, answers each card with a key (or automatically)."""

    def __init__(
        self,
        telegram: FakeTelegram,
        *,
        user_id: int,
        user_name: str,
        style: Style,
        keys: KeyReader | None,
        auto_pause: float = 1.5,
        out: TextIO = sys.stdout,
    ) -> None:
        self.telegram = telegram
        self.user_id = user_id
        self.user_name = user_name
        self.style = style
        self.keys = keys  # None: press Allow by itself after ``auto_pause`` seconds
        self.auto_pause = auto_pause
        self.out = out
        self.presses: list[str] = []  # callback kinds pressed, in order
        self._seen: dict[int, int] = {}  # message_id -> edits already drawn

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # -- drawing ------------------------------------------------------------------------------

    def draw(self, message: FakeMessage, *, edited: bool) -> None:
        """One chat bubble: header, text, inline keyboard (as Telegram lays it out)."""
        label = "edited" if edited else "new message"
        text = visible(message, self.style)
        if edited and not message.buttons:
            # The new status sits on top of the card just drawn; the rest did not change.
            text = condensed(text, self.style)
        rows = (message.reply_markup or {}).get("inline_keyboard") or []
        labels = [[str(b.get("text", "")) for b in row] for row in rows]
        for line in bubble(
            f"📱 Telegram · agentgate guardians · {label}", text, labels, self.style
        ):
            self._print(line)

    # -- the loop -----------------------------------------------------------------------------

    def _unseen(self) -> list[FakeMessage] | None:
        fresh = [
            m for m in self.telegram.messages.values() if self._seen.get(m.message_id, -1) < m.edits
        ]
        return fresh or None

    async def run(self) -> None:
        """Draw every new or edited message; answer every new card. Runs until cancelled."""
        while True:
            for message in await self.telegram.wait_for(self._unseen):
                edited = message.message_id in self._seen
                self._seen[message.message_id] = message.edits
                self.draw(message, edited=edited)
                if _is_card(message) and not edited:
                    await self.answer(message)

    async def settled(self) -> None:
        """Wait until every message has been drawn and no card still shows its buttons."""
        while True:
            messages = self.telegram.messages.values()
            if all(self._seen.get(m.message_id) == m.edits and not _is_card(m) for m in messages):
                return
            await trio.sleep(0.05)

    async def answer(self, card: FakeMessage) -> None:
        """Choose a button (key or auto), press it through the fake, show Telegram's toast."""
        s = self.style
        buttons = dict(reversed([(data.partition(":")[0], data) for _, data in card.buttons]))
        hint = "  ".join(
            f"[{key}] {label}" for key, (kind, label) in KEYS.items() if kind in buttons
        )
        kind = await self._choose(hint)
        if kind is None:
            return
        data = buttons.get(kind)
        if data is None:  # this card has no such button: nothing to press
            self._print(s.yellow(f"  (no {kind!r} button on this card)"))
            return
        label = next(label for k, label in KEYS.values() if k == kind)
        self._print(f"  👆 {s.bold(self.user_name)} presses {s.bold(label)}")
        self.presses.append(kind)
        press = self.telegram.press(card.message_id, data, self.user_id, first_name=self.user_name)
        with trio.move_on_after(10):
            answer = await press.wait_answer()
            self._print(s.dim(f"  💬 Telegram toast: {answer.text}"))

    def undoable(self) -> FakeMessage | None:
        """The latest card that offers ↩ Undo (an executed, undoable call), if any."""
        found = [m for m in self.telegram.messages.values() if _undo_button(m)]
        return found[-1] if found else None

    async def undo(self, card: FakeMessage) -> str | None:
        """Press ↩ Undo on ``card`` (key ``u``, or by itself); the toast, or None if kept."""
        s = self.style
        data = _undo_button(card)
        assert data is not None
        if self.keys is None or self.keys.eof:
            self._print(f"  {s.dim('[u] Undo  [k] keep')}   {s.dim('(--auto: Undo in a moment)')}")
            await trio.sleep(self.auto_pause)
        else:
            self._print(f"  {s.bold('Your move:')} [u] Undo  [k] keep (the light stays on)")
            while True:
                key = await self.keys.get()
                if key in (None, "u"):
                    break
                if key == "k":
                    self._print(f"  👆 {s.bold(self.user_name)} keeps it")
                    return None
                self._print(s.dim(f"  ({key!r} is not a button: press u or k)"))
        self._print(f"  👆 {s.bold(self.user_name)} presses {s.bold('↩ Undo')}")
        self.presses.append("undo")
        press = self.telegram.press(card.message_id, data, self.user_id, first_name=self.user_name)
        with trio.move_on_after(10):
            answer = await press.wait_answer()
            self._print(s.dim(f"  💬 Telegram toast: {answer.text}"))
            return str(answer.text)
        return None

    async def _choose(self, hint: str) -> str | None:
        s = self.style
        if self.keys is None or self.keys.eof:
            if self.keys is not None:
                self._print(s.yellow("  (no keyboard: stdin is closed; pressing Allow for you)"))
            else:
                self._print(f"  {s.dim(hint)}   {s.dim('(--auto: Allow in a moment)')}")
            await trio.sleep(self.auto_pause)
            return "allow"
        self._print(f"  {s.bold('Your move:')} {hint}")
        while True:
            key = await self.keys.get()
            if key is None:
                self._print(s.yellow("  (stdin closed; pressing Allow for you)"))
                return "allow"
            if key in KEYS:
                return KEYS[key][0]
            self._print(s.dim(f"  ({key!r} is not a button: press a, d or h)"))
