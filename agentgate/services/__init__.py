"""The services the gateway executes against, behind one :class:`Executor` protocol.

The pipeline (``agentgate.pipeline``) depends on this protocol only; Home Assistant
(:mod:`agentgate.services.homeassistant`) is the one implementation today. An executor holds
the credential of its service: nothing else in the gateway ever sees it.

Imports: tools (ToolSpec).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from agentgate.tools import ToolSpec

__all__ = ["Executor", "Progress", "snippet"]

_SNIPPET = 200


class Executor(Protocol):
    """A service the gateway can act on.

    Errors: :class:`~agentgate.errors.ExecutionFailed` (-32004) for anything the service did or
    could not do, :class:`~agentgate.errors.InvalidParams` for a tool it does not offer.
    """

    @property
    def tools(self) -> Mapping[str, ToolSpec]:
        """The tools this executor offers, by name, with their JSON Schemas."""
        ...

    async def execute(self, tool: str, args: dict[str, Any]) -> Any:
        """Run ``tool`` with already validated ``args``; the service's answer is the result."""
        ...

    async def describe(self, tool: str, args: dict[str, Any]) -> str | None:
        """The card's line about what the call targets (``lock.front_door “Front Door” — now:
        locked``), or None when it names nothing to describe. Never raises: a service that
        cannot say gives a line saying so."""
        ...

    async def state_after(self, tool: str, args: dict[str, Any]) -> dict[str, Any] | None:
        """The current states of the entities a call names (``{entity_id: state}``), read after
        an unknown outcome; None if it names none or none could be read. Never raises."""
        ...

    async def check_health(self) -> str | None:
        """None if the service answers as it should, else a warning for the log (an outage is
        ridden out). Raises :class:`~agentgate.config.ConfigError` if the service refuses the
        gateway's credential: a configuration to fix, at start-up."""
        ...


def snippet(text: str) -> str:
    """A service's answer, whitespace folded, cut to a line an error message can quote."""
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET else text[: _SNIPPET - 1] + "…"


class Progress:
    """How far the acting request of one tool call got: once its first bytes are on their
    way, it may reach the service whatever happens next (an unknown outcome, never retried).
    Passed to httpcore as its ``trace`` extension."""

    __slots__ = ("may_have_run",)

    def __init__(self) -> None:
        self.may_have_run = False

    async def trace(self, event: str, info: Mapping[str, Any]) -> None:
        if event.endswith("send_request_headers.started"):
            self.may_have_run = True
