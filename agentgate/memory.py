"""Freed heap memory, handed back to the operating system after the gateway was busy.

glibc keeps the memory Python frees in its heap for reuse; after a burst (thousands of
connections, large frames, a fuzzer) the gateway's RSS stays several MiB above what it uses,
for as long as it runs — on a small home server or a Raspberry Pi that is memory nothing else
gets. Every ``TRIM_EVERY`` seconds in which the store committed anything, :func:`trim_heap`
calls glibc's ``malloc_trim(0)`` (about a tenth of a millisecond), which returns the free pages.
An idle gateway is never woken for it: the timer starts only after a commit; where the C
library has no ``malloc_trim`` (musl, macOS) this does nothing.

Imports: nothing of agentgate.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

__all__ = ["TRIM_EVERY", "heap_trimmer", "trim_after_activity"]

log = logging.getLogger(__name__)

TRIM_EVERY: Final = 15.0  # seconds between looks at whether the gateway was busy


def heap_trimmer() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


async def trim_after_activity(
    activity: Callable[[], int],
    reaches: Callable[[int], Awaitable[None]],
    *,
    every: float = TRIM_EVERY,
    trim: Callable[[], object] | None = None,
) -> None:
    """Until cancelled: ``every`` seconds after ``activity()`` (a counter that grows while the
    gateway works, such as the store's commits) grew, trim the heap; ``reaches(n)`` returns
    once the counter is at least ``n``. At most one trim per ``every`` seconds of work."""
    trim = trim if trim is not None else heap_trimmer()
    if trim is None:
        log.debug("no malloc_trim in this C library: freed heap memory stays with the process")
        return
    seen = activity()
    while True:
        await reaches(seen + 1)
        await trio.sleep(every)
        seen = activity()
        trim()
