"""The Telegram guardian: approval cards with inline buttons, through python-telegram-bot.

PTB is asyncio code; agentgate is Trio. The bot's ``Application`` runs inside a trio-asyncio
loop owned by :func:`open_telegram_guardian`, and the two sides meet in one place::

    Trio (broker, gateway)                       asyncio (PTB Application, inside open_loop)
    GuardianControl ◀── Trio tasks ◀── channel ◀──trio_as_aio── handlers (button, command)
                                   _Poller ──update_queue.put──▶ (the updates it fetched)

Bot API calls (``send_card``, ``update_card``, the ``getUpdates`` long poll) are awaited in the
Trio task that makes them (:func:`agentgate._compat.bot_call_on_trio`), their HTTP done by
:class:`~agentgate.guardian._trio_request.TrioRequest`, a PTB ``BaseRequest`` on httpx's Trio
backend: httpx on the asyncio loop, and then each call's hops between the two loops, cost more
than anything else on the approval path.

The asyncio handlers only hand updates over; every decision runs on the Trio side, which checks
*who* pressed (``allowed_users``) and calls the gateway's :class:`GuardianControl`. Sends retry a
bounded number of times (honouring Telegram's ``RetryAfter``) and then fail closed with
:class:`GuardianUnavailable`; new messages are paced by a per-chat token bucket.

Updates are polled by :class:`_Poller`, a Trio task of ours rather than PTB's ``Updater``: PTB's
polling stops for good after one 401 and its start raises on one 502 or 409 to
``deleteWebhook``. Ours never stops: every error (network, 5xx, 409 conflicts, 429, a refused
token) is retried with a growing pause (at most a minute), logged once per change of state and
shown by ``/status``; asks fail closed meanwhile only if cards cannot be sent.

At start, ``getMe`` answered 401/404 (the token) or ``getChat`` refused (the chat) raise
:class:`GuardianRefused` naming the key to fix; the supervisor makes that a configuration error
on the first start and an outage to ride out later.

Card text is Telegram HTML; every string that an agent can influence is escaped, and invisible or
direction-changing characters are shown as ``\\uXXXX`` so that nothing on a card can hide or
fake a part of it.

Imports: guardian, guardian.card, guardian._trio_request, config, _compat.
"""

from __future__ import annotations

# trio_asyncio patches asyncio; imported after anyio or httpx, every Telegram request inside
# open_loop() fails with "no running event loop".
import trio_asyncio  # isort: skip

import datetime as dt
import html
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from functools import partial
from typing import Any, Protocol, TypeVar

import trio
from attrs import field, frozen

from agentgate._compat import bot_call_on_trio, wait_all_tasks_blocked

# PTB 22 warns on every RetryAfter unless timedelta periods are opted into; opt in (the future
# behaviour) so flood control is a plain exception, also under warnings-as-errors.
os.environ.setdefault("PTB_TIMEDELTA", "true")

from telegram import (
    BotCommand,
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    Message,
    Update,
)
from telegram.constants import ParseMode
from telegram.error import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
    TimedOut,
)
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    filters,
)

from agentgate.config import client_ssl_context
from agentgate.guardian import (
    Action,
    ApprovalCard,
    CardUpdate,
    GatewayStatus,
    Grant,
    GuardianControl,
    GuardianRefused,
    GuardianUnavailable,
    UndoItem,
)
from agentgate.guardian._trio_request import TrioRequest
from agentgate.guardian.card import (
    MAX_TEXT,
    CardRules,
    CardTooLarge,
    arguments_document,
    clip,
    document_name,
    offers,
    remaining,
    render_card,
    render_resolution,
    reveal_key,
    reveal_value,
    utc,
    utf16_len,
)

__all__ = [
    "COMMANDS",
    "SendLimits",
    "TelegramGuardian",
    "TelegramSettings",
    "open_telegram_guardian",
    "render_card",
    "render_resolution",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CALLBACK_DATA = 64  # bytes
POLL_TIMEOUT = 10  # seconds of one getUpdates long poll (returns at once when a press arrives)
# After a poll that brought presses, the next getUpdates waits until they have settled: handed
# over (nothing left to run) and each decided press's outcome gone out to its agent. Sent at
# once, its HTTP work would run between a press and its result, on the one event-loop thread.
# It waits at most this long (a slow service call, or a loop that never idles under load), so
# a press that arrives meanwhile waits at most this long in Telegram's queue.
POLL_SETTLE = 0.005
POLL_PAUSE = 0.02  # polls that bring nothing start at most this often (no busy loop)
SHUTDOWN_GRACE = 5.0  # seconds for PTB to stop, all steps together
UPDATER_STOP_GRACE = 1.0
SEND_CONNECTIONS = 8  # Bot API calls in flight at most
POLL_RETRY_DELAYS = (
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
)  # seconds after a failed poll; the last repeats
CONFIRM_GRACE = 1.0  # seconds for the last getUpdates that confirms what was fetched
# While Bot API calls are in flight, the gateway's loop is checked this often; a check that
# comes later than this much beyond its time is the gateway's own stall, not Telegram's.
STALL_TICK = 0.1
STALL_TOLERANCE = 0.1
ALLOWED_UPDATES = (Update.MESSAGE, Update.CALLBACK_QUERY)

COMMANDS: tuple[tuple[str, str], ...] = (
    ("pending", "Re-send every pending approval"),
    ("grants", "List active grants, 'Allow 1 h' and 'Always allow' (with Revoke buttons)"),
    ("undo", "List the recent calls Undo can put back (with Undo buttons)"),
    ("freeze", "Deny every new request until /unfreeze"),
    ("unfreeze", "Back to normal approvals"),
    ("status", "Connected agents, pending approvals, frozen or not"),
    ("help", "What this bot does"),
)

NOT_AUTHORISED = "not authorised"
EXPIRED = "expired or unknown button"


class TelegramSettings(Protocol):
    """What the guardian reads from ``[guardian.telegram]`` (``config.TelegramConfig`` fits)."""

    @property
    def token(self) -> str: ...

    @property
    def chat_id(self) -> int: ...

    @property
    def allowed_users(self) -> tuple[int, ...]: ...

    @property
    def base_url(self) -> str | None: ...


@frozen
class SendLimits:
    """How hard the guardian tries to deliver, and how fast it may send.

    Defaults keep under the Bot API's rates (about 20 messages a minute to one group, one a
    second to a private chat, short bursts allowed) and fail an ask closed after ~10 s of
    Telegram's time (time the gateway's own loop was stalled does not count: :class:`_Stalls`).
    """

    attempts: int = 3  # per message, RetryAfter included
    budget: float = 10.0  # seconds for all attempts of one message
    backoff: tuple[float, ...] = (0.5, 1.0)  # pause after a network error, per attempt
    burst: int = 20  # messages a chat may get at once
    group_per_minute: float = 20.0
    private_per_minute: float = 60.0
    queue_budget: float = 60.0  # seconds a new message may wait for its send slot
    # A fresh decision is answered (the press's progress bar stopped) once its card shows the
    # outcome, or after this many seconds: the execution runs first, unhurried by the answer.
    answer_wait: float = 3.0
    poll_backoff: tuple[float, ...] = POLL_RETRY_DELAYS  # pauses after failed polls


# -- rendering (pure functions) -------------------------------------------------------------


def _field(text: str, limit: int) -> str:
    """One agent-influenced line: revealed, clipped, HTML-escaped."""
    return html.escape(clip(reveal_value(text), limit), quote=False)


def _callback(kind: str, ident: str) -> str:
    data = f"{kind}:{ident}"
    if len(data.encode()) > MAX_CALLBACK_DATA:
        raise GuardianUnavailable(f"id too long for a Telegram button ({len(data.encode())} bytes)")
    return data


def card_keyboard(
    request_id: str, *, grant: bool = True, always: int | None = None
) -> InlineKeyboardMarkup:
    """Allow / Deny buttons for one request, Allow 1 h unless ``grant`` is False, and Always
    allow when ``always`` (the approvals that suggest it) is set."""
    rows = [
        [
            InlineKeyboardButton("✅ Allow", callback_data=_callback("allow", request_id)),
            InlineKeyboardButton("❌ Deny", callback_data=_callback("deny", request_id)),
        ]
    ]
    if grant:
        row = [InlineKeyboardButton("⏱ Allow 1 h", callback_data=_callback("grant", request_id))]
        if always is not None:
            label = f"🔁 Always allow (approved {always} times)"
            row.append(InlineKeyboardButton(label, callback_data=_callback("always", request_id)))
        rows.append(row)
    return InlineKeyboardMarkup(rows)


def keyboard_for(card: ApprovalCard) -> InlineKeyboardMarkup:
    """The buttons ``card`` carries while it waits (:func:`~agentgate.guardian.card.offers`)."""
    grant, always = offers(card)
    return card_keyboard(
        card.request_id, grant=grant, always=card.approved_before if always else None
    )


def check_buttons_fit(card: ApprovalCard) -> None:
    """Raise :class:`GuardianUnavailable` if ``card``'s request id is too long for the
    longest button :func:`keyboard_for` gives it, without building the keyboard."""
    grant, always = offers(card)
    _callback("always" if grant and always else "allow", card.request_id)


def undo_keyboard(request_id: str) -> InlineKeyboardMarkup:
    """The ↩ Undo button an executed, undoable call's card keeps."""
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton("↩ Undo", callback_data=_callback("undo", request_id))]]
    )


CALLBACK_KINDS = frozenset({"allow", "deny", "grant", "always", "revoke", "undo", "undo!"})


def parse_callback(data: str) -> tuple[str, str] | None:
    """``allow|deny|grant|always|revoke|undo|undo!:<id>`` → (kind, id); anything else → None."""
    kind, sep, ident = data.partition(":")
    if not sep or not ident or kind not in CALLBACK_KINDS:
        return None
    if len(data.encode()) > MAX_CALLBACK_DATA or not ident.isprintable():
        return None
    return kind, ident


def render_grants(grants: list[Grant], *, now: float) -> tuple[str, InlineKeyboardMarkup | None]:
    """The /grants answer: one line and one Revoke button per grant."""
    if not grants:
        return "No active grants.", None
    lines = ["<b>Active grants</b> (Allow 1 h, Always allow):"]
    rows = []
    for n, grant in enumerate(grants, 1):
        until = (
            "always (until revoked)"
            if grant.permanent
            else f"until {utc(grant.expires_at)} ({remaining(grant.expires_at - now)})"
        )
        lines.append(
            f"{n}. <code>{_field(grant.signature, 300)}</code> — agent {_field(grant.agent, 100)},"
            f" by {_field(grant.granted_by, 100)}, {until}"
        )
        data = f"revoke:{grant.grant_id}"
        if len(data.encode()) <= MAX_CALLBACK_DATA:
            rows.append([InlineKeyboardButton(f"Revoke {n}", callback_data=data)])
    text = "\n".join(lines)
    if utf16_len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 40].rsplit("\n", 1)[0] + "\n… (more grants not shown)"
    return text, InlineKeyboardMarkup(rows) if rows else None


MAX_UNDO_LISTED = 10


def render_undoable(
    items: list[UndoItem], *, now: float
) -> tuple[str, InlineKeyboardMarkup | None]:
    """The /undo answer: the calls an Undo can put back now, newest first, one button each."""
    if not items:
        return "Nothing to undo: no undoable call in its undo window.", None
    shown = items[:MAX_UNDO_LISTED]
    lines = ["<b>Undo</b> (newest first):"]
    rows = []
    for n, item in enumerate(shown, 1):
        who = f"allowed by {_field(item.decided_by, 100)}" if item.decided_by else "by policy"
        lines.append(
            f"{n}. <code>{_field(item.signature, 300)}</code> — agent {_field(item.agent, 100)},"
            f" {who}, at {utc(item.executed_at)}; undo sets {_field(item.restores, 300)}"
            f" (until {utc(item.until)}, {remaining(item.until - now)})"
        )
        rows.append(
            [InlineKeyboardButton(f"↩ Undo {n}", callback_data=_callback("undo", item.request_id))]
        )
    if len(items) > len(shown):
        lines.append(f"… and {len(items) - len(shown)} older (agentgate undo REQUEST_ID)")
    text = "\n".join(lines)
    if utf16_len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 40].rsplit("\n", 1)[0] + "\n… (more not shown)"
    return text, InlineKeyboardMarkup(rows)


def render_status(status: GatewayStatus, telegram: str = "ok") -> str:
    """The /status answer; ``telegram`` is how polling Telegram goes (:meth:`_Poller.health`)."""
    agents = ", ".join(
        f"{_field(name, 100)} ({count})" for name, count in sorted(status.agents_connected.items())
    )
    return (
        f"<b>agentgate status</b>\n"
        f"Agents connected: {agents or 'none'}\n"
        f"Pending approvals: {status.pending}\n"
        f"Frozen: {'yes — every ask is denied' if status.frozen else 'no'}\n"
        f"Telegram: {_field(telegram, 300)}"
    )


HELP_TEXT = (
    "<b>agentgate guardian</b>\n"
    "Approval cards arrive here; press Allow, Deny or Allow 1 h (Always allow once you have"
    " approved the same request a few times). An executed call's card keeps ↩ Undo for a"
    " while.\n"
    + "\n".join(f"/{name} — {html.escape(what, quote=False)}" for name, what in COMMANDS)
)


def parse_ref(message_ref: str) -> tuple[int, int]:
    """``"chat_id:message_id"`` → (chat_id, message_id); ValueError when malformed."""
    chat, _, message = message_ref.rpartition(":")
    return int(chat), int(message)


# -- pacing and delivery ----------------------------------------------------------------------


class TokenBucket:
    """Paces sends: ``capacity`` at once, refilled at ``rate`` per second (Trio clock)."""

    def __init__(self, capacity: float, rate: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.tokens = capacity
        self.stamp = trio.current_time()

    async def take(self) -> None:
        """Wait until one token is available and take it."""
        while True:
            now = trio.current_time()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await trio.sleep((1 - self.tokens) / self.rate)


class _NotModified(GuardianUnavailable):
    """Telegram refused an edit that would change nothing (the card already shows it)."""


def _refused(what: str, exc: BadRequest, token: str) -> GuardianUnavailable:
    """A 400 from the Bot API as a typed condition: its kind is only in the description."""
    message = _redact(exc.message, token)
    if "not modified" in message.lower():  # PTB has no class of its own for this one
        return _NotModified(f"Telegram {what}: {message}")
    return GuardianUnavailable(f"Telegram {what} refused: {message}")


def _redact(text: str, token: str) -> str:
    return text.replace(token, "<token>") if token else text


class _RedactToken(logging.Filter):
    """Keeps the bot token out of httpx's request log lines (it is part of every URL)."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        if self.token in record.getMessage():
            record.msg = _redact(record.getMessage(), self.token)
            record.args = ()
        return True


@frozen
class _Press:
    query_id: str
    user_id: int
    user_name: str
    data: str
    chat_id: int | None  # the message the button is on; None for inline-mode messages
    message_id: int | None

    @property
    def message_ref(self) -> str | None:
        if self.chat_id is None or self.message_id is None:
            return None
        return f"{self.chat_id}:{self.message_id}"


@frozen
class _Command:
    name: str
    user_id: int
    user_name: str
    chat_id: int
    private: bool


_Event = _Press | _Command

STRANGER_AUDITS = 3  # audit rows per stranger per minute; later presses are only answered
STRANGERS_REMEMBERED = 10_000


class _StrangerLog:
    """How often a stranger's press or command is audited: a few a minute per user."""

    def __init__(self) -> None:
        self._seen: OrderedDict[int, list[float]] = OrderedDict()

    def counts(self, user_id: int) -> bool:
        """Whether this attempt gets an audit row (and a log line)."""
        now = trio.current_time()
        stamps = [t for t in self._seen.pop(user_id, []) if now - t < 60]
        counted = len(stamps) < STRANGER_AUDITS
        if counted:
            stamps.append(now)
        self._seen[user_id] = stamps
        while len(self._seen) > STRANGERS_REMEMBERED:
            self._seen.popitem(last=False)
        return counted


class _Credit:
    """Seconds by which one call's budget was extended (:class:`_Stalls`)."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


class _Stalls:
    """Keeps a Bot API call's budget for Telegram's time, not the gateway's.

    A call needs several rounds of the event loop (its slot, PTB's encoding, the HTTP exchange,
    the answer's parsing). When the loop's rounds take seconds (10,000 asks admitted at once, a
    long garbage collection), a call can spend its whole budget waiting for the gateway itself
    while Telegram answered at once, and its ask would fail closed, blamed on Telegram. So while
    calls are in flight :meth:`run` sleeps :data:`STALL_TICK` at a time and measures how late it
    wakes: a wake-up later than :data:`STALL_TOLERANCE` is a stalled loop, and every call in
    flight gets that much more time (it still fails closed if Telegram does not answer within
    its budget). It sleeps while no call is in flight: an idle gateway never wakes for it.
    """

    def __init__(self) -> None:
        self._budgets: dict[trio.CancelScope, _Credit] = {}
        self._busy = trio.Event()

    @contextmanager
    def credit(self, budget: trio.CancelScope) -> Iterator[_Credit]:
        """Extend ``budget``'s deadline by the loop's stalls while the block runs."""
        credit = self._budgets[budget] = _Credit()
        self._busy.set()
        try:
            yield credit
        finally:
            del self._budgets[budget]

    async def run(self) -> None:
        while True:
            await self._busy.wait()
            while self._budgets:
                start = trio.current_time()
                await trio.sleep(STALL_TICK)
                late = trio.current_time() - start - STALL_TICK
                if late > STALL_TOLERANCE:
                    for budget, credit in self._budgets.items():
                        budget.deadline += late
                        credit.seconds += late
            self._busy = trio.Event()


@frozen
class _Pacing:
    limits: SendLimits
    buckets: dict[int, TokenBucket] = field(factory=dict)

    def bucket(self, chat_id: int) -> TokenBucket:
        if chat_id not in self.buckets:
            per_minute = (
                self.limits.private_per_minute if chat_id > 0 else self.limits.group_per_minute
            )
            self.buckets[chat_id] = TokenBucket(self.limits.burst, per_minute / 60)
        return self.buckets[chat_id]


class TelegramGuardian:
    """The :class:`~agentgate.guardian.Guardian` that shows cards in one Telegram chat.

    Made by :func:`open_telegram_guardian`; valid only inside its ``async with`` block.
    """

    def __init__(
        self,
        app: Application[Any, Any, Any, Any, Any, Any],
        config: TelegramSettings,
        control: GuardianControl,
        limits: SendLimits,
        cards: CardRules,
    ) -> None:
        self._app = app
        self._cards = cards
        self._strangers = _StrangerLog()
        self._bot = app.bot
        self._chat_id = config.chat_id
        self._allowed = frozenset(config.allowed_users)
        self._token = config.token
        self._control = control
        self._limits = limits
        self._pacing = _Pacing(limits)
        # At most this many Bot API calls in flight: a burst of cards waits here, in a fair FIFO,
        # not in httpcore's pool, which rescans every waiting request on every event.
        self._calls = trio.CapacityLimiter(SEND_CONNECTIONS)
        # Presses waiting for their card's outcome before they are answered: request id ->
        # events, set by update_card.
        self._outcomes: dict[str, list[trio.Event]] = {}
        self._outcome_shown = trio.Event()  # set (and renewed) when a press stops waiting
        self._stalls = _Stalls()
        self.poller: _Poller | None = None  # set once polling runs

    async def watch_stalls(self) -> None:
        """Keep the Bot API calls' budgets for Telegram's time (:class:`_Stalls`); run it
        beside the guardian."""
        await self._stalls.run()

    # -- Guardian ---------------------------------------------------------------------------

    async def send_card(self, card: ApprovalCard) -> str:
        """Post a new approval card with its buttons; return ``"chat_id:message_id"``.

        Raises :class:`GuardianUnavailable` when Telegram cannot be reached within the bounded
        retry (the ask then fails closed).
        """
        return await self._send_card_to(self._chat_id, card)

    async def update_card(self, card: ApprovalCard, message_ref: str, update: CardUpdate) -> None:
        """Show the card's resolution and remove its buttons. Best effort: logs, never raises."""
        for shown in self._outcomes.pop(card.request_id, ()):
            shown.set()
        self._outcome_changed()
        try:
            chat_id, message_id = parse_ref(message_ref)
        except ValueError:
            log.error("cannot update card %s: bad message ref %r", card.request_id, message_ref)
            return

        layout = self._cards.shown_layout(card)

        keyboard = undo_keyboard(card.request_id) if update.undo_until is not None else None

        def edit() -> Awaitable[Any]:
            # Rendered once a send slot is free: when 10,000 approvals end at once, their edits
            # wait in line without their text, and the CPU goes first to the agents' outcomes.
            text = render_resolution(
                card, update, now=time.time(), layout=layout, max_chars=self._cards.max_chars
            )
            return self._bot.edit_message_text(  # type: ignore[no-any-return]
                text,
                chat_id=chat_id,
                message_id=message_id,
                parse_mode=ParseMode.HTML,
                reply_markup=keyboard,
            )

        try:
            await self._deliver("editMessageText", edit)
        except _NotModified:
            pass  # it shows this already
        except GuardianUnavailable as exc:
            log.warning("could not update card %s: %s", card.request_id, exc.message)
        except Exception:
            log.exception("could not update card %s", card.request_id)

    async def restore_card(self, card: ApprovalCard, message_ref: str) -> None:
        """The card as it was asked, buttons included (after a planned restart, or with its
        votes so far). Best effort."""
        try:
            chat_id, message_id = parse_ref(message_ref)
        except ValueError:
            log.error("cannot restore card %s: bad message ref %r", card.request_id, message_ref)
            return
        layout = self._cards.shown_layout(card)

        def edit() -> Awaitable[Any]:
            text = render_card(card, now=time.time(), layout=layout)
            return self._bot.edit_message_text(  # type: ignore[no-any-return]
                text,
                chat_id=chat_id,
                message_id=message_id,
                parse_mode=ParseMode.HTML,
                reply_markup=keyboard_for(card),
            )

        try:
            await self._deliver("editMessageText", edit)
        except _NotModified:
            pass
        except (GuardianUnavailable, CardTooLarge) as exc:
            log.warning("could not restore card %s: %s", card.request_id, exc)
        except Exception:
            log.exception("could not restore card %s", card.request_id)

    async def notify(
        self, text: str, buttons: Sequence[tuple[str, str]] = (), *, silent: bool = False
    ) -> None:
        """A message for the guardians' chat (plain text, escaped), with buttons; ``silent``:
        delivered without a sound (``disable_notification``). Best effort."""
        markup = None
        if buttons:
            markup = InlineKeyboardMarkup(
                [[InlineKeyboardButton(label, callback_data=data)] for label, data in buttons]
            )
        body = html.escape(clip(reveal_value(text.replace("\n", " ⏎ ")), MAX_TEXT - 100))
        body = body.replace(" ⏎ ", "\n")
        await self._reply(self._chat_id, body, markup, silent=silent)

    # -- sending ----------------------------------------------------------------------------

    async def _send_card_to(self, chat_id: int, card: ApprovalCard) -> str:
        """Send ``card`` (its arguments document first, if it needs one); its message ref."""
        check_buttons_fit(card)  # a request id too long for a button fails here, unsent
        try:
            layout = self._cards.layout(card)
        except CardTooLarge as exc:  # the gateway refuses such asks; never send a partial card
            raise GuardianUnavailable(f"card not sent: {exc}") from exc
        if layout == "document":
            await self._send_document(chat_id, card)

        def compose() -> tuple[str, InlineKeyboardMarkup]:
            # Text and buttons are made when the card is sent, not while it waits for a send
            # slot: 10,000 queued cards then hold only their ApprovalCard, and the expiry line
            # is current.
            text = render_card(card, now=time.time(), layout=layout)
            return text, keyboard_for(card)

        message = await self._send(chat_id, compose)
        return f"{message.chat_id}:{message.message_id}"

    async def _send_document(self, chat_id: int, card: ApprovalCard) -> None:
        """The complete arguments of ``card``, as a file, before the message with its buttons."""
        with trio.move_on_after(self._limits.queue_budget) as slot:
            await self._pacing.bucket(chat_id).take()
        if slot.cancelled_caught:
            raise GuardianUnavailable("too many Telegram messages queued; send rate exceeded")
        content = arguments_document(card)
        caption = (
            f"Arguments of approval {card.request_id[:8]} (agent {reveal_key(card.agent)},"
            f" {reveal_key(card.tool)}): {len(content):,} characters"
        )

        def send() -> Awaitable[Message]:
            document = InputFile(content, filename=document_name(card))
            return self._bot.send_document(  # type: ignore[no-any-return]
                chat_id, document, caption=caption, disable_content_type_detection=True
            )

        await self._deliver("sendDocument", send)

    async def _send(
        self,
        chat_id: int,
        compose: Callable[[], tuple[str, InlineKeyboardMarkup | None]],
        *,
        silent: bool = False,
    ) -> Message:
        """A new message: wait for a send slot, then deliver with the bounded retry."""
        with trio.move_on_after(self._limits.queue_budget) as slot:
            await self._pacing.bucket(chat_id).take()
        if slot.cancelled_caught:
            raise GuardianUnavailable("too many Telegram messages queued; send rate exceeded")

        quiet = {"disable_notification": True} if silent else {}

        def send() -> Awaitable[Message]:
            text, keyboard = compose()
            return self._bot.send_message(  # type: ignore[no-any-return]
                chat_id, text, parse_mode=ParseMode.HTML, reply_markup=keyboard, **quiet
            )

        return await self._deliver("sendMessage", send)

    async def _deliver(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run one Bot API call in this task: a few attempts within ``limits.budget`` (of
        Telegram's time: :class:`_Stalls`), honouring RetryAfter; then
        :class:`GuardianUnavailable` naming the last cause."""
        limits = self._limits
        cause = "no attempt made"
        last: BaseException | None = None
        with (
            trio.move_on_at(trio.current_time() + limits.budget) as budget,
            self._stalls.credit(budget) as stalled,
        ):
            for attempt in range(limits.attempts):
                try:
                    async with self._calls:
                        result: T = await bot_call_on_trio(call)
                    return result
                except RetryAfter as exc:
                    last, pause = exc, _retry_after_seconds(exc)
                    cause = f"rate limited by Telegram (retry after {pause:g} s)"
                except BadRequest as exc:  # our request is wrong: retrying cannot help
                    raise _refused(what, exc, self._token) from exc
                except NetworkError as exc:  # includes TimedOut
                    last = exc
                    pause = limits.backoff[min(attempt, len(limits.backoff) - 1)]
                    cause = f"Telegram unreachable ({_redact(str(exc), self._token)})"
                except TelegramError as exc:  # InvalidToken, Forbidden, Conflict...
                    raise GuardianUnavailable(
                        f"Telegram {what} failed: {_redact(exc.message, self._token)}"
                    ) from exc
                if attempt + 1 == limits.attempts or trio.current_time() + pause > budget.deadline:
                    break
                await trio.sleep(pause)
        if last is None:
            cause = f"no answer within {limits.budget:g} s"
        if stalled.seconds:
            cause += f" (not counting {stalled.seconds:.1f} s in which the gateway itself was busy)"
        raise GuardianUnavailable(
            f"Telegram {what} failed after {limits.attempts} attempts"
            f" / {limits.budget:g} s: {cause}"
        ) from last

    async def _reply(
        self,
        chat_id: int,
        text: str,
        keyboard: InlineKeyboardMarkup | None = None,
        *,
        silent: bool = False,
    ) -> None:
        try:
            await self._send(chat_id, lambda: (text, keyboard), silent=silent)
        except GuardianUnavailable as exc:
            log.warning("could not answer a command: %s", exc.message)

    async def _answer(self, query_id: str, text: str) -> None:
        try:
            await self._deliver(
                "answerCallbackQuery",
                lambda: self._bot.answer_callback_query(query_id, text=text[:200]),
            )
        except GuardianUnavailable as exc:
            log.warning("could not answer a button press: %s", exc.message)

    # -- updates from Telegram (Trio side) ----------------------------------------------------

    async def _consume(self, updates: trio.MemoryReceiveChannel[_Event]) -> None:
        async with trio.open_nursery() as nursery:
            async for event in updates:
                nursery.start_soon(self._handle, event)

    async def _handle(self, event: _Event) -> None:
        try:
            if isinstance(event, _Press):
                await self._on_press(event)
            else:
                await self._on_command(event)
        except Exception:
            log.exception("guardian failed to handle %r", event)

    async def _on_press(self, press: _Press) -> None:
        who = f"{press.user_name} ({press.user_id})"
        if press.user_id not in self._allowed:
            if self._strangers.counts(press.user_id):  # audited before it is answered
                await self._control.refused(who, f"button {press.data[:80]!r}")
            await self._answer(press.query_id, NOT_AUTHORISED)
            return
        parsed = parse_callback(press.data)
        if parsed is None:
            await self._control.refused(who, f"button {press.data[:80]!r}: not one of ours")
            await self._answer(press.query_id, EXPIRED)
            return
        kind, ident = parsed
        if kind == "revoke":
            revoked = await self._control.revoke_grant(ident, by=who)
            text = "grant revoked" if revoked else "grant already gone (expired or revoked)"
        elif kind in ("undo", "undo!"):
            if press.chat_id != self._chat_id:  # Undo buttons are the guardians' chat's only
                await self._control.refused(who, f"button {press.data[:80]!r} in a foreign chat")
                text = EXPIRED
            else:
                answer = await self._control.undo(ident, by=who, confirm=kind == "undo!")
                text = answer.text
        else:
            # Decides only the approval whose card this is, in the guardians' chat: the
            # gateway checks the message against the approval's cards.
            ref = press.message_ref if press.chat_id == self._chat_id else None
            text = await self._decide(
                ident, Action(kind), who, ref or f"foreign {press.chat_id}", str(press.user_id)
            )
        await self._answer(press.query_id, text)

    async def _decide(
        self, ident: str, action: Action, who: str, message_ref: str, voter: str
    ) -> str:
        """Decide, then wait (bounded) until the card shows the outcome.

        Telegram shows a progress bar on the button until the press is answered; answering when
        the card changes keeps the two together, and keeps the answer's Bot API call off the
        path from the press to the agent's result.
        """
        shown = trio.Event()
        self._outcomes.setdefault(ident, []).append(shown)
        try:
            answer = await self._control.decide(
                ident, action, by=who, message_ref=message_ref, voter=voter
            )
            if answer.decided:
                with trio.move_on_after(self._limits.answer_wait):
                    await shown.wait()
            return answer.text
        finally:
            waiting = self._outcomes.get(ident)
            if waiting is not None and shown in waiting:
                waiting.remove(shown)
                if not waiting:
                    del self._outcomes[ident]
            self._outcome_changed()

    def _outcome_changed(self) -> None:
        self._outcome_shown.set()
        self._outcome_shown = trio.Event()

    async def settled(self) -> None:
        """Return once no press waits for its outcome: every approval decided by a press has
        delivered its result (the poller then fetches the next presses)."""
        while self._outcomes:
            await self._outcome_shown.wait()

    async def _on_command(self, command: _Command) -> None:
        who = f"{command.user_name} ({command.user_id})"
        if command.user_id not in self._allowed:
            # No reply: strangers must not be able to spend the chat's send budget.
            if self._strangers.counts(command.user_id):
                await self._control.refused(who, f"command /{command.name}")
            return
        if command.chat_id != self._chat_id and not command.private:
            log.warning(
                "ignoring /%s from %s in foreign chat %s", command.name, who, command.chat_id
            )
            return
        chat = command.chat_id
        if command.name == "pending":
            # Copies go to the guardians' chat, where presses count, whoever asked from where.
            pending = await self._control.pending()
            if not pending:
                await self._reply(chat, "No pending approvals.")
            elif chat != self._chat_id:
                await self._reply(chat, f"Sending {len(pending)} pending approval(s) to the group.")
            for item in pending:
                try:
                    ref = await self._send_card_to(self._chat_id, item.card)
                except GuardianUnavailable as exc:
                    log.warning("could not re-send card %s: %s", item.card.request_id, exc.message)
                else:
                    await self._control.card_copied(item.card.request_id, ref)
        elif command.name == "grants":
            text, keyboard = render_grants(await self._control.grants(), now=time.time())
            await self._reply(chat, text, keyboard)
        elif command.name == "undo":
            # Listed in the guardians' chat, where the buttons count, whoever asked from where.
            text, keyboard = render_undoable(await self._control.undoable(), now=time.time())
            await self._reply(self._chat_id, text, keyboard)
            if chat != self._chat_id:
                await self._reply(chat, "The undoable calls are listed in the group.")
        elif command.name in ("freeze", "unfreeze"):
            frozen_ = command.name == "freeze"
            await self._control.set_frozen(frozen_, by=who)
            await self._reply(
                chat,
                f"🧊 Frozen by {_field(who, 200)}: every ask is denied until /unfreeze."
                if frozen_
                else f"Unfrozen by {_field(who, 200)}: asks go to the guardians again.",
            )
        elif command.name == "status":
            health = self.poller.health() if self.poller is not None else "ok"
            await self._reply(chat, render_status(await self._control.status(), health))
        else:
            await self._reply(chat, HELP_TEXT)


def _retry_after_seconds(exc: RetryAfter) -> float:
    value: object = exc.retry_after  # a timedelta with PTB_TIMEDELTA set (above), else an int
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, int | float):
        return float(value)
    raise TypeError(f"RetryAfter.retry_after is neither seconds nor a timedelta: {value!r}")


def _build_application(config: TelegramSettings) -> Application[Any, Any, Any, Any, Any, Any]:
    # Both of PTB's request objects do their HTTP on the Trio side (see _trio_request.py), and
    # share one TLS context (each context holds the parsed CA bundle, ~0.8 MiB).
    tls = client_ssl_context(config.base_url or "https://api.telegram.org/bot")
    requests = TrioRequest(
        connections=SEND_CONNECTIONS,
        connect_timeout=3.0,
        read_timeout=5.0,
        write_timeout=5.0,
        pool_timeout=1.0,
        verify=tls,
    )
    polling = TrioRequest(
        connections=1,
        connect_timeout=3.0,
        read_timeout=5.0,
        write_timeout=5.0,
        pool_timeout=1.0,
        verify=tls,
    )
    builder = (
        Application.builder()
        .token(config.token)
        .job_queue(None)
        .updater(None)  # we poll ourselves (_Poller)
        .request(requests)
        .get_updates_request(polling)
    )
    if config.base_url:
        builder = builder.base_url(config.base_url)
    return builder.build()


def _start_error(exc: Exception, config: TelegramSettings) -> GuardianUnavailable:
    where = config.base_url or "https://api.telegram.org/bot"
    if isinstance(exc, InvalidToken):  # getMe answered 401 or 404
        return GuardianRefused(
            "Telegram refused the bot token (getMe answered Unauthorized or Not Found): check it"
            " with @BotFather",
            key="guardian.telegram.token",
        )
    if isinstance(exc, NetworkError):
        return GuardianUnavailable(
            f"Telegram Bot API unreachable at {where}: {_redact(str(exc), config.token)}"
        )
    return GuardianUnavailable(f"Telegram start-up failed: {_redact(str(exc), config.token)}")


@asynccontextmanager
async def open_telegram_guardian(
    config: TelegramSettings,
    control: GuardianControl,
    *,
    limits: SendLimits | None = None,
    cards: CardRules | None = None,
) -> AsyncIterator[TelegramGuardian]:
    """Run the Telegram bot for the ``async with`` block and yield the guardian.

    Checks the token with ``getMe`` first: a rejected token or an unreachable Bot API raises
    :class:`GuardianUnavailable` naming the cause. Once running, Telegram outages are logged
    and ridden out (polling resumes by itself); they never end the block. Leaving the block
    stops the bot within a few seconds, shielded from cancellation. ``limits`` defaults to
    :class:`SendLimits` with ``send_retries + 1`` attempts when the config has that key;
    ``cards`` (``[guardian] max_card_chars`` and ``card_overflow``) to Telegram's own limit.
    """
    cards = cards or CardRules()
    if limits is None:
        retries = getattr(config, "send_retries", None)  # [guardian.telegram] send_retries
        limits = SendLimits(attempts=retries + 1) if isinstance(retries, int) else SendLimits()
    redactor = _RedactToken(config.token)
    httpx_log = logging.getLogger("httpx")
    httpx_log.addFilter(redactor)
    try:
        with _unwrap_single_error():
            async with trio_asyncio.open_loop() as loop:
                # trio-asyncio's default handler re-raises any stray asyncio error (e.g. PTB's
                # "Task exception was never retrieved" when polling stops mid-outage) into the
                # loop's nursery, which would take the gateway down with it. Log instead.
                loop.set_exception_handler(partial(_on_asyncio_error, config.token))
                app = _build_application(config)
                try:
                    await trio_asyncio.aio_as_trio(app.initialize)()
                except Exception as exc:
                    with trio.move_on_after(SHUTDOWN_GRACE, shield=True):
                        await trio_asyncio.aio_as_trio(app.bot.shutdown)()
                    if isinstance(exc, InvalidToken):  # PTB's message quotes the token
                        raise _start_error(exc, config) from None
                    raise _start_error(exc, config) from exc
                try:
                    await _check_chat(app, config)
                    async with _running(app, config, control, limits, cards) as guardian:
                        yield guardian
                finally:
                    with trio.move_on_after(SHUTDOWN_GRACE, shield=True) as grace:
                        await _stop(app)
                    if grace.cancelled_caught:
                        log.warning("Telegram guardian did not stop within %s s", SHUTDOWN_GRACE)
    finally:
        httpx_log.removeFilter(redactor)


async def _check_chat(
    app: Application[Any, Any, Any, Any, Any, Any], config: TelegramSettings
) -> None:
    """``getChat``: the bot must be able to reach ``chat_id`` (a refusal names the key)."""
    try:
        await trio_asyncio.aio_as_trio(app.bot.get_chat)(config.chat_id)
    except (BadRequest, Forbidden) as exc:  # "chat not found", "bot was kicked", ...
        raise GuardianRefused(
            f"Telegram says the bot cannot reach chat {config.chat_id}:"
            f" {_redact(exc.message, config.token)} (add the bot to the chat, then check the id)",
            key="guardian.telegram.chat_id",
        ) from None
    except TelegramError as exc:
        raise _start_error(exc, config) from exc


def _on_asyncio_error(token: str, loop: object, context: dict[str, Any]) -> None:
    error = context.get("exception")
    log.warning(
        "Telegram (asyncio side): %s%s",
        context.get("message", "error"),
        f": {_redact(repr(error), token)}" if error is not None else "",
    )


@contextmanager
def _unwrap_single_error() -> Iterator[None]:
    """Let one error out as itself rather than inside the exception groups of our nurseries
    (and trio-asyncio's); callers of the context manager should never see those."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        pending: list[BaseException] = [group]
        while pending:
            exc = pending.pop()
            if isinstance(exc, BaseExceptionGroup):
                pending.extend(exc.exceptions)
            else:
                leaves.append(exc)
        if len(leaves) == 1 and isinstance(leaves[0], Exception):
            raise leaves[0] from leaves[0].__cause__
        raise


@asynccontextmanager
async def _running(
    app: Application[Any, Any, Any, Any, Any, Any],
    config: TelegramSettings,
    control: GuardianControl,
    limits: SendLimits,
    cards: CardRules,
) -> AsyncIterator[TelegramGuardian]:
    """Handlers, start, commands, polling; the Trio consumer in a nursery."""
    send, receive = trio.open_memory_channel[_Event](64)
    send_blocking = trio_asyncio.trio_as_aio(send.send)

    async def hand_over(event: _Event) -> None:
        # The asyncio loop runs inside a Trio task, so a non-blocking send is safe here and saves
        # a round trip; only a full channel waits (on the Trio side, through trio_as_aio).
        try:
            send.send_nowait(event)
        except trio.WouldBlock:
            await send_blocking(event)

    async def on_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query: CallbackQuery | None = update.callback_query
        if query is None:
            return
        user = query.from_user
        message = query.message  # MaybeInaccessibleMessage: chat and id even when inaccessible
        chat_id = message.chat.id if message is not None else None
        message_id = message.message_id if message is not None else None
        event = _Press(query.id, user.id, user.full_name, query.data or "", chat_id, message_id)
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):  # shutting down
            await hand_over(event)

    async def on_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None or message.from_user is None or not message.text:
            return
        name = message.text.split(maxsplit=1)[0][1:].split("@", 1)[0].lower()
        user = message.from_user
        chat = message.chat
        event = _Command(name, user.id, user.full_name, chat.id, chat.type == "private")
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await hand_over(event)

    async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.warning(
            "Telegram update handling failed: %s", _redact(repr(context.error), config.token)
        )

    app.add_handler(CallbackQueryHandler(on_button))
    app.add_handler(
        CommandHandler(
            [name for name, _ in COMMANDS] + ["start"], on_command, filters.UpdateType.MESSAGE
        )
    )
    app.add_error_handler(on_error)
    guardian = TelegramGuardian(app, config, control, limits, cards)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guardian._consume, receive)
        nursery.start_soon(guardian.watch_stalls)
        try:
            await trio_asyncio.aio_as_trio(app.start)()
            try:
                await trio_asyncio.aio_as_trio(app.bot.set_my_commands)(
                    [BotCommand(name, what) for name, what in COMMANDS]
                )
            except TelegramError as exc:
                log.warning("could not set the bot's command list: %s", exc)
            poller = guardian.poller = _Poller(
                app, config.token, limits.poll_backoff, guardian.settled
            )
            nursery.start_soon(poller.run)
            log.info("Telegram guardian running (chat %s)", config.chat_id)
            yield guardian
        finally:
            send.close()  # first: a handler blocked on the channel would stall app.stop()
            nursery.cancel_scope.cancel()
            if guardian.poller is not None:
                with trio.CancelScope(shield=True):
                    await guardian.poller.confirm()


class _Poller:
    """Fetches updates (``getUpdates`` long polls) and hands them to PTB's update queue.

    Presses made while the gateway was down still count (pending updates are kept). Never
    stops by itself: see the module docstring. ``health()`` says how it goes, for ``/status``.
    """

    def __init__(
        self,
        app: Application[Any, Any, Any, Any, Any, Any],
        token: str,
        backoff: tuple[float, ...] = POLL_RETRY_DELAYS,
        settled: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._app = app
        self._token = token
        self._backoff = backoff
        self._settled = settled or trio.lowlevel.checkpoint  # presses handed over are done
        self._loop = trio_asyncio.current_loop.get()
        self.offset: int | None = None  # the next update wanted (all before it are handled)
        self.problem: str | None = None  # what goes wrong now, or None
        self.since = 0.0  # unix time the problem began
        self.polls = 0  # getUpdates answered (tests wait on it)
        self._answered = trio.Event()

    def health(self) -> str:
        if self.problem is None:
            return "ok"
        return f"polling fails since {utc(self.since)}: {self.problem}"

    async def answered(self) -> None:
        """Return once the next getUpdates has been answered."""
        await self._answered.wait()

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """A Bot API call, in this Trio task."""
        return await bot_call_on_trio(partial(fn, *args, **kwargs))

    async def _hand_over(self, update: Update) -> None:
        """Into PTB's update queue, on the asyncio side (its handlers run there)."""
        await trio_asyncio.aio_as_trio(self._app.update_queue.put, loop=self._loop)(update)

    async def run(self) -> None:
        bot = self._app.bot
        failures = 0
        webhook_cleared = False
        while True:
            started = trio.current_time()
            try:
                if not webhook_cleared:
                    # getUpdates is refused while a webhook is set.
                    await self._call(bot.delete_webhook, drop_pending_updates=False)
                    webhook_cleared = True
                updates = await self._call(
                    bot.get_updates,
                    offset=self.offset,
                    timeout=POLL_TIMEOUT,
                    allowed_updates=list(ALLOWED_UPDATES),
                )
            except Exception as exc:
                pause, problem, level = self._trouble(exc, failures)
                if isinstance(exc, Conflict):
                    webhook_cleared = False
                self._report(problem, level, exc)
                failures += 1
                await trio.sleep(pause)
                continue
            failures = 0
            if self.problem is not None:
                log.info("Telegram polling works again (it failed: %s)", self.problem)
                self.problem = None
            self.polls += 1
            self._answered.set()
            self._answered = trio.Event()
            for update in updates:
                await self._hand_over(update)
                self.offset = update.update_id + 1
            await _before_next_poll(bool(updates), started, self._settled)

    def _trouble(self, exc: Exception, failures: int) -> tuple[float, str, int]:
        """(pause, what is wrong, log level) for a failed poll."""
        backoff = self._backoff[min(failures, len(self._backoff) - 1)]
        if isinstance(exc, RetryAfter):
            pause = _retry_after_seconds(exc)
            return pause, f"rate limited by Telegram (retry after {pause:g} s)", logging.WARNING
        if isinstance(exc, InvalidToken):
            return backoff, "Telegram refused the bot token (401)", logging.ERROR
        if isinstance(exc, Conflict):
            return backoff, f"conflict: {_redact(exc.message, self._token)}", logging.WARNING
        if isinstance(exc, TimedOut):
            return min(backoff, 1.0), "Telegram did not answer in time", logging.WARNING
        if isinstance(exc, NetworkError):  # includes 5xx answers
            return (
                backoff,
                f"Telegram unreachable: {_redact(exc.message, self._token)}",
                logging.WARNING,
            )
        if isinstance(exc, TelegramError):
            return backoff, f"Telegram error: {_redact(exc.message, self._token)}", logging.WARNING
        return backoff, f"unexpected error: {_redact(repr(exc), self._token)}", logging.ERROR

    def _report(self, problem: str, level: int, exc: Exception) -> None:
        """Log a problem once, when it begins or changes (not at every retry)."""
        if problem == self.problem:
            return
        if self.problem is None:
            self.since = time.time()
        self.problem = problem
        log.log(
            level,
            "Telegram polling failed: %s; retrying with a growing pause (at most %g s);"
            " presses wait in Telegram meanwhile",
            problem,
            self._backoff[-1],
            exc_info=exc if level >= logging.ERROR and not isinstance(exc, TelegramError) else None,
        )

    async def confirm(self) -> None:
        """Tell Telegram that every update handed over is done (one short getUpdates), so the
        next start does not fetch them again. Best effort, bounded."""
        if self.offset is None:
            return
        with trio.move_on_after(CONFIRM_GRACE):
            try:
                await self._call(
                    self._app.bot.get_updates,
                    offset=self.offset,
                    timeout=0,
                    allowed_updates=list(ALLOWED_UPDATES),
                )
            except Exception as exc:
                log.debug("could not confirm the last updates: %s", exc)


async def _before_next_poll(
    brought: bool, started: float, settled: Callable[[], Awaitable[None]]
) -> None:
    """Wait before the next getUpdates: after a poll that ``brought`` updates, until they have
    settled (at most ``POLL_SETTLE``); else until ``POLL_PAUSE`` after the last one ``started``."""
    if not brought:
        await trio.sleep_until(started + POLL_PAUSE)
        return
    with trio.move_on_after(POLL_SETTLE):
        # Trio's idle hook: no task is runnable, so what was handed over has reached the
        # guardian, each press waiting for its outcome.
        await wait_all_tasks_blocked()
        await settled()


async def _stop(app: Application[Any, Any, Any, Any, Any, Any]) -> None:
    """Stop polling, the application, then its HTTP clients; each step logged, never raised."""
    steps: list[tuple[str, Callable[[], Awaitable[None]], float]] = []
    if app.updater is not None and app.updater.running:
        # PTB's polling loop sleeps out its retry back-off (up to 30 s during an outage) before
        # it notices the stop; cutting it short cancels the polling task, which is all we need.
        steps.append(("updater.stop", app.updater.stop, UPDATER_STOP_GRACE))
    if app.running:
        steps.append(("stop", app.stop, SHUTDOWN_GRACE))
    steps.append(("shutdown", app.shutdown, SHUTDOWN_GRACE))
    for name, step, grace in steps:
        with trio.move_on_after(grace) as scope:
            try:
                await trio_asyncio.aio_as_trio(step)()
            except Exception as exc:
                log.warning("Telegram shutdown step %s failed: %s", name, exc)
        if scope.cancelled_caught:
            log.warning("Telegram shutdown step %s did not finish within %s s", name, grace)
