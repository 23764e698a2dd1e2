"""The one error family of agentgate, shared by the gateway, the SDKs and the CLI.

Every error that can cross the wire is a class here carrying its JSON-RPC ``code``; the
gateway turns any of them into an error response in one place, and the SDKs turn an error
response back into the same class. ::

    AgentgateError                      .code .message .data
    ├── ParseError              -32700  not JSON
    ├── InvalidRequest          -32600  not a JSON-RPC 2.0 request object
    ├── MethodNotFound          -32601
    ├── InvalidParams           -32602  ill-typed args, forbidden characters, unknown tool
    ├── InternalError           -32603  a bug in the gateway (logged)
    ├── DeniedByGuardian        -32001
    ├── ApprovalTimedOut        -32002
    ├── DeniedByPolicy          -32003
    ├── ExecutionFailed         -32004  service error/unreachable, audit unavailable
    │   └── OutcomeUnknown              data.outcome = "unknown": the call may have run
    ├── AuthenticationFailed    -32005  then the socket closes with 1008
    ├── RateLimited             -32006
    ├── GatewayShuttingDown     -32007
    └── ConnectionLost          (SDK only: the socket went away; no wire code)

Imports: nothing of agentgate.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AgentgateError(Exception):
    """Base of every agentgate error: ``code`` (JSON-RPC), ``message`` and ``data``."""

    code: ClassVar[int] = -32603
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None, *, data: dict[str, Any] | None = None) -> None:
        self.message = message if message is not None else self.default_message
        self.data: dict[str, Any] = dict(data) if data else {}
        super().__init__(self.message)

    def to_wire(self) -> dict[str, Any]:
        """The JSON-RPC ``error`` member for this error."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data:
            error["data"] = self.data
        return error

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code})"


class ParseError(AgentgateError):
    code = -32700
    default_message = "parse error"


class InvalidRequest(AgentgateError):
    code = -32600
    default_message = "invalid request"


class MethodNotFound(AgentgateError):
    code = -32601
    default_message = "method not found"


class InvalidParams(AgentgateError):
    code = -32602
    default_message = "invalid params"


class InternalError(AgentgateError):
    code = -32603
    default_message = "internal error"


class DeniedByGuardian(AgentgateError):
    code = -32001
    default_message = "denied by the guardian"


class ApprovalTimedOut(AgentgateError):
    code = -32002
    default_message = "approval timed out"


class DeniedByPolicy(AgentgateError):
    code = -32003
    default_message = "denied by policy"


class ExecutionFailed(AgentgateError):
    code = -32004
    default_message = "execution failed"


class OutcomeUnknown(ExecutionFailed):
    """The call was (or may have been) sent, but its answer never came: it may have run.

    It is never retried. ``data["outcome"]`` is ``"unknown"``; ``data["state_after"]``, when
    present, maps each entity the call named to its state read back afterwards.
    """

    default_message = "outcome unknown: the call may have run; it was not retried"

    def __init__(self, message: str | None = None, *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message, data=data)
        self.data["outcome"] = "unknown"


class AuthenticationFailed(AgentgateError):
    code = -32005
    default_message = "authentication failed"


class RateLimited(AgentgateError):
    code = -32006
    default_message = "rate limited"


class GatewayShuttingDown(AgentgateError):
    code = -32007
    default_message = "gateway shutting down"


class ConnectionLost(AgentgateError):
    """The connection to the gateway went away (SDK side only; never sent on the wire)."""

    code = 0
    default_message = "connection lost"


ERRORS_BY_CODE: dict[int, type[AgentgateError]] = {
    cls.code: cls
    for cls in (
        ParseError,
        InvalidRequest,
        MethodNotFound,
        InvalidParams,
        InternalError,
        DeniedByGuardian,
        ApprovalTimedOut,
        DeniedByPolicy,
        ExecutionFailed,
        AuthenticationFailed,
        RateLimited,
        GatewayShuttingDown,
    )
}


def error_from_wire(error: object) -> AgentgateError:
    """Rebuild the typed error from a JSON-RPC ``error`` member (unknown codes stay generic)."""
    if not isinstance(error, dict):
        return InternalError(f"malformed error member: {error!r}")
    code = error.get("code")
    message = error.get("message")
    data = error.get("data")
    cls = ERRORS_BY_CODE.get(code) if isinstance(code, int) else None
    if cls is ExecutionFailed and isinstance(data, dict) and data.get("outcome") == "unknown":
        cls = OutcomeUnknown
    err = (cls or AgentgateError)(
        str(message) if message is not None else None,
        data=data if isinstance(data, dict) else None,
    )
    if cls is None and isinstance(code, int):
        err.code = code  # type: ignore[misc]  # keep an unknown code visible
    return err
