"""Sans-io client core shared by the Trio and asyncio transports.

No I/O and no event loop here. The core owns everything about the conversation with the
gateway that does not depend on how bytes move:

* id allocation (one counter per client, never reused across reconnects, so an ``rpc_id``
  in a queued result names exactly one call);
* correlation of replies to the calls waiting for them (a transport hands in an opaque
  *waiter* and gets it back in a :class:`Completed` event);
* decoding of the gateway's notifications (:class:`ApprovalPending`, :class:`ResultsPending`);
* acknowledged delivery of queued results: every ``get_pending_results`` carries ``ack`` (the
  results already handed to the program, so the gateway drops them), any reply is buffered
  (even when the call that asked was cancelled), and an entry whose ``request_id`` was
  already collected is dropped, so the program sees each result once whatever the connection
  does (see :meth:`ClientCore.take_results`);
* the reconnect policy (:class:`Backoff`, :func:`is_fatal`).

Transports drive it: ``begin()`` → send the text; every received frame → ``receive()``;
connection gone → ``lose_all()``; caller cancelled → ``abandon()``.

Imports: errors, protocol (the sans-io JSON-RPC core the gateway speaks too).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from attrs import define, field, frozen, validators

from agentgate.errors import (
    AgentgateError,
    AuthenticationFailed,
    ConnectionLost,
    InternalError,
    InvalidParams,
)
from agentgate.protocol import (
    MAX_ACK,
    MAX_REQUEST_ID_CHARS,
    ErrorResponse,
    Notification,
    Response,
    encode_request,
    parse_reply,
)

W = TypeVar("W")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest frame the SDK accepts from the gateway (``ha_get_states`` can be big)."""

_COLLECT_METHOD = "get_pending_results"


@frozen
class Completed(Generic[W]):
    """A reply to one of our calls: exactly one of ``result`` / ``error`` is meaningful."""

    waiter: W | None
    rpc_id: int
    method: str
    result: Any = None
    error: AgentgateError | None = None


@frozen
class ApprovalPending:
    """``approval_pending``: one of our calls waits for the guardian (``hook``: that call's
    own ``on_pending``, if it has one)."""

    params: dict[str, Any]
    hook: Any = None


@frozen
class ResultsPending:
    """``results_pending``: results were queued for this agent; collect them."""

    count: int


@frozen
class Ignored:
    """A frame that needs no action (a late reply to a cancelled call, an unknown notification)."""

    reason: str


Event = Completed[W] | ApprovalPending | ResultsPending | Ignored


def _positive(_inst: object, attribute: Any, value: float) -> None:
    if not value > 0:
        raise ValueError(f"Backoff.{attribute.name} must be positive, got {value!r}")


@frozen
class Backoff:
    """Capped exponential backoff with jitter for reconnect attempts.

    Attempt ``n`` (0-based) waits a random time in ``[d/2, d]`` where
    ``d = min(maximum, initial * factor**n)`` ("equal jitter": never zero, so a fleet of
    agents does not stampede a restarted gateway, and never longer than ``maximum``).
    """

    initial: float = field(default=0.5, validator=_positive)
    maximum: float = field(default=30.0, validator=_positive)
    factor: float = field(default=2.0, validator=validators.ge(1.0))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before reconnect attempt ``attempt`` (0 for the first retry)."""
        exponent = min(max(attempt, 0), 64)  # 2.0**64 is far above any cap; avoids overflow
        ceiling = min(self.maximum, self.initial * self.factor**exponent)
        uniform = (rng or random).uniform
        return ceiling / 2 + uniform(0.0, ceiling / 2)


def is_fatal(error: AgentgateError) -> bool:
    """Whether a failed (re)connect must stop the reconnect loop.

    A rejected token will not get better by retrying (and the gateway rate-limits failed
    auths per address); everything else (unreachable, shutting down, rate limited) is
    transient.
    """
    return isinstance(error, AuthenticationFailed)


@define
class _Call(Generic[W]):
    method: str
    waiter: W | None
    request_id: str | None = None
    acks: tuple[str, ...] = ()  # what a collection acknowledges
    on_pending: Any = None


@define
class ClientCore(Generic[W]):
    """Correlation state of one client, across all its connections."""

    _next_id: int = 1
    _calls: dict[int, _Call[W]] = field(factory=dict)
    _results: list[dict[str, Any]] = field(factory=list)  # collected, not yet handed out
    # request ids collected in this session (buffered or handed out): a later listing of one
    # of them is a duplicate
    _seen: set[str] = field(factory=set)
    # handed to the program and not yet acknowledged to the gateway (an ordered set)
    _unacked: dict[str, None] = field(factory=dict)
    # acknowledged (the gateway said so) but maybe still in a reply already on its way
    _confirmed: set[str] = field(factory=set)

    # -- outgoing -------------------------------------------------------------------------

    def begin(
        self, method: str, params: dict[str, Any] | None, waiter: W | None, on_pending: Any = None
    ) -> tuple[int, str]:
        """Register a call; return its id and the text frame to send. ``on_pending`` rides
        along with this call's ``approval_pending`` event.

        A ``get_pending_results`` always goes out in acknowledged mode, carrying the results
        handed to the program since the last confirmed acknowledgement (``params`` is ignored).
        """
        rpc_id = self._next_id
        self._next_id += 1
        acks: tuple[str, ...] = ()
        if method == _COLLECT_METHOD:
            acks = tuple(self._unacked)[:MAX_ACK]
            params = {"ack": list(acks)}
        text = encode_request(rpc_id, method, params)
        self._calls[rpc_id] = _Call(method, waiter, acks=acks, on_pending=on_pending)
        return rpc_id, text

    def abandon(self, rpc_id: int) -> None:
        """The caller stopped waiting (cancelled): its late reply will be discarded.

        A ``get_pending_results`` call stays registered without its waiter: its reply still
        lands in the results buffer, so a cancelled collection never loses results.
        """
        call = self._calls.get(rpc_id)
        if call is None:
            return
        if call.method == _COLLECT_METHOD:
            call.waiter = None
        else:
            del self._calls[rpc_id]

    @property
    def in_flight(self) -> int:
        """Number of calls sent and not yet answered."""
        return len(self._calls)

    # -- incoming -------------------------------------------------------------------------

    def receive(self, text: str | bytes) -> Event[W]:
        """Interpret one frame from the gateway.

        Raises :class:`ConnectionLost` when the frame is not JSON-RPC 2.0: a gateway that
        speaks garbage cannot be trusted to answer the calls in flight, so the transport
        drops the connection (and reconnects).
        """
        try:
            message = parse_reply(text)
        except AgentgateError as exc:
            raise ConnectionLost(f"the gateway sent an invalid frame: {exc.message}") from None
        if isinstance(message, Notification):
            return self._notification(message)
        rpc_id = message.id
        call = self._calls.pop(rpc_id, None) if isinstance(rpc_id, int) else None
        if call is None:
            return Ignored(f"reply to unknown or cancelled call {rpc_id!r}")
        assert isinstance(rpc_id, int)
        if call.request_id is not None and not _still_pending(message):
            # An approval's outcome, answered directly: the gateway queued it first and takes
            # it out once the frame is written, so a crash in between lists it again. It is a
            # duplicate then, and the next collection acknowledges it.
            self._seen.add(call.request_id)
            self.acknowledge((call.request_id,))
        if isinstance(message, ErrorResponse):
            if call.method == _COLLECT_METHOD and isinstance(message.error, InvalidParams):
                # The gateway refuses these acknowledgements themselves: sending them again
                # would fail every collection. Give them up (their results may come again).
                for request_id in call.acks:
                    self._unacked.pop(request_id, None)
            return Completed(call.waiter, rpc_id, call.method, error=message.error)
        assert isinstance(message, Response)
        if call.method == _COLLECT_METHOD:
            try:
                count = self.store_results(message.result)
            except InternalError as exc:
                return Completed(call.waiter, rpc_id, call.method, error=exc)
            self._acknowledged(call.acks)
            return Completed(call.waiter, rpc_id, call.method, result=count)
        return Completed(call.waiter, rpc_id, call.method, result=message.result)

    def _notification(self, message: Notification) -> Event[W]:
        params = message.params
        if message.method == "approval_pending":
            rpc_id = params.get("rpc_id")
            request_id = params.get("request_id")
            call = self._calls.get(rpc_id) if isinstance(rpc_id, int) else None
            if call is not None and isinstance(request_id, str):
                call.request_id = request_id
            return ApprovalPending(dict(params), call.on_pending if call is not None else None)
        if message.method == "results_pending":
            count = params.get("count")
            valid = isinstance(count, int) and not isinstance(count, bool)
            return ResultsPending(count if valid else 1)  # type: ignore[arg-type]
        return Ignored(f"unknown notification {message.method!r}")

    def lose_all(self, reason: str) -> list[tuple[W, ConnectionLost]]:
        """The connection is gone: every call in flight fails with ``ConnectionLost``.

        The error's ``data`` holds ``rpc_id``, ``method`` and, when the gateway had announced
        an approval for it, ``request_id`` — its outcome may later arrive through
        ``pending_results()`` under that ``rpc_id``/``request_id``.
        """
        failed: list[tuple[W, ConnectionLost]] = []
        for rpc_id, call in self._calls.items():
            if call.waiter is None:
                continue
            data: dict[str, Any] = {"rpc_id": rpc_id, "method": call.method}
            if call.request_id is not None:
                data["request_id"] = call.request_id
            failed.append((call.waiter, ConnectionLost(reason, data=data)))
        self._calls.clear()
        return failed

    # -- results ----------------------------------------------------------------------------

    def store_results(self, result: Any) -> int:
        """Buffer the new entries of a ``get_pending_results`` result; return how many.

        An entry whose ``request_id`` was collected before in this session (still buffered,
        or handed out and not yet acknowledged) is a duplicate and is dropped.
        """
        entries = result.get("results") if isinstance(result, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise InternalError("the gateway sent a malformed get_pending_results reply")
        new = 0
        for entry in entries:
            request_id = entry.get("request_id")
            if isinstance(request_id, str):
                if request_id in self._seen:
                    continue
                self._seen.add(request_id)
            self._results.append(entry)
            new += 1
        return new

    def take_results(self, *, acknowledge: bool = True) -> list[dict[str, Any]]:
        """Hand out (and forget) every buffered queued result.

        ``acknowledge``: the next collection tells the gateway they were handed out (the
        caller sends one soon); False leaves that to :meth:`acknowledge` (the program first
        stores them somewhere, then acknowledges).
        """
        taken, self._results = self._results, []
        if acknowledge:
            self.acknowledge(e.get("request_id") for e in taken)
        return taken

    def acknowledge(self, request_ids: Iterable[object]) -> None:
        """Acknowledge these results with the next collection (request ids only: strings the
        gateway could have made; anything else names no result and is skipped)."""
        for request_id in request_ids:
            if isinstance(request_id, str) and 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
                self._unacked[request_id] = None

    def _acknowledged(self, acks: tuple[str, ...]) -> None:
        """The gateway confirmed ``acks``: it will never list them again."""
        for request_id in acks:
            self._unacked.pop(request_id, None)
        self._confirmed.update(acks)
        if not any(call.method == _COLLECT_METHOD for call in self._calls.values()):
            # No reply listed before those acknowledgements can still arrive: they cannot
            # come back, so they need not be remembered.
            self._seen -= self._confirmed
            self._confirmed.clear()

    @property
    def buffered(self) -> int:
        """Number of queued results collected and not yet handed out."""
        return len(self._results)

    @property
    def unacknowledged(self) -> int:
        """Results handed to the program whose acknowledgement the gateway has not confirmed."""
        return len(self._unacked)


# -- result shapes ---------------------------------------------------------------------------


def auth_agent(result: Any) -> str:
    """Validate an ``auth`` result and return the agent name (fail closed on anything else)."""
    if not isinstance(result, dict) or result.get("status") != "authenticated":
        raise AuthenticationFailed(f"unexpected auth reply from the gateway: {result!r}")
    agent = result.get("agent")
    return agent if isinstance(agent, str) else ""


def tool_result(result: Any) -> dict[str, Any]:
    """Validate a ``tool_request`` result (``status`` must be ``executed``)."""
    if not isinstance(result, dict) or result.get("status") != "executed" or "data" not in result:
        raise InternalError(f"the gateway sent a malformed tool_request reply: {result!r}")
    return result


def tools_list(result: Any) -> list[dict[str, Any]]:
    """Validate a ``list_tools`` result."""
    tools = result.get("tools") if isinstance(result, dict) else None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise InternalError("the gateway sent a malformed list_tools reply")
    return tools


def _still_pending(message: Response | ErrorResponse) -> bool:
    """A planned restart's -32007 for an approval that stays open (``data.pending``)."""
    return isinstance(message, ErrorResponse) and bool(message.error.data.get("pending"))
