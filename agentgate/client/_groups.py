"""Keep exception groups from Trio nurseries inside the SDK.

No exception group ever escapes ``connect()`` or a call (docs/sdk.md): a nursery's group is
re-raised as its one meaningful exception, and any other is logged.

Imports: client._base (the logger).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio

from agentgate.client._base import logger


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found


@contextmanager
def collapse_groups() -> Iterator[None]:
    """Re-raise the one meaningful exception of a nursery's group, never the group.

    The SDK's own tasks do not raise (they log and record errors), so a group holds the
    user's exception and/or ``Cancelled``: the first non-``Cancelled`` leaf wins, else the
    first ``Cancelled``. Any other leaf is logged, not lost silently.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        chosen = next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])
        for other in leaves:
            if other is not chosen and not isinstance(other, trio.Cancelled):
                logger.error("also raised while closing: %r", other)
        context = chosen.__context__
        try:
            raise chosen  # the group is an artefact of our nurseries, not a cause
        finally:
            chosen.__context__ = context
            del chosen, group
