"""``python -m bench.gateway_unpaced serve gate.toml``: the gateway with Telegram pacing lifted.

(S5/S6 always start the gateway this way; ``--proposals NAME`` starts every scenario's gateway
this way with ``BENCH_PROPOSALS`` set, to measure a proposed change before it is applied: add
it below as an opt-in monkeypatch, as P1-P3 were. All three are applied in the product now.)

Exactly ``python -m agentgate``, except that the Telegram guardian's per-chat send pacing (20
new cards a minute to a group, bursts of 20 — real Telegram's limit) is lifted, so that S5 can
ask many times in a row and S6 can put 10,000 cards in front of the fake Bot API. Only *new
cards* are paced; the press → result path S5/S6 time is not.
"""

from __future__ import annotations

import trio_asyncio  # noqa: F401  # isort: skip  # patch asyncio before httpx (PITFALLS.md)

import functools

from agentgate.serve import import_telegram_guardian

import_telegram_guardian()  # as `agentgate serve` does: without PTB's Passport support

from agentgate.guardian import telegram  # noqa: E402
from agentgate.guardian.telegram import SendLimits  # noqa: E402

UNPACED = SendLimits(
    burst=1_000_000,
    group_per_minute=60_000_000.0,
    private_per_minute=60_000_000.0,
    queue_budget=600.0,
)

telegram.open_telegram_guardian = functools.partial(telegram.open_telegram_guardian, limits=UNPACED)

if __name__ == "__main__":
    from agentgate.cli import main

    raise SystemExit(main())
