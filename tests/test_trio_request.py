"""TrioRequest: PTB's Bot API calls with their HTTP done by httpx on the Trio side.

Fast tier: httpx.MockTransport behind a real trio-asyncio loop (PTB's side calls ``do_request``
exactly as it does in production). The real-socket behaviour (outages, polling, presses) is
covered by test_telegram_guardian.py and test_telegram_e2e.py, which run PTB through it.
"""

from __future__ import annotations

import trio_asyncio  # isort: skip

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from telegram.error import NetworkError, TimedOut
from telegram.request import RequestData
from telegram.request._requestparameter import RequestParameter

from agentgate.guardian._trio_request import TrioRequest

URL = "http://127.0.0.1:9/botTOKEN/sendMessage"


def _request(handler: Callable[[httpx.Request], httpx.Response]) -> TrioRequest:
    return TrioRequest(
        connections=2,
        connect_timeout=3.0,
        read_timeout=5.0,
        write_timeout=6.0,
        pool_timeout=1.0,
        transport=httpx.MockTransport(handler),
    )


async def _call(request: TrioRequest, **kwargs: Any) -> tuple[int, bytes]:
    """``do_request`` as PTB calls it: from a coroutine on the asyncio side.

    An error is re-raised outside the loop, as itself (not inside the loop's exception group).
    """
    error: Exception | None = None
    async with trio_asyncio.open_loop():
        await trio_asyncio.aio_as_trio(request.initialize)()
        try:
            return await trio_asyncio.aio_as_trio(request.do_request)(URL, "POST", **kwargs)
        except Exception as exc:
            error = exc
        finally:
            await trio_asyncio.aio_as_trio(request.shutdown)()
    assert error is not None
    raise error


async def test_a_call_goes_out_as_ptb_encodes_it_and_returns_status_and_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True, "result": {"message_id": 7}})

    data = RequestData(
        [RequestParameter("chat_id", 42, None), RequestParameter("text", "hi & <b>", None)]
    )
    status, body = await _call(_request(handler), request_data=data)
    assert (status, json.loads(body)) == (200, {"ok": True, "result": {"message_id": 7}})
    (sent,) = seen
    assert sent.method == "POST"
    assert str(sent.url) == URL
    assert sent.headers["User-Agent"] == TrioRequest.USER_AGENT
    assert httpx.QueryParams(sent.content.decode()) == httpx.QueryParams(
        {"chat_id": "42", "text": "hi & <b>"}
    )
    assert sent.extensions["timeout"] == {"connect": 3.0, "read": 5.0, "write": 6.0, "pool": 1.0}


async def test_per_call_timeouts_override_the_defaults() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True, "result": []})

    await _call(_request(handler), read_timeout=15.0, connect_timeout=None)
    assert seen[0].extensions["timeout"] == {
        "connect": None,
        "read": 15.0,
        "write": 6.0,
        "pool": 1.0,
    }


async def test_a_non_2xx_answer_is_returned_for_ptb_to_map() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"ok": False, "parameters": {"retry_after": 3}})

    status, _ = await _call(_request(handler))
    assert status == 429


@pytest.mark.parametrize(
    ("error", "expected", "text"),
    [
        (httpx.ConnectError("refused"), NetworkError, "httpx.ConnectError: refused"),
        (httpx.RemoteProtocolError("hung up"), NetworkError, "httpx.RemoteProtocolError"),
        (httpx.ReadTimeout("slow"), TimedOut, "Timed out"),
        (httpx.PoolTimeout("busy"), TimedOut, "Pool timeout"),
    ],
)
async def test_transport_errors_map_as_ptbs_own_httpx_request_maps_them(
    error: Exception, expected: type[Exception], text: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    with pytest.raises(expected, match=text) as caught:
        await _call(_request(handler))
    assert type(caught.value) is expected


async def test_a_call_before_initialize_is_refused() -> None:
    request = _request(lambda r: httpx.Response(200))
    async with trio_asyncio.open_loop():
        with pytest.raises(RuntimeError, match="not initialized"):
            await trio_asyncio.aio_as_trio(request.do_request)(URL, "POST")


async def test_cancelling_the_ptb_side_cancels_the_trio_side() -> None:
    started = trio.Event()
    cancelled = trio.Event()

    async def never_answers(request: httpx.Request) -> httpx.Response:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    request = _request(never_answers)  # type: ignore[arg-type]
    with trio.fail_after(10):
        async with trio_asyncio.open_loop():
            await trio_asyncio.aio_as_trio(request.initialize)()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio_asyncio.aio_as_trio(request.do_request), URL, "POST")
                await started.wait()  # the Trio side is handling it
                nursery.cancel_scope.cancel()
            await cancelled.wait()
            await trio_asyncio.aio_as_trio(request.shutdown)()
