"""``python -m bench.gateway_unpaced serve gate.toml``: the gateway with Telegram pacing lifted.

(S5/S6 always start the gateway this way; ``--proposals P1`` starts every scenario's gateway
this way with ``BENCH_PROPOSALS`` set, to measure a proposed change before it is applied.)

Exactly ``python -m agentgate``, except for two things in the Telegram guardian:

1. its per-chat send pacing (20 new cards a minute to a group, bursts of 20 — real Telegram's
   limit) is lifted, so that S5 can ask many times in a row and S6 can put 10,000 cards in front
   of the fake Bot API. Only *new cards* are paced; the press → result path S5/S6 time is not.
2. at most ``SENDS_AT_ONCE`` Bot API calls are in flight (proposal P3 in docs/performance.md).
   Without it, 2,000 unpaced cards queue inside httpcore's connection pool, whose
   ``_assign_requests_to_connections`` rescans every queued request on every event: the
   gateway spends its CPU there and shows 3-5 cards in 30 s.
"""

from __future__ import annotations

import trio_asyncio  # noqa: F401  # isort: skip  # patch asyncio before httpx (PITFALLS.md)

import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from agentgate.guardian import telegram
from agentgate.guardian.telegram import SendLimits, TelegramGuardian

SENDS_AT_ONCE = 8

UNPACED = SendLimits(
    burst=1_000_000,
    group_per_minute=60_000_000.0,
    private_per_minute=60_000_000.0,
    queue_budget=600.0,
)

telegram.open_telegram_guardian = functools.partial(telegram.open_telegram_guardian, limits=UNPACED)

_original_deliver = TelegramGuardian._deliver
_limiter: trio.CapacityLimiter | None = None


async def _bounded_deliver(
    self: TelegramGuardian, what: str, call: Callable[[], Awaitable[Any]]
) -> Any:
    global _limiter
    if _limiter is None:
        _limiter = trio.CapacityLimiter(SENDS_AT_ONCE)
    async with _limiter:
        return await _original_deliver(self, what, call)


TelegramGuardian._deliver = _bounded_deliver  # type: ignore[method-assign]

# Opt-in proposals (``python -m bench --proposals P1``), measured before they are applied:
# P1 - at most LIMITS.max_connections Home Assistant requests in flight; the rest wait on a
#      Trio limiter instead of in httpcore's pool queue (rescanned on every event).
if "P1" in os.environ.get("BENCH_PROPOSALS", ""):
    from agentgate.services import homeassistant

    _original_request = homeassistant.HomeAssistant._request
    _ha_limiter: trio.CapacityLimiter | None = None

    async def _bounded_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        global _ha_limiter
        if _ha_limiter is None:
            _ha_limiter = trio.CapacityLimiter(homeassistant.LIMITS.max_connections or 10)
        async with _ha_limiter:
            return await _original_request(self, *args, **kwargs)

    homeassistant.HomeAssistant._request = _bounded_request  # type: ignore[method-assign]

# P2 - run the store's group commits on the event loop thread (open_store(inline=True)) instead
#      of one trio.to_thread hop per batch: with WAL and synchronous=normal a commit does not
#      fsync, so the hop costs more than the write.
if "P2" in os.environ.get("BENCH_PROPOSALS", ""):
    from agentgate import gateway, store

    gateway.open_store = functools.partial(store.open_store, inline=True)  # type: ignore[attr-defined]

if __name__ == "__main__":
    from agentgate.cli import main

    raise SystemExit(main())
