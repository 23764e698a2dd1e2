"""Rate limits, O(1) per request (docs/configuration.md, `[limits]`; docs/protocol.md, -32006).

Time comes from ``trio.current_time()`` by default so the fast tests can run on a fake clock.

Imports: nothing of agentgate.
"""

from __future__ import annotations

import ipaddress
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


def source_of(address: str) -> str:
    """The source that failed-auth limits count: an IPv4 address, an IPv6 /64 (one host usually
    holds a whole /64), anything else as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailedAuthTracker:
    """Failed authentications per source (``failed_auth_per_minute``), counted from the start.

    An attempt takes one of the source's ``limit`` places as soon as its socket is accepted
    (:meth:`begin`) and gives it back only if it succeeds; a failure keeps it for ``window``
    seconds. So parallel sockets from one source cannot multiply its guesses: with ``limit``
    attempts open or failed within the window, the next one is refused before it can guess.
    Sources are :func:`source_of` addresses. Each source keeps at most ``limit`` timestamps, and
    at most ``max_addresses`` failing sources are remembered (least recently failing forgotten
    first), so a scan from many addresses cannot grow memory without bound.
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
        self._open: dict[str, int] = {}  # attempts begun and not finished, per source

    def _recent(self, source: str) -> list[float]:
        stamps = self._failures.get(source)
        if stamps is None:
            return []
        cutoff = self._clock() - self.window
        while stamps and stamps[0] <= cutoff:
            stamps.pop(0)
        if not stamps:
            del self._failures[source]
        return stamps

    def blocked(self, address: str) -> bool:
        source = source_of(address)
        return len(self._recent(source)) + self._open.get(source, 0) >= self.limit

    def retry_after(self, address: str) -> float:
        """Seconds until an attempt from ``address`` may start (1 s while others are open)."""
        source = source_of(address)
        stamps = self._recent(source)
        if len(stamps) >= self.limit:
            return max(0.0, stamps[0] + self.window - self._clock())
        return 1.0 if len(stamps) + self._open.get(source, 0) >= self.limit else 0.0

    def begin(self, address: str) -> AuthAttempt | None:
        """Start an attempt, or None when the source has no place left (refuse it)."""
        if self.blocked(address):
            return None
        source = source_of(address)
        self._open[source] = self._open.get(source, 0) + 1
        return AuthAttempt(self, source)

    def record_failure(self, address: str) -> None:
        self._fail(source_of(address))

    def _fail(self, source: str) -> None:
        stamps = self._recent(source)
        stamps.append(self._clock())
        del stamps[: -self.limit]
        self._failures[source] = stamps
        self._failures.move_to_end(source)
        while len(self._failures) > self._max:
            self._failures.popitem(last=False)

    def _close(self, source: str) -> None:
        left = self._open.get(source, 0) - 1
        if left > 0:
            self._open[source] = left
        else:
            self._open.pop(source, None)


class AuthAttempt:
    """One authentication in progress; exactly one of its methods ends it (later calls do
    nothing)."""

    def __init__(self, tracker: FailedAuthTracker, source: str) -> None:
        self._tracker: FailedAuthTracker | None = tracker
        self._source = source

    def _end(self) -> FailedAuthTracker | None:
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            tracker._close(self._source)
        return tracker

    def succeeded(self) -> None:
        """Authenticated: the place is given back."""
        self._end()

    def failed(self) -> None:
        """A wrong token, a bad first frame or the deadline: the place stays, as a failure."""
        tracker = self._end()
        if tracker is not None:
            tracker._fail(self._source)

    def abandoned(self) -> None:
        """The peer left before it sent anything: no guess was made."""
        self._end()
