"""Approval cards (``agentgate.guardian.card``): complete or refused, nothing disguised.

Fast tier: pure functions. What Telegram would show is computed by the fake Bot API's own HTML
parser (``telegram_visible_text``), so the sizes here are the sizes a guardian's phone gets.
"""

from __future__ import annotations

import time
import unicodedata
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentgate.guardian import ApprovalCard, CardUpdate, Status
from agentgate.guardian.card import (
    MAX_MARKS,
    MAX_TEXT,
    CardTooLarge,
    arguments_text,
    card_layout,
    render_card,
    render_resolution,
    reveal_key,
    reveal_value,
    utf16_len,
)
from agentgate.testing.fake_telegram import telegram_visible_text
from agentgate.tools import signature


def card(args: dict[str, Any], **changes: Any) -> ApprovalCard:
    tool = changes.pop("tool", "ha_call_service")
    fields: dict[str, Any] = {
        "request_id": "0b8f7a52-6f1e-4a0a-9d7e-2f4c1f9f3c11",
        "agent": "pi",
        "tool": tool,
        "args": args,
        "signature": changes.pop("signature", None) or signature(tool, args),
        "matched": "rule 9: ha_call_service(light.*) (ask)",
        "expires_at": time.time() + 900,
        "target": None,
    }
    fields.update(changes)
    return ApprovalCard(**fields)


LIGHT = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}


# -- revealing --------------------------------------------------------------------------------


def test_keys_show_everything_outside_printable_ascii_escaped() -> None:
    # A Cyrillic ie (U+0435): two keys that would both read "entity_id".
    assert reveal_key("entity_id") == "entity_id"
    assert reveal_key("\u0435ntity_id") == "\\u0435ntity_id"
    assert reveal_key("entity_id\u200b") == "entity_id\\u200b"
    assert reveal_key("caf\u00e9") == "caf\\u00e9"
    assert reveal_key("x\x7f") == "x\\u007f"
    text = arguments_text({"entity_id": "light.a", "\u0435ntity_id": "lock.b"})
    assert '"entity_id": "light.a"' in text
    assert '"\\u0435ntity_id": "lock.b"' in text  # JSON's own escape: still valid JSON


@pytest.mark.parametrize(
    "char",
    [
        "\u00a0",  # no-break space
        "\u2003",  # em space
        "\u3000",  # ideographic space
        "\u2800",  # braille blank
        "\u3164",  # Hangul filler
        "\u115f",  # Hangul choseong filler
        "\uffa0",  # halfwidth Hangul filler
        "\u200b",  # zero width space
        "\u200d",  # zero width joiner
        "\u202e",  # right-to-left override
        "\u2066",  # left-to-right isolate
        "\u2028",  # line separator
        "\u2029",  # paragraph separator
        "\ufeff",  # byte order mark
        "\u00ad",  # soft hyphen
        "\ufe0f",  # variation selector
        "\u034f",  # combining grapheme joiner
        "\U000e0041",  # tag latin capital A
        "\ue000",  # private use
        "\x85",  # next line (C1)
    ],
)
def test_invisible_and_spacing_characters_in_values_are_escaped(char: str) -> None:
    shown = reveal_value(f"a{char}b")
    assert char not in shown
    assert shown.startswith("a\\u")
    assert shown.endswith("b")


def test_visible_text_stays_readable() -> None:
    for text in ("Küche", "Гостиная", "客厅", "غرفة", "🔓 unlocked", "caf\u00e9", "a b"):
        assert reveal_value(text) == text


def test_combining_marks_are_bounded() -> None:
    assert reveal_value("e\u0301") == "e\u0301"  # one mark on a visible base: shown
    stacked = reveal_value("e" + "\u0301" * 6)
    assert stacked == "e" + "\u0301" * MAX_MARKS + "\\u0301" * (6 - MAX_MARKS)
    assert reveal_value("\u0301x") == "\\u0301x"  # no base: escaped
    assert reveal_value(" \u0301") == " \\u0301"  # a space is no base


# -- the target line, and everything else -------------------------------------------------------


def test_the_card_shows_where_each_entity_was_named_and_why_it_is_indirect() -> None:
    args = {
        "domain": "script",
        "service": "turn_on",
        "entity_id": "script.evening",
        "variables": {"door": "lock.front_door", "lights": ["light.a", "light.b"]},
    }
    text = telegram_visible_text(render_card(card(args), now=time.time()))
    assert (
        "Signature: ha_call_service(script.turn_on, script.evening, light.a, light.b,"
        " lock.front_door)" in text
    )
    assert "Entities named in: entity_id, variables.lights[0], variables.lights[1]," in text
    assert "⚠ Indirect: script.turn_on runs a script: what it does is not part of this call" in text


def test_a_friendly_name_cannot_lead_or_run_long() -> None:
    name = "Hallway Light (light.hallway) — now: off " * 20
    shown = card(LIGHT, target=f"lock.front_door “{name}” — now: locked")
    text = telegram_visible_text(render_card(shown, now=time.time()))
    target = next(line for line in text.splitlines() if line.startswith("Target: "))
    assert target.startswith("Target: lock.front_door “Hallway Light")
    assert utf16_len(target) <= len("Target: ") + len("light.kitchen") + 200


# -- complete, or refused -------------------------------------------------------------------


def test_a_card_too_long_is_refused_not_cut() -> None:
    big = card({**LIGHT, "note": "x" * 5000})
    with pytest.raises(CardTooLarge) as info:
        card_layout(big, max_chars=MAX_TEXT, overflow="refuse")
    assert info.value.limit == MAX_TEXT
    assert info.value.size > MAX_TEXT
    with pytest.raises(CardTooLarge):
        render_card(big, now=time.time())


def test_max_card_chars_is_the_limit() -> None:
    small = card(LIGHT)
    size = len(telegram_visible_text(render_card(small, now=time.time())))
    assert card_layout(small, max_chars=1000, overflow="refuse") == "inline"
    with pytest.raises(CardTooLarge):
        card_layout(small, max_chars=size - 1, overflow="refuse")


def test_the_target_counts_at_its_largest() -> None:
    # Whatever Home Assistant will say about the entity, a card that passed still fits.
    note = "y" * 3400
    passed = card({**LIGHT, "note": note})
    limit = len(telegram_visible_text(render_card(passed, now=time.time()))) + 400
    assert card_layout(passed, max_chars=limit, overflow="refuse") == "inline"
    worst = card({**LIGHT, "note": note}, target="light.kitchen " + "\u200b" * 500)
    shown = telegram_visible_text(render_card(worst, now=time.time()))
    assert utf16_len(shown) <= limit


json_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]).filter(
        lambda c: (
            c not in "*?[]()," and not (c < " " or c == "\x7f")
        )  # what validation refuses anyway
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    args=st.dictionaries(json_text, json_text | st.integers() | st.lists(json_text), max_size=30),
    by=json_text,
    detail=json_text,
    limit=st.integers(min_value=512, max_value=MAX_TEXT),
)
def test_a_card_that_passes_fits_asked_and_resolved_and_hides_nothing(
    args: dict[str, str], by: str, detail: str, limit: int
) -> None:
    shown = card({"domain": "notify", "service": "send", **args}, tool="ha_call_service")
    try:
        layout = card_layout(shown, max_chars=limit, overflow="refuse")
    except CardTooLarge:
        return
    asked = telegram_visible_text(render_card(shown, now=time.time(), layout=layout))
    assert utf16_len(asked) <= limit
    update = CardUpdate(Status.EXECUTED, by=by * 10, detail=detail * 20, at=time.time())
    resolved = telegram_visible_text(render_resolution(shown, update, now=time.time()))
    assert utf16_len(resolved) <= MAX_TEXT
    for text in (asked, resolved):
        for char in text:
            category = unicodedata.category(char)
            assert char == "\n" or category[0] not in "CZ" or char == " ", repr(char)


def test_a_resolved_card_keeps_to_max_card_chars() -> None:
    shown = card({**LIGHT, "note": "z" * 300})
    assert card_layout(shown, max_chars=1000, overflow="refuse") == "inline"
    update = CardUpdate(Status.FAILED, by="B" * 300, detail="d" * 3000, at=time.time())
    resolved = render_resolution(shown, update, now=time.time(), max_chars=1000)
    text = telegram_visible_text(resolved)
    assert utf16_len(text) <= 1000
    assert text.startswith("⚠ Failed by BBB")
    assert '"note": "' + "z" * 300 + '"' in text  # the card itself is never what gets cut


def test_a_resolved_grant_says_until_when() -> None:
    shown = card(LIGHT, target="light.kitchen “Kitchen” — now: on")
    until = 1_800_003_600.0
    update = CardUpdate(Status.EXECUTED, "light.kitchen: on", by="Alex (1)", at=1_800_000_000.0,
                        grant_until=until)  # fmt: skip
    text = telegram_visible_text(render_resolution(shown, update, now=1_800_000_000.0))
    assert text.splitlines()[:3] == [
        "✅ Executed by Alex (1) at 2027-01-15 08:00:00 UTC",
        "⏱ Allowed for 1 h: the same request from pi runs without asking until"
        " 2027-01-15 09:00:00 UTC",
        "light.kitchen: on",
    ]
    plain = render_resolution(shown, CardUpdate(Status.EXECUTED, "x", at=1_800_000_000.0), now=0)
    assert "Allowed for 1 h" not in plain
