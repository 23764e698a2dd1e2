"""Rate limits (``agentgate.limits``): the failed-auth limiter counts attempts when they start."""

from __future__ import annotations

import pytest

from agentgate.limits import ConnectionLimits, FailedAuthTracker, OverLimit, Throttle, source_of


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_attempt_holds_its_place_until_it_ends() -> None:
    clock = Clock()
    tracker = FailedAuthTracker(3, clock=clock)
    attempts = [tracker.begin("10.0.0.1") for _ in range(3)]
    assert all(a is not None for a in attempts)
    assert tracker.begin("10.0.0.1") is None  # three open attempts: no fourth guess
    assert tracker.begin("10.0.0.2") is not None  # another source is not affected
    assert tracker.retry_after("10.0.0.1") == 1.0
    attempts[0].succeeded()  # type: ignore[union-attr]
    fourth = tracker.begin("10.0.0.1")
    assert fourth is not None
    attempts[1].abandoned()  # type: ignore[union-attr]  # left before sending anything
    attempts[2].failed()  # type: ignore[union-attr]
    attempts[2].failed()  # type: ignore[union-attr]  # only the first end counts
    fourth.failed()
    fifth = tracker.begin("10.0.0.1")
    assert fifth is not None
    fifth.failed()
    assert tracker.blocked("10.0.0.1")  # three failures within the minute
    assert tracker.retry_after("10.0.0.1") == pytest.approx(60.0)
    clock.now = 60.5
    assert not tracker.blocked("10.0.0.1")


@pytest.mark.parametrize(
    ("address", "source"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("gate.test", "gate.test"),
    ],
)
def test_ipv6_sources_are_grouped_by_64(address: str, source: str) -> None:
    assert source_of(address) == source


def test_one_ipv6_host_cannot_rotate_addresses_within_its_64() -> None:
    tracker = FailedAuthTracker(2, clock=Clock())
    for n in range(2):
        attempt = tracker.begin(f"2001:db8::{n + 1}")
        assert attempt is not None
        attempt.failed()
    assert tracker.begin("2001:db8::99") is None
    assert tracker.begin("2001:db8:0:1::1") is not None  # the next /64 is someone else


def test_connection_limits_count_each_socket_by_its_state() -> None:
    limits = ConnectionLimits(4, 2, 1)
    a, b = limits.admit("10.0.0.1"), limits.admit("10.0.0.1")
    with pytest.raises(OverLimit, match="2 connections from 10\\.0\\.0\\.1 are not authenticated"):
        limits.admit("10.0.0.1")
    c = limits.admit("2001:db8::1")
    assert limits.unauthenticated("2001:db8::2") == 1  # an IPv6 /64 is one source
    assert a.authenticate("pi")
    assert limits.unauthenticated("10.0.0.1") == 1
    assert not b.authenticate("pi")  # pi holds its one connection: b stays unauthenticated
    assert limits.unauthenticated("10.0.0.1") == 1
    d = limits.admit("10.0.0.1")
    assert limits.open == 4
    with pytest.raises(OverLimit, match="holds 4 connections") as over:
        limits.admit("10.0.0.9")
    assert over.value.key == "max_connections 10.0.0.9"
    a.leave_agent()
    assert limits.of_agent("pi") == 0
    assert b.authenticate("pi")
    for ticket in (a, b, c, d, a, b):  # closing twice changes nothing
        ticket.close()
    assert (limits.open, limits.of_agent("pi"), limits.unauthenticated("10.0.0.1")) == (0, 0, 0)
    assert not a.authenticate("pi")  # a closed ticket takes nothing


def test_connection_limits_are_lowered_to_what_descriptors_allow() -> None:
    limits = ConnectionLimits(256)
    assert not limits.limit_to(1000)
    assert limits.limit_to(100)
    assert limits.max_connections == 100
    assert limits.limit_to(-5)
    assert limits.max_connections == 1


def test_throttle_allows_one_per_window_per_key() -> None:
    clock = Clock()
    throttle = Throttle(60, clock=clock, max_keys=2)
    assert throttle.allow("a")
    assert not throttle.allow("a")
    assert not throttle.allow("a")
    assert throttle.allow("b")
    assert throttle.take_suppressed("a") == 2
    assert throttle.take_suppressed("a") == 0
    clock.now = 60
    assert throttle.allow("a")
    assert throttle.allow("c")  # "b" is forgotten: at most two keys
    assert throttle.allow("b")
