"""Rate limits, O(1) per request (DESIGN §10, §13).

Time comes from ``trio.current_time()`` by default so the fast tests can run on a fake clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import trio

Clock = Callable[[], float]


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``capacity / period`` per second."""

    def __init__(self, capacity: float, period: float = 60.0, *, clock: Clock | None = None):
        if capacity <= 0 or period <= 0:
            raise ValueError("capacity and period must be positive")
        self.capacity = float(capacity)
        self.rate = capacity / period
        self._clock = clock or trio.current_time
        self._tokens = self.capacity
        self._stamp = self._clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_take(self) -> bool:
        """Take one token if there is one."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until the next token is available."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)


class FailedAuthTracker:
    """Failed authentications per source address (DESIGN §13).

    After ``limit`` failures within ``window`` seconds, the address is blocked until the oldest of
    them is ``window`` seconds old. Each address keeps at most ``limit`` timestamps, and at most
    ``max_addresses`` addresses are remembered (least recently failing forgotten first), so a
    scan from many addresses cannot grow memory without bound.
    """

    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        *,
        clock: Clock | None = None,
        max_addresses: int = 100_000,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock or trio.current_time
        self._max = max_addresses
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, address: str) -> list[float]:
        stamps = self._failures.get(address)
        if stamps is None:
            return []
        cutoff = self._clock() - self.window
        while stamps and stamps[0] <= cutoff:
            stamps.pop(0)
        if not stamps:
            del self._failures[address]
        return stamps

    def blocked(self, address: str) -> bool:
        return len(self._recent(address)) >= self.limit

    def retry_after(self, address: str) -> float:
        stamps = self._recent(address)
        if len(stamps) < self.limit:
            return 0.0
        return max(0.0, stamps[0] + self.window - self._clock())

    def record_failure(self, address: str) -> None:
        stamps = self._recent(address)
        stamps.append(self._clock())
        del stamps[: -self.limit]
        self._failures[address] = stamps
        self._failures.move_to_end(address)
        while len(self._failures) > self._max:
            self._failures.popitem(last=False)
