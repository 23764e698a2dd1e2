"""``agentgate._compat``: each reliance on a dependency's internals, checked against it.

If one of these fails after an upgrade, the dependency changed under agentgate: read the item
in ``agentgate/_compat.py`` and decide again (and update the version it names).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.fresh import fresh_python


def test_telegram_is_imported_without_passport_support() -> None:
    # cryptography is installed here (trustme needs it), yet the gateway leaves it unloaded.
    seen = fresh_python(
        "import json, sys\n"
        "from agentgate._compat import import_telegram_without_passport\n"
        "import_telegram_without_passport()\n"
        "from telegram._passport import credentials\n"
        "loaded = 'cryptography' in sys.modules\n"
        "import cryptography\n"  # still importable afterwards, for whoever needs it
        "print(json.dumps({'loaded': loaded, 'passport': credentials.CRYPTO_INSTALLED,"
        " 'guardian': 'agentgate.guardian.telegram' in sys.modules,"
        " 'later': cryptography.__name__}))\n"
    )
    assert seen == {
        "loaded": False,
        "passport": False,
        "guardian": True,
        "later": "cryptography",
    }


def test_httpx_is_imported_without_its_command_line_client_or_http2() -> None:
    seen = fresh_python(
        "import json, sys\n"
        "from agentgate._compat import import_httpx_without_extras\n"
        "import_httpx_without_extras()\n"
        "import httpcore, httpx\n"
        "hidden = sorted(m for m in ('httpx._main', 'click', 'pygments', 'rich', 'h2')"
        " if m in sys.modules)\n"
        "try:\n"
        "    httpcore.AsyncHTTP2Connection(origin=None, stream=None)\n"
        "    http2 = 'built'\n"
        "except RuntimeError as exc:\n"
        "    http2 = str(exc)\n"
        "import h2.connection\n"  # still importable afterwards, for Hypercorn
        "later = h2.connection.__name__\n"
        "client = httpx.AsyncClient()\n"  # the fallbacks leave HTTP/1.1 clients as they were
        "print(json.dumps({'hidden': hidden, 'http2': http2, 'later': later,"
        " 'main': httpx.main.__module__, 'httpx': httpx.__version__,"
        " 'httpcore': httpcore.__version__}))\n"
    )
    assert seen["hidden"] == []
    assert "h2" in seen["http2"]
    assert seen["later"] == "h2.connection"
    assert seen["main"] == "httpx"  # httpx's own fallback, not httpx._main
    # Checked against these; a newer one may have moved the optional imports (see _compat).
    assert seen["httpx"] == "0.28.1"
    assert seen["httpcore"] == "1.0.9"


def test_telegram_import_leaves_httpx_extras_out_too() -> None:
    seen = fresh_python(
        "import json, sys\n"
        "from agentgate._compat import import_telegram_without_passport\n"
        "import_telegram_without_passport()\n"
        "import httpcore\n"
        "print(json.dumps(sorted(m for m in ('httpx._main', 'click', 'h2') if m in sys.modules)))\n"
    )
    assert seen == []


def test_httpx_import_is_a_plain_one_once_h2_is_loaded() -> None:
    seen = fresh_python(
        "import json, sys\n"
        "import h2.connection\n"
        "from agentgate._compat import import_httpx_without_extras\n"
        "import_httpx_without_extras()\n"
        "import httpcore\n"
        "print(json.dumps('httpcore._async.http2' in sys.modules))\n"
    )
    assert seen is True


def test_the_import_is_a_plain_one_once_cryptography_is_loaded() -> None:
    seen = fresh_python(
        "import json, sys\n"
        "import cryptography\n"
        "from agentgate._compat import import_telegram_without_passport\n"
        "import_telegram_without_passport()\n"
        "from telegram._passport import credentials\n"
        "print(json.dumps({'passport': credentials.CRYPTO_INSTALLED,"
        " 'kept': sys.modules['cryptography'] is cryptography}))\n"
    )
    assert seen == {"passport": True, "kept": True}


def test_the_pollers_idle_hook_is_trio_testings_without_importing_it() -> None:
    seen = fresh_python(
        "import json, sys\n"
        "from agentgate._compat import import_telegram_without_passport, wait_all_tasks_blocked\n"
        "import_telegram_without_passport()\n"
        "quiet = 'trio.testing' not in sys.modules and 'pytest' not in sys.modules\n"
        "import trio.testing\n"
        "print(json.dumps({'quiet': quiet,"
        " 'same': wait_all_tasks_blocked is trio.testing.wait_all_tasks_blocked}))\n"
    )
    assert seen == {"quiet": True, "same": True}


async def _initialized_bot(kind: str, handler: Callable[[Any], Any]) -> Any:
    """A PTB ``kind`` ("Bot" or "ExtBot") on ``TrioRequest``s answered by ``handler`` (an httpx
    ``MockTransport`` handler), initialized on a trio-asyncio loop that is closed again."""
    import trio_asyncio  # isort: skip

    import httpx
    from telegram import Bot
    from telegram.ext import ExtBot

    import agentgate.guardian.telegram  # noqa: F401  (opts into PTB's timedelta periods, as served)
    from agentgate.guardian._trio_request import TrioRequest

    def trio_request() -> TrioRequest:
        return TrioRequest(
            connections=1,
            connect_timeout=1.0,
            read_timeout=1.0,
            write_timeout=1.0,
            pool_timeout=1.0,
            transport=httpx.MockTransport(handler),
        )

    make = ExtBot if kind == "ExtBot" else Bot
    bot = make("1:T", request=trio_request(), get_updates_request=trio_request())
    async with trio_asyncio.open_loop():
        await trio_asyncio.aio_as_trio(bot.initialize)()  # asyncio.gather: the loop's
    return bot


@pytest.mark.parametrize("kind", ["Bot", "ExtBot"])
async def test_ptb_bot_calls_run_in_a_trio_task_with_no_asyncio_loop(kind: str) -> None:
    # The guardian awaits Bot methods in Trio tasks (its Application's bot is an ExtBot). Here
    # the trio-asyncio loop is closed before the calls: if PTB awaited anything of asyncio
    # between a Bot method and do_request, or if TrioRequest hopped to the asyncio side, they
    # would fail.
    import httpx
    import trio

    from agentgate._compat import bot_call_on_trio

    message = {"message_id": 7, "date": 0, "chat": {"id": -5, "type": "group"}, "text": "hi"}
    answers: dict[str, Any] = {
        "getMe": {"id": 1, "is_bot": True, "first_name": "gate", "username": "gate_bot"},
        "sendMessage": message,
        "editMessageText": message,
        "answerCallbackQuery": True,
        "getUpdates": [{"update_id": 3, "message": message}],
    }
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        method = request.url.path.rsplit("/", 1)[-1]
        seen.append(method)
        return httpx.Response(200, json={"ok": True, "result": answers[method]})

    with trio.fail_after(10):
        bot = await _initialized_bot(kind, handler)
        sent = await bot_call_on_trio(lambda: bot.send_message(-5, "hi"))
        edited = await bot_call_on_trio(
            lambda: bot.edit_message_text("hi", chat_id=-5, message_id=7)
        )
        answered = await bot_call_on_trio(lambda: bot.answer_callback_query("q"))
        updates = await bot_call_on_trio(lambda: bot.get_updates(offset=3, timeout=0))
    assert sent.message_id == 7
    assert not isinstance(edited, bool)
    assert edited.message_id == 7
    assert answered is True
    assert [u.update_id for u in updates] == [3]
    assert seen == ["getMe", "sendMessage", "editMessageText", "answerCallbackQuery", "getUpdates"]


async def test_ptb_bot_call_errors_raise_in_a_trio_task_with_no_asyncio_loop() -> None:
    # The error paths too: Telegram's flood control, a refused request and a dropped connection
    # become PTB's exceptions in the Trio task, with no asyncio loop running.
    import httpx
    import trio
    from telegram.error import BadRequest, NetworkError, RetryAfter

    from agentgate._compat import bot_call_on_trio

    me = {"id": 1, "is_bot": True, "first_name": "gate", "username": "gate_bot"}

    def handler(request: httpx.Request) -> httpx.Response:
        method = request.url.path.rsplit("/", 1)[-1]
        if method == "getMe":
            return httpx.Response(200, json={"ok": True, "result": me})
        if b"flood" in request.content:
            body = {"ok": False, "error_code": 429, "description": "Too Many Requests"}
            return httpx.Response(429, json=body | {"parameters": {"retry_after": 3}})
        if b"bad" in request.content:
            body = {"ok": False, "error_code": 400, "description": "Bad Request: chat not found"}
            return httpx.Response(400, json=body)
        raise httpx.ConnectError("connection refused", request=request)

    with trio.fail_after(10):
        bot = await _initialized_bot("ExtBot", handler)
        with pytest.raises(RetryAfter):
            await bot_call_on_trio(lambda: bot.send_message(-5, "flood"))
        with pytest.raises(BadRequest, match=r"(?i)chat not found"):
            await bot_call_on_trio(lambda: bot.send_message(-5, "bad"))
        with pytest.raises(NetworkError):
            await bot_call_on_trio(lambda: bot.send_message(-5, "gone"))
