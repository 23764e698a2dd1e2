"""Freed heap memory is handed back after the gateway was busy, never while it idles."""

from __future__ import annotations

import trio
import trio.testing

from agentgate.memory import TRIM_EVERY, heap_trimmer, trim_after_activity


async def test_the_heap_is_trimmed_after_activity_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    commits = 0
    grew = trio.Event()
    trims: list[float] = []

    async def reaches(n: int) -> None:
        nonlocal grew
        while commits < n:
            await grew.wait()
            grew = trio.Event()

    def work(n: int) -> None:
        nonlocal commits
        commits += n
        grew.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trim_after_activity(lambda: commits, reaches, trim=lambda: trims.append(0.0))
        )
        await trio.sleep(TRIM_EVERY * 3 + 1)  # idle: nothing to hand back
        assert trims == []
        work(5)  # a burst of work
        await trio.sleep(TRIM_EVERY + 1)
        assert len(trims) == 1
        await trio.sleep(TRIM_EVERY * 3)  # idle again
        assert len(trims) == 1
        work(1)  # more work, then a burst right after the trim: one more trim covers both
        await trio.sleep(TRIM_EVERY / 2)
        work(3)
        await trio.sleep(TRIM_EVERY)
        assert len(trims) == 2
        await trio.sleep(TRIM_EVERY * 3)
        assert len(trims) == 2
        nursery.cancel_scope.cancel()


async def test_an_idle_trimmer_sets_no_timer(autojump_clock: trio.testing.MockClock) -> None:
    """Idle, the trimmer waits for work without a deadline: nothing wakes the gateway for it."""
    never = trio.Event()

    async def reaches(n: int) -> None:
        await never.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: trim_after_activity(lambda: 0, reaches, trim=lambda: None))
        await trio.testing.wait_all_tasks_blocked()
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline == float("inf")
        nursery.cancel_scope.cancel()


def test_glibcs_malloc_trim_is_found_and_runs() -> None:
    trim = heap_trimmer()
    assert trim is not None  # this machine's C library is glibc
    trim()
