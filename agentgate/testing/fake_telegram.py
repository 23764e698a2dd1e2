"""A fake Telegram Bot API: a real HTTP server on 127.0.0.1 that python-telegram-bot talks to.

Point PTB at it with ``base_url = fake.base_url`` (``http://127.0.0.1:PORT/bot``); PTB then posts
``/bot<TOKEN>/<method>`` form-encoded (non-string values JSON-encoded). The server is a stdlib
``ThreadingHTTPServer`` in a daemon thread (HTTP/1.1 keep-alive, Nagle off), so it works from Trio
tests, from asyncio code and as ``python -m agentgate.testing.fake_telegram``.

Test code plays the guardian through a thread-safe API::

    async with run_fake_telegram(token=TOKEN) as tg:
        msg = await tg.wait_for_message(lambda m: "lock.front_door" in m.text)
        press = tg.press(msg.message_id, f"allow:{request_id}", user_id=111)
        answer = await press.wait_answer()
        tg.send_command("/freeze", user_id=111)

Fault switches: :meth:`FakeTelegram.down` / :meth:`~FakeTelegram.up` (refuse or drop
connections), ``tg.retry_after = N`` (the next sendMessage answers 429 with ``retry_after``),
:meth:`~FakeTelegram.throttle` (the next K sendMessage calls), per method
:meth:`~FakeTelegram.fail_next` (the next K calls) and :meth:`~FakeTelegram.fail` (every call
until :meth:`~FakeTelegram.heal`): e.g. ``tg.fail("getUpdates", 401, "Unauthorized")``.
``getChat`` knows the default chat and those added to ``tg.chats``; any other is "chat not
found", as for a bot that was never added to it.

Messages sent with ``parse_mode="HTML"`` are checked like Telegram does (only its tags, balanced,
every ``<``, ``>`` and ``&`` escaped) and stored as the text a human would see. ``sendDocument``
takes a multipart upload; the message keeps the file (``message.document``).

Imports: nothing of agentgate: it stands for another program.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import itertools
import json
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from html.parser import HTMLParser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit

import attrs
import trio
from attrs import frozen

__all__ = [
    "CallbackAnswer",
    "FakeMessage",
    "FakeTelegram",
    "Press",
    "run_fake_telegram",
    "serve_fake_telegram",
    "telegram_visible_text",
]

T = TypeVar("T")

MAX_TEXT = 4096  # UTF-16 code units after entity parsing, as Telegram counts them

# Form fields that PTB JSON-encodes (everything else arrives as a plain string).
_JSON_FIELDS = frozenset(
    {
        "allowed_updates",
        "cache_time",
        "chat_id",
        "commands",
        "disable_notification",
        "drop_pending_updates",
        "entities",
        "limit",
        "link_preview_options",
        "message_id",
        "offset",
        "protect_content",
        "reply_markup",
        "reply_parameters",
        "scope",
        "show_alert",
        "timeout",
    }
)

_HTML_TAGS = frozenset(
    {
        "a",
        "b",
        "blockquote",
        "code",
        "del",
        "em",
        "i",
        "ins",
        "pre",
        "s",
        "span",
        "strike",
        "strong",
        "tg-emoji",
        "tg-spoiler",
        "u",
    }
)
_HTML_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}


class _BadRequest(Exception):
    """A method's 400 answer."""


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


class _TelegramHTML(HTMLParser):
    """Telegram's HTML parse mode, strictly: returns the visible text or raises _BadRequest."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.parts: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _HTML_TAGS:
            raise _BadRequest(f"Bad Request: can't parse entities: Unsupported start tag {tag!r}")
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            raise _BadRequest(f"Bad Request: can't parse entities: Unexpected end tag {tag!r}")
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        for bad in "<>&":
            if bad in data:
                raise _BadRequest(f"Bad Request: can't parse entities: unescaped {bad!r}")
        self.parts.append(data)

    def handle_entityref(self, name: str) -> None:
        if name not in _HTML_ENTITIES:
            raise _BadRequest(f"Bad Request: can't parse entities: unsupported entity &{name};")
        self.parts.append(_HTML_ENTITIES[name])

    def handle_charref(self, name: str) -> None:
        try:
            code = int(name[1:], 16) if name[:1] in "xX" else int(name)
            self.parts.append(chr(code))
        except (ValueError, OverflowError):
            raise _BadRequest(f"Bad Request: can't parse entities: bad &#{name};") from None

    def handle_comment(self, data: str) -> None:
        raise _BadRequest("Bad Request: can't parse entities: comments are not supported")

    def handle_decl(self, decl: str) -> None:
        raise _BadRequest("Bad Request: can't parse entities: declarations are not supported")

    def unknown_decl(self, data: str) -> None:
        raise _BadRequest("Bad Request: can't parse entities: declarations are not supported")

    def handle_pi(self, data: str) -> None:
        raise _BadRequest("Bad Request: can't parse entities: processing instructions")

    @classmethod
    def visible_text(cls, html: str) -> str:
        """The text a human sees; raises _BadRequest like Telegram would."""
        parser = cls()
        parser.feed(html)
        parser.close()
        if parser.rawdata:  # the parser kept something it could not make sense of
            raise _BadRequest("Bad Request: can't parse entities: unterminated markup")
        if parser.stack:
            raise _BadRequest(
                f"Bad Request: can't parse entities: Can't find end tag for {parser.stack[-1]!r}"
            )
        return "".join(parser.parts)


def telegram_visible_text(html: str) -> str:
    """What Telegram shows for ``html`` in HTML parse mode; ValueError where it would refuse."""
    try:
        return _TelegramHTML.visible_text(html)
    except _BadRequest as exc:
        raise ValueError(str(exc)) from None


@frozen
class FakeDocument:
    """A file the bot sent (``sendDocument``)."""

    filename: str
    content: bytes
    caption: str


@frozen
class FakeMessage:
    """A message the bot sent, as it currently looks (``text`` is what a human sees)."""

    message_id: int
    chat_id: int | str
    text: str
    raw_text: str  # exactly as sent (HTML source when parse_mode is HTML)
    parse_mode: str | None
    reply_markup: dict[str, Any] | None
    edits: int = 0
    deleted: bool = False
    document: FakeDocument | None = None
    silent: bool = False  # sent with disable_notification

    @property
    def buttons(self) -> list[tuple[str, str]]:
        """Inline buttons as ``(label, callback_data)``, row by row."""
        rows = (self.reply_markup or {}).get("inline_keyboard") or []
        return [(b.get("text", ""), b.get("callback_data", "")) for row in rows for b in row]

    def to_api(self, bot: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {
            "message_id": self.message_id,
            "date": int(time.time()),
            "chat": _chat(self.chat_id),
            "from": bot,
        }
        if self.document is not None:
            message["document"] = {
                "file_id": f"file-{self.message_id}",
                "file_unique_id": f"u{self.message_id}",
                "file_name": self.document.filename,
                "file_size": len(self.document.content),
            }
            message["caption"] = self.document.caption
        else:
            message["text"] = self.text
        if self.edits:
            message["edit_date"] = int(time.time())
        if self.reply_markup:
            message["reply_markup"] = self.reply_markup
        return message


@frozen
class CallbackAnswer:
    """An ``answerCallbackQuery`` the bot made."""

    callback_query_id: str
    text: str | None
    show_alert: bool


class Press:
    """A queued button press; :meth:`wait_answer` returns the bot's callback answer."""

    def __init__(self, fake: FakeTelegram, callback_query_id: str, update_id: int) -> None:
        self.fake = fake
        self.callback_query_id = callback_query_id
        self.update_id = update_id

    @property
    def answer(self) -> CallbackAnswer | None:
        """The answer so far, or None."""
        with self.fake._cond:
            return self.fake._answers.get(self.callback_query_id)

    async def wait_answer(self) -> CallbackAnswer:
        """Wait (under the caller's deadline) until the bot answers this press."""
        return await self.fake.wait_for(lambda: self.fake._answers.get(self.callback_query_id))


def _chat(chat_id: int | str) -> dict[str, Any]:
    if isinstance(chat_id, int) and chat_id > 0:
        return {"id": chat_id, "type": "private", "first_name": "Guardian"}
    return {"id": chat_id, "type": "supergroup", "title": "agentgate guardians"}


class FakeTelegram:
    """The fake Bot API's state and its guardian-side controls (all methods are thread-safe)."""

    def __init__(self, token: str = "123456:TEST-TOKEN", *, chat_id: int = -1001) -> None:
        self.token = token
        self.default_chat_id = chat_id
        head = token.split(":", 1)[0]
        self.bot_user: dict[str, Any] = {
            "id": int(head) if head.isdigit() else 123456,
            "is_bot": True,
            "first_name": "agentgate",
            "username": "agentgate_test_bot",
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }
        self._cond = threading.Condition()
        self._ids = itertools.count(1)  # message ids and callback query ids
        self._update_ids = itertools.count(1)
        self._updates: list[dict[str, Any]] = []
        self._messages: dict[int, FakeMessage] = {}
        self._answers: dict[str, CallbackAnswer] = {}
        self._commands: list[dict[str, Any]] = []
        self._calls: list[tuple[str, dict[str, Any]]] = []
        self._failures: dict[str, deque[tuple[int, str, dict[str, Any] | None]]] = {}
        self._failing: dict[str, tuple[int, str, int | None]] = {}  # method -> answer until healed
        self.chats: set[int | str] = set()  # chats the bot is in, besides the default one
        self._waiters: list[tuple[trio.lowlevel.TrioToken, trio.Event]] = []
        self._down: Literal["refuse", "drop"] | None = None
        self._dropped = 0
        self._closing = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.host = "127.0.0.1"
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """What to give PTB (or ``[guardian.telegram] base_url``)."""
        return f"http://{self.host}:{self.port}/bot"

    def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and serve in a daemon thread (port 0 picks a free port)."""
        self.host = host
        self._listen(port)

    def close(self) -> None:
        """Stop serving, wake long polls and drop every connection."""
        with self._cond:
            self._closing = True
            self._changed()
        self._stop_listening()
        self._drop_connections()

    def _listen(self, port: int) -> None:
        server = _Server((self.host, port), _Handler)
        server.fake = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-telegram:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def _drop_connections(self) -> None:
        with self._cond:
            connections = list(self._connections)
        for conn in connections:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # -- fault switches --------------------------------------------------------------------

    def down(self, mode: Literal["refuse", "drop"] = "refuse") -> None:
        """Make Telegram unreachable: refuse new connections (or accept and drop them), and
        drop every open one, long polls included."""
        with self._cond:
            self._down = mode
            self._changed()
        if mode == "refuse":
            self._stop_listening()
        self._drop_connections()

    def up(self) -> None:
        """Serve again on the same port."""
        with self._cond:
            mode, self._down = self._down, None
            self._changed()
        if mode == "refuse" and self._server is None and not self._closing:
            self._listen(self.port)

    @property
    def retry_after(self) -> int:
        """Seconds of the next armed 429 (0 when none); setting it arms the next sendMessage."""
        with self._cond:
            for code, _, params in self._failures.get("sendMessage", ()):
                if code == 429 and params:
                    return int(params["retry_after"])
            return 0

    @retry_after.setter
    def retry_after(self, seconds: int) -> None:
        self.throttle(seconds, times=1 if seconds else 0)

    def throttle(self, retry_after: int, *, times: int = 1, method: str = "sendMessage") -> None:
        """The next ``times`` calls of ``method`` answer 429 Too Many Requests."""
        with self._cond:
            queue = self._failures.setdefault(method, deque())
            kept = [f for f in queue if f[0] != 429]
            queue.clear()
            queue.extend(kept)
            for _ in range(times):
                queue.append(
                    (
                        429,
                        f"Too Many Requests: retry after {retry_after}",
                        {"retry_after": retry_after},
                    )
                )

    def fail(
        self, method: str, error_code: int, description: str, *, retry_after: int | None = None
    ) -> None:
        """Every call of ``method`` answers ``error_code`` with ``description`` until healed
        (``retry_after``: the 429's ``parameters.retry_after``)."""
        with self._cond:
            self._failing[method] = (error_code, description, retry_after)
            self._changed()

    def heal(self, method: str | None = None) -> None:
        """Stop :meth:`fail` for ``method`` (every method if None)."""
        with self._cond:
            if method is None:
                self._failing.clear()
            else:
                self._failing.pop(method, None)
            self._changed()

    def fail_next(self, method: str, error_code: int, description: str, *, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` answer ``error_code`` with ``description``."""
        with self._cond:
            queue = self._failures.setdefault(method, deque())
            for _ in range(times):
                queue.append((error_code, description, None))

    # -- what the bot did ------------------------------------------------------------------

    @property
    def messages(self) -> dict[int, FakeMessage]:
        """Every message the bot sent, by message_id, as it looks now (in send order)."""
        with self._cond:
            return dict(self._messages)

    @property
    def answers(self) -> list[CallbackAnswer]:
        """Every callback answer, in order."""
        with self._cond:
            return list(self._answers.values())

    @property
    def commands(self) -> list[dict[str, Any]]:
        """The bot's command list as last set with setMyCommands."""
        with self._cond:
            return list(self._commands)

    @property
    def calls(self) -> list[tuple[str, dict[str, Any]]]:
        """Every API call received: ``(method, params)``."""
        with self._cond:
            return list(self._calls)

    def calls_to(self, method: str) -> list[dict[str, Any]]:
        """The params of every call of ``method``."""
        return [params for m, params in self.calls if m == method]

    async def wait_for(self, probe: Callable[[], T | None]) -> T:
        """Wait until ``probe()`` (called under the fake's lock) returns something not None.

        No deadline of its own: the caller holds it (``with trio.fail_after(...)``).
        """
        while True:
            event = trio.Event()
            with self._cond:
                result = probe()
                if result is not None:
                    return result
                self._waiters.append((trio.lowlevel.current_trio_token(), event))
            await event.wait()

    async def wait_for_message(self, predicate: Callable[[FakeMessage], bool]) -> FakeMessage:
        """Wait for a (sent or edited) message matching ``predicate``; return it as it is now."""

        def probe() -> FakeMessage | None:
            for message in reversed(self._messages.values()):
                if predicate(message):
                    return message
            return None

        return await self.wait_for(probe)

    # -- what the guardian does --------------------------------------------------------------

    def press(
        self,
        message_id: int,
        callback_data: str,
        user_id: int,
        *,
        first_name: str = "Guardian",
        last_name: str | None = None,
        in_chat: int | None = None,
    ) -> Press:
        """Press an inline button of a sent message: queues a ``callback_query`` update.

        ``callback_data`` need not be one of the message's buttons (a forged press);
        ``in_chat`` makes the press come from a copy of the message in another chat.
        """
        with self._cond:
            message = self._messages[message_id]
            if in_chat is not None:
                message = attrs.evolve(message, chat_id=in_chat)
            query_id = str(next(self._ids))
            update_id = self._queue_update(
                {
                    "callback_query": {
                        "id": query_id,
                        "from": _user(user_id, first_name, last_name),
                        "chat_instance": f"ci{message.chat_id}",
                        "data": callback_data,
                        "message": message.to_api(self.bot_user),
                    }
                }
            )
        return Press(self, query_id, update_id)

    def send_command(
        self,
        text: str,
        user_id: int,
        *,
        chat_id: int | None = None,
        first_name: str = "Guardian",
        last_name: str | None = None,
    ) -> int:
        """Send a message such as ``/freeze`` from ``user_id`` (to the group by default)."""
        word = text.split(maxsplit=1)[0] if text.strip() else ""
        entities = (
            [{"type": "bot_command", "offset": 0, "length": _utf16_len(word)}]
            if word.startswith("/")
            else []
        )
        with self._cond:
            chat = self.default_chat_id if chat_id is None else chat_id
            message: dict[str, Any] = {
                "message_id": next(self._ids),
                "date": int(time.time()),
                "chat": _chat(chat),
                "from": _user(user_id, first_name, last_name),
                "text": text,
            }
            if entities:
                message["entities"] = entities
            return self._queue_update({"message": message})

    def _queue_update(self, update: dict[str, Any]) -> int:
        update_id = next(self._update_ids)
        self._updates.append({"update_id": update_id, **update})
        self._changed()
        return update_id

    @property
    def dropped(self) -> int:
        """How many connections or requests were dropped while down."""
        with self._cond:
            return self._dropped

    def _count_drop(self) -> None:
        self._dropped += 1
        self._changed()

    def _changed(self) -> None:
        """Wake long polls and async waiters (lock held)."""
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for token, event in waiters:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(event.set)

    # -- the Bot API -----------------------------------------------------------------------

    def handle(self, method: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """Answer one API call: ``(http_status, body)``, or None to drop the connection."""
        with self._cond:
            self._calls.append((method, params))
            self._changed()
            if self._down:
                return None
            failures = self._failures.get(method)
            if method in self._failing:
                code, description, retry_after = self._failing[method]
                failed: dict[str, Any] = {
                    "ok": False,
                    "error_code": code,
                    "description": description,
                }
                if retry_after is not None:
                    failed["parameters"] = {"retry_after": retry_after}
                return code, failed
            if failures:
                code, description, extra = failures.popleft()
                body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
                if extra:
                    body["parameters"] = extra
                return code, body
        if method == "getUpdates":
            return self._get_updates(params)
        handler = getattr(self, f"_api_{method}", None)
        if handler is None:
            return 404, {
                "ok": False,
                "error_code": 404,
                "description": "Not Found: method not found",
            }
        try:
            with self._cond:
                result = handler(params)
                self._changed()
        except _BadRequest as exc:
            return 400, {"ok": False, "error_code": 400, "description": str(exc)}
        except (KeyError, TypeError, ValueError) as exc:
            return 400, {"ok": False, "error_code": 400, "description": f"Bad Request: {exc}"}
        return 200, {"ok": True, "result": result}

    def _get_updates(self, params: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        offset = int(params.get("offset") or 0)
        limit = max(1, min(100, int(params.get("limit") or 100)))
        deadline = time.monotonic() + max(0.0, float(params.get("timeout") or 0))
        with self._cond:
            while True:
                if self._down:
                    return None
                if self._closing:
                    return 200, {"ok": True, "result": []}
                if offset > 0:
                    self._updates = [u for u in self._updates if u["update_id"] >= offset]
                batch = self._updates[:limit]
                remaining = deadline - time.monotonic()
                if batch or remaining <= 0:
                    return 200, {"ok": True, "result": batch}
                self._cond.wait(remaining)

    def _render(self, params: dict[str, Any]) -> tuple[str, str]:
        raw = params.get("text")
        if not isinstance(raw, str) or not raw.strip():
            raise _BadRequest("Bad Request: message text is empty")
        mode = params.get("parse_mode")
        text = _TelegramHTML.visible_text(raw) if str(mode).lower() == "html" else raw
        if _utf16_len(text) > MAX_TEXT:
            raise _BadRequest("Bad Request: message is too long")
        if not text.strip():
            raise _BadRequest("Bad Request: message text is empty")
        return raw, text

    def _markup(self, params: dict[str, Any]) -> dict[str, Any] | None:
        markup = params.get("reply_markup")
        if markup is None:
            return None
        if not isinstance(markup, dict):
            raise _BadRequest("Bad Request: can't parse reply keyboard markup JSON object")
        for row in markup.get("inline_keyboard", []):
            for button in row:
                data = button.get("callback_data")
                if data is not None and not 1 <= len(data.encode()) <= 64:
                    raise _BadRequest("Bad Request: BUTTON_DATA_INVALID")
        return markup if markup.get("inline_keyboard") else None

    def _target(self, params: dict[str, Any]) -> FakeMessage:
        if "inline_message_id" in params:
            raise _BadRequest("Bad Request: inline messages are not supported by the fake")
        message = self._messages.get(int(params["message_id"]))
        if message is None or message.deleted or message.chat_id != params.get("chat_id"):
            raise _BadRequest("Bad Request: message to edit not found")
        return message

    def _api_getMe(self, params: dict[str, Any]) -> Any:
        return self.bot_user

    def _api_getChat(self, params: dict[str, Any]) -> Any:
        chat_id = params["chat_id"]
        if chat_id != self.default_chat_id and chat_id not in self.chats:
            raise _BadRequest("Bad Request: chat not found")
        return {**_chat(chat_id), "accent_color_id": 0, "max_reaction_count": 11}

    def _api_sendMessage(self, params: dict[str, Any]) -> Any:
        chat_id = params["chat_id"]
        raw, text = self._render(params)
        message = FakeMessage(
            message_id=next(self._ids),
            chat_id=chat_id,
            text=text,
            raw_text=raw,
            parse_mode=params.get("parse_mode"),
            reply_markup=self._markup(params),
            silent=params.get("disable_notification") is True,
        )
        self._messages[message.message_id] = message
        return message.to_api(self.bot_user)

    def _api_sendDocument(self, params: dict[str, Any]) -> Any:
        upload = params.get("document")
        if not isinstance(upload, tuple):
            raise _BadRequest("Bad Request: there is no document in the request")
        filename, content = upload
        caption = str(params.get("caption") or "")
        message = FakeMessage(
            message_id=next(self._ids),
            chat_id=params["chat_id"],
            text=caption,
            raw_text=caption,
            parse_mode=None,
            reply_markup=None,
            document=FakeDocument(filename, content, caption),
        )
        self._messages[message.message_id] = message
        return message.to_api(self.bot_user)

    def _api_editMessageText(self, params: dict[str, Any]) -> Any:
        message = self._target(params)
        raw, text = self._render(params)
        markup = self._markup(params)  # not passing reply_markup removes the inline keyboard
        if (raw, markup, params.get("parse_mode")) == (
            message.raw_text,
            message.reply_markup,
            message.parse_mode,
        ):
            raise _BadRequest(
                "Bad Request: message is not modified: specified new message content and reply "
                "markup are exactly the same as a current content and reply markup of the message"
            )
        edited = attrs.evolve(
            message,
            text=text,
            raw_text=raw,
            parse_mode=params.get("parse_mode"),
            reply_markup=markup,
            edits=message.edits + 1,
        )
        self._messages[message.message_id] = edited
        return edited.to_api(self.bot_user)

    def _api_editMessageReplyMarkup(self, params: dict[str, Any]) -> Any:
        message = self._target(params)
        markup = self._markup(params)
        if markup == message.reply_markup:
            raise _BadRequest("Bad Request: message is not modified")
        edited = attrs.evolve(message, reply_markup=markup, edits=message.edits + 1)
        self._messages[message.message_id] = edited
        return edited.to_api(self.bot_user)

    def _api_deleteMessage(self, params: dict[str, Any]) -> Any:
        message = self._target(params)
        self._messages[message.message_id] = attrs.evolve(message, deleted=True)
        return True

    def _api_answerCallbackQuery(self, params: dict[str, Any]) -> Any:
        query_id = str(params["callback_query_id"])
        if query_id in self._answers:
            raise _BadRequest("Bad Request: query is too old and response timeout expired")
        text = params.get("text")
        if text is not None and len(text) > 200:
            raise _BadRequest("Bad Request: MESSAGE_TOO_LONG")
        self._answers[query_id] = CallbackAnswer(query_id, text, bool(params.get("show_alert")))
        return True

    def _api_setMyCommands(self, params: dict[str, Any]) -> Any:
        commands = params["commands"]
        if not isinstance(commands, list):
            raise _BadRequest("Bad Request: can't parse commands JSON object")
        self._commands = commands
        return True

    def _api_getMyCommands(self, params: dict[str, Any]) -> Any:
        return self._commands

    def _api_deleteMyCommands(self, params: dict[str, Any]) -> Any:
        self._commands = []
        return True

    def _api_deleteWebhook(self, params: dict[str, Any]) -> Any:
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    def _api_getWebhookInfo(self, params: dict[str, Any]) -> Any:
        return {"url": "", "has_custom_certificate": False, "pending_update_count": 0}

    def _api_close(self, params: dict[str, Any]) -> Any:
        return True

    def _api_logOut(self, params: dict[str, Any]) -> Any:
        return True


def _user(user_id: int, first_name: str, last_name: str | None) -> dict[str, Any]:
    user: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": first_name}
    if last_name:
        user["last_name"] = last_name
    return user


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # keep-alive handler threads end when their client goes
    allow_reuse_address = True
    fake: FakeTelegram

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up (or a dropped connection) is not an error here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        fake = self.server.fake
        with fake._cond:
            fake._connections.add(self.connection)
            refused = fake._down is not None or fake._closing
            if refused:
                fake._count_drop()
        if refused:
            self.close_connection = True
            with suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        with self.server.fake._cond:
            self.server.fake._connections.discard(self.connection)
        with suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = url.path.split("/")
        if len(parts) != 3 or parts[0] != "" or not parts[1].startswith("bot"):
            self._reply(404, {"ok": False, "error_code": 404, "description": "Not Found"})
            return
        token, method = parts[1][3:], parts[2]
        if token != fake.token:
            self._reply(401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
            return
        try:
            params = _parse_params(self.headers.get("Content-Type", ""), url.query, body)
        except ValueError as exc:
            self._reply(400, {"ok": False, "error_code": 400, "description": f"Bad Request: {exc}"})
            return
        answer = fake.handle(method, params)
        if answer is None:  # Telegram is "down": drop the connection without an answer
            with fake._cond:
                fake._count_drop()
            self.close_connection = True
            with suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._reply(*answer)

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n"
            "\r\n"
        )
        try:  # one write: a response split in two packets costs the client a wake-up
            self.wfile.write(head.encode() + data)
        except OSError:
            self.close_connection = True


def _parse_params(content_type: str, query: str, body: bytes) -> dict[str, Any]:
    params: dict[str, Any] = {}
    fields = parse_qsl(query, keep_blank_values=True)
    if content_type.startswith("application/json"):
        decoded = json.loads(body or b"{}")
        if not isinstance(decoded, dict):
            raise ValueError("JSON body must be an object")
        params.update(decoded)
    elif content_type.startswith("multipart/"):
        fields += _multipart(content_type, body, params)
    else:
        fields += parse_qsl(body.decode(), keep_blank_values=True)
    for key, value in fields:
        if key in _JSON_FIELDS:
            try:
                params[key] = json.loads(value)
            except json.JSONDecodeError:
                params[key] = value  # e.g. chat_id="@channel"
        else:
            params[key] = value
    return params


def _multipart(content_type: str, body: bytes, files: dict[str, Any]) -> list[tuple[str, str]]:
    """The text fields of a multipart/form-data body; uploads go to ``files`` as
    ``(filename, content)``."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not parsed.is_multipart():
        raise ValueError("malformed multipart body")
    fields = []
    for part in parsed.iter_parts():
        name = part.get_param("name", header="content-disposition")
        content = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(content, bytes):
            raise ValueError("malformed multipart part")
        filename = part.get_filename()
        if filename is not None:
            files[name] = (filename, content)
        else:
            fields.append((name, content.decode()))
    return fields


@contextmanager
def serve_fake_telegram(
    token: str = "123456:TEST-TOKEN",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    chat_id: int = -1001,
) -> Iterator[FakeTelegram]:
    """Run the fake in a daemon thread for the ``with`` block (synchronous code)."""
    fake = FakeTelegram(token, chat_id=chat_id)
    fake.start(host, port)
    try:
        yield fake
    finally:
        fake.close()


@asynccontextmanager
async def run_fake_telegram(
    token: str = "123456:TEST-TOKEN",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    chat_id: int = -1001,
) -> AsyncIterator[FakeTelegram]:
    """Run the fake for the ``async with`` block (Trio); ``fake.base_url`` is for PTB."""
    fake = FakeTelegram(token, chat_id=chat_id)
    fake.start(host, port)
    try:
        yield fake
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(fake.close)


def main(argv: list[str] | None = None) -> None:
    """``python -m agentgate.testing.fake_telegram``: serve until interrupted."""
    parser = argparse.ArgumentParser(description="A fake Telegram Bot API for agentgate demos.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--token", default="123456:TEST-TOKEN")
    parser.add_argument("--chat-id", type=int, default=-1001)
    args = parser.parse_args(argv)
    with serve_fake_telegram(
        args.token, host=args.host, port=args.port, chat_id=args.chat_id
    ) as tg:
        print(f"fake Telegram Bot API on {tg.base_url} (token {args.token})", flush=True)
        seen: set[tuple[int, int]] = set()
        try:
            while True:
                time.sleep(0.2)
                for message in tg.messages.values():
                    if (message.message_id, message.edits) not in seen:
                        seen.add((message.message_id, message.edits))
                        verb = "edited" if message.edits else "sent"
                        buttons = " | ".join(data for _, data in message.buttons)
                        print(f"--- {verb} #{message.message_id} to {message.chat_id} [{buttons}]")
                        print(message.text, flush=True)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
