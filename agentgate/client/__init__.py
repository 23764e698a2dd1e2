"""The agentgate agent SDK: the same API inside a Trio program and inside an asyncio program.

::

    from agentgate.client import connect, DeniedByGuardian, DeniedByPolicy, ApprovalTimedOut

    async with connect("wss://gate.example:8443", token="...", ca="ca.pem") as gw:
        state = await gw.call("ha_get_state", entity_id="sensor.living_room")   # -> data
        tools = await gw.list_tools()                                           # -> list[dict]
        queued = await gw.pending_results()                                     # -> list[dict]

Errors (all :class:`AgentgateError` with ``.code``, ``.message``, ``.data``)::

    AgentgateError
    ├── ParseError, InvalidRequest, MethodNotFound, InvalidParams, InternalError
    ├── DeniedByGuardian        -32001
    ├── ApprovalTimedOut        -32002
    ├── DeniedByPolicy          -32003   .data["signature"], .data["request_id"]
    ├── ExecutionFailed         -32004
    │   └── OutcomeUnknown               sent, no answer: it may have run (.data["state_after"])
    ├── AuthenticationFailed    -32005   never retried
    ├── RateLimited             -32006
    ├── GatewayShuttingDown     -32007
    └── ConnectionLost                   the socket went away (see docs/sdk.md)

No exception group ever escapes ``connect()`` or a call. See ``docs/sdk.md``.

Imports: client._base, client._core, errors; client._trio or client._asyncio when ``connect``
knows which library runs it. Nothing of the gateway: the SDK runs on the agent's device.
"""

from __future__ import annotations

import os
import random
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sniffio

from agentgate.client._base import Gateway, Options, PendingHook, make_target
from agentgate.client._core import Backoff
from agentgate.errors import (
    AgentgateError,
    ApprovalTimedOut,
    AuthenticationFailed,
    ConnectionLost,
    DeniedByGuardian,
    DeniedByPolicy,
    ExecutionFailed,
    GatewayShuttingDown,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    OutcomeUnknown,
    ParseError,
    RateLimited,
)

__all__ = [
    "AgentgateError",
    "ApprovalTimedOut",
    "AuthenticationFailed",
    "Backoff",
    "ConnectionLost",
    "DeniedByGuardian",
    "DeniedByPolicy",
    "ExecutionFailed",
    "Gateway",
    "GatewayShuttingDown",
    "InternalError",
    "InvalidParams",
    "InvalidRequest",
    "MethodNotFound",
    "OutcomeUnknown",
    "ParseError",
    "PendingHook",
    "RateLimited",
    "connect",
]


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: str,
    ca: str | os.PathLike[str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    reconnect: bool = True,
    on_pending: PendingHook | None = None,
    backoff: Backoff = Backoff(),  # noqa: B008 - frozen, immutable
    handshake_timeout: float = 10.0,
    rng: random.Random | None = None,
    collect: bool = True,
    client: str | None = None,
) -> AsyncIterator[Gateway]:
    """Connect to a gateway, authenticate, and yield a :class:`Gateway`.

    - ``url``: ``wss://host:port/`` (or ``ws://`` for a gateway run with ``--insecure``).
    - ``token``: this agent's token (sent as the first message, ``auth``).
    - ``ca``: path to a PEM CA bundle to trust instead of the system store;
      ``ssl_context``: a ready :class:`ssl.SSLContext` instead (not both).
    - ``reconnect``: after the connection drops, reconnect with ``backoff`` (capped
      exponential, jittered), re-authenticate and collect queued results. Calls made while
      reconnecting wait for the new connection (bound them with your own deadline).
      An authentication failure is never retried.
    - ``on_pending``: called (sync or async) with the ``approval_pending`` params
      ``{"rpc_id", "request_id", "expires_at"}`` when a call waits for the guardian.
    - ``handshake_timeout``: seconds for TCP + TLS + WebSocket + ``auth`` (the only timeout
      the SDK sets by itself).
    - ``collect``: collect queued results in the background, after each (re)connect and on
      every ``results_pending``, so ``pending_results()`` has them at once. ``False`` leaves
      them on the gateway until ``pending_results()`` asks (``results_waiting`` says how many
      the gateway announced); ``agentgate call`` works this way.

    Queued results are delivered in acknowledged mode: the gateway keeps each one until the
    SDK has handed it to the program, and the SDK drops duplicates, so a program sees each
    result once (see ``Gateway.pending_results``).
    - ``client``: sent as ``auth``'s optional ``client`` member; ``"mcp-stdio"`` (agentgate's
      MCP bridge) makes the audit log and the card say the request came through MCP.

    Raises ``AuthenticationFailed`` (bad token) or ``ConnectionLost`` (unreachable, TLS
    failure, handshake too slow) if the first connection fails; ``ValueError`` for a bad URL.
    Works under Trio and asyncio (detected with ``sniffio``).
    """
    if not handshake_timeout > 0:
        raise ValueError("handshake_timeout must be positive")
    options = Options(
        target=make_target(url, ca=ca, ssl_context=ssl_context),
        token=token,
        reconnect=reconnect,
        on_pending=on_pending,
        backoff=backoff,
        handshake_timeout=handshake_timeout,
        rng=rng or random.Random(),
        collect=collect,
        client=client,
    )
    library = sniffio.current_async_library()
    if library == "trio":
        from agentgate.client._trio import open_trio_gateway as opener
    elif library == "asyncio":
        from agentgate.client._asyncio import open_asyncio_gateway as opener
    else:
        raise RuntimeError(f"agentgate.client supports trio and asyncio, not {library}")
    async with opener(options) as gateway:
        yield gateway
