"""PTB's HTTP layer, run on the Trio side.

python-telegram-bot sends every Bot API call through a :class:`telegram.request.BaseRequest`;
its default, ``HTTPXRequest``, runs httpx on the asyncio loop. Inside trio-asyncio every socket
event of that client is an asyncio callback relayed through Trio, which made PTB's HTTP the
largest cost of the approval path. This request class keeps PTB in charge of everything else (method
encoding, retries, error mapping, ``Update`` parsing, polling) and hands only the HTTP exchange
to a Trio-native httpx client through ``trio_as_aio``.

One httpx client must never be shared between the asyncio side and the Trio side (its pool's
locks belong to one event loop); this client is only ever used from Trio.

A Bot API call awaited in a Trio task (:func:`agentgate._compat.bot_call_on_trio`: how the
guardian sends) does its HTTP in that task, with no hop through the asyncio loop at all.

Imports: _compat (python-telegram-bot's request interface, httpx, trio-asyncio).
"""

from __future__ import annotations

# trio_asyncio patches asyncio; imported after anyio or httpx, every Telegram request inside
# open_loop() fails with "no running event loop".
import trio_asyncio  # isort: skip

import asyncio
import ssl
from collections.abc import AsyncIterator

import httpx
from telegram.error import NetworkError, TimedOut
from telegram.request import BaseRequest, RequestData

from agentgate._compat import BOT_CALL_ON_TRIO

__all__ = ["TrioRequest"]


class TrioRequest(BaseRequest):
    """A :class:`BaseRequest` whose HTTP runs in Trio (httpx's Trio backend).

    Timeouts mirror ``HTTPXRequest``'s: the defaults given here, overridden per call by PTB.
    Errors are mapped as ``HTTPXRequest`` maps them (``TimedOut``, ``NetworkError``), so PTB's
    polling back-off and agentgate's bounded retries behave the same.
    """

    def __init__(
        self,
        *,
        connections: int,
        connect_timeout: float,
        read_timeout: float,
        write_timeout: float,
        pool_timeout: float,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._timeout = httpx.Timeout(
            connect=connect_timeout, read=read_timeout, write=write_timeout, pool=pool_timeout
        )
        self._limits = httpx.Limits(
            max_connections=connections, max_keepalive_connections=connections
        )
        self._verify = verify
        self._transport = transport  # tests: httpx.MockTransport
        self._client: httpx.AsyncClient | None = None

    @property
    def read_timeout(self) -> float | None:
        return self._timeout.read

    async def initialize(self) -> None:
        if self._client is None:
            # Building the client does no I/O; its connections bind to Trio on first use.
            self._client = httpx.AsyncClient(
                timeout=self._timeout,
                limits=self._limits,
                verify=self._verify,
                transport=self._transport,
            )

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await trio_asyncio.trio_as_aio(client.aclose, loop=asyncio.get_running_loop())()

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: object = BaseRequest.DEFAULT_NONE,
        write_timeout: object = BaseRequest.DEFAULT_NONE,
        connect_timeout: object = BaseRequest.DEFAULT_NONE,
        pool_timeout: object = BaseRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        client = self._client
        if client is None:
            raise RuntimeError("TrioRequest is not initialized")
        default = self._timeout
        timeout = httpx.Timeout(
            connect=_pick(connect_timeout, default.connect),
            read=_pick(read_timeout, default.read),
            write=_pick(write_timeout, default.write),
            pool=_pick(pool_timeout, default.pool),
        )
        request = client.build_request(
            method,
            url,
            headers={"User-Agent": self.USER_AGENT},
            timeout=timeout,
            files=request_data.multipart_data if request_data else None,
            data=request_data.json_parameters if request_data else None,
        )
        if isinstance(request.stream, httpx.ByteStream):  # always, unless PTB uploads a file
            request.stream = _Body(request.content)
        elif isinstance(request.stream, httpx.SyncByteStream):  # a multipart upload, in memory
            request.stream = _Body(b"".join(request.stream))
        if BOT_CALL_ON_TRIO.get():  # PTB's coroutine runs in a Trio task: no hop
            return await _send(client, request)
        # PTB's tasks do not carry trio-asyncio's current-loop context variable: name the loop.
        loop = asyncio.get_running_loop()
        return await trio_asyncio.trio_as_aio(_send, loop=loop)(client, request)  # type: ignore[no-any-return]


async def _send(client: httpx.AsyncClient, request: httpx.Request) -> tuple[int, bytes]:
    """The HTTP exchange itself, on the Trio side; errors as ``HTTPXRequest`` raises them."""
    try:
        response = await client.send(request)
    except httpx.PoolTimeout as exc:
        raise TimedOut(
            "Pool timeout: all connections to the Bot API are busy; the request was not sent"
        ) from exc
    except httpx.TimeoutException as exc:
        raise TimedOut from exc
    except httpx.HTTPError as exc:
        raise NetworkError(f"httpx.{type(exc).__name__}: {exc}") from exc
    return response.status_code, response.content


class _Body(httpx.AsyncByteStream):
    """A request body in one chunk, without an async generator.

    httpx's own ``ByteStream`` iterates through an async generator; when the server hangs up
    mid-request (a Bot API outage), httpcore abandons it and Trio reports the unfinished
    generator as a ``ResourceWarning`` when it is collected.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Once(self._data)


class _Once:
    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        data, self._data = self._data, None
        if data is None:
            raise StopAsyncIteration
        return data


# PTB's "use the default" marker: BaseRequest.DEFAULT_NONE is public, its class is not.
_DEFAULT_MARKER = type(BaseRequest.DEFAULT_NONE)


def _pick(value: object, default: float | None) -> float | None:
    if isinstance(value, _DEFAULT_MARKER):
        return default
    if value is None or isinstance(value, int | float):
        return value
    raise TypeError(f"a timeout must be a number or None, got {value!r}")
