"""The fake Telegram Bot API, driven by a plain httpx client over real sockets (127.0.0.1)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from agentgate.testing.fake_telegram import (
    FakeTelegram,
    run_fake_telegram,
    telegram_visible_text,
)

TOKEN = "123456:FAKE-TOKEN"
CEILING = 10

pytestmark = pytest.mark.slow


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with run_fake_telegram(token=TOKEN) as fake:
        yield fake


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as c:
        yield c


async def call(
    client: httpx.AsyncClient, tg: FakeTelegram, method: str, token: str = TOKEN, **params: Any
) -> tuple[int, dict[str, Any]]:
    """Post like PTB does: form fields, non-strings JSON-encoded."""
    form = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
    response = await client.post(f"{tg.base_url}{token}/{method}", data=form)
    return response.status_code, response.json()


async def test_get_me_and_bad_token(tg: FakeTelegram, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CEILING):
        status, body = await call(client, tg, "getMe")
        assert status == 200
        assert body["ok"]
        assert body["result"]["is_bot"]
        assert body["result"]["id"] == 123456
        status, body = await call(client, tg, "getMe", token="123456:WRONG")
        assert (status, body) == (
            401,
            {"ok": False, "error_code": 401, "description": "Unauthorized"},
        )


async def test_unknown_method_is_404(tg: FakeTelegram, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CEILING):
        status, body = await call(client, tg, "launchRockets")
    assert status == 404
    assert body == {"ok": False, "error_code": 404, "description": "Not Found: method not found"}


async def test_send_edit_and_remove_buttons(tg: FakeTelegram, client: httpx.AsyncClient) -> None:
    markup = {"inline_keyboard": [[{"text": "Allow", "callback_data": "allow:r1"}]]}
    with trio.fail_after(CEILING):
        status, body = await call(
            client,
            tg,
            "sendMessage",
            chat_id=-1001,
            text="<b>Hi</b> &lt;x&gt;",
            parse_mode="HTML",
            reply_markup=markup,
        )
        assert status == 200
        message_id = body["result"]["message_id"]
        sent = tg.messages[message_id]
        assert (sent.text, sent.raw_text, sent.chat_id) == ("Hi <x>", "<b>Hi</b> &lt;x&gt;", -1001)
        assert sent.buttons == [("Allow", "allow:r1")]

        status, body = await call(
            client, tg, "editMessageText", chat_id=-1001, message_id=message_id, text="done"
        )
        assert status == 200
        edited = tg.messages[message_id]
        assert (edited.text, edited.buttons, edited.edits) == ("done", [], 1)

        status, body = await call(
            client, tg, "editMessageText", chat_id=-1001, message_id=message_id, text="done"
        )
        assert status == 400
        assert "not modified" in body["description"]
        status, body = await call(
            client, tg, "editMessageText", chat_id=-1001, message_id=999, text="x"
        )
        assert status == 400
        assert "not found" in body["description"]


async def test_html_is_checked_like_telegram(tg: FakeTelegram, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CEILING):
        for bad in ["a < b", "<script>x</script>", "<b>open", "Tom & Jerry", "&nbsp;"]:
            status, body = await call(
                client, tg, "sendMessage", chat_id=1, text=bad, parse_mode="HTML"
            )
            assert status == 400, bad
            assert "can't parse entities" in body["description"]
        status, body = await call(client, tg, "sendMessage", chat_id=1, text="x" * 4097)
        assert status == 400
        assert "too long" in body["description"]
    assert telegram_visible_text("<pre>&quot;&amp;&#65;</pre>") == '"&A'
    with pytest.raises(ValueError, match="parse entities"):
        telegram_visible_text("<i>x</b>")


async def test_long_poll_wakes_on_press_and_confirms(
    tg: FakeTelegram, client: httpx.AsyncClient
) -> None:
    _, body = await call(client, tg, "sendMessage", chat_id=-1001, text="card")
    message_id = body["result"]["message_id"]
    results: list[dict[str, Any]] = []

    async def poll() -> None:
        _, body = await call(client, tg, "getUpdates", offset=0, timeout=30)
        results.extend(body["result"])

    with trio.fail_after(CEILING):  # far below the poll's own 30 s
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await tg.wait_for(lambda: tg.calls_to("getUpdates") or None)
            press = tg.press(message_id, "allow:r1", user_id=111, first_name="Alice")
        (update,) = results
        query = update["callback_query"]
        assert query["data"] == "allow:r1"
        assert query["from"]["id"] == 111
        assert query["message"]["message_id"] == message_id

        await call(
            client, tg, "answerCallbackQuery", callback_query_id=query["id"], text="approved"
        )
        answer = await press.wait_answer()
        assert (answer.text, press.answer) == ("approved", answer)

        tg.send_command("/freeze", user_id=111)
        _, body = await call(client, tg, "getUpdates", offset=update["update_id"] + 1, timeout=0)
        (command,) = body["result"]
        assert command["message"]["text"] == "/freeze"
        assert command["message"]["entities"][0] == {
            "type": "bot_command",
            "offset": 0,
            "length": 7,
        }
        _, body = await call(client, tg, "getUpdates", offset=command["update_id"] + 1, timeout=0)
        assert body["result"] == []


async def test_commands_and_harmless_methods(tg: FakeTelegram, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CEILING):
        commands = [{"command": "freeze", "description": "Freeze"}]
        assert (await call(client, tg, "setMyCommands", commands=commands))[0] == 200
        assert (await call(client, tg, "getMyCommands"))[1]["result"] == commands
        for method in ("deleteWebhook", "close", "logOut"):
            assert (await call(client, tg, method))[1] == {"ok": True, "result": True}
    assert tg.commands == commands


async def test_retry_after_and_fail_next(tg: FakeTelegram, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CEILING):
        tg.retry_after = 7
        assert tg.retry_after == 7
        status, body = await call(client, tg, "sendMessage", chat_id=1, text="x")
        assert status == 429
        assert body["parameters"] == {"retry_after": 7}
        assert (await call(client, tg, "sendMessage", chat_id=1, text="x"))[0] == 200

        tg.fail_next("sendMessage", 403, "Forbidden: bot was kicked", times=2)
        for _ in range(2):
            status, body = await call(client, tg, "sendMessage", chat_id=1, text="x")
            assert (status, body["description"]) == (403, "Forbidden: bot was kicked")
        assert (await call(client, tg, "sendMessage", chat_id=1, text="x"))[0] == 200


@pytest.mark.parametrize("mode", ["refuse", "drop"])
async def test_down_and_up(tg: FakeTelegram, mode: Any) -> None:
    with trio.fail_after(CEILING):
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await call(client, tg, "getMe"))[0] == 200
            tg.down(mode)
            with pytest.raises(httpx.TransportError):
                await call(client, tg, "getMe")
            tg.up()
            assert (await call(client, tg, "getMe"))[0] == 200


async def test_down_drops_a_waiting_long_poll(tg: FakeTelegram, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:

            async def poll() -> None:
                with pytest.raises(httpx.TransportError):
                    await call(client, tg, "getUpdates", timeout=30)

            nursery.start_soon(poll)
            await tg.wait_for(lambda: tg.calls_to("getUpdates") or None)
            tg.down("drop")
        tg.up()


async def test_wait_for_message_wakes_up(tg: FakeTelegram, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: call(client, tg, "sendMessage", chat_id=-1001, text=""))
            nursery.start_soon(
                lambda: call(client, tg, "sendMessage", chat_id=-1001, text="needle")
            )
            message = await tg.wait_for_message(lambda m: "needle" in m.text)
    assert message.chat_id == -1001


def test_runs_as_a_module() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentgate.testing.fake_telegram", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("fake Telegram Bot API on http://127.0.0.1:")
        url = line.split()[5]
        response = httpx.post(f"{url}{'123456:TEST-TOKEN'}/getMe", timeout=5)
        assert response.json()["ok"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
