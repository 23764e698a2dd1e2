"""One MCP behaviour for both transports: tools, outcomes, waiting for the guardian.

A :class:`Backend` is where a call goes (the pipeline for the HTTP door, the SDK for the
bridge); :func:`build_server` wraps it in the SDK's low-level ``Server`` with two handlers.

``tools/list``: the gateway's tools (their JSON Schema as ``inputSchema``, a title, honest
annotations) plus ``agentgate_result`` and ``agentgate_pending_results``. No ``outputSchema``:
a pending answer would not match one.

``tools/call``, as a model can use it (tool results, except where the spec says protocol
error)::

    allowed, or asked and approved  isError false, structuredContent {"request_id", "data"}
    denied by policy                isError true, "denied by policy: SIGNATURE — RULE"
    invalid arguments               isError true, the WebSocket door's -32602 message
    unknown tool                    JSON-RPC error -32602 (a protocol error)
    guardian deny / timeout         isError true, "denied by the guardian" / "approval timed out"
    undecided after ``wait`` s      isError false, structuredContent {"status": "pending",
                                    "request_id", "expires_at"}: call agentgate_result later
    rate limited, shutting down,    isError true, the gateway's message
    execution failed

While a call waits for the guardian it sends ``notifications/progress`` (if the client gave a
``progressToken``) every :data:`PROGRESS_EVERY` seconds. A call that is cancelled, abandoned
(its client gone) or answered "pending" leaves its approval with the broker; the outcome is
queued for the agent (``agentgate_pending_results``) and readable by id (``agentgate_result``).

Imports: errors (the error family), agentgate's ``__version__``. The SDK (``mcp``,
``mcp_types``) and Trio.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, Protocol

import mcp_types as types
import trio
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError

from agentgate import __version__
from agentgate.errors import (
    AgentgateError,
    ApprovalTimedOut,
    DeniedByGuardian,
    DeniedByPolicy,
    ExecutionFailed,
    GatewayShuttingDown,
    InternalError,
    InvalidParams,
    error_from_wire,
)

__all__ = [
    "OWN_TOOLS",
    "PROGRESS_EVERY",
    "Asked",
    "Backend",
    "Outcome",
    "build_server",
    "call_result",
    "entry_outcome",
    "mcp_tools",
]

log = logging.getLogger(__name__)

PROGRESS_EVERY: Final = 5.0  # seconds between progress notices while a call waits (spec: ≤ 10)
RESULT_TOOL: Final = "agentgate_result"
PENDING_TOOL: Final = "agentgate_pending_results"
OWN_TOOLS: Final = frozenset({RESULT_TOOL, PENDING_TOOL})

# Tools that only read, for a gateway whose list_tools entries carry no annotations (an older
# one, behind the stdio bridge): everything else changes the home or is unknown to this table,
# and says so. Annotations are hints; the policy stays the only gate.
_READS: Final = frozenset(
    {"ha_get_state", "ha_get_states", "ha_get_services", "ha_get_config", "ha_get_history"}
)
_TITLES: Final[Mapping[str, str]] = {
    "ha_get_state": "Read one Home Assistant entity",
    "ha_get_states": "Read every Home Assistant entity",
    "ha_call_service": "Call a Home Assistant service",
    "ha_fire_event": "Fire a Home Assistant event",
    "ha_get_services": "List Home Assistant services",
    "ha_get_config": "Read Home Assistant's configuration",
    "ha_get_history": "Read an entity's history",
    RESULT_TOOL: "Outcome of a request that waited for approval",
    PENDING_TOOL: "Collect outcomes decided while away",
}
_OWN_TOOL_LIST: Final = (
    {
        "name": RESULT_TOOL,
        "description": (
            "The outcome of one of your earlier requests that waited for the human guardian's"
            " approval, by its request_id. Waits a while if it is still undecided, then answers"
            ' "pending" again. Never runs anything itself.'
        ),
        "args": {
            "type": "object",
            "properties": {"request_id": {"type": "string", "minLength": 1}},
            "required": ["request_id"],
            "additionalProperties": False,
        },
    },
    {
        "name": PENDING_TOOL,
        "description": (
            "Every outcome decided while you were not waiting for it (approvals that were"
            " answered later), each returned once. Never runs anything itself."
        ),
        "args": {"type": "object", "properties": {}, "additionalProperties": False},
    },
)

_STATUS_ERRORS: Final[Mapping[str, type[AgentgateError]]] = {
    "denied": DeniedByGuardian,
    "timed_out": ApprovalTimedOut,
    "failed": ExecutionFailed,
    "shutdown": GatewayShuttingDown,
}


class Asked(NamedTuple):
    """A call waits for the guardian: its request id and when the approval expires (unix)."""

    request_id: str
    expires_at: float


Outcome = dict[str, Any]
"""A call that ran: ``{"request_id", "data"}`` (a refusal is raised as an AgentgateError)."""


class Backend(Protocol):
    """Where an agent's MCP calls go. One per agent (per request on the HTTP door)."""

    def known(self, tool: str) -> bool:
        """Whether the gateway offers ``tool`` (for the unknown-tool protocol error)."""
        ...

    async def tools(self) -> list[dict[str, Any]]:
        """The gateway's ``list_tools`` entries: ``{"name", "description", "args"}``."""
        ...

    async def call(
        self, tool: str, args: dict[str, Any], asked: Callable[[Asked], None]
    ) -> Outcome:
        """Run one request to its final outcome (raising the gateway's error), calling
        ``asked`` if it waits for the guardian. Cancelling it abandons the wait, never the
        approval: the outcome is then queued for the agent."""
        ...

    async def result(self, request_id: str, wait: float) -> dict[str, Any]:
        """A queued-result entry (docs/protocol.md), or ``{"status": "pending", ...}``."""
        ...

    async def pending_results(self) -> list[dict[str, Any]]:
        """The agent's queued results, each returned once."""
        ...


# -- tools/list --------------------------------------------------------------------------------


def mcp_tools(entries: list[dict[str, Any]]) -> list[types.Tool]:
    """MCP tools from the gateway's ``list_tools`` entries, then agentgate's own two."""
    out = []
    for entry in [*entries, *_OWN_TOOL_LIST]:
        name = str(entry.get("name", ""))
        own = name in OWN_TOOLS
        given = entry.get("annotations")
        given = given if isinstance(given, dict) else {}
        reads = own or given.get("readOnlyHint", name in _READS) is True
        destructive = not reads and given.get("destructiveHint", True) is not False
        title = given.get("title") if isinstance(given.get("title"), str) else None
        title = _TITLES.get(name) or title or name
        out.append(
            types.Tool(
                name=name,
                title=title,
                description=str(entry.get("description", "")),
                input_schema=dict(entry.get("args") or {"type": "object"}),
                annotations=types.ToolAnnotations(
                    title=title,
                    read_only_hint=reads,
                    destructive_hint=destructive,
                    idempotent_hint=reads,
                    # an HTTP service is a world beyond the home; Home Assistant is not
                    open_world_hint=name.startswith("http_"),
                ),
            )
        )
    return out


# -- outcomes ----------------------------------------------------------------------------------


def call_result(outcome: Outcome | AgentgateError) -> types.CallToolResult:
    """The tool result of a final outcome (see the module docstring's table)."""
    if isinstance(outcome, AgentgateError):
        error: dict[str, Any] = {"code": outcome.code, "message": outcome.message}
        structured: dict[str, Any] = {"error": error}
        for key in ("request_id", "signature"):
            if isinstance(outcome.data.get(key), str):
                structured[key] = outcome.data[key]
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=_error_text(outcome))],
            structured_content=structured,
            is_error=True,
        )
    data = outcome.get("data")
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=json.dumps(data, ensure_ascii=False))],
        structured_content={"request_id": outcome.get("request_id"), "data": data},
        is_error=False,
    )


def pending_result(asked: Asked) -> types.CallToolResult:
    """The answer to a call still undecided: not an error; ask again by id later."""
    text = (
        f"Still waiting for the guardian's approval (request {asked.request_id}, expires"
        f" {_clock(asked.expires_at)}). Nothing has run yet. Call {RESULT_TOOL} with"
        f' request_id "{asked.request_id}" later to get the outcome.'
    )
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        structured_content={
            "status": "pending",
            "request_id": asked.request_id,
            "expires_at": asked.expires_at,
        },
        is_error=False,
    )


def entry_outcome(entry: Mapping[str, Any]) -> Outcome | AgentgateError:
    """A queued-result entry (docs/protocol.md) as a final outcome."""
    if entry.get("status") == "executed":
        return {"request_id": entry.get("request_id"), "data": entry.get("data")}
    wire = entry.get("error")
    if isinstance(wire, dict):
        error = error_from_wire(wire)
    else:
        status = str(entry.get("status"))
        error = _STATUS_ERRORS.get(status, ExecutionFailed)(f"request {status}")
    for key in ("request_id", "signature"):
        if isinstance(entry.get(key), str):
            error.data.setdefault(key, entry[key])
    return error


def _error_text(error: AgentgateError) -> str:
    signature = error.data.get("signature")
    if isinstance(error, DeniedByPolicy) and isinstance(signature, str):
        # Name the call and what decided it, so the model need not guess.
        reason = error.message.removeprefix("denied by policy: ")
        return f"denied by policy: {signature} — {reason}"
    return error.message


def _clock(expires_at: float) -> str:
    try:
        return datetime.fromtimestamp(expires_at, UTC).strftime("%H:%M:%S UTC")
    except (ValueError, OverflowError, OSError):
        return "unknown"


# -- waiting -----------------------------------------------------------------------------------


class _Progress:
    """``notifications/progress`` for one call (a no-op when the client gave no token)."""

    def __init__(self, ctx: ServerRequestContext[Any, Any]) -> None:
        self._ctx = ctx
        self._count = 0

    async def waiting(self, asked: Asked) -> None:
        self._count += 1
        message = (
            f"waiting for the guardian's approval (expires {_clock(asked.expires_at)});"
            f" request {asked.request_id}"
        )
        try:
            await self._ctx.session.report_progress(self._count, None, message)
        except Exception:  # a client that went away must not fail the call
            log.debug("progress notice not sent", exc_info=True)


async def _run_call(
    backend: Backend,
    tool: str,
    args: dict[str, Any],
    *,
    wait: float,
    progress: _Progress,
    gone: trio.Event | None,
) -> types.CallToolResult:
    outcome: Outcome | AgentgateError | None = None
    asked: Asked | None = None
    changed = trio.Event()

    def on_asked(value: Asked) -> None:
        nonlocal asked
        asked = value
        changed.set()

    async def run() -> None:
        nonlocal outcome
        try:
            outcome = await backend.call(tool, args, on_asked)
        except AgentgateError as exc:
            outcome = exc
        except Exception:
            log.exception("MCP call of %s failed unexpectedly", tool)
            outcome = InternalError("internal error (logged)")
        changed.set()

    async def client_gone() -> None:
        assert gone is not None
        await gone.wait()
        changed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        if gone is not None:
            nursery.start_soon(client_gone)
        with trio.move_on_after(wait):
            while outcome is None and not (gone is not None and gone.is_set()):
                if asked is not None:
                    await progress.waiting(asked)
                    with trio.move_on_after(PROGRESS_EVERY):
                        await changed.wait()
                else:
                    await changed.wait()
                changed = trio.Event()
        # Stop waiting; the backend leaves the approval with the broker (result queued).
        nursery.cancel_scope.cancel()
    if outcome is not None:
        return call_result(outcome)
    if asked is None:
        # Cancelled before the gateway said anything about it: never reached the pipeline, or
        # still executing an allowed call when the wait ended (its outcome is in the audit log).
        return call_result(
            ExecutionFailed("no outcome within the wait; see the gateway's audit log")
        )
    return pending_result(asked)


# -- the server --------------------------------------------------------------------------------


BackendFor = Callable[[ServerRequestContext[Any, Any]], Backend]
GoneFor = Callable[[ServerRequestContext[Any, Any]], trio.Event | None]


def build_server(
    backend_for: BackendFor,
    *,
    wait: float,
    gone_for: GoneFor = lambda ctx: None,
    instructions: str | None = None,
) -> Server[Any]:
    """The SDK's low-level server for one MCP door.

    ``backend_for`` gives the calling agent's :class:`Backend` for a request; ``wait`` is how
    long a call waits for the guardian before answering "pending"; ``gone_for`` gives an event
    set when the request's client has gone (the HTTP door), so a waiting call stops waiting.
    """

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        backend = backend_for(ctx)
        try:
            entries = await backend.tools()
        except AgentgateError as exc:
            raise MCPError(code=_protocol_code(exc), message=exc.message) from None
        return types.ListToolsResult(tools=mcp_tools(entries))

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        backend = backend_for(ctx)
        name, args = params.name, params.arguments
        if args is None:
            args = {}
        progress = _Progress(ctx)
        if name == RESULT_TOOL:
            return await _result_tool(backend, args, wait=wait, progress=progress)
        if name == PENDING_TOOL:
            return await _pending_tool(backend, args)
        try:
            result = await _run_call(
                backend, name, args, wait=wait, progress=progress, gone=gone_for(ctx)
            )
        except AgentgateError as exc:  # a backend that raised outside a call
            result = call_result(exc)
        if result.is_error and not backend.known(name):
            # The pipeline refused (and audited) it; the spec wants a protocol error.
            raise MCPError(code=InvalidParams.code, message=f"unknown tool: {name}")
        return result

    return Server(
        "agentgate",
        version=__version__,
        title="agentgate",
        instructions=instructions
        or (
            "Tools act on a home through agentgate: a policy decides, and some calls wait for a"
            ' human guardian\'s approval. A call answered with status "pending" has not run'
            f" yet: call {RESULT_TOOL} with its request_id later."
        ),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


async def _result_tool(
    backend: Backend, args: dict[str, Any], *, wait: float, progress: _Progress
) -> types.CallToolResult:
    request_id = args.get("request_id")
    extra = set(args) - {"request_id"}
    if extra:
        return call_result(InvalidParams(f"unexpected arguments: {', '.join(sorted(extra))}"))
    if not isinstance(request_id, str) or not request_id or len(request_id) > 128:
        return call_result(InvalidParams('"request_id" must be a request id (a string)'))
    try:
        entry = await backend.result(request_id, 0)
    except AgentgateError as exc:  # "unknown request: ..." among them
        return call_result(exc)
    if entry.get("status") != "pending":
        return call_result(entry_outcome(entry))
    asked = Asked(request_id, _number(entry.get("expires_at")))
    final: list[dict[str, Any] | AgentgateError] = []
    # One more request that waits the whole time, with progress notices beside it (each
    # request to the gateway counts against the agent's rate).
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            try:
                final.append(await backend.result(request_id, wait))
            except AgentgateError as exc:
                final.append(exc)
            nursery.cancel_scope.cancel()

        nursery.start_soon(read)
        while not final:
            await progress.waiting(asked)
            await trio.sleep(PROGRESS_EVERY)
    outcome = final[0] if final else None
    if isinstance(outcome, AgentgateError):
        return call_result(outcome)
    if outcome is None or outcome.get("status") == "pending":
        return pending_result(asked)
    return call_result(entry_outcome(outcome))


async def _pending_tool(backend: Backend, args: dict[str, Any]) -> types.CallToolResult:
    if args:
        return call_result(InvalidParams(f"unexpected arguments: {', '.join(sorted(args))}"))
    try:
        results = await backend.pending_results()
    except AgentgateError as exc:
        return call_result(exc)
    count = len(results)
    text = json.dumps(results, ensure_ascii=False) if results else "no results are waiting"
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        structured_content={"results": results, "count": count},
        is_error=False,
    )


def _number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return math.nan


def _protocol_code(error: AgentgateError) -> int:
    return error.code if error.code < 0 else -32603
