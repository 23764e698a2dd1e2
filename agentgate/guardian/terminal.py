"""A guardian in the terminal: ``agentgate serve gate.toml --terminal-guardian``.

Approval cards are drawn in the terminal that runs the gateway, with the text a Telegram card
has (:mod:`agentgate.guardian.card` renders both), and the operator decides with one key:
``a`` Allow, ``d`` Deny, ``h`` Allow 1 h, ``w`` Always allow (where the card offers it). Once
an undoable call has run and no card waits, ``u`` undoes the latest one (and confirms an Undo
that asked for it). No phone, no bot, no Telegram: for trying an approval before creating a
bot, and for an operator who sits at the gateway's console.

A terminal is one person: a rule that needs two guardians (``approvals: 2``) cannot be decided
here (``config check --terminal-guardian`` says so).

Safety rules, the same as Telegram's buttons and then some:

- A key decides the oldest card still waiting, and only a key pressed after that card's prompt
  appeared: keys typed earlier are dropped, so a stray ``a`` cannot approve the next card.
- Decisions go through :class:`~agentgate.guardian.GuardianControl` like a press in Telegram;
  the audit log names the decider as ``USER (terminal)``.
- When stdin closes nothing is decided for anyone: cards still appear, and wait until they
  time out.

The drawing helpers (:class:`Style`, :func:`bubble`, :func:`html_to_text`, :func:`cbreak`) are
shared with the demo's Telegram "phone" (:mod:`agentgate.demo_phone`).

Imports: guardian, guardian.card, inert.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
import termios
import textwrap
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from html.parser import HTMLParser
from typing import Final, TextIO

import trio
from attrs import frozen

from agentgate.guardian import (
    Action,
    ApprovalCard,
    CardUpdate,
    GuardianControl,
)
from agentgate.guardian.card import (
    CardRules,
    CardTooLarge,
    arguments_document,
    card_layout,
    document_name,
    offers,
    render_card,
    render_resolution,
    utc,
)
from agentgate.inert import inert

__all__ = [
    "KEYS",
    "WIDTH",
    "KeySource",
    "Style",
    "TerminalGuardian",
    "bubble",
    "cbreak",
    "html_to_text",
]

# key -> (callback kind, what the guardian sees on the button)
KEYS: Final[dict[str, tuple[str, str]]] = {
    "a": ("allow", "Allow"),
    "d": ("deny", "Deny"),
    "h": ("grant", "Allow 1 h"),
    "w": ("always", "Always allow"),
}
UNDO_KEY: Final = "u"


def card_keys(card: ApprovalCard) -> dict[str, tuple[str, str]]:
    """The keys ``card`` offers (its buttons, as :func:`~agentgate.guardian.card.offers`)."""
    grant, always = offers(card)
    wanted = {"allow", "deny"} | ({"grant"} if grant else set()) | ({"always"} if always else set())
    return {key: value for key, value in KEYS.items() if value[0] in wanted}


def card_buttons(card: ApprovalCard) -> list[list[str]]:
    """The buttons as the Telegram card lays them out."""
    grant, always = offers(card)
    rows = [["✅ Allow", "❌ Deny"]]
    if grant:
        rows.append(["⏱ Allow 1 h", "🔁 Always allow"] if always else ["⏱ Allow 1 h"])
    return rows


@frozen
class _UndoOffer:
    request_id: str
    signature: str
    until: float
    confirm: bool = False


WIDTH: Final = 64  # columns of a phone screen, roughly


@frozen
class Style:
    """ANSI colours, or nothing at all when the output is not a terminal."""

    enabled: bool

    @classmethod
    def for_stream(cls, stream: TextIO, *, force_off: bool = False) -> Style:
        """Colours only for a TTY, and never with ``NO_COLOR`` set (https://no-color.org)."""
        isatty = getattr(stream, "isatty", lambda: False)()
        return cls(bool(isatty) and not force_off and "NO_COLOR" not in os.environ)

    def _sgr(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled and text else text

    def bold(self, text: str) -> str:
        return self._sgr("1", text)

    def dim(self, text: str) -> str:
        return self._sgr("2", text)

    def green(self, text: str) -> str:
        return self._sgr("32", text)

    def red(self, text: str) -> str:
        return self._sgr("31", text)

    def yellow(self, text: str) -> str:
        return self._sgr("33", text)

    def blue(self, text: str) -> str:
        return self._sgr("34", text)

    def cyan(self, text: str) -> str:
        return self._sgr("36", text)


class _HtmlToText(HTMLParser):
    """Card HTML → terminal text: bold stays bold, code cyan; every piece of text made inert."""

    def __init__(self, style: Style) -> None:
        super().__init__(convert_charrefs=True)
        self.style = style
        self.parts: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if self.open:
            self.open.pop()

    def handle_data(self, data: str) -> None:
        lines = [inert(line) for line in data.split("\n")]
        paint: Callable[[str], str] | None = None
        if {"b", "strong"} & set(self.open):
            paint = self.style.bold
        elif {"code", "pre"} & set(self.open):
            paint = self.style.cyan
        if paint is not None:  # line by line, so every printed line resets its own colour
            lines = [paint(line) for line in lines]
        self.parts.append("\n".join(lines))


def html_to_text(html: str, style: Style) -> str:
    """What a card's Telegram HTML shows, as terminal text (bold and code marked for a TTY)."""
    parser = _HtmlToText(style)
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _wrap(text: str) -> list[str]:
    """Lines of at most ``WIDTH - 4`` visible characters (colour codes take no room)."""
    lines: list[str] = []
    for line in text.splitlines() or [""]:
        if len(_ANSI.sub("", line)) <= WIDTH - 4:
            lines.append(line)
        else:
            lines += textwrap.wrap(line, WIDTH - 4, replace_whitespace=False) or [""]
    return lines


def bubble(title: str, text: str, rows: Sequence[Sequence[str]], style: Style) -> list[str]:
    """One chat bubble as terminal lines: a title bar, the text, the buttons."""
    s = style
    top = f" {title} "
    lines = ["  " + s.blue("╭─" + top + "─" * max(2, WIDTH - len(top) - 2))]
    bar = s.blue("│")
    lines += [f"  {bar} {line}" for line in _wrap(text)]
    if rows:
        lines.append("  " + s.blue("├" + "─" * (WIDTH - 1)))
        for row in rows:
            lines.append(f"  {bar} " + "  ".join(s.bold(f"[ {label} ]") for label in row))
    lines.append("  " + s.blue("╰" + "─" * (WIDTH - 1)))
    return lines


def condensed(text: str, style: Style) -> str:
    """A resolved card's text as an edit shows it: the new status on top, the target as it is
    now, the rest of the card (already drawn just above) folded into one line."""
    head, blank, rest = text.partition("\n\n")
    if not blank:
        return text
    lines = rest.splitlines()
    kept = [line for line in lines if _ANSI.sub("", line).startswith("Target: ")]
    folded = f"… the card as above ({len(lines) - len(kept)} lines)"
    return "\n".join([head, *kept, style.dim(folded)])


@contextmanager
def cbreak(fd: int = 0) -> Iterator[bool]:
    """Read keys one at a time without echo while inside (if ``fd`` is a TTY); always restore.

    Ctrl-C still interrupts (cbreak keeps signals)."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class KeySource:
    """Key presses from a file descriptor, read by one worker thread for the whole run.

    One reader for the run, so a prompt that is abandoned (its card timed out) loses no key;
    ``os.read`` in a thread, so stdin is never switched to non-blocking mode (which would hit
    stdout too on a TTY).
    """

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.closed = False
        self._send, self._receive = trio.open_memory_channel[str | None](math.inf)

    async def run(self) -> None:
        """Read until end of file (then ``get`` returns None), or until cancelled."""
        while True:
            try:
                data = await trio.to_thread.run_sync(os.read, self.fd, 64, abandon_on_cancel=True)
            except OSError:
                data = b""
            if not data:
                self._send.send_nowait(None)
                return
            for char in data.decode(errors="replace"):
                if not char.isspace():
                    self._send.send_nowait(char.lower())

    def flush(self) -> None:
        """Forget every key pressed so far (they were not meant for what comes next)."""
        while True:
            try:
                key = self._receive.receive_nowait()
            except trio.WouldBlock:
                return
            if key is None:
                self.closed = True

    async def get(self) -> str | None:
        """The next key (lower-cased), or None once the input is closed."""
        if self.closed:
            return None
        key = await self._receive.receive()
        if key is None:
            self.closed = True
        return key


class TerminalGuardian:
    """The :class:`~agentgate.guardian.Guardian` of ``serve --terminal-guardian``.

    Set :attr:`control` to the gateway's controls, then run :meth:`run` for as long as the
    gateway runs; cards sent before that are drawn and wait for it.
    """

    def __init__(
        self,
        *,
        user: str,
        keys: KeySource | None,
        out: TextIO = sys.stdout,
        style: Style | None = None,
        cards: CardRules | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.control: GuardianControl | None = None
        self.user = user
        self.keys = keys
        self.out = out
        self.style = style or Style.for_stream(out)
        self.cards = cards or CardRules()
        self.now = now
        self._refs = itertools.count(1)
        self._run = f"{int(time.time()):x}"  # refs stay unique across restarts of the gateway
        self._waiting: dict[str, ApprovalCard] = {}  # message ref -> card, oldest first
        self._changed = trio.Event()
        self._prompt: tuple[str, trio.CancelScope] | None = None
        self._earlier: set[str] = set()  # refs of cards from before a restart, not drawn yet
        self._undo: _UndoOffer | None = None  # what u undoes, while no card waits

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        if self._prompt is not None and self._prompt[0] == "undo":
            self._prompt[1].cancel()  # a card came, or what u would undo changed: prompt again

    def banner(self) -> str:
        """The line that says who decides, printed once at start."""
        return (
            "terminal guardian: approval cards appear in this terminal; press a (Allow),"
            " d (Deny) or h (Allow 1 h), w (Always allow) where offered, and u to undo the"
            " latest undoable call. No phone and no Telegram are involved; decisions are"
            f" audited as {self.user!r}."
        )

    # -- Guardian -------------------------------------------------------------------------------

    async def send_card(self, card: ApprovalCard) -> str:
        ref = f"terminal-{self._run}-{next(self._refs)}"
        self._waiting[ref] = card
        if self.keys is None:  # nothing to prompt: shown at once, to wait out its time
            self._draw_card(card)
        self._touch()
        return ref

    async def cards_waiting(self, count: int) -> None:
        """Return once at least ``count`` cards wait for a decision here."""
        while len(self._waiting) < count:
            await self._changed.wait()

    def _draw_card(self, card: ApprovalCard) -> None:
        s = self.style
        try:
            layout = card_layout(card, max_chars=self.cards.max_chars, overflow="refuse")
        except CardTooLarge:
            layout = "document"  # a terminal has room: the arguments go just above the card
            self._print(s.dim(f"  📎 {document_name(card)}"))
            for line in arguments_document(card).decode("ascii").splitlines():
                self._print(f"  {s.dim('│')} {line}")
        text = html_to_text(render_card(card, now=self.now(), layout=layout), s)
        for line in bubble("🖥 agentgate · approval card", text, card_buttons(card), s):
            self._print(line)

    async def update_card(self, card: ApprovalCard, message_ref: str, update: CardUpdate) -> None:
        self._waiting.pop(message_ref, None)
        if self._prompt is not None and self._prompt[0] == message_ref:
            self._prompt[1].cancel()  # decided elsewhere, timed out, or the gateway stops
        self._touch()
        layout = self.cards.shown_layout(card)
        html = render_resolution(
            card, update, now=self.now(), layout=layout, max_chars=self.cards.max_chars
        )
        text = condensed(html_to_text(html, self.style), self.style)
        rows = [["↩ Undo"]] if update.undo_until is not None else []
        for line in bubble("🖥 agentgate · card updated", text, rows, self.style):
            self._print(line)
        if update.undo_until is not None:
            self._undo = _UndoOffer(card.request_id, card.signature, update.undo_until)
            self._touch()

    async def notify(
        self, text: str, buttons: Sequence[tuple[str, str]] = (), *, silent: bool = False
    ) -> None:
        """A message for the guardian, drawn as a bubble (``silent`` ones too: an audit
        checkpoint); an "Undo anyway" button makes ``u`` confirm that Undo."""
        rows = [[label] for label, _ in buttons]
        for line in bubble("🖥 agentgate · message", inert(text), rows, self.style):
            self._print(line)
        for _, data in buttons:
            kind, _, request_id = data.partition(":")
            if kind == "undo!" and request_id:
                self._undo = _UndoOffer(request_id, "", math.inf, confirm=True)
                self._touch()

    async def restore_card(self, card: ApprovalCard, message_ref: str) -> None:
        """After a planned restart: the card is shown again, and its keys decide it."""
        if message_ref in self._waiting:
            return  # shown again already (run() shows what was pending at start)
        self._earlier.add(message_ref)
        self._waiting[message_ref] = card
        if self.keys is None:
            self._draw(message_ref, card)
        self._touch()

    # -- the keyboard ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Prompt for the oldest waiting card and decide it with the key pressed; until
        cancelled. Returns early (deciding nothing more) if the keyboard is closed."""
        s = self.style
        if self.keys is None:
            self._print(s.yellow("  (no keyboard: cards are shown, and wait until they time out)"))
            return
        await self._show_earlier_cards()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.keys.run)
            while True:
                if not self._waiting:
                    offer = self._undo
                    if offer is not None and (offer.confirm or offer.until > self.now()):
                        if await self._offer_undo(offer):
                            continue
                    else:
                        await self._changed.wait()
                        continue
                    ref, card = "", None
                else:
                    ref, card = next(iter(self._waiting.items()))
                if card is None or not await self._decide(ref, card):
                    self._print(
                        s.yellow(
                            "  stdin is closed: nothing more can be decided in this terminal;"
                            " waiting cards will time out"
                        )
                    )
                    nursery.cancel_scope.cancel()
                    return

    async def _show_earlier_cards(self) -> None:
        """Approvals still pending from before this run (a restart): their cards were shown by
        the gateway's last run, so show them again here, where their keys can decide them."""
        assert self.control is not None, "set control to the gateway's controls first"
        for pending in await self.control.pending():
            ref = pending.message_ref
            if ref is None or ref in self._waiting:
                continue  # never shown: the broker sends it now, through send_card
            self._earlier.add(ref)
            self._waiting[ref] = pending.card
        self._touch()

    def _draw(self, ref: str, card: ApprovalCard) -> None:
        if ref in self._earlier:
            self._earlier.discard(ref)
            self._print(self.style.dim("  (an approval from before the restart, still pending)"))
        self._draw_card(card)

    async def _offer_undo(self, offer: _UndoOffer) -> bool:
        """Prompt for ``u`` while no card waits; False once keys end (True: go on)."""
        assert self.keys is not None
        assert self.control is not None
        s = self.style
        self.keys.flush()
        if offer.confirm:
            what = "confirm the Undo above"
        else:
            what = f"undo {offer.signature} (until {utc(offer.until)})"
        self._print(f"  {s.bold('↩')} [{UNDO_KEY}] {what}")
        while True:
            with trio.CancelScope() as scope:
                self._prompt = ("undo", scope)
                if math.isfinite(offer.until):
                    scope.deadline = trio.current_time() + max(0.0, offer.until - self.now())
                try:
                    key = await self.keys.get()
                finally:
                    self._prompt = None
            if scope.cancelled_caught:
                if self._undo is offer and not offer.confirm:
                    self._undo = None  # its window has passed
                return True  # a card came, or the offer changed
            if key is None:
                return False
            if key != UNDO_KEY:
                self._print(s.dim(f"  ({key!r}: no card is waiting; press {UNDO_KEY} to undo)"))
                continue
            self._undo = None
            self._print(f"  👆 {s.bold(self.user)} presses {s.bold('↩ Undo')}")
            answer = await self.control.undo(offer.request_id, self.user, confirm=offer.confirm)
            self._print(s.dim(f"  💬 {answer.text}"))
            return True

    async def _decide(self, ref: str, card: ApprovalCard) -> bool:
        """Prompt for one card until a key decides it or it leaves; False once keys end."""
        assert self.keys is not None
        s = self.style
        keys = card_keys(card)
        hint = "  ".join(f"[{key}] {label}" for key, (_, label) in keys.items())
        others = len(self._waiting) - 1
        more = f" ({others} more waiting: shown one at a time)" if others else ""
        # Cards are drawn one at a time, each just before its prompt: the card on screen with
        # buttons is always the one a key decides (a card arriving meanwhile waits its turn).
        self._draw(ref, card)
        self.keys.flush()  # only a key pressed from now on decides this card
        self._print(
            f"  {s.bold('Your move')} on {card.signature} for {card.agent}: {hint}{s.dim(more)}"
        )
        while True:
            with trio.CancelScope() as scope:
                self._prompt = (ref, scope)
                try:
                    key = await self.keys.get()
                finally:
                    self._prompt = None
            if scope.cancelled_caught:
                return True  # the card left: the next one gets a prompt
            if key is None:
                return False
            if key not in keys:
                shown = ", ".join(keys)
                self._print(s.dim(f"  ({key!r} is not a button of this card: press {shown})"))
                continue
            kind, label = keys[key]
            self._print(f"  👆 {s.bold(self.user)} presses {s.bold(label)}")
            assert self.control is not None, "set control to the gateway's controls first"
            answer = await self.control.decide(
                card.request_id, Action(kind), self.user, message_ref=ref
            )
            # Pressed: decided now, or already over ("expired"); either way no more prompts.
            self._waiting.pop(ref, None)
            self._print(s.dim(f"  💬 {answer.text}"))
            return True
