"""The official ``mcp`` Python client on Trio, pointed at agentgate: tests, the demo, the bench.

``async with mcp_http_client(url, token=..., ca=...) as client:`` speaks Streamable HTTP with
the agent's token as the bearer; ``async with mcp_stdio_client(url, token=..., ca=...)``
starts ``agentgate mcp`` as a subprocess (the token travels in its environment, never on its
command line) and speaks MCP over its stdin/stdout. ``mode`` is the client's: ``"legacy"``
(the 2025 initialize handshake), ``"auto"`` or a modern version such as ``"2026-07-28"``.

Imports: nothing of agentgate (the official ``mcp`` client; ``agentgate mcp`` runs as a subprocess).
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

__all__ = ["mcp_http_client", "mcp_stdio_client"]


@asynccontextmanager
async def mcp_http_client(
    url: str,
    *,
    token: str | None,
    ca: Path | str | None = None,
    mode: str = "legacy",
    headers: Mapping[str, str] | None = None,
) -> AsyncIterator[Client]:
    """An MCP client over Streamable HTTP (TLS trusting ``ca``), entered and ready."""
    verify: ssl.SSLContext | bool = True
    if ca is not None:
        verify = ssl.create_default_context(cafile=str(ca))
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    timeout = httpx2.Timeout(30.0, read=300.0)
    async with (
        httpx2.AsyncClient(verify=verify, headers=sent, timeout=timeout) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        yield client


def stdio_parameters(
    url: str,
    *,
    token: str,
    ca: Path | str | None = None,
    wait: float | None = None,
    env: Mapping[str, str] | None = None,
) -> StdioServerParameters:
    """How an MCP host starts ``agentgate mcp``: the token in the environment only."""
    args = ["-m", "agentgate", "mcp", "--url", url]
    if ca is not None:
        args += ["--ca", str(ca)]
    if wait is not None:
        args += ["--wait", str(wait)]
    environment = {
        key: value
        for key, value in os.environ.items()
        if key in ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "SSL_CERT_FILE", "TMPDIR")
    }
    environment["AGENTGATE_TOKEN"] = token
    environment.update(env or {})
    return StdioServerParameters(command=sys.executable, args=args, env=environment)


@asynccontextmanager
async def mcp_stdio_client(
    url: str,
    *,
    token: str,
    ca: Path | str | None = None,
    wait: float | None = None,
    mode: str = "legacy",
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Client]:
    """An MCP client over stdio, to an ``agentgate mcp`` subprocess it starts."""
    params = stdio_parameters(url, token=token, ca=ca, wait=wait, env=env)
    async with Client(stdio_client(params), mode=mode) as client:
        yield client
