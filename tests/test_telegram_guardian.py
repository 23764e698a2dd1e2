"""The Telegram guardian: pure rendering (fast tier), then real PTB against the fake Bot API.

Real tier note: trio-asyncio plus real I/O cannot use ``autojump_clock`` (PTB's timeouts would
fire at once), so those tests run on the real clock under ``trio.fail_after`` ceilings.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from attrs import frozen

from agentgate.guardian import (
    Action,
    ApprovalCard,
    CardUpdate,
    GatewayStatus,
    Grant,
    GuardianRefused,
    GuardianUnavailable,
    PendingCard,
    PressAnswer,
    Status,
    UndoItem,
)
from agentgate.guardian import telegram as telegram_module
from agentgate.guardian.card import (
    CardRules,
    CardTooLarge,
    arguments_document,
    card_layout,
    utf16_len,
)
from agentgate.guardian.telegram import (
    MAX_TEXT,
    POLL_PAUSE,
    POLL_SETTLE,
    SHUTDOWN_GRACE,
    SendLimits,
    TelegramGuardian,
    TokenBucket,
    _before_next_poll,
    card_keyboard,
    open_telegram_guardian,
    parse_callback,
    parse_ref,
    render_card,
    render_resolution,
    render_status,
)
from agentgate.testing.fake_telegram import (
    FakeMessage,
    FakeTelegram,
    run_fake_telegram,
    telegram_visible_text,
)
from agentgate.tools import signature

TOKEN = "123456:GUARDIAN-TOKEN"
CHAT = -1001
ALICE = 111  # allowed
MALLORY = 666  # not allowed
CEILING = 15
REQUEST_ID = "0b8f7a52-6f1e-4a0a-9d7e-2f4c1f9f3c11"


@frozen
class Config:
    token: str
    chat_id: int
    allowed_users: tuple[int, ...]
    base_url: str | None


def make_card(request_id: str = REQUEST_ID, **changes: Any) -> ApprovalCard:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "agent": "pi",
        "tool": "ha_call_service",
        "args": {"domain": "lock", "service": "unlock", "entity_id": "lock.front_door"},
        "signature": "ha_call_service(lock.unlock, lock.front_door)",
        "matched": "rule 4: ha_call_service(lock.*) (ask)",
        "expires_at": time.time() + 900,
        "target": "lock.front_door “Front door” — now: locked",
    }
    fields.update(changes)
    return ApprovalCard(**fields)


class FakeControl:
    """A GuardianControl that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._changed = trio.Event()
        self.frozen = False
        self.pending_cards: list[PendingCard] = []
        self.active_grants: list[Grant] = []
        self.undo_items: list[UndoItem] = []
        self.block_decide = False

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, name: str, count: int = 1) -> list[tuple[Any, ...]]:
        while len(matching := [c for c in self.calls if c[0] == name]) < count:
            await self._changed.wait()
        return matching

    async def decide(
        self,
        request_id: str,
        action: Action,
        by: str,
        *,
        message_ref: str,
        voter: str | None = None,
    ) -> PressAnswer:
        self._record("decide", request_id, action, by, message_ref)
        if self.block_decide:
            await trio.sleep_forever()
        if request_id != REQUEST_ID:
            return PressAnswer("expired or already resolved")
        text = {"allow": "approved", "deny": "denied", "grant": "allowed for 1 h"}[action]
        return PressAnswer(text, decided=True)

    async def refused(self, user: str, what: str) -> None:
        self._record("refused", user, what)

    async def card_copied(self, request_id: str, message_ref: str) -> None:
        self._record("card_copied", request_id, message_ref)

    async def pending(self) -> list[PendingCard]:
        self._record("pending")
        return self.pending_cards

    async def grants(self) -> list[Grant]:
        self._record("grants")
        return self.active_grants

    async def revoke_grant(self, grant_id: str, by: str) -> bool:
        self._record("revoke_grant", grant_id, by)
        before = len(self.active_grants)
        self.active_grants = [g for g in self.active_grants if g.grant_id != grant_id]
        return len(self.active_grants) < before

    async def undo(self, request_id: str, by: str, *, confirm: bool = False) -> PressAnswer:
        self._record("undo", request_id, by, confirm)
        return PressAnswer("undone: light.kitchen: off")

    async def undoable(self) -> list[UndoItem]:
        self._record("undoable")
        return self.undo_items

    async def set_frozen(self, frozen: bool, by: str) -> None:
        self._record("set_frozen", frozen, by)
        self.frozen = frozen

    async def status(self) -> GatewayStatus:
        self._record("status")
        return GatewayStatus(agents_connected={"pi": 1}, pending=2, frozen=self.frozen)


# -- fast tier: rendering, parsing, pacing ------------------------------------------------------


def test_card_shows_everything_escaped() -> None:
    card = make_card(
        agent="pi <b>boss</b>",
        args={"entity_id": "lock.front_door", "note": "</pre><b>APPROVED</b> & \u202egnp.exe"},
    )
    html_text = render_card(card, now=card.expires_at - 900)
    text = telegram_visible_text(html_text)  # also proves the HTML is valid for Telegram
    assert "Agent: pi <b>boss</b>" in text
    assert '"note": "</pre><b>APPROVED</b> & \\u202egnp.exe"' in text
    assert "\u202e" not in text
    assert "Tool: ha_call_service" in text
    assert "Signature: ha_call_service(lock.unlock, lock.front_door)" in text
    assert "Asked because: rule 4: ha_call_service(lock.*) (ask)" in text
    assert "Target: lock.front_door “Front door” — now: locked" in text
    assert "UTC (in 15 min)" in text


def test_newlines_cannot_fake_lines() -> None:
    card = make_card(target="Front door\n✅ Approved by Alice")
    text = telegram_visible_text(render_card(card, now=time.time()))
    assert "\n✅" not in text
    assert "Front door\\u000a✅ Approved by Alice" in text


def test_a_card_that_does_not_fit_is_never_sent_in_part() -> None:
    # Arguments were once cut to what fitted: 150 lights first hid the lock at the end.
    card = make_card(args={"data": "x" * 10_000, "zzz": "end"})
    with pytest.raises(CardTooLarge, match="arguments too large to show the guardian"):
        render_card(card, now=time.time())
    with pytest.raises(CardTooLarge):
        card_layout(card, max_chars=MAX_TEXT, overflow="refuse")
    assert card_layout(card, max_chars=MAX_TEXT, overflow="document") == "document"
    html_text = render_card(card, now=time.time(), layout="document")
    text = telegram_visible_text(html_text)
    assert "x" * 100 not in text  # no prefix of the arguments: all of them, in the document
    size = len(arguments_document(card))
    assert f"Arguments: {size:,} characters, in the file request-0b8f7a52-arguments.json" in text
    resolved = render_resolution(
        card, CardUpdate(Status.DENIED, by="Alice (111)"), now=time.time(), layout="document"
    )
    assert "request-0b8f7a52-arguments.json" in telegram_visible_text(resolved)


def test_astral_and_escaped_characters_are_counted_as_telegram_counts_them() -> None:
    card = make_card(args={"emoji": "🔓" * 900, "amp": "&" * 1500})
    assert card_layout(card, max_chars=MAX_TEXT, overflow="refuse") == "inline"
    html_text = render_card(card, now=time.time())
    assert utf16_len(telegram_visible_text(html_text)) <= MAX_TEXT
    with pytest.raises(CardTooLarge):
        render_card(make_card(args={"emoji": "🔓" * 3000}), now=time.time())


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        (CardUpdate(Status.APPROVED, by="Alice (111)", at=0.0), "✅ Approved by Alice (111) at"),
        (CardUpdate(Status.DENIED, by="Alice (111)"), "❌ Denied by Alice (111)"),
        (CardUpdate(Status.TIMED_OUT), "⌛ Timed out"),
        (CardUpdate(Status.EXECUTED, detail="state: unlocked"), "state: unlocked"),
        (CardUpdate(Status.FAILED, detail="service unreachable"), "⚠ Failed"),
        (CardUpdate(Status.QUEUED), "Agent offline — result queued"),
        (CardUpdate(Status.SHUTDOWN), "Gateway shutting down"),
        (CardUpdate(Status.FROZEN, by="Bob (2)"), "Frozen — denied by Bob (2)"),
    ],
)
def test_resolutions(update: CardUpdate, expected: str) -> None:
    text = telegram_visible_text(render_resolution(make_card(), update, now=1.8e9))
    assert expected in text
    assert "lock.front_door" in text
    assert "Expires" not in text


def test_callback_data() -> None:
    rows = card_keyboard(REQUEST_ID).inline_keyboard
    data = [b.callback_data for row in rows for b in row]
    assert data == [f"allow:{REQUEST_ID}", f"deny:{REQUEST_ID}", f"grant:{REQUEST_ID}"]
    assert all(len(str(d).encode()) <= 64 for d in data)
    with pytest.raises(GuardianUnavailable):
        card_keyboard("r" * 70)
    assert parse_callback(f"deny:{REQUEST_ID}") == ("deny", REQUEST_ID)
    assert parse_callback("revoke:g1") == ("revoke", "g1")
    for bad in ["", "allow", "allow:", "launch:r1", "allow:a\nb", "allow:" + "x" * 64]:
        assert parse_callback(bad) is None
    assert parse_ref("-1001:42") == (-1001, 42)
    with pytest.raises(ValueError, match="invalid literal"):
        parse_ref("nonsense")


async def test_token_bucket_paces_after_a_burst(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(capacity=3, rate=20 / 60)
    start = trio.current_time()
    for _ in range(3):
        await bucket.take()
    assert trio.current_time() == start
    await bucket.take()
    assert trio.current_time() - start == pytest.approx(3.0)
    await bucket.take()
    assert trio.current_time() - start == pytest.approx(6.0)


# -- a Bot API call's budget is Telegram's time, not the gateway's (fast tier) -----------------


def bare_guardian(limits: SendLimits) -> TelegramGuardian:
    """A guardian for its send path alone: no bot (each test hands ``_deliver`` its call)."""
    settings = SimpleNamespace(token=TOKEN, chat_id=CHAT, allowed_users=(ALICE,))
    app: Any = SimpleNamespace(bot=None)
    return TelegramGuardian(app, settings, FakeControl(), limits, CardRules())


async def busy_loop(clock: trio.testing.MockClock, rounds: int) -> None:
    """The gateway busy with its own work (a flood of asks being admitted): each round of the
    event loop takes 0.3 s."""
    for _ in range(rounds):
        clock.jump(0.3)
        await trio.lowlevel.checkpoint()


async def test_a_send_slowed_by_the_gateways_own_work_is_not_failed_closed(
    mock_clock: trio.testing.MockClock,
) -> None:
    # S6: the first cards of a 10,000-ask burst spent their whole budget waiting for the
    # gateway's own loop, and their asks failed closed, "no answer within 10 s" from Telegram.
    # The exchange takes 40 loop rounds of 0.3 s: 12 s against a 10 s budget. The watcher
    # credits a stall only after it (and each of its ticks counts), so at any moment up to a
    # few seconds are not yet credited, whatever order Trio runs the tasks in: well within
    # the budget's margin here.
    guardian = bare_guardian(SendLimits(budget=10.0))

    async def exchange() -> str:  # Telegram answers at once; the call takes many loop rounds
        for _ in range(40):
            await trio.lowlevel.checkpoint()
        return "sent"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guardian.watch_stalls)
        nursery.start_soon(busy_loop, mock_clock, 60)
        assert await guardian._deliver("sendMessage", exchange) == "sent"
        nursery.cancel_scope.cancel()


async def test_telegram_silent_while_the_gateway_is_busy_still_fails_closed_and_says_both(
    mock_clock: trio.testing.MockClock,
) -> None:
    guardian = bare_guardian(SendLimits(budget=1.0))

    async def exchange() -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guardian.watch_stalls)
        nursery.start_soon(busy_loop, mock_clock, 10)
        mock_clock.autojump_threshold = 0  # once the loop is idle, time runs on
        with pytest.raises(GuardianUnavailable) as failed:
            await guardian._deliver("sendMessage", exchange)
        nursery.cancel_scope.cancel()
    message = failed.value.message
    assert "no answer within 1 s" in message
    assert "in which the gateway itself was busy" in message


async def test_telegram_silent_on_an_idle_gateway_fails_closed_at_its_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    guardian = bare_guardian(SendLimits(budget=1.0))

    async def exchange() -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guardian.watch_stalls)
        start = trio.current_time()
        with pytest.raises(GuardianUnavailable) as failed:
            await guardian._deliver("sendMessage", exchange)
        assert trio.current_time() - start == pytest.approx(1.0)  # virtual time, exact
        nursery.cancel_scope.cancel()
    assert failed.value.message.endswith("no answer within 1 s")


# -- real tier: PTB against the fake Bot API ----------------------------------------------------


# FakeControl never shows an outcome on the card: answer presses soon anyway.
FAST_LIMITS = SendLimits(
    attempts=3, budget=3.0, backoff=(0.2, 0.2), answer_wait=0.3, poll_backoff=(0.05, 0.1, 0.2)
)


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with run_fake_telegram(token=TOKEN, chat_id=CHAT) as fake:
        yield fake


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


@pytest.fixture
async def guardian(tg: FakeTelegram, control: FakeControl) -> AsyncIterator[TelegramGuardian]:
    config = Config(TOKEN, CHAT, (ALICE,), tg.base_url)
    with trio.fail_after(CEILING):
        async with open_telegram_guardian(config, control, limits=FAST_LIMITS) as g:
            yield g


async def send(guardian: TelegramGuardian, tg: FakeTelegram, card: ApprovalCard) -> FakeMessage:
    ref = await guardian.send_card(card)
    chat_id, message_id = parse_ref(ref)
    assert chat_id == CHAT
    return tg.messages[message_id]


slow = pytest.mark.slow


@slow
async def test_card_arrives_with_buttons(guardian: TelegramGuardian, tg: FakeTelegram) -> None:
    with trio.fail_after(CEILING):
        message = await send(guardian, tg, make_card())
    assert message.parse_mode == "HTML"
    assert '"entity_id": "lock.front_door"' in message.text
    assert '"service": "unlock"' in message.text
    assert "Target: lock.front_door “Front door” — now: locked" in message.text
    assert [data for _, data in message.buttons] == [
        f"allow:{REQUEST_ID}",
        f"deny:{REQUEST_ID}",
        f"grant:{REQUEST_ID}",
    ]
    assert [c["command"] for c in tg.commands] == [
        "pending",
        "grants",
        "undo",
        "freeze",
        "unfreeze",
        "status",
        "help",
    ]


@slow
async def test_no_allow_for_an_hour_where_the_signature_leaves_out_what_runs(
    guardian: TelegramGuardian, tg: FakeTelegram
) -> None:
    args = {"domain": "conversation", "service": "process", "text": "turn on the lamp"}
    card = make_card(args=args, signature=signature("ha_call_service", args))
    with trio.fail_after(CEILING):
        message = await send(guardian, tg, card)
    assert [data.split(":")[0] for _, data in message.buttons] == ["allow", "deny"]
    assert "⚠ Indirect: conversation.process Assist turns the text into actions" in message.text


@slow
async def test_a_card_too_long_for_a_message_sends_its_arguments_first(
    tg: FakeTelegram, control: FakeControl
) -> None:
    config = Config(TOKEN, CHAT, (ALICE,), tg.base_url)
    lights = {f"light.room_{n:03}": "on" for n in range(150)}
    args = {"domain": "scene", "service": "apply", "entities": lights}
    card = make_card(args=args, signature=signature("ha_call_service", args))
    with trio.fail_after(CEILING):
        cards = CardRules(overflow="document")
        async with open_telegram_guardian(config, control, limits=FAST_LIMITS, cards=cards) as g:
            message = await send(g, tg, card)
            ref = f"{CHAT}:{message.message_id}"
            await g.update_card(card, ref, CardUpdate(Status.DENIED, by="Alice (111)"))
    document_message = tg.messages[message.message_id - 1]
    assert document_message.document is not None
    assert document_message.document.filename == "request-0b8f7a52-arguments.json"
    assert json.loads(document_message.document.content) == card.args  # all of it
    assert '"light.room_149": "on"' not in message.text  # the signature names it, the file has it
    assert "light.room_149)" in message.text
    assert "in the file request-0b8f7a52-arguments.json" in message.text
    assert message.buttons
    assert "in the file request-0b8f7a52-arguments.json" in tg.messages[message.message_id].text

    # Refusing (the default) sends nothing at all: the gateway refuses such an ask up front.
    async with open_telegram_guardian(config, control, limits=FAST_LIMITS) as g:
        with pytest.raises(GuardianUnavailable, match="too large to show the guardian"):
            await g.send_card(card)
    assert len(tg.messages) == 2


@slow
@pytest.mark.parametrize(
    ("data", "action", "answer"),
    [
        (f"allow:{REQUEST_ID}", Action.ALLOW, "approved"),
        (f"deny:{REQUEST_ID}", Action.DENY, "denied"),
        (f"grant:{REQUEST_ID}", Action.GRANT, "allowed for 1 h"),
        ("allow:unknown-request", Action.ALLOW, "expired or already resolved"),
    ],
)
async def test_allowed_user_decides(
    guardian: TelegramGuardian,
    tg: FakeTelegram,
    control: FakeControl,
    data: str,
    action: Action,
    answer: str,
) -> None:
    with trio.fail_after(CEILING):
        message = await send(guardian, tg, make_card())
        press = tg.press(message.message_id, data, ALICE, first_name="Alice", last_name="Smith")
        (decision,) = await control.wait("decide")
        ref = f"{CHAT}:{message.message_id}"
        assert decision == ("decide", data.split(":", 1)[1], action, "Alice Smith (111)", ref)
        assert (await press.wait_answer()).text == answer


@slow
async def test_stranger_is_refused_and_audited(
    guardian: TelegramGuardian, tg: FakeTelegram, control: FakeControl
) -> None:
    with trio.fail_after(CEILING):
        message = await send(guardian, tg, make_card())
        press = tg.press(message.message_id, f"allow:{REQUEST_ID}", MALLORY, first_name="Mallory")
        assert (await press.wait_answer()).text == "not authorised"
        (refused,) = await control.wait("refused")
    assert refused == ("refused", "Mallory (666)", f"button 'allow:{REQUEST_ID}'")
    assert not [c for c in control.calls if c[0] == "decide"]


@slow
async def test_malformed_press_is_expired(
    guardian: TelegramGuardian, tg: FakeTelegram, control: FakeControl
) -> None:
    with trio.fail_after(CEILING):
        message = await send(guardian, tg, make_card())
        press = tg.press(message.message_id, "launch:rockets", ALICE)
        assert "expired" in str((await press.wait_answer()).text)
    assert control.calls == [
        ("refused", "Guardian (111)", "button 'launch:rockets': not one of ours")
    ]


@slow
async def test_update_card_shows_resolution_and_removes_buttons(
    guardian: TelegramGuardian, tg: FakeTelegram
) -> None:
    card = make_card()
    with trio.fail_after(CEILING):
        ref = await guardian.send_card(card)
        message_id = parse_ref(ref)[1]
        await guardian.update_card(
            card, ref, CardUpdate(Status.APPROVED, by="Alice Smith (111)", at=time.time())
        )
        edited = tg.messages[message_id]
        assert edited.text.startswith("✅ Approved by Alice Smith (111) at ")
        assert edited.buttons == []
        await guardian.update_card(
            card, ref, CardUpdate(Status.EXECUTED, detail="lock.front_door: unlocked")
        )
        assert "lock.front_door: unlocked" in tg.messages[message_id].text
        # Best effort: nothing raises, whatever goes wrong.
        await guardian.update_card(
            card, ref, CardUpdate(Status.EXECUTED, detail="lock.front_door: unlocked")
        )
        await guardian.update_card(card, "garbage", CardUpdate(Status.DENIED))
        await guardian.update_card(card, f"{CHAT}:9999", CardUpdate(Status.DENIED))
        tg.down()
        await guardian.update_card(card, ref, CardUpdate(Status.TIMED_OUT))
        tg.up()


@slow
async def test_freeze_and_unfreeze(
    guardian: TelegramGuardian, tg: FakeTelegram, control: FakeControl
) -> None:
    with trio.fail_after(CEILING):
        tg.send_command("/freeze", ALICE, first_name="Alice")
        await tg.wait_for_message(lambda m: "Frozen by Alice (111)" in m.text)
        tg.send_command("/unfreeze@agentgate_test_bot", ALICE, first_name="Alice")
        await tg.wait_for_message(lambda m: "Unfrozen" in m.text)
    assert [c for c in control.calls if c[0] == "set_frozen"] == [
        ("set_frozen", True, "Alice (111)"),
        ("set_frozen", False, "Alice (111)"),
    ]


@slow
async def test_status_and_help(
    guardian: TelegramGuardian, tg: FakeTelegram, control: FakeControl
) -> None:
    with trio.fail_after(CEILING):
        tg.send_command("/status", ALICE)
        status = await tg.wait_for_message(lambda m: "agentgate status" in m.text)
        tg.send_command("/help", ALICE, chat_id=ALICE)  # private chat with the bot
        help_ = await tg.wait_for_message(lambda m: "/pending" in m.text)
    assert "Agents connected: pi (1)" in status.text
    assert "Pending approvals: 2" in status.text
    assert help_.chat_id == ALICE


@slow
async def test_pending_resends_cards(
    guardian: TelegramGuardian, tg: FakeTelegram, control: FakeControl
) -> None:
    control.pending_cards = [
        PendingCard(make_card(), f"{CHAT}:1"),
        PendingCard(make_card("second-request", tool="ha_fire_event", args={"x": 1}), None),
    ]
    with trio.fail_after(CEILING):
        tg.send_command("/pending", ALICE)
        second = await tg.wait_for_message(lambda m: "ha_fire_event" in m.text)
        first = await tg.wait_for_message(lambda m: "lock.front_door" in m.text)
    assert "allow:second-request" in [d for _, d in second.buttons]
    assert first.buttons

    control.pending_cards = []
    with trio.fail_after(CEILING):
        tg.send_command("/pending", ALICE)
        await tg.wait_for_message(lambda m: m.text == "No pending approvals.")


@slow
async def test_grants_and_revoke(
    guardian: TelegramGuardian, tg: FakeTelegram, control: FakeControl
) -> None:
    control.active_grants = [
        Grant("g-1", "pi", "ha_call_service(light.turn_on, light.desk)", "Alice (111)", 2e9),
        Grant("g-2", "pi", "ha_get_state(sensor.temp)", "Alice (111)", 2e9),
    ]
    with trio.fail_after(CEILING):
        tg.send_command("/grants", ALICE)
        listing = await tg.wait_for_message(lambda m: "Active grants" in m.text)
        assert "light.desk" in listing.text
        assert "sensor.temp" in listing.text
        assert listing.buttons == [("Revoke 1", "revoke:g-1"), ("Revoke 2", "revoke:g-2")]
        press = tg.press(listing.message_id, "revoke:g-2", ALICE)
        assert (await press.wait_answer()).text == "grant revoked"
        again = tg.press(listing.message_id, "revoke:g-2", ALICE)
        assert "already" in str((await again.wait_answer()).text)
    assert next(c for c in control.calls if c[0] == "revoke_grant") == (
        "revoke_grant",
        "g-2",
        "Guardian (111)",
    )


@slow
async def test_stranger_commands_are_refused_silently(
    guardian: TelegramGuardian, tg: FakeTelegram, control: FakeControl
) -> None:
    with trio.fail_after(CEILING):
        tg.send_command("/freeze", MALLORY, first_name="Mallory")
        (refused,) = await control.wait("refused")
    assert refused == ("refused", "Mallory (666)", "command /freeze")
    assert not control.frozen
    assert tg.calls_to("sendMessage") == []


@slow
async def test_send_while_down_fails_closed_within_bound(
    guardian: TelegramGuardian, tg: FakeTelegram
) -> None:
    tg.down()
    start = trio.current_time()
    with trio.fail_after(CEILING), pytest.raises(GuardianUnavailable, match="unreachable"):
        await guardian.send_card(make_card())
    assert trio.current_time() - start <= FAST_LIMITS.budget  # attempts are cut at it
    tg.up()
    with trio.fail_after(CEILING):
        await send(guardian, tg, make_card())  # and the guardian is still alive


@slow
async def test_retry_after_is_honoured(guardian: TelegramGuardian, tg: FakeTelegram) -> None:
    tg.retry_after = 1
    start = trio.current_time()
    with trio.fail_after(CEILING):
        message = await send(guardian, tg, make_card())
    assert trio.current_time() - start >= 0.9  # waited as told (a lower bound, not a timing)
    assert len(tg.calls_to("sendMessage")) == 2
    assert message.buttons


@slow
async def test_retry_after_beyond_the_budget_fails_at_once(
    guardian: TelegramGuardian, tg: FakeTelegram
) -> None:
    tg.retry_after = 60
    with trio.fail_after(CEILING), pytest.raises(GuardianUnavailable, match="rate limited"):
        await guardian.send_card(make_card())
    assert len(tg.calls_to("sendMessage")) == 1


@slow
async def test_bad_request_fails_without_retry(
    guardian: TelegramGuardian, tg: FakeTelegram
) -> None:
    tg.fail_next("sendMessage", 400, "Bad Request: chat not found")
    with trio.fail_after(CEILING), pytest.raises(GuardianUnavailable, match=r"(?i)chat not found"):
        await guardian.send_card(make_card())
    assert len(tg.calls_to("sendMessage")) == 1


@slow
async def test_a_fresh_decision_is_answered_when_its_card_shows_the_outcome(
    tg: FakeTelegram, control: FakeControl
) -> None:
    # answer_wait is far beyond the ceiling: only the card's update can release the answer.
    patient = attrs.evolve(FAST_LIMITS, answer_wait=CEILING * 10)
    config = Config(TOKEN, CHAT, (ALICE,), tg.base_url)
    with trio.fail_after(CEILING):
        async with open_telegram_guardian(config, control, limits=patient) as guardian:
            card = make_card()
            message = await send(guardian, tg, card)
            press = tg.press(message.message_id, f"allow:{REQUEST_ID}", ALICE)
            await control.wait("decide")
            assert press.answer is None
            update = CardUpdate(Status.EXECUTED, detail="lock.front_door: unlocked", by="Alice")
            await guardian.update_card(card, f"{CHAT}:{message.message_id}", update)
            assert (await press.wait_answer()).text == "approved"
            assert "unlocked" in telegram_visible_text(tg.messages[message.message_id].text)

            # A stale press has nothing to wait for: answered at once.
            stale = tg.press(message.message_id, "allow:unknown-request", ALICE)
            assert (await stale.wait_answer()).text == "expired or already resolved"


@slow
async def test_settled_waits_for_every_press_to_have_its_outcome(
    tg: FakeTelegram, control: FakeControl
) -> None:
    # What the poller waits for before its next getUpdates (rather than a fixed pause).
    patient = attrs.evolve(FAST_LIMITS, answer_wait=CEILING * 10)
    config = Config(TOKEN, CHAT, (ALICE,), tg.base_url)
    with trio.fail_after(CEILING):
        async with open_telegram_guardian(config, control, limits=patient) as guardian:
            await guardian.settled()  # no press waits: at once
            card = make_card()
            message = await send(guardian, tg, card)
            tg.press(message.message_id, f"allow:{REQUEST_ID}", ALICE)
            await control.wait("decide")
            settled = trio.Event()

            async def wait_settled() -> None:
                await guardian.settled()
                settled.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_settled)
                await trio.testing.wait_all_tasks_blocked()
                assert not settled.is_set()  # decided, its outcome not shown yet
                update = CardUpdate(Status.EXECUTED, detail="lock.front_door: unlocked")
                await guardian.update_card(card, f"{CHAT}:{message.message_id}", update)
            assert settled.is_set()


async def test_after_a_press_the_next_poll_waits_for_its_outcome_not_a_pause(
    mock_clock: trio.testing.MockClock,
) -> None:
    outcome = trio.Event()
    polled = trio.Event()
    start = trio.current_time()

    async def next_poll() -> None:
        await _before_next_poll(True, start, outcome.wait)
        polled.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(next_poll)
        await trio.testing.wait_all_tasks_blocked()
        assert not polled.is_set()
        outcome.set()
    assert trio.current_time() == start  # at once: no pause (the clock stands still)


async def test_the_next_poll_waits_for_a_slow_outcome_only_so_long(
    mock_clock: trio.testing.MockClock,
) -> None:
    polled = trio.Event()

    async def next_poll() -> None:
        await _before_next_poll(True, trio.current_time(), trio.sleep_forever)
        polled.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(next_poll)
        await trio.testing.wait_all_tasks_blocked()
        assert not polled.is_set()
        mock_clock.jump(POLL_SETTLE)
    assert polled.is_set()


async def test_polls_that_bring_nothing_are_not_a_busy_loop(
    mock_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    await _before_next_poll(False, start - 2 * POLL_PAUSE, trio.sleep_forever)  # held: at once
    assert trio.current_time() == start
    polled = trio.Event()

    async def next_poll() -> None:
        await _before_next_poll(False, start, trio.sleep_forever)  # answered at once
        polled.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(next_poll)
        await trio.testing.wait_all_tasks_blocked()
        assert not polled.is_set()
        mock_clock.jump(POLL_PAUSE)
    assert polled.is_set()


@slow
async def test_polling_survives_an_outage(
    guardian: TelegramGuardian, tg: FakeTelegram, control: FakeControl
) -> None:
    with trio.fail_after(CEILING):
        message = await send(guardian, tg, make_card())
        tg.down("drop")  # the waiting long poll is dropped; PTB backs off and retries
        await tg.wait_for(lambda: tg.dropped or None)
        tg.up()
        press = tg.press(message.message_id, f"allow:{REQUEST_ID}", ALICE)
        assert (await press.wait_answer()).text == "approved"


@slow
async def test_shutdown_during_an_outage_is_bounded(tg: FakeTelegram, control: FakeControl) -> None:
    config = Config(TOKEN, CHAT, (ALICE,), tg.base_url)
    with trio.fail_after(CEILING):
        async with open_telegram_guardian(config, control, limits=FAST_LIMITS):
            tg.down("drop")
            # A few failed polls: the poller now sleeps out a back-off of several seconds.
            await tg.wait_for(lambda: tg.dropped > 2 or None)
            leaving = trio.current_time()
    assert trio.current_time() - leaving <= SHUTDOWN_GRACE  # the guardian's own bound


@slow
async def test_bad_token_is_a_clear_error(tg: FakeTelegram, control: FakeControl) -> None:
    config = Config("123456:WRONG", CHAT, (ALICE,), tg.base_url)
    with trio.fail_after(CEILING), pytest.raises(GuardianRefused) as info:
        async with open_telegram_guardian(config, control):
            pytest.fail("should not start")
    assert "refused the bot token" in info.value.message
    assert info.value.key == "guardian.telegram.token"
    assert "WRONG" not in info.value.message


@slow
async def test_unreachable_api_is_a_clear_error(control: FakeControl) -> None:
    async with run_fake_telegram(token=TOKEN) as tg:
        base_url = tg.base_url
    config = Config(TOKEN, CHAT, (ALICE,), base_url)
    with trio.fail_after(CEILING), pytest.raises(GuardianUnavailable) as info:
        async with open_telegram_guardian(config, control):
            pytest.fail("should not start")
    assert "unreachable" in info.value.message
    assert base_url in info.value.message


@slow
async def test_set_my_commands_failure_is_not_fatal(tg: FakeTelegram, control: FakeControl) -> None:
    tg.fail_next("setMyCommands", 400, "Bad Request: nope")
    config = Config(TOKEN, CHAT, (ALICE,), tg.base_url)
    with trio.fail_after(CEILING):
        async with open_telegram_guardian(config, control, limits=FAST_LIMITS) as guardian:
            await send(guardian, tg, make_card())


@slow
async def test_shutdown_does_not_hang(tg: FakeTelegram, control: FakeControl) -> None:
    """A decision stuck in the gateway, a press queued, Telegram down: exit is still bounded."""
    control.block_decide = True
    config = Config(TOKEN, CHAT, (ALICE,), tg.base_url)
    with trio.fail_after(CEILING):
        async with open_telegram_guardian(config, control, limits=FAST_LIMITS) as guardian:
            message = await send(guardian, tg, make_card())
            tg.press(message.message_id, f"allow:{REQUEST_ID}", ALICE)
            await control.wait("decide")
            tg.down()
            leaving = trio.current_time()
    assert trio.current_time() - leaving <= SHUTDOWN_GRACE  # the guardian's own bound


@slow
async def test_cancellation_stops_the_guardian(tg: FakeTelegram, control: FakeControl) -> None:
    config = Config(TOKEN, CHAT, (ALICE,), tg.base_url)
    with trio.fail_after(CEILING):
        with trio.CancelScope() as running:
            async with open_telegram_guardian(config, control, limits=FAST_LIMITS):
                running.cancel()  # cancelled from outside while it runs
                await trio.sleep_forever()
        # A second guardian on the same bot starts cleanly afterwards.
        async with open_telegram_guardian(config, control, limits=FAST_LIMITS) as guardian:
            await send(guardian, tg, make_card())


# -- Telegram's bad moments (polling never stops; start-up refusals are typed) ------------------


@slow
@pytest.mark.parametrize(
    ("code", "description"),
    [(502, "Bad Gateway"), (409, "Conflict: terminated by other getUpdates request")],
)
async def test_delete_webhook_failing_at_start_does_not_stop_the_guardian(
    tg: FakeTelegram, control: FakeControl, code: int, description: str
) -> None:
    # PTB's start_polling raised out of the gateway on this (exit 1).
    tg.fail_next("deleteWebhook", code, description, times=2)
    config = Config(TOKEN, CHAT, (ALICE,), tg.base_url)
    with trio.fail_after(CEILING):
        async with open_telegram_guardian(config, control, limits=FAST_LIMITS) as guardian:
            message = await send(guardian, tg, make_card())  # cards go out meanwhile
            press = tg.press(message.message_id, f"allow:{REQUEST_ID}", ALICE)
            assert (await press.wait_answer()).text == "approved"  # polling came up
    assert len(tg.calls_to("deleteWebhook")) == 3


@slow
@pytest.mark.parametrize(
    ("code", "description", "level"),
    [
        (401, "Unauthorized", "ERROR"),
        (502, "Bad Gateway", "WARNING"),
        (409, "Conflict: terminated by other getUpdates request", "WARNING"),
        (429, "Too Many Requests: retry after 0", "WARNING"),
    ],
)
async def test_polling_rides_out_errors_mid_run(
    guardian: TelegramGuardian,
    tg: FakeTelegram,
    control: FakeControl,
    caplog: pytest.LogCaptureFixture,
    code: int,
    description: str,
    level: str,
) -> None:
    # A 401 on getUpdates made PTB stop polling for good: presses were never read again.
    poller = guardian.poller
    assert poller is not None
    with trio.fail_after(CEILING), caplog.at_level(logging.INFO, logger="agentgate"):
        message = await send(guardian, tg, make_card())
        tg.fail("getUpdates", code, description, retry_after=0 if code == 429 else None)
        failing = len(tg.calls_to("getUpdates"))
        tg.send_command("/help", ALICE)  # ends the long poll in flight: the next one fails
        await tg.wait_for(lambda: len(tg.calls_to("getUpdates")) >= failing + 3 or None)
        assert poller.problem is not None
        assert "polling fails since" in poller.health()
        tg.heal()
        press = tg.press(message.message_id, f"allow:{REQUEST_ID}", ALICE)
        assert (await press.wait_answer()).text == "approved"
        assert poller.problem is None
    failed = [r for r in caplog.records if "Telegram polling failed" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in failed]  # once, not at every retry
    assert failed[0].levelname == level
    assert "TOKEN" not in failed[0].getMessage()
    assert any("Telegram polling works again" in r.getMessage() for r in caplog.records)


@slow
async def test_status_reports_how_polling_goes(
    guardian: TelegramGuardian, tg: FakeTelegram, control: FakeControl
) -> None:
    poller = guardian.poller
    assert poller is not None
    with trio.fail_after(CEILING):
        tg.send_command("/status", ALICE)
        reply = await tg.wait_for_message(lambda m: "agentgate status" in m.text)
        assert "Telegram: ok" in reply.text
    poller.problem, poller.since = "Telegram refused the bot token (401)", time.time()
    text = telegram_visible_text(render_status(GatewayStatus({}, 0, False), poller.health()))
    assert "Telegram: polling fails since" in text
    assert "refused the bot token (401)" in text


@slow
async def test_a_chat_the_bot_cannot_reach_is_refused_at_start(
    tg: FakeTelegram, control: FakeControl
) -> None:
    config = Config(TOKEN, -999, (ALICE,), tg.base_url)
    with trio.fail_after(CEILING), pytest.raises(GuardianRefused) as info:
        async with open_telegram_guardian(config, control):
            pytest.fail("should not start")
    assert info.value.key == "guardian.telegram.chat_id"
    assert "chat not found" in info.value.message.lower()
    assert "-999" in info.value.message


@slow
async def test_a_token_refused_with_404_is_refused(tg: FakeTelegram, control: FakeControl) -> None:
    tg.fail_next("getMe", 404, "Not Found")
    config = Config(TOKEN, CHAT, (ALICE,), tg.base_url)
    with trio.fail_after(CEILING), pytest.raises(GuardianRefused) as info:
        async with open_telegram_guardian(config, control):
            pytest.fail("should not start")
    assert info.value.key == "guardian.telegram.token"


async def test_a_request_id_too_long_for_a_button_is_refused_unsent(
    guardian: TelegramGuardian, tg: FakeTelegram
) -> None:
    with trio.fail_after(CEILING), pytest.raises(GuardianUnavailable, match="too long"):
        await guardian.send_card(make_card(request_id="r" * 60))
    assert tg.messages == {}


async def test_a_queued_card_builds_its_buttons_only_when_sent(
    guardian: TelegramGuardian, tg: FakeTelegram, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cards waiting for a send slot hold their ApprovalCard, not PTB's buttons (memory, S6):
    # the id is checked against the buttons' size before, and they are built once, by the Bot
    # API call that sends them.
    built: list[str] = []
    at_slot: list[int] = []
    real_keyboard, real_deliver = telegram_module.keyboard_for, guardian._deliver

    def keyboard(card: ApprovalCard) -> Any:
        built.append(card.request_id)
        return real_keyboard(card)

    async def deliver(what: str, call: Any) -> Any:
        at_slot.append(len(built))
        return await real_deliver(what, call)

    monkeypatch.setattr(telegram_module, "keyboard_for", keyboard)
    monkeypatch.setattr(guardian, "_deliver", deliver)
    with trio.fail_after(CEILING):
        message = await send(guardian, tg, make_card())
    assert message.buttons
    assert at_slot == [0]  # nothing built before the slot (the id's length is checked alone)
    assert built == [REQUEST_ID]
