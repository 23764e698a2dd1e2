"""Rate limits and connection limits, O(1) per request or socket (docs/configuration.md,
`[limits]`; docs/protocol.md, -32006).

Time comes from ``trio.current_time()`` by default so the fast tests can run on a fake clock.

Imports: nothing of agentgate.
"""

from __future__ import annotations

import ipaddress
import math
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


class OverLimit(Exception):
    """A connection refused by :class:`ConnectionLimits`; ``key`` names the limit and the
    address (log throttling), ``str()`` says why."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class ConnectionLimits:
    """The sockets the gateway holds, against ``[limits]`` (docs/configuration.md).

    A socket takes a :class:`Ticket` as soon as it is accepted (:meth:`admit`): it counts
    towards ``max_connections`` until it is closed, and towards its source's
    ``max_unauthenticated_per_address`` (sources as :func:`source_of`) until it authenticates,
    its TLS and WebSocket handshakes included. An authenticated socket counts towards its
    agent's ``max_connections_per_agent`` instead. Every check and count is synchronous, so
    sockets racing each other cannot overshoot a limit.
    """

    def __init__(
        self,
        max_connections: float = math.inf,
        max_unauthenticated_per_address: float = math.inf,
        max_connections_per_agent: float = math.inf,
    ) -> None:
        self.max_connections = max_connections
        self.max_unauthenticated = max_unauthenticated_per_address
        self.max_per_agent = max_connections_per_agent
        self.open = 0
        self._unauthenticated: dict[str, int] = {}
        self._agents: dict[str, int] = {}
        self._released: trio.Event | None = None  # someone waits in released()

    async def released(self) -> None:
        """Return once a socket or an agent's session gives its place back (tests wait on
        the counts with it)."""
        if self._released is None:
            self._released = trio.Event()
        await self._released.wait()

    def _give_back(self) -> None:
        if self._released is not None:
            self._released.set()
            self._released = None

    def admit(self, address: str) -> Ticket:
        """A ticket for a socket just accepted from ``address``; OverLimit if over a limit."""
        source = source_of(address)
        if self.open >= self.max_connections:
            raise OverLimit(
                f"the gateway holds {self.open} connections (max_connections ="
                f" {self.max_connections:.0f})",
                f"max_connections {source}",
            )
        waiting = self._unauthenticated.get(source, 0)
        if waiting >= self.max_unauthenticated:
            raise OverLimit(
                f"{waiting} connections from {source} are not authenticated yet"
                f" (max_unauthenticated_per_address = {self.max_unauthenticated:.0f})",
                f"unauthenticated {source}",
            )
        self.open += 1
        self._unauthenticated[source] = waiting + 1
        return Ticket(self, source)

    def unauthenticated(self, address: str) -> int:
        return self._unauthenticated.get(source_of(address), 0)

    def of_agent(self, agent: str) -> int:
        """Authenticated connections ``agent`` holds."""
        return self._agents.get(agent, 0)

    def limit_to(self, most: int) -> bool:
        """Lower ``max_connections`` to ``most`` if it is higher (what the process's file
        descriptors allow); True if it was lowered."""
        if most >= self.max_connections:
            return False
        self.max_connections = max(most, 1)
        return True

    @staticmethod
    def _down(counts: dict[str, int], key: str) -> None:
        left = counts.get(key, 0) - 1
        if left > 0:
            counts[key] = left
        else:
            counts.pop(key, None)


class Ticket:
    """One socket's place in :class:`ConnectionLimits`: unauthenticated, then maybe an
    agent's, until :meth:`close` (which is idempotent, like every method here)."""

    __slots__ = ("_agent", "_limits", "_source")

    def __init__(self, limits: ConnectionLimits, source: str) -> None:
        self._limits: ConnectionLimits | None = limits
        self._source: str | None = source  # while unauthenticated
        self._agent: str | None = None

    def authenticate(self, agent: str) -> bool:
        """The socket authenticated as ``agent``: False (nothing changes) if the agent already
        holds ``max_connections_per_agent`` connections."""
        limits = self._limits
        if limits is None or self._source is None:
            return False
        held = limits._agents.get(agent, 0)
        if held >= limits.max_per_agent:
            return False
        limits._down(limits._unauthenticated, self._source)
        self._source = None
        limits._agents[agent] = held + 1
        self._agent = agent
        return True

    def leave_agent(self) -> None:
        """The agent's session on this socket is over (the socket may still be closing)."""
        if self._limits is not None and self._agent is not None:
            self._limits._down(self._limits._agents, self._agent)
            self._agent = None
            self._limits._give_back()

    def close(self) -> None:
        """The socket is closed: every place it held is given back."""
        limits, self._limits = self._limits, None
        if limits is None:
            return
        if self._source is not None:
            limits._down(limits._unauthenticated, self._source)
            self._source = None
        if self._agent is not None:
            limits._down(limits._agents, self._agent)
            self._agent = None
        limits.open -= 1
        limits._give_back()


class Throttle:
    """At most one ``True`` per key per ``window`` seconds (logging a refusal once a minute);
    at most ``max_keys`` keys remembered (the oldest forgotten first)."""

    def __init__(
        self, window: float = 60.0, *, clock: Clock | None = None, max_keys: int = 10_000
    ) -> None:
        self.window = window
        self._clock = clock or trio.current_time
        self._max = max_keys
        self._last: OrderedDict[str, float] = OrderedDict()
        self.suppressed: dict[str, int] = {}  # refusals not logged since the key's last line

    def allow(self, key: str) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.window:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self._max:
            old, _ = self._last.popitem(last=False)
            self.suppressed.pop(old, None)
        return True

    def take_suppressed(self, key: str) -> int:
        """How many were not logged since the key's last line (and reset the count)."""
        return self.suppressed.pop(key, 0)
