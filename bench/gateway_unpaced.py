"""``python -m bench.gateway_unpaced serve gate.toml``: the gateway with Telegram pacing lifted.

(S5/S6 always start the gateway this way; ``--proposals NAME`` starts every scenario's gateway
this way with ``BENCH_PROPOSALS`` set, to measure a proposed change before it is applied: add
it below as an opt-in monkeypatch, as P1-P3 were. All three are applied in the product now.)

Exactly ``python -m agentgate``, except for two things in the Telegram guardian:

1. its per-chat send pacing (20 new cards a minute to a group, bursts of 20 — real Telegram's
   limit) is lifted, so that S5 can ask many times in a row and S6 can put 10,000 cards in front
   of the fake Bot API. Only *new cards* are paced; the press → result path S5/S6 time is not.
2. Bot API calls queue for one of ``SENDS_AT_ONCE`` slots *before* their retry budget starts
   (10 s for all attempts of one message). The guardian's own limit of 8 calls in flight sits
   inside that budget, which is right when pacing lets at most a burst of 20 cards through; with
   pacing lifted, 10,000 cards would wait for a slot inside their budget and most would fail.

With ``BENCH_SEND_TIMES=FILE`` it also records the times of each Bot API call (below); nothing
else changes.
"""

from __future__ import annotations

import trio_asyncio  # noqa: F401  # isort: skip  # patch asyncio before httpx, anyio or telegram are imported

import functools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agentgate._compat import import_telegram_without_passport

import_telegram_without_passport()  # as `agentgate serve` does

import trio  # noqa: E402

from agentgate.guardian import telegram  # noqa: E402
from agentgate.guardian.telegram import SEND_CONNECTIONS, SendLimits, TelegramGuardian  # noqa: E402

SENDS_AT_ONCE = SEND_CONNECTIONS

UNPACED = SendLimits(
    burst=1_000_000,
    group_per_minute=60_000_000.0,
    private_per_minute=60_000_000.0,
    queue_budget=600.0,
)

telegram.open_telegram_guardian = functools.partial(telegram.open_telegram_guardian, limits=UNPACED)

_original_deliver = TelegramGuardian._deliver
_slots: trio.CapacityLimiter | None = None


async def _deliver_in_turn(
    self: TelegramGuardian, what: str, call: Callable[[], Awaitable[Any]]
) -> Any:
    global _slots
    if _slots is None:
        _slots = trio.CapacityLimiter(SENDS_AT_ONCE)
    async with _slots:
        return await _original_deliver(self, what, call)


TelegramGuardian._deliver = _deliver_in_turn  # type: ignore[method-assign]

# ``BENCH_SEND_TIMES=FILE``: one line per Bot API call (queued, slot taken, returned) and per
# HTTP exchange under it (started, answered), to tell the gateway's own delays from the fake's.
_SEND_TIMES = os.environ.get("BENCH_SEND_TIMES")
if _SEND_TIMES:
    from agentgate.guardian import _trio_request

    _times = open(_SEND_TIMES, "a", buffering=1)  # noqa: SIM115  # open for the process's life
    _exchange = _trio_request._send

    async def _timed_exchange(client: Any, request: Any) -> tuple[int, bytes]:
        started = time.time()
        try:
            return await _exchange(client, request)
        finally:
            method = request.url.path.rsplit("/", 1)[-1]
            _times.write(f"http {started:.4f} {time.time():.4f} {method}\n")

    async def _timed_deliver(
        self: TelegramGuardian, what: str, call: Callable[[], Awaitable[Any]]
    ) -> Any:
        global _slots
        if _slots is None:
            _slots = trio.CapacityLimiter(SENDS_AT_ONCE)
        queued = time.time()
        async with _slots:
            taken, outcome = time.time(), "fail"
            try:
                result = await _original_deliver(self, what, call)
                outcome = "ok"
                return result
            finally:
                _times.write(
                    f"deliver {queued:.4f} {taken:.4f} {time.time():.4f} {what} {outcome}\n"
                )

    _trio_request._send = _timed_exchange
    TelegramGuardian._deliver = _timed_deliver  # type: ignore[method-assign]

if __name__ == "__main__":
    from agentgate.cli import main

    raise SystemExit(main())
