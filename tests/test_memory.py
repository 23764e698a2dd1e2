"""Freed heap memory is handed back after the gateway was busy, never while it idles."""

from __future__ import annotations

import trio
import trio.testing

from agentgate.memory import TRIM_EVERY, heap_trimmer, trim_after_activity


async def test_the_heap_is_trimmed_after_activity_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    commits = 0
    trims: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trim_after_activity(lambda: commits, trim=lambda: trims.append(0.0))
        )
        await trio.sleep(TRIM_EVERY * 3 + 1)  # idle: nothing to hand back (off its beat)
        assert trims == []
        commits += 5  # a burst of work
        await trio.sleep(TRIM_EVERY)
        assert len(trims) == 1
        await trio.sleep(TRIM_EVERY * 3)  # idle again
        assert len(trims) == 1
        nursery.cancel_scope.cancel()


def test_glibcs_malloc_trim_is_found_and_runs() -> None:
    trim = heap_trimmer()
    assert trim is not None  # this machine's C library is glibc
    trim()
