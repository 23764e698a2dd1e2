"""The sans-io JSON-RPC core (agentgate/protocol.py): synchronous, no I/O."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentgate.errors import (
    AgentgateError,
    DeniedByPolicy,
    InvalidParams,
    InvalidRequest,
    ParseError,
)
from agentgate.protocol import (
    ErrorResponse,
    Notification,
    Request,
    Response,
    encode_error,
    encode_notification,
    encode_request,
    encode_result,
    error_id,
    parse_reply,
    parse_request,
)


def _req(**members: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", **members})


# -- ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc_id", ["abc", "", 0, -7, 2**70, 1.5, -0.25, None])
def test_ids_are_echoed_exactly(rpc_id: object) -> None:
    parsed = parse_request(_req(id=rpc_id, method="list_tools"))
    assert isinstance(parsed, Request)
    assert parsed.id == rpc_id
    assert type(parsed.id) is type(rpc_id)
    reply = json.loads(encode_result(parsed.id, {"ok": True}))
    assert reply == {"jsonrpc": "2.0", "id": rpc_id, "result": {"ok": True}}
    assert type(reply["id"]) is type(rpc_id)


@pytest.mark.parametrize("rpc_id", [True, False, [1], {"a": 1}])
def test_ill_typed_ids_are_invalid_requests_answered_with_null(rpc_id: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(_req(id=rpc_id, method="x"))
    assert error_id(info.value) is None


def test_error_id_keeps_a_usable_id_of_a_bad_request() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(json.dumps({"jsonrpc": "1.0", "id": "r1", "method": "x"}))
    assert error_id(info.value) == "r1"
    with pytest.raises(InvalidParams) as info2:
        parse_request(_req(id=7, method="x", params=[1, 2]))
    assert error_id(info2.value) == 7


def test_error_id_of_an_error_without_id_is_null() -> None:
    assert error_id(InvalidRequest()) is None
    err = InvalidRequest()
    err.rpc_id = True  # type: ignore[attr-defined]
    assert error_id(err) is None


# -- requests vs notifications ------------------------------------------------------------------


def test_missing_id_is_a_notification_and_null_id_is_a_request() -> None:
    note = parse_request(_req(method="auth", params={"token": "t"}))
    assert note == Notification("auth", {"token": "t"})
    req = parse_request(_req(id=None, method="auth", params={"token": "t"}))
    assert req == Request(None, "auth", {"token": "t"})


def test_params_default_to_an_empty_object() -> None:
    assert parse_request(_req(id=1, method="list_tools")) == Request(1, "list_tools", {})


@pytest.mark.parametrize("params", [[1, 2], "x", 3, True])
def test_non_object_params_are_invalid_params(params: object) -> None:
    with pytest.raises(InvalidParams) as info:
        parse_request(_req(id=1, method="tool_request", params=params))
    assert info.value.code == -32602


# -- invalid requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '[{"jsonrpc": "2.0", "id": 1, "method": "list_tools"}]',
        '"just a string"',
        "42",
        "null",
        '{"id": 1, "method": "x"}',
        '{"jsonrpc": "2.1", "id": 1, "method": "x"}',
        '{"jsonrpc": 2.0, "id": 1, "method": "x"}',
        '{"jsonrpc": "2.0", "id": 1}',
        '{"jsonrpc": "2.0", "id": 1, "method": ""}',
        '{"jsonrpc": "2.0", "id": 1, "method": 5}',
        '{"jsonrpc": "2.0", "id": 1, "method": "x", "extra": 1}',
    ],
)
def test_invalid_requests(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(text)
    assert info.value.code == -32600


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "not json",
        '{"jsonrpc": "2.0", "id": NaN, "method": "x"}',
        '{"jsonrpc": "2.0", "id": 1, "method": "x", "params": {"v": Infinity}}',
        '{"jsonrpc": "2.0", "id": 1, "method": "x", "params": {"v": -Infinity}}',
        b"\xff\xfe\x00garbage",
        "[" * 100_000,
    ],
)
def test_parse_errors(text: str | bytes) -> None:
    with pytest.raises(ParseError) as info:
        parse_request(text)
    assert info.value.code == -32700
    assert error_id(info.value) is None


def test_overflowing_floats_are_rejected_like_infinity() -> None:
    with pytest.raises(ParseError):
        parse_request('{"jsonrpc": "2.0", "id": 1, "method": "x", "params": {"v": 1e400}}')


def test_overflowing_float_id_is_not_echoed() -> None:
    with pytest.raises(AgentgateError) as info:
        parse_request('{"jsonrpc": "2.0", "id": 1e400, "method": "x"}')
    assert error_id(info.value) is None


def test_lone_surrogates_are_a_parse_error_so_replies_stay_utf8() -> None:
    with pytest.raises(ParseError):
        parse_request('{"jsonrpc": "2.0", "id": "\\ud800", "method": "x"}')
    with pytest.raises(ParseError):
        parse_request('{"jsonrpc": "2.0", "id": 1, "method": "x", "params": {"a": "\\udfff"}}')
    parsed = parse_request('{"jsonrpc": "2.0", "id": "\\ud83d\\ude00", "method": "x"}')
    assert isinstance(parsed, Request)
    encode_result(parsed.id, {}).encode("utf-8")


# -- encoding and the SDK side ----------------------------------------------------------------


def test_encode_request_and_notification() -> None:
    assert json.loads(encode_request(3, "list_tools")) == {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "list_tools",
    }
    assert json.loads(encode_request("a", "auth", {"token": "t"}))["params"] == {"token": "t"}
    assert json.loads(encode_notification("results_pending", {"count": 2})) == {
        "jsonrpc": "2.0",
        "method": "results_pending",
        "params": {"count": 2},
    }


def test_encoding_refuses_nan() -> None:
    with pytest.raises(ValueError, match="JSON"):
        encode_result(1, {"v": float("nan")})


def test_error_round_trip_keeps_class_code_and_data() -> None:
    text = encode_error(9, DeniedByPolicy("no", data={"signature": "s(x)", "request_id": "r"}))
    reply = parse_reply(text)
    assert isinstance(reply, ErrorResponse)
    assert reply.id == 9
    assert isinstance(reply.error, DeniedByPolicy)
    assert reply.error.message == "no"
    assert reply.error.data == {"signature": "s(x)", "request_id": "r"}


def test_parse_reply_kinds() -> None:
    assert parse_reply(encode_result(1, {"a": 1})) == Response(1, {"a": 1})
    note = parse_reply(encode_notification("approval_pending", {"rpc_id": 1}))
    assert note == Notification("approval_pending", {"rpc_id": 1})
    unknown = parse_reply('{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"m"}}')
    assert isinstance(unknown, ErrorResponse)
    assert unknown.error.code == -1


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '{"jsonrpc":"2.0","id":1}',
        '{"jsonrpc":"1.0","id":1,"result":1}',
        '{"jsonrpc":"2.0","id":true,"result":1}',
        '{"jsonrpc":"2.0","method":5}',
    ],
)
def test_parse_reply_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_reply(text)


# -- properties ---------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
_members = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2.0]) | _json,
        "id": _json,
        "method": st.sampled_from(["auth", "tool_request", ""]) | _json,
        "params": _json,
        "extra": _json,
    },
)


@given(_json | _members)
def test_parse_request_only_raises_agentgate_errors_on_json(value: Any) -> None:
    try:
        parsed = parse_request(json.dumps(value))
    except AgentgateError:
        return
    assert isinstance(parsed, Request | Notification)
    assert isinstance(parsed.params, dict)


@given(st.text() | st.binary())
def test_parse_request_only_raises_agentgate_errors_on_any_text(text: str | bytes) -> None:
    with contextlib.suppress(AgentgateError):
        parse_request(text)


@given(st.text() | st.binary() | _json.map(json.dumps))
def test_parse_reply_only_raises_agentgate_errors(text: str | bytes) -> None:
    with contextlib.suppress(AgentgateError):
        parse_reply(text)
