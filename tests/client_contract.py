"""SDK contract suite: written once, run under Trio AND asyncio against a REAL gateway.

Not collected by pytest by itself (the file name does not start with ``test_``). A runner
drives it::

    from tests.client_contract import CONTRACT
    for case in CONTRACT:                       # each is `async def case(gw_factory, home)`
        await case(gw_factory, home)            # under trio.run OR asyncio.run

Runner signature, what the runner must provide:

- ``gw_factory(**overrides) -> async context manager yielding Gateway``: usually
  ``functools.partial(agentgate.client.connect, url, token=TOKEN, ca=CA_PEM)``; the cases pass
  ``on_pending=``, ``reconnect=``, ``backoff=`` or ``token=`` overrides through to ``connect``.
- ``home``: an object satisfying :class:`Home` below. Its async methods must be awaitable
  from the library the case runs under (for asyncio in a worker thread, wrap Trio-side
  actions with ``trio.from_thread.run``).
- The gateway under test runs with ``approval_timeout`` ≈ 3 s and this policy
  (as ``permissions.yaml``)::

      rules:
        - {pattern: "ha_get_state(sensor.*)",               action: allow, description: reads}
        - {pattern: "ha_call_service(lock.unlock, *)",       action: deny,  description: locks}
        - {pattern: "ha_call_service(light.turn_on, *)",     action: ask,   description: lights}
  and the fake Home Assistant knows ``sensor.living_room`` and ``light.kitchen``.

Each case is self-contained (opens its own connections) and bounds every wait with a
deadline, so a hang fails the case instead of the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import sniffio
import trio

from agentgate.client import (
    ApprovalTimedOut,
    AuthenticationFailed,
    Backoff,
    ConnectionLost,
    DeniedByGuardian,
    DeniedByPolicy,
    Gateway,
    InvalidParams,
)

GwFactory = Callable[..., AbstractAsyncContextManager[Gateway]]

STEP = 15.0  # ceiling for one ordinary step against a local gateway (seconds)


class Home(Protocol):
    """The world around the gateway, driven by the runner."""

    approval_timeout: float
    """The gateway's ``approval_timeout`` in seconds."""

    async def press(self, request_id: str, decision: str) -> None:
        """Press ``decision`` (``"allow"`` or ``"deny"``) on the approval card of ``request_id``
        as an allowed guardian user."""

    async def restart_gateway(self) -> None:
        """Stop the gateway (connections drop) and start it again at the same URL with the
        same store; return once it accepts connections."""

    async def settled(self) -> None:
        """Return once no approval is in flight on the gateway: each decided one has answered
        its connection or queued its result."""


# -- library-neutral helpers (Trio or asyncio, picked with sniffio) ----------------------------


def _trio() -> bool:
    return sniffio.current_async_library() == "trio"


async def sleep(seconds: float) -> None:
    """Sleep under whichever library runs (to wait for a condition, wait on an event)."""
    if _trio():
        await trio.sleep(seconds)
    else:
        await asyncio.sleep(seconds)


def event() -> trio.Event | asyncio.Event:
    """An event of whichever library runs (set it from that library's thread)."""
    return trio.Event() if _trio() else asyncio.Event()


@asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[None]:
    """Fail (``trio.TooSlowError`` / ``TimeoutError``) if the block takes longer."""
    if _trio():
        with trio.fail_after(seconds):
            yield
    else:
        async with asyncio.timeout(seconds):
            yield


class _Cancelled:
    hit = False


@asynccontextmanager
async def move_on_after(seconds: float) -> AsyncIterator[_Cancelled]:
    """Cancel the block after ``seconds`` and carry on; ``.hit`` tells whether it fired."""
    flag = _Cancelled()
    if _trio():
        with trio.move_on_after(seconds) as scope:
            yield flag
        flag.hit = scope.cancelled_caught
    else:
        try:
            async with asyncio.timeout(seconds):
                yield flag
        except TimeoutError:
            flag.hit = True


async def capture(fn: Callable[[], Awaitable[Any]]) -> tuple[Any, BaseException | None]:
    """Run ``fn`` and return ``(result, None)`` or ``(None, exception)``."""
    try:
        return await fn(), None
    except Exception as exc:
        return None, exc


async def gather(*fns: Callable[[], Awaitable[Any]]) -> list[tuple[Any, BaseException | None]]:
    """Run the thunks concurrently; return each one's ``capture`` outcome, in order."""
    outcomes: list[tuple[Any, BaseException | None]] = [(None, None)] * len(fns)

    async def one(index: int) -> None:
        outcomes[index] = await capture(fns[index])

    if _trio():
        async with trio.open_nursery() as nursery:
            for index in range(len(fns)):
                nursery.start_soon(one, index)
    else:
        await asyncio.gather(*(one(index) for index in range(len(fns))))
    return outcomes


class PendingLog:
    """An ``on_pending`` hook that remembers every ``approval_pending`` it saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._changed: trio.Event | asyncio.Event | None = None

    def __call__(self, params: dict[str, Any]) -> None:
        self.seen.append(params)
        if self._changed is not None:
            self._changed.set()

    async def wait(self, count: int = 1) -> dict[str, Any]:
        """Wait (bounded by the caller's deadline) until ``count`` approvals were announced."""
        while len(self.seen) < count:
            self._changed = event()
            await self._changed.wait()
        return self.seen[count - 1]


def _light(**extra: Any) -> dict[str, Any]:
    return {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen", **extra}


# -- the cases ----------------------------------------------------------------------------------


async def allowed_read_returns_data(gw_factory: GwFactory, home: Home) -> None:
    async with deadline(STEP), gw_factory() as gw:
        data = await gw.call("ha_get_state", entity_id="sensor.living_room")
        assert data["entity_id"] == "sensor.living_room"
        whole = await gw.request("ha_get_state", {"entity_id": "sensor.living_room"})
        assert whole["status"] == "executed"
        assert isinstance(whole["request_id"], str)
        assert whole["request_id"]
        assert whole["data"]["entity_id"] == "sensor.living_room"


async def denied_by_policy_carries_signature(gw_factory: GwFactory, home: Home) -> None:
    async with deadline(STEP), gw_factory() as gw:
        _, error = await capture(
            lambda: gw.call(
                "ha_call_service", domain="lock", service="unlock", entity_id="lock.front_door"
            )
        )
        assert isinstance(error, DeniedByPolicy), error
        assert error.code == -32003
        assert error.data["signature"] == "ha_call_service(lock.unlock, lock.front_door)"
        assert error.data.get("request_id")
        # the connection is still fine afterwards
        await gw.call("ha_get_state", entity_id="sensor.living_room")


async def invalid_arguments_are_invalid_params(gw_factory: GwFactory, home: Home) -> None:
    async with deadline(STEP), gw_factory() as gw:
        _, error = await capture(lambda: gw.call("ha_get_state", entity_id="sensor.*"))
        assert isinstance(error, InvalidParams), error
        _, error = await capture(lambda: gw.call("no_such_tool"))
        assert isinstance(error, InvalidParams), error


async def bad_token_is_authentication_failed(gw_factory: GwFactory, home: Home) -> None:
    async with deadline(STEP):
        _, error = await capture(lambda: _enter(gw_factory(token="not-the-token")))
        assert isinstance(error, AuthenticationFailed), error
        assert error.code == -32005


async def _enter(cm: AbstractAsyncContextManager[Gateway]) -> None:
    async with cm:
        raise AssertionError("connect() succeeded with a bad token")


async def ask_then_allow_executes(gw_factory: GwFactory, home: Home) -> None:
    pending = PendingLog()
    async with deadline(STEP), gw_factory(on_pending=pending) as gw:

        async def guardian() -> None:
            params = await pending.wait()
            await home.press(params["request_id"], "allow")

        (result, error), _ = await gather(lambda: gw.request("ha_call_service", _light()), guardian)
        assert error is None, error
        assert result["status"] == "executed"
        assert result["request_id"] == pending.seen[0]["request_id"]
        assert isinstance(pending.seen[0]["rpc_id"], int)
        assert pending.seen[0]["expires_at"]


async def ask_then_deny_is_denied_by_guardian(gw_factory: GwFactory, home: Home) -> None:
    pending = PendingLog()
    async with deadline(STEP), gw_factory(on_pending=pending) as gw:

        async def guardian() -> None:
            params = await pending.wait()
            await home.press(params["request_id"], "deny")

        (_, error), _ = await gather(lambda: gw.call("ha_call_service", **_light()), guardian)
        assert isinstance(error, DeniedByGuardian), error
        assert error.code == -32001
        assert error.data.get("request_id") == pending.seen[0]["request_id"]


async def ask_unanswered_times_out(gw_factory: GwFactory, home: Home) -> None:
    pending = PendingLog()
    async with deadline(home.approval_timeout + STEP), gw_factory(on_pending=pending) as gw:
        _, error = await capture(lambda: gw.call("ha_call_service", **_light()))
        assert isinstance(error, ApprovalTimedOut), error
        assert error.code == -32002
        assert len(pending.seen) == 1


async def concurrent_calls_share_one_connection(gw_factory: GwFactory, home: Home) -> None:
    pending = PendingLog()
    async with deadline(STEP), gw_factory(on_pending=pending) as gw:

        async def read() -> Any:
            return await gw.call("ha_get_state", entity_id="sensor.living_room")

        async def reads_while_an_approval_waits() -> None:
            params = await pending.wait()
            outcomes = await gather(*[read] * 20)
            assert all(e is None and r["entity_id"] == "sensor.living_room" for r, e in outcomes)
            await home.press(params["request_id"], "deny")

        (_, ask_error), (_, reads_error) = await gather(
            lambda: gw.call("ha_call_service", **_light()), reads_while_an_approval_waits
        )
        assert reads_error is None, reads_error
        assert isinstance(ask_error, DeniedByGuardian), ask_error


async def cancelled_call_leaves_connection_usable(gw_factory: GwFactory, home: Home) -> None:
    pending = PendingLog()
    async with deadline(STEP), gw_factory(on_pending=pending) as gw:
        async with move_on_after(1.0) as cancelled:
            await gw.call("ha_call_service", **_light())
        assert cancelled.hit
        params = await pending.wait()
        data = await gw.call("ha_get_state", entity_id="sensor.living_room")
        assert data["entity_id"] == "sensor.living_room"
        await home.press(params["request_id"], "deny")  # clean up; the late reply is dropped
        await home.settled()  # the late reply is on the wire, ahead of the next call's
        data = await gw.call("ha_get_state", entity_id="sensor.living_room")
        assert data["entity_id"] == "sensor.living_room"
        assert gw.connected


async def list_tools_shape(gw_factory: GwFactory, home: Home) -> None:
    async with deadline(STEP), gw_factory() as gw:
        tools = await gw.list_tools()
        assert isinstance(tools, list)
        assert tools
        for tool in tools:
            assert isinstance(tool["name"], str)
            assert isinstance(tool["description"], str)
            assert isinstance(tool["args"], dict)
        names = {tool["name"] for tool in tools}
        assert {"ha_get_state", "ha_get_states", "ha_call_service"} <= names


async def reconnect_after_restart_collects_queued_result(gw_factory: GwFactory, home: Home) -> None:
    pending = PendingLog()
    fast = Backoff(initial=0.1, maximum=0.5)
    async with deadline(3 * STEP), gw_factory(on_pending=pending, backoff=fast) as gw:

        async def restart_when_pending() -> None:
            await pending.wait()
            await home.restart_gateway()

        (_, lost), (_, restart_error) = await gather(
            lambda: gw.call("ha_call_service", **_light()), restart_when_pending
        )
        assert restart_error is None, restart_error
        assert isinstance(lost, ConnectionLost), lost
        request_id = pending.seen[0]["request_id"]
        assert lost.data["rpc_id"] == pending.seen[0]["rpc_id"]
        assert lost.data.get("request_id") == request_id

        await home.press(request_id, "allow")  # the approval outlived the restart
        await home.settled()  # executed, its result queued for the agent
        collected = await gw.pending_results()  # waits for the SDK to reconnect
        (entry,) = [e for e in collected if e["request_id"] == request_id]
        assert entry["status"] == "executed"
        assert entry["rpc_id"] == lost.data["rpc_id"]
        assert entry["tool"] == "ha_call_service"
        # handed out once
        assert all(e.get("request_id") != request_id for e in await gw.pending_results())


CONTRACT: list[Callable[[GwFactory, Home], Awaitable[None]]] = [
    allowed_read_returns_data,
    denied_by_policy_carries_signature,
    invalid_arguments_are_invalid_params,
    bad_token_is_authentication_failed,
    ask_then_allow_executes,
    ask_then_deny_is_denied_by_guardian,
    ask_unanswered_times_out,
    concurrent_calls_share_one_connection,
    cancelled_call_leaves_connection_usable,
    list_tools_shape,
    reconnect_after_restart_collects_queued_result,
]
"""Every case, in a sensible order (the slow timeout and restart cases last but one/last)."""
