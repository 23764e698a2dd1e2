"""The HTTP executor: the tools of one ``[services.http.NAME]`` as requests to its API.

Each tool call is exactly the request :meth:`~agentgate.http_tools.HttpTool.request` builds
(and the approval card showed): one request, never retried, with the credential added here
and nowhere else. What comes back:

- 2xx: the body is the agent's data (parsed if the service says JSON, else text; ``null`` if
  empty). Every secret of the service (token, password, the basic pair as base64) is replaced
  by ``[redacted]`` in it first: a service that echoes headers must not hand the credential
  to the agent, the audit log or a card.
- A redirect is followed only for a GET and only on the service's own origin (scheme, host,
  port), at most :data:`MAX_REDIRECTS` times; a redirect to another host is refused, and a
  redirect answering a write is reported, not followed. -32004 either way.
- Any other status: -32004 ``NAME answered 404: <the body's start>``; 401/403 say that the
  service refused the gateway's credential.
- A body over ``max_response_bytes`` (its ``Content-Length``, or what arrives) is refused,
  -32004; reading stops there.
- No answer within ``timeout`` (one deadline for the whole call, redirects included) →
  -32004; for a write whose request had started to go out, :class:`OutcomeUnknown`: it may
  have run. Cannot connect → ``NAME unreachable``; the address and the socket's reason go to
  the log only.

``data`` of every failure is ``{"status": int | None, "service": NAME}``.

Imports: tools, http_tools, config, errors, services (Progress, snippet).
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from agentgate.config import HttpServiceConfig, client_ssl_context
from agentgate.errors import ExecutionFailed, InvalidParams, OutcomeUnknown
from agentgate.http_tools import BuiltRequest, HttpTool, origin
from agentgate.services import Progress, snippet
from agentgate.tools import ToolSpec

__all__ = ["MAX_REDIRECTS", "HttpService", "open_http_service"]

log = logging.getLogger(__name__)

MAX_REDIRECTS: Final = 5
REDACTED: Final = "[redacted]"
LIMITS: Final = httpx.Limits(max_connections=10, max_keepalive_connections=5, keepalive_expiry=30)
NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class HttpService:
    """The :class:`~agentgate.services.Executor` of one HTTP service. Build it with
    :func:`open_http_service`."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        config: HttpServiceConfig,
        definitions: Mapping[str, HttpTool],
    ) -> None:
        self._client = client
        self._config = config
        self._name = config.name
        self._definitions = dict(definitions)
        self._origin = origin(config.base_url)
        self._secrets = sorted(config.secrets(), key=len, reverse=True)
        self.tools: Mapping[str, ToolSpec] = {
            name: tool.spec() for name, tool in self._definitions.items()
        }

    async def check_health(self) -> str | None:
        """Nothing to check without calling a tool: an API has no common health endpoint."""
        return None

    async def describe(self, tool: str, args: dict[str, Any]) -> str | None:
        """The request exactly as it will be sent (the card's "Request"); never raises."""
        definition = self._definitions.get(tool)
        if definition is None:
            return None
        try:
            return definition.request(args).preview(definition.auth)
        except Exception as exc:  # the ask was validated: this is a bug, said on the card
            log.exception("previewing %s failed", tool)
            return f"(the request cannot be shown: {type(exc).__name__})"

    async def state_after(self, tool: str, args: dict[str, Any]) -> dict[str, Any] | None:
        """An HTTP API has no entity states to read back."""
        return None

    async def execute(self, tool: str, args: dict[str, Any]) -> Any:
        """Send ``tool``'s request for validated ``args``; see the module docstring."""
        definition = self._definitions.get(tool)
        if definition is None:
            raise InvalidParams(f"unknown tool: {tool}")
        built = definition.request(args)
        progress = Progress()
        with self._boundary(built, progress, acts=not definition.read_only):
            return await self._send(built, progress, acts=not definition.read_only)

    # ---- plumbing ------------------------------------------------------------------------

    def _failed(self, message: str, status: int | None) -> ExecutionFailed:
        return ExecutionFailed(message, data={"status": status, "service": self._name})

    @contextmanager
    def _boundary(self, built: BuiltRequest, progress: Progress, *, acts: bool) -> Iterator[None]:
        timeout = self._config.timeout
        try:
            with trio.fail_after(timeout):
                yield
        except (ExecutionFailed, InvalidParams):
            raise
        except (trio.TooSlowError, httpx.TimeoutException) as exc:
            if acts and progress.may_have_run and not isinstance(exc, NOT_SENT):
                raise self._unknown(f"{self._name} did not answer within {timeout:g} s") from exc
            raise self._failed(f"{self._name} did not answer within {timeout:g} s", None) from exc
        except httpx.TransportError as exc:
            log.warning("%s unreachable (%s %s): %s", self._name, built.method, built.url, exc)
            if acts and progress.may_have_run and not isinstance(exc, NOT_SENT):
                raise self._unknown(f"the connection to {self._name} dropped") from exc
            what = "cannot connect" if isinstance(exc, httpx.ConnectError) else "connection failed"
            raise self._failed(f"{self._name} unreachable: {what}", None) from exc
        except httpx.HTTPError as exc:
            log.warning("%s request failed (%s %s): %s", self._name, built.method, built.url, exc)
            raise self._failed(
                f"{self._name} request failed (see the gateway's log)", None
            ) from exc

    def _unknown(self, what: str) -> OutcomeUnknown:
        return OutcomeUnknown(
            f"outcome unknown: {what} after the request was sent; it may have run and was"
            " not retried",
            data={"status": None, "service": self._name},
        )

    async def _send(self, built: BuiltRequest, progress: Progress, *, acts: bool) -> Any:
        url = built.url
        headers = {"Content-Type": "application/json"} if built.body is not None else None
        for _ in range(MAX_REDIRECTS + 1):
            if origin(url) != self._origin:  # never: paths are encoded; checked anyway
                raise self._failed(f"refused: {url} is not on {self._name}'s host", None)
            request = self._client.build_request(
                built.method,
                url,
                content=built.body,
                headers=headers,
                extensions={"trace": progress.trace} if acts else {},
            )
            try:
                response = await self._client.send(request, stream=True)
            except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):
                progress.may_have_run = True
                raise
            try:
                if response.is_redirect:
                    url = self._redirect(built, url, response)
                    continue
                body = await self._read(response)
            finally:
                await response.aclose()
            return self._answer(response, body)
        raise self._failed(f"{self._name} redirected more than {MAX_REDIRECTS} times", None)

    def _redirect(self, built: BuiltRequest, url: str, response: httpx.Response) -> str:
        status = response.status_code
        target: str = urljoin(url, str(response.headers.get("location", "")))
        if origin(target) != self._origin:
            host = urlsplit(target).hostname or "?"
            raise self._failed(
                f"{self._name} answered {status} with a redirect to another host ({host}): refused",
                status,
            )
        if built.method != "GET":
            raise self._failed(
                f"{self._name} answered {status} (a redirect to {urlsplit(target).path}) to a"
                f" {built.method}: not followed; it may have run",
                status,
            )
        return target

    async def _read(self, response: httpx.Response) -> bytes:
        cap = self._config.max_response_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise self._too_large(response.status_code)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > cap:
                raise self._too_large(response.status_code)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, status: int) -> ExecutionFailed:
        cap = self._config.max_response_bytes
        return self._failed(
            f"{self._name} answered with more than {cap} bytes: refused"
            f" (services.http.{self._name}.max_response_bytes)",
            status,
        )

    def _answer(self, response: httpx.Response, body: bytes) -> Any:
        text = self._redact(body.decode(response.encoding or "utf-8", errors="replace"))
        status = response.status_code
        if status in (401, 403):
            raise self._failed(
                f"{self._name} refused the gateway's credential ({status}): check"
                f" services.http.{self._name}: {snippet(text)}",
                status,
            )
        if not response.is_success:
            raise self._failed(f"{self._name} answered {status}: {snippet(text)}", status)
        if not text:
            return None
        if "json" in response.headers.get("content-type", "").lower():
            try:
                return json.loads(text)
            except ValueError:
                raise self._failed(
                    f"{self._name} answered {status} with a body that is not JSON: {snippet(text)}",
                    status,
                ) from None
        return text

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


def _tls(config: HttpServiceConfig) -> ssl.SSLContext:
    if config.ca is not None:
        return ssl.create_default_context(cafile=str(config.ca))
    return client_ssl_context(config.base_url)


def _auth(config: HttpServiceConfig) -> tuple[dict[str, str], httpx.Auth | None]:
    if config.auth == "bearer" and config.token is not None:
        return {"Authorization": f"Bearer {config.token}"}, None
    if config.auth == "header" and config.header is not None and config.token is not None:
        return {config.header: config.token}, None
    if config.auth == "basic" and config.username is not None and config.password is not None:
        return {}, httpx.BasicAuth(config.username, config.password)
    return {}, None


@asynccontextmanager
async def open_http_service(
    config: HttpServiceConfig,
    definitions: Mapping[str, HttpTool],
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[HttpService]:
    """One :class:`HttpService` with its own ``httpx.AsyncClient`` for the block.
    ``transport`` replaces the network (``httpx.MockTransport`` in tests)."""
    headers, auth = _auth(config)
    async with httpx.AsyncClient(
        headers=headers,
        auth=auth,
        timeout=httpx.Timeout(float(config.timeout)),
        limits=LIMITS,
        transport=transport,
        verify=_tls(config),
        follow_redirects=False,
    ) as client:
        yield HttpService(client, config, definitions)
