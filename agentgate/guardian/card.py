"""Approval cards as a guardian sees them: complete, or not sent at all.

Pure functions, no I/O and no Telegram import: the gateway measures a card with them before it
asks anyone, and the Telegram guardian renders with them, so the two always agree.

What a card guarantees:

- **Everything or nothing.** Every argument is shown in full. A card longer than
  ``[guardian] max_card_chars`` (visible characters after rendering, UTF-16 units as Telegram
  counts them) is refused before anything is recorded (``card_overflow = "refuse"``), or its
  arguments go to an attached JSON document sent before the message with the buttons
  (``"document"``). Nothing is ever truncated; the signature, which names every entity, never
  moves to the document.
- **Nothing disguised.** In keys and identifiers every code point outside printable ASCII is
  shown escaped (``\\u0435``), so two keys can never both read ``entity_id``. In values,
  everything that is not a visible, non-combining character is escaped (controls, format and
  bidi characters, every space but U+0020, line separators, fillers such as U+3164 and U+2800,
  variation selectors), and at most :data:`MAX_MARKS` combining marks may follow a visible base
  character: more are escaped, so stacked marks cannot paint over other lines.
- **The target starts with the entity id**; the friendly name Home Assistant reports follows,
  quoted and bounded (the Home Assistant executor builds that line; here it is revealed and
  bounded again).
- **An HTTP tool's card shows the request as it will be sent** (method, URL, the
  authentication scheme without its secret, the JSON body), whole, under "Request:": it is
  part of what the card must show in full, or nothing is asked. A call naming no entity has
  no other target, so a target without ``entity_id`` is such a request.
- **A template is named by its length and digest** (``ha_render_template``): its signature
  does not hold it, so the guardian can match the card against the arguments below.
- **Room for what comes later.** A card that needs several guardians grows a line naming who
  allowed it so far; its size is measured with that line at its longest.

HTML is built from text spans (:class:`_Html`) that count what Telegram will show, so the size
of a card is known exactly without parsing it back.

Imports: guardian, tools. Never Telegram.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import math
import unicodedata
from collections import Counter
from collections.abc import Iterator
from typing import Any, Final, Literal

import attrs
from attrs import frozen

from agentgate import tools
from agentgate.guardian import ApprovalCard, CardUpdate, Status

__all__ = [
    "FRAME_RESERVE",
    "MAX_MARKS",
    "MAX_TEXT",
    "CardRules",
    "CardTooLarge",
    "Layout",
    "arguments_document",
    "arguments_text",
    "card_layout",
    "clip",
    "document_name",
    "offers",
    "remaining",
    "render_card",
    "render_resolution",
    "reveal_key",
    "reveal_value",
    "utc",
    "utf16_len",
]

MCP_DOORS: Final = frozenset({"mcp-stdio", "mcp-http"})  # a card says "via MCP" for these
MAX_TEXT: Final = 4096
"""What one Telegram message holds: visible text, in UTF-16 code units."""

MAX_MARKS: Final = 2
"""Combining marks shown as they are after one visible base character; more are escaped."""

FRAME_RESERVE: Final = 160
"""Room a card keeps for its first and last lines: the approval header and expiry line when it
is asked, the outcome line (status, who, when) once it is resolved."""

TARGET_EXTRA: Final = 200
"""How much longer than its entity id a target line may be (name and state, revealed)."""

VOTER_NAME: Final = 40
"""Characters of one guardian's name in a card's "approved by" line."""

Layout = Literal["inline", "document"]

_HIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp", "Zs"})
_MARKS: Final = frozenset({"Mn", "Mc", "Me"})
# Visible by category, invisible in practice: fillers, blanks and default-ignorable marks.
_INVISIBLE: Final = frozenset(
    [
        *(0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0, 0x1D159),
        *range(0x180B, 0x1810),  # Mongolian variation selectors and vowel separator
        *range(0xFE00, 0xFE10),  # variation selectors
        *range(0xE0100, 0xE01F0),  # variation selectors supplement
    ]
)


class CardTooLarge(Exception):
    """A card that would not fit one message: the ask is refused (or its arguments would go
    to a document, which cannot help here)."""

    def __init__(self, size: int, limit: int, what: str = "arguments") -> None:
        self.size, self.limit, self.what = size, limit, what
        super().__init__(
            f"{what} too large to show the guardian: the card would be {size} characters,"
            f" the limit is {limit} (guardian.max_card_chars)"
        )


# -- revealing ------------------------------------------------------------------------------


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON's form: a surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def reveal_key(text: str) -> str:
    """Keys and identifiers: everything outside printable ASCII escaped."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if " " <= c <= "~" else _escape(c) for c in text)


def reveal_value(text: str) -> str:
    """Values: visible, non-combining characters as they are, a few marks on each; the rest
    escaped (see the module docstring)."""
    if text.isascii() and text.isprintable():
        return text
    out: list[str] = []
    marks = MAX_MARKS + 1  # no visible base yet: a leading mark is escaped
    for char in text:
        category = unicodedata.category(char)
        if char == " ":
            out.append(char)
            marks = MAX_MARKS + 1
        elif category in _HIDDEN_CATEGORIES or ord(char) in _INVISIBLE:
            out.append(_escape(char))
            marks = MAX_MARKS + 1
        elif category in _MARKS:
            marks += 1
            out.append(char if marks <= MAX_MARKS else _escape(char))
        else:
            out.append(char)
            marks = 0
    return "".join(out)


def _json_lines(value: Any, indent: str = "") -> Iterator[str]:
    """``value`` as indented JSON, keys through :func:`reveal_key`, strings :func:`reveal_value`.

    Escapes use JSON's own ``\\uXXXX`` form, so the text is still valid JSON.
    """
    inner = indent + "  "
    if isinstance(value, dict) and value:
        yield "{"
        items = list(value.items())
        for index, (key, item) in enumerate(items):
            comma = "," if index < len(items) - 1 else ""
            key_text = reveal_key(json.dumps(str(key), ensure_ascii=True))
            lines = list(_json_lines(item, inner))
            yield f"{inner}{key_text}: {lines[0]}" + ("" if len(lines) > 1 else comma)
            if len(lines) > 1:
                yield from lines[1:-1]
                yield lines[-1] + comma
        yield f"{indent}}}"
    elif isinstance(value, list) and value:
        yield "["
        for index, item in enumerate(value):
            comma = "," if index < len(value) - 1 else ""
            lines = list(_json_lines(item, inner))
            lines[0] = inner + lines[0]
            lines[-1] += comma
            yield from lines
        yield f"{indent}]"
    elif isinstance(value, str):
        yield reveal_value(json.dumps(value, ensure_ascii=False))
    else:
        yield json.dumps(value, ensure_ascii=True, default=str)


def arguments_text(args: dict[str, Any]) -> str:
    """The arguments as the card shows them."""
    return "\n".join(_json_lines(args))


# -- building HTML that knows its visible size -------------------------------------------------


def utf16_len(text: str) -> int:
    """Length as Telegram counts it (UTF-16 code units)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


class _Html:
    """Telegram HTML assembled from text spans; ``visible`` counts what Telegram shows."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.visible = 0

    def text(self, text: str, tag: str | None = None) -> _Html:
        escaped = html.escape(text, quote=False)
        self.parts.append(f"<{tag}>{escaped}</{tag}>" if tag else escaped)
        self.visible += utf16_len(text)
        return self

    def extend(self, other: _Html) -> _Html:
        self.parts.extend(other.parts)
        self.visible += other.visible
        return self

    def __str__(self) -> str:
        return "".join(self.parts)


def clip(text: str, limit: int) -> str:
    """At most ``limit`` UTF-16 units of ``text``, ending in "…" when cut."""
    if utf16_len(text) <= limit:
        return text
    out, used = [], 0
    for char in text:
        size = utf16_len(char)
        if used + size > limit - 1:
            break
        out.append(char)
        used += size
    return "".join(out) + "…"


def utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def remaining(seconds: float) -> str:
    if seconds <= 0:
        return "now"
    if seconds < 60:
        return f"in {math.ceil(seconds)} s"
    return f"in {round(seconds / 60)} min"


def _target_limit(card: ApprovalCard) -> int:
    entity_id = card.args.get("entity_id")
    return (len(entity_id) if isinstance(entity_id, str) else 0) + TARGET_EXTRA


def _entity_line(card: ApprovalCard) -> str | None:
    """Where the entities of the signature were found, when not only in ``entity_id``:
    ``entity_id, entities (150), variables.door``. The signature names each of them."""
    try:
        refs = tools.references(card.tool, card.args)
    except Exception:  # a row from another version: the signature still names them
        return None
    if all(ref.path == "entity_id" for ref in refs):
        return None
    counts = Counter(ref.path for ref in refs)
    return ", ".join(
        reveal_key(path) if count == 1 else f"{reveal_key(path)} ({count})"
        for path, count in counts.items()
    )


def _is_request(card: ApprovalCard) -> bool:
    return card.target is not None and not isinstance(card.args.get("entity_id"), str)


def _template_line(card: ApprovalCard) -> str | None:
    template = card.args.get("template")
    if card.tool != "ha_render_template" or not isinstance(template, str):
        return None
    digest = hashlib.sha256(template.encode("utf-8", "surrogatepass")).hexdigest()
    return f"Template: {len(template):,} characters, sha256 {digest[:16]}…\n"


def _indirect_line(card: ApprovalCard) -> str | None:
    reason = tools.indirect_reason(card.tool, card.args)
    if reason is None:
        return None
    domain, service = card.args.get("domain"), card.args.get("service")
    what = f"{domain}.{service}" if card.tool == "ha_call_service" else card.tool
    return f"{reveal_key(str(what))} {reason}"


def _body(card: ApprovalCard, layout: Layout, *, target: str | None) -> _Html:
    """Everything but the first and last lines, which differ between asked and resolved."""
    out = _Html()
    out.text("Agent: ").text(reveal_key(card.agent), "b")
    out.text(" (via MCP)\n" if card.via in MCP_DOORS else "\n")
    out.text("Tool: ").text(reveal_key(card.tool), "code").text("\n")
    if target and _is_request(card):
        shown = "\n".join(reveal_value(line) for line in target.split("\n"))
        out.text("Request (as it will be sent):\n").text(shown, "pre").text("\n")
    elif target:
        out.text("Target: ").text(clip(reveal_value(target), _target_limit(card)), "b")
        out.text("\n")
    template = _template_line(card)
    if template:
        out.text(template)
    out.text("Signature: ").text(reveal_key(card.signature), "code").text("\n")
    entities = _entity_line(card)
    if entities:
        out.text(f"Entities named in: {entities}\n")
    indirect = _indirect_line(card)
    if indirect:
        out.text(f"⚠ Indirect: {indirect}\n", "b")
    out.text(f"Asked because: {reveal_value(card.matched)}\n")
    if card.quorum > 1:
        out.text(_votes_line(card) + "\n", "b")
    if layout == "inline":
        out.text("Arguments:\n").text(arguments_text(card.args), "pre")
    else:
        name, size, digest = _document_facts(card)
        out.text(f"Arguments: {size:,} characters, in the file {name} sent just before this")
        out.text(f" message (sha256 {digest[:16]}…). Read it before you decide.", "b")
    return out


def _votes_line(card: ApprovalCard) -> str:
    """``👥 2 guardians must allow: 1 of 2 — approved by Alex (111)``."""
    line = f"👥 {card.quorum} guardians must allow: {len(card.votes)} of {card.quorum}"
    if card.votes:
        names = ", ".join(clip(reveal_value(name), VOTER_NAME) for name in card.votes)
        line += f" — approved by {names}"
    return line


def offers(card: ApprovalCard) -> tuple[bool, bool]:
    """Which grant buttons the card carries: (Allow 1 h, Always allow). Neither where several
    guardians must allow, where a quota asked, or where the signature leaves out what runs;
    Always allow only once it is suggested (``approved_before``)."""
    grant = card.quorum <= 1 and card.quota is None and tools.grantable(card.tool, card.args)
    return grant, grant and card.approved_before is not None


def _document_facts(card: ApprovalCard) -> tuple[str, int, str]:
    content = arguments_document(card)
    return document_name(card), len(content), hashlib.sha256(content).hexdigest()


def document_name(card: ApprovalCard) -> str:
    """The file name of a card's arguments document."""
    return f"request-{card.request_id[:8]}-arguments.json"


def arguments_document(card: ApprovalCard) -> bytes:
    """The complete arguments as a JSON document: ASCII only, every other character escaped."""
    return json.dumps(card.args, indent=2, ensure_ascii=True, default=str).encode("ascii")


@frozen
class CardRules:
    """``[guardian] max_card_chars`` and ``card_overflow``: how large a card may be, and what
    happens to a call whose card would be larger."""

    max_chars: int = MAX_TEXT
    overflow: Literal["refuse", "document"] = "refuse"

    def layout(self, card: ApprovalCard) -> Layout:
        """See :func:`card_layout`."""
        return card_layout(card, max_chars=self.max_chars, overflow=self.overflow)

    def shown_layout(self, card: ApprovalCard) -> Layout:
        """How an already shown card is rendered again (its resolution, after a restart that
        may have changed these rules): inline if it fits one message, else its document."""
        try:
            return self.layout(card)
        except CardTooLarge:
            pass
        try:
            return card_layout(card, max_chars=MAX_TEXT, overflow="refuse")
        except CardTooLarge:
            return "document"


def card_layout(card: ApprovalCard, *, max_chars: int, overflow: str) -> Layout:
    """How ``card`` will be shown within ``max_chars``, or :class:`CardTooLarge`.

    :data:`FRAME_RESERVE` keeps room for the first and last lines, so a card that passes here
    renders within its limit, asked or resolved.
    """
    # The target line is read from Home Assistant when the card is sent: count its largest;
    # and every guardian a two-person approval needs, with the longest of names.
    named = isinstance(card.args.get("entity_id"), str)
    worst_target = "x" * _target_limit(card) if named else card.target
    if card.quorum > 1:
        card = attrs.evolve(card, votes=("x" * VOTER_NAME,) * card.quorum)
    size = _body(card, "inline", target=worst_target).visible + FRAME_RESERVE
    if size <= max_chars:
        return "inline"
    if overflow != "document":
        raise CardTooLarge(size, max_chars)
    pointer = _body(card, "document", target=worst_target).visible + FRAME_RESERVE
    if pointer > max_chars:
        raise CardTooLarge(pointer, max_chars, "request")
    return "document"


def render_card(card: ApprovalCard, *, now: float, layout: Layout = "inline") -> str:
    """The HTML of a new approval card; :class:`CardTooLarge` rather than a card that would
    not fit one message."""
    out = _Html().text("🛡 ").text("Approval needed", "b").text("\n")
    out.extend(_body(card, layout, target=card.target))
    out.text(f"\nExpires: {utc(card.expires_at)} ({remaining(card.expires_at - now)})")
    if out.visible > MAX_TEXT:
        raise CardTooLarge(out.visible, MAX_TEXT)
    return str(out)


_STATUS_TEXT: Final[dict[Status, str]] = {
    Status.APPROVED: "✅ Approved",
    Status.DENIED: "❌ Denied",
    Status.TIMED_OUT: "⌛ Timed out: nobody decided",
    Status.EXECUTED: "✅ Executed",
    Status.FAILED: "⚠ Failed",
    Status.UNKNOWN: "❓ Sent, but no answer: it may have run",
    Status.QUEUED: "📥 Agent offline — result queued",
    Status.SHUTDOWN: "⏹ Gateway shutting down — request cancelled",
    Status.RESTARTING: "⏸ Gateway restarting — this request stays open",
    Status.FROZEN: "🧊 Frozen — denied",
    Status.UNDONE: "↩ Undone",
    Status.UNDO_FAILED: "⚠ Undo failed",
}


def render_resolution(
    card: ApprovalCard,
    update: CardUpdate,
    *,
    now: float,
    layout: Layout = "inline",
    max_chars: int = MAX_TEXT,
) -> str:
    """The HTML of a resolved card: what happened, who, when, then the card itself.

    The card part is the same as when it was asked; who decided and the detail line are cut
    to the room that leaves within ``max_chars`` (the status and the time always fit: a card
    that passed :func:`card_layout` kept :data:`FRAME_RESERVE` for them).
    """
    body = _body(card, layout, target=card.target)
    status = _STATUS_TEXT.get(update.status, str(update.status))
    when = f" at {utc(update.at or now)}"
    room = min(max_chars, MAX_TEXT) - body.visible - utf16_len(status + when) - 2
    head = _Html().text(status, "b")
    if update.by and room > 8:
        by = clip(f" by {reveal_value(update.by)}", min(room, 200))
        head.text(by)
        room -= utf16_len(by)
    head.text(when)
    if update.grant_until is not None:
        if math.isinf(update.grant_until):
            grant = (
                f"\n🔁 Allowed always: the same request from {reveal_key(card.agent)} runs"
                " without asking until the grant is revoked (/grants)"
            )
        else:
            grant = (
                f"\n⏱ Allowed for 1 h: the same request from {reveal_key(card.agent)} runs"
                f" without asking until {utc(update.grant_until)}"
            )
        if utf16_len(grant) + 8 < room:
            head.text(grant)
            room -= utf16_len(grant)
    if update.undo_until is not None:
        undo = f"\n↩ Undo possible until {utc(update.undo_until)}"
        if utf16_len(undo) + 8 < room:
            head.text(undo)
            room -= utf16_len(undo)
    detail = reveal_value(update.detail.replace("\n", " "))
    if detail and room > 8:
        head.text("\n" + clip(detail, min(room - 1, 500)))
    return str(head.text("\n\n").extend(body))
