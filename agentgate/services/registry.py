"""Several executors as one: each tool runs on the service that offers it.

The pipeline holds one :class:`~agentgate.services.Executor`; a gateway with Home Assistant and
HTTP services gives it a :class:`ServiceSet`, whose ``tools`` are the union of its members'
(a name offered twice is a configuration error, never a silent choice) and whose calls go to
the member that offers the tool. An unknown tool is refused (-32602), never executed.

Imports: services (the protocol), tools, config (ConfigError), errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agentgate.config import ConfigError
from agentgate.errors import InvalidParams
from agentgate.services import Executor
from agentgate.tools import ToolSpec

__all__ = ["ServiceSet"]


class ServiceSet:
    """An :class:`~agentgate.services.Executor` over ``members``, dispatching by tool name."""

    def __init__(self, members: Sequence[Executor]) -> None:
        self.members = tuple(members)
        self._by_tool: dict[str, Executor] = {}
        specs: dict[str, ToolSpec] = {}
        for member in self.members:
            for name, spec in member.tools.items():
                if name in specs:
                    raise ConfigError(f"the tool {name} is offered by two services: rename one")
                specs[name] = spec
                self._by_tool[name] = member
        self.tools: Mapping[str, ToolSpec] = specs

    def _member(self, tool: str) -> Executor | None:
        return self._by_tool.get(tool)

    async def execute(self, tool: str, args: dict[str, Any]) -> Any:
        member = self._member(tool)
        if member is None:
            raise InvalidParams(f"unknown tool: {tool}")
        return await member.execute(tool, args)

    async def describe(self, tool: str, args: dict[str, Any]) -> str | None:
        member = self._member(tool)
        return None if member is None else await member.describe(tool, args)

    async def state_after(self, tool: str, args: dict[str, Any]) -> dict[str, Any] | None:
        member = self._member(tool)
        return None if member is None else await member.state_after(tool, args)

    async def check_health(self) -> str | None:
        """Every member's warning, one per line (a ConfigError from one stops the start)."""
        warnings = [warning for member in self.members if (warning := await member.check_health())]
        return "\n".join(warnings) or None
