"""Sans-io JSON-RPC 2.0 core: text in, typed messages out, and back.

No I/O and no event loop here; the gateway, both SDKs and the tests share it.

Parsing never raises anything but :class:`~agentgate.errors.AgentgateError` subclasses
(``ParseError``, ``InvalidRequest``, ``InvalidParams``). When the offending message had a
usable id, the raised error carries it as ``rpc_id`` so the reply can echo it; otherwise the
reply goes out with ``id: null`` as JSON-RPC requires.

Imports: errors.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

from attrs import frozen

from agentgate.errors import AgentgateError, InvalidParams, InvalidRequest, ParseError

JsonId = str | int | float | None
"""A JSON-RPC id: string, number or null (never a boolean)."""

MAX_ACK: Final = 1000
"""Request ids one ``get_pending_results`` may acknowledge (its ``ack`` list)."""

MAX_REQUEST_ID_CHARS: Final = 128
"""The longest request id ``ack`` may name (the gateway's are 36: UUIDs)."""

_NO_ID: Final = object()


@frozen
class Request:
    """A call that expects an answer (it has an ``id``, possibly ``None``)."""

    id: JsonId
    method: str
    params: dict[str, Any]


@frozen
class Notification:
    """A message without ``id``: never answered."""

    method: str
    params: dict[str, Any]


@frozen
class Response:
    id: JsonId
    result: Any


@frozen
class ErrorResponse:
    id: JsonId
    error: AgentgateError


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _loads(text: str | bytes) -> Any:
    try:
        message = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        if ("\\ud" in text or "\\uD" in text) if isinstance(text, str) else True:
            # JSON escapes can smuggle lone surrogates, which cannot be encoded back to UTF-8.
            json.dumps(message, ensure_ascii=False).encode("utf-8")
        return message
    except (ValueError, RecursionError, UnicodeError) as exc:
        raise ParseError(f"parse error: {exc}") from None


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int)


def _with_id(err: AgentgateError, rpc_id: object) -> AgentgateError:
    err.rpc_id = rpc_id if _valid_id(rpc_id) else None  # type: ignore[attr-defined]
    return err


def error_id(err: AgentgateError) -> JsonId:
    """The id to echo in the reply to a message that raised ``err`` (``None`` if unknown)."""
    value = getattr(err, "rpc_id", None)
    return value if _valid_id(value) else None


def parse_request(text: str | bytes) -> Request | Notification:
    """Parse one frame sent by an agent.

    Raises ``ParseError`` (not JSON), ``InvalidRequest`` (not a JSON-RPC 2.0 request object,
    batches included) or ``InvalidParams`` (``params`` present but not an object).
    """
    message = _loads(text)
    if isinstance(message, list):
        raise InvalidRequest("batch requests are not supported")
    if not isinstance(message, dict):
        raise InvalidRequest("a request must be a JSON object")
    rpc_id = message.get("id", _NO_ID)
    if rpc_id is not _NO_ID and not _valid_id(rpc_id):
        raise _with_id(InvalidRequest("id must be a string, a number or null"), None)
    if message.get("jsonrpc") != "2.0":
        raise _with_id(InvalidRequest('"jsonrpc" must be exactly "2.0"'), rpc_id)
    method = message.get("method")
    if not isinstance(method, str) or not method:
        raise _with_id(InvalidRequest('"method" must be a non-empty string'), rpc_id)
    extra = set(message) - {"jsonrpc", "id", "method", "params"}
    if extra:
        raise _with_id(InvalidRequest(f"unexpected members: {', '.join(sorted(extra))}"), rpc_id)
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _with_id(InvalidParams('"params" must be an object'), rpc_id)
    if rpc_id is _NO_ID:
        return Notification(method, params)
    return Request(rpc_id, method, params)


def parse_reply(text: str | bytes) -> Response | ErrorResponse | Notification:
    """Parse one frame sent by the gateway (the SDK side)."""
    from agentgate.errors import error_from_wire

    message = _loads(text)
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise InvalidRequest("the gateway sent something that is not JSON-RPC 2.0")
    if "method" in message and "id" not in message:
        params = message.get("params") or {}
        if not isinstance(message["method"], str) or not isinstance(params, dict):
            raise InvalidRequest("malformed notification from the gateway")
        return Notification(message["method"], params)
    rpc_id = message.get("id")
    if not _valid_id(rpc_id):
        raise InvalidRequest("the gateway sent an invalid id")
    if "error" in message:
        return ErrorResponse(rpc_id, error_from_wire(message["error"]))
    if "result" in message:
        return Response(rpc_id, message["result"])
    raise InvalidRequest("a reply must have a result or an error")


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_request(rpc_id: JsonId, method: str, params: dict[str, Any] | None = None) -> str:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": rpc_id, "method": method}
    if params is not None:
        message["params"] = params
    return _dumps(message)


def encode_result(rpc_id: JsonId, result: Any) -> str:
    return _dumps({"jsonrpc": "2.0", "id": rpc_id, "result": result})


def encode_error(rpc_id: JsonId, error: AgentgateError) -> str:
    return _dumps({"jsonrpc": "2.0", "id": rpc_id, "error": error.to_wire()})


def encode_notification(method: str, params: dict[str, Any]) -> str:
    return _dumps({"jsonrpc": "2.0", "method": method, "params": params})
