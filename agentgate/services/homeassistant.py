"""The Home Assistant executor: agentgate's tools as calls to HA's REST API over httpx.

=================== ==========================================================================
tool                HTTP (bearer token from ``[services.homeassistant]``)
=================== ==========================================================================
``ha_get_state``    GET  ``/api/states/{entity_id}``
``ha_get_states``   GET  ``/api/states``
``ha_call_service`` GET  ``/api/states/{entity_id}`` for each named entity (404 → not found:
                    real HA answers ``200 []`` for an unknown entity) unless it was read in the
                    last 60 s (the approval card reads it), then
                    POST ``/api/services/{domain}/{service}`` with the other args as JSON body;
                    a ``[]`` answer for an entity not checked just now checks it after all
``ha_fire_event``   POST ``/api/events/{event_type}`` with ``event_data`` (or ``{}``) as body
``ha_get_services`` GET  ``/api/services``
``ha_get_config``   GET  ``/api/config``
``ha_get_history``  GET  ``/api/history/period/{now - hours}?filter_entity_id=X&end_time={now}
                    &minimal_response``  (``hours`` defaults to 24); if HA answers ``[]`` (what
                    it says for an unknown entity), GET ``/api/states/X`` (404 → not found)
``ha_get_logbook``  GET  ``/api/logbook/{now - hours}?entity=X&end_time={now}``; ``[]`` is
                    checked as for the history
``ha_render_        POST ``/api/template`` ``{"template"}``: the rendered text (a read: a
template``          timeout is a plain failure, never "outcome unknown")
``ha_list_areas``,  POST ``/api/template`` with a fixed template (:mod:`.ha_templates`) and
``ha_list_          the filters as its ``variables``: JSON built by Home Assistant itself
entities``
=================== ==========================================================================

**The HTTP client.** The executor owns its connection pool, an ``httpx.AsyncHTTPTransport``
(HTTP/1.1, at most :data:`LIMITS` connections), builds each ``httpx.Request`` itself (the
headers an ``httpx.AsyncClient`` sends, the token, the timeouts as its ``timeout`` extension)
and reads every body to its end, which gives the connection back: what ``AsyncClient.request``
would do, without the client's layers on every call. No redirect is ever followed (the token
goes to Home Assistant's URL only) and no cookie is kept. A proxy named by the environment
(``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, with ``NO_PROXY``) is used as an
``httpx.AsyncClient`` uses it: then the requests go through one.

**Shared reads.** A ``GET`` asked while the same ``GET`` waits to go out joins it; one asked
while it is in flight waits for it and then sends the next, for everyone who asked meanwhile
(:meth:`HomeAssistant._shared_read`). So no caller gets an answer to a request sent before it
asked (it sees every change before it, its own service calls included), and many reads of one
entity cost one read in flight at a time. Writes are never shared.

``ha_call_service`` with ``return_response: true`` adds ``?return_response``: the answer is
``{"changed_states": [...], "service_response": {...}}``.

The result for the agent is Home Assistant's JSON as it came: a service call's list of changed
states may hold transitional states (``[locking, locked]``) and is ``[]`` when nothing changed.
Every failure is an :class:`~agentgate.errors.ExecutionFailed` (-32004) with
``data = {"status": int | None, "service": "homeassistant"}``:

- 401 → the gateway's token was rejected; 404 → ``entity not found: X`` (``not found: PATH``
  elsewhere); 400 → ``Home Assistant refused the call: <HA's message>`` (text/plain or JSON;
  never assumed to be JSON); 500 on a service call → ``Home Assistant failed to run the service
  (500): ...`` (2025.4's bare page for a service validation error, so the message says what it
  usually means); other 5xx → ``Home Assistant error (500): <body>``; a 200 whose body is not
  JSON → failed.
- Transport errors are mapped at the boundary (:func:`_map_transport_errors`): cannot connect
  → ``Home Assistant unreachable: cannot connect`` (a dropped connection: ``connection
  failed``; the address and the socket's reason go to the log, never to the agent); no
  answer within ``timeout`` seconds (one
  deadline per tool call, both requests of ``ha_call_service`` included) → ``Home Assistant did
  not answer within N s``.
- **Outcome unknown.** A request that acts (the POST of ``ha_call_service`` or
  ``ha_fire_event``) that was, or may have been, sent without its answer arriving may have
  run: a read timeout, a connection dropped after the request was written, the call's deadline
  once the request had started to go out, or Home Assistant's own 10 s limit for a service
  call (it answers then, while the service may still run) → :class:`OutcomeUnknown` (-32004,
  ``data.outcome = "unknown"``), with ``data.state_after`` (the named entities' states read
  back afterwards) when that read succeeds. Only a failure before the request left (cannot
  connect, DNS, TLS, no free connection) is a plain failure. Nothing is ever retried.

Imports: tools, errors, config (TLS contexts), services (Progress, snippet), ha_templates.
"""

from __future__ import annotations

import copy
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol
from urllib.parse import quote

import httpx
import trio

from agentgate.config import ConfigError, client_ssl_context
from agentgate.errors import AgentgateError, ExecutionFailed, InvalidParams, OutcomeUnknown
from agentgate.services import Progress, ha_templates, snippet
from agentgate.tools import TOOLS as TOOL_SPECS
from agentgate.tools import ToolSpec

__all__ = ["TOOLS", "HomeAssistant", "HomeAssistantSettings", "open_homeassistant"]

TOOLS: Final = frozenset(
    {
        "ha_get_state",
        "ha_get_states",
        "ha_call_service",
        "ha_fire_event",
        "ha_get_services",
        "ha_get_config",
        "ha_get_history",
        "ha_get_logbook",
        "ha_render_template",
        "ha_list_areas",
        "ha_list_entities",
    }
)

SERVICE: Final = "homeassistant"
log = logging.getLogger(__name__)

# The HTTP client, not Home Assistant, is what limits throughput: more connections buy
# nothing. A modest pool, all of it kept alive (no reconnects after a burst), with headroom for
# a few slow calls (a pool wait counts against the call's deadline).
SEEN_FOR: Final = 60.0  # seconds an entity read counts as "exists" for a service call
SEEN_MAX: Final = 10_000
URLS_MAX: Final = 1024  # request paths whose full URL is kept, parsed (cleared when full)
LIMITS: Final = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=30)

HA_SERVICE_LIMIT: Final = 10.0  # seconds Home Assistant waits for a service before answering
READ_BACK: Final = 5.0  # seconds at most to read the state after an unknown outcome
# Transport errors that can only happen before a request left: it certainly did not run.
NOT_SENT: Final = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)
# ... and those that can happen after it was written: it may have run.
MAY_HAVE_RUN: Final = (
    httpx.WriteError,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.ReadTimeout,
    httpx.RemoteProtocolError,
)

DESCRIBE_NAME: Final = 64  # characters of a friendly name on a card
DESCRIBE_STATE: Final = 64
_SERVICE_500 = (
    "the arguments may be out of range or unsupported by this entity; see Home Assistant's log"
)


class HomeAssistantSettings(Protocol):
    """What the executor needs from ``[services.homeassistant]`` (``HomeAssistantConfig``)."""

    @property
    def url(self) -> str: ...
    @property
    def token(self) -> str: ...
    @property
    def timeout(self) -> float: ...


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _failed(message: str, status: int | None) -> ExecutionFailed:
    return ExecutionFailed(message, data={"status": status, "service": SERVICE})


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Read:
    """One GET shared by every caller that asked for it before it was sent."""

    __slots__ = ("done", "error", "response", "sent")

    def __init__(self) -> None:
        self.sent = False
        self.done = trio.Event()
        self.response: httpx.Response | None = None
        self.error: httpx.HTTPError | None = None


_PROGRESS: ContextVar[Progress | None] = ContextVar("agentgate_ha_progress", default=None)


@contextmanager
def _map_transport_errors(url: str, timeout: float, progress: Progress) -> Iterator[None]:
    """Turn httpx's and Trio's exceptions into :class:`ExecutionFailed` at the boundary, or
    :class:`OutcomeUnknown` once the acting request may have reached Home Assistant.

    The agent hears what happened, never where: Home Assistant's address and the socket
    error's text (which names it) go to the log only.
    """
    try:
        yield
    except OutcomeUnknown:
        raise
    except (trio.TooSlowError, httpx.TimeoutException) as exc:
        if progress.may_have_run and not isinstance(exc, NOT_SENT):
            raise _unknown(
                f"Home Assistant did not answer within {timeout:g} s after the call was sent"
            ) from exc
        raise _failed(f"Home Assistant did not answer within {timeout:g} s", None) from exc
    except httpx.TransportError as exc:
        reason = str(exc) or type(exc).__name__
        log.warning("Home Assistant unreachable at %s: %s", url, reason)
        if progress.may_have_run and not isinstance(exc, NOT_SENT):
            raise _unknown(
                "the connection to Home Assistant dropped after the call was sent"
            ) from exc
        what = "cannot connect" if isinstance(exc, httpx.ConnectError) else "connection failed"
        raise _failed(f"Home Assistant unreachable: {what}", None) from exc
    except httpx.HTTPError as exc:  # e.g. a malformed URL built from odd arguments
        log.warning("Home Assistant request to %s failed: %s", url, exc)
        raise _failed("Home Assistant request failed (see the gateway's log)", None) from exc


def _unknown(what: str) -> OutcomeUnknown:
    return OutcomeUnknown(
        f"outcome unknown: {what}; it may have run and was not retried",
        data={"status": None, "service": SERVICE},
    )


def _error_for(
    response: httpx.Response, entity_id: str | None, *, service_call: bool = False
) -> ExecutionFailed:
    """The :class:`ExecutionFailed` for a non-2xx answer (HA's body is never assumed JSON)."""
    status = response.status_code
    if status == 401:
        return _failed(
            "Home Assistant rejected the gateway's token (401): check services.homeassistant.token",
            status,
        )
    if status == 404:
        what = f"entity not found: {entity_id}" if entity_id else f"not found: {response.url.path}"
        return _failed(what, status)
    text = response.text
    message = text
    from_json = False
    try:
        body = json.loads(text)
    except ValueError:
        pass
    else:
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            message, from_json = body["message"], True
    if status == 500 and service_call:
        # 2025.4.4 lets a ServiceValidationError escape as a bare "500 Internal Server Error"
        # page (2026.x answers 400 JSON): the page says nothing, so say what it usually means.
        detail = snippet(message) if from_json else _SERVICE_500
        return _failed(f"Home Assistant failed to run the service (500): {detail}", status)
    if status == 400:
        return _failed(f"Home Assistant refused the call: {snippet(message)}", status)
    if status >= 500:
        return _failed(f"Home Assistant error ({status}): {snippet(message)}", status)
    return _failed(f"Home Assistant answered {status}: {snippet(message)}", status)


def _str_arg(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidParams(f"{name} must be a non-empty string")
    return value


def _segment(value: str) -> str:
    """One URL path segment; identifiers are validated upstream, quote anyway."""
    return quote(value, safe="")


class HomeAssistant:
    """The Home Assistant :class:`~agentgate.services.Executor`: agentgate's tools as calls to
    its REST API. Build it with :func:`open_homeassistant`."""

    tools: Mapping[str, ToolSpec] = {name: TOOL_SPECS[name] for name in sorted(TOOLS)}

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        settings: HomeAssistantSettings,
        *,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._transport = transport
        self._base = _base_url(settings.url)
        self._headers = _headers(settings.token)
        self._timeouts = httpx.Timeout(float(settings.timeout)).as_dict()
        # Requests wait for a connection here, in a fair FIFO, instead of in httpcore's pool,
        # which rescans every queued request on every event (a deep queue costs more CPU than
        # the requests themselves).
        self._slots = trio.CapacityLimiter(LIMITS.max_connections or 10)
        self._reads: dict[tuple[str, tuple[tuple[str, str], ...]], _Read] = {}  # GETs, by URL
        # Entities Home Assistant showed us lately (id -> Trio time it was seen). A service call
        # on one of them skips the existence check; the approval card's read fills this.
        self._seen: dict[str, float] = {}
        self._urls: dict[str, httpx.URL] = {}  # path -> its URL on Home Assistant (_full_url)
        self._url = settings.url
        self._timeout = float(settings.timeout)
        self._now = now
        self._tools: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "ha_get_state": self._get_state,
            "ha_get_states": lambda _: self._request("GET", "/api/states"),
            "ha_call_service": self._call_service,
            "ha_fire_event": self._fire_event,
            "ha_get_services": lambda _: self._request("GET", "/api/services"),
            "ha_get_config": lambda _: self._request("GET", "/api/config"),
            "ha_get_history": self._get_history,
            "ha_get_logbook": self._get_logbook,
            "ha_render_template": self._render_template,
            "ha_list_areas": self._list_areas,
            "ha_list_entities": self._list_entities,
        }

    async def check_health(self) -> str | None:
        """``None`` if ``GET /api/`` says the API runs, else a warning for the log.

        Raises :class:`~agentgate.config.ConfigError` only when Home Assistant refuses the
        gateway's token (401): that is a configuration to fix, not an outage to ride out.
        """
        try:
            with self._boundary():
                body = await self._request("GET", "/api/")
        except ExecutionFailed as exc:
            if exc.data.get("status") == 401:
                raise ConfigError(
                    f"services.homeassistant.token: Home Assistant at {self._url} refused the"
                    " token (401 to GET /api/); create a long-lived access token in your Home"
                    " Assistant profile"
                ) from None
            return f"Home Assistant health check failed at {self._url}: {exc.message}"
        except Exception as exc:  # a health check must not stop the gateway
            return f"Home Assistant health check failed: {exc!r}"
        if isinstance(body, dict) and body.get("message") == "API running.":
            return None
        return f"Home Assistant at {self._url} answered /api/ unexpectedly: {snippet(str(body))}"

    async def execute(self, tool: str, args: dict[str, Any]) -> Any:
        """Run ``tool`` with (policy-validated) ``args``; HA's JSON answer is the agent's data.

        Raises :class:`ExecutionFailed` for any service failure, :class:`InvalidParams` for a
        tool this executor does not know (never executed, whatever the policy said).
        """
        handler = self._tools.get(tool)
        if handler is None:
            raise InvalidParams(f"unknown tool: {tool}")
        try:
            with self._boundary():
                return await handler(args)
        except OutcomeUnknown as exc:
            after = await self.state_after(tool, args)
            if after is not None:
                exc.data["state_after"] = after
            raise

    async def state_after(self, tool: str, args: dict[str, Any]) -> dict[str, Any] | None:
        """The states of the entities a call names, read now (``{entity_id: state}``), or None
        if it names none or none could be read; never raises. Bounded by its own deadline."""
        named = args.get("entity_id")
        entity_ids = [named] if isinstance(named, str) else named
        if not isinstance(entity_ids, list):
            return None
        states: dict[str, Any] = {}
        with trio.move_on_after(min(self._timeout, READ_BACK)):
            for entity_id in entity_ids:
                if not isinstance(entity_id, str):
                    continue
                try:
                    with self._boundary():
                        state = await self._fetch_state(entity_id)
                except AgentgateError:
                    continue
                if isinstance(state, dict):
                    states[entity_id] = state.get("state")
        return states or None

    async def describe(self, tool: str, args: dict[str, Any]) -> str | None:
        """The card's target line for a call naming ``entity_id`` (None otherwise); never
        raises: when Home Assistant cannot say, the line says so."""
        entity_id = args.get("entity_id")
        if not isinstance(entity_id, str):
            return None
        try:
            return await self.describe_entity(entity_id)
        except AgentgateError as exc:
            return f"{entity_id} — current state unavailable: {exc.message}"
        except Exception as exc:
            log.exception("describing %s failed", entity_id)
            return f"{entity_id} — current state unavailable: {type(exc).__name__}"

    async def describe_entity(self, entity_id: str) -> str:
        """A line for approval cards: ``lock.front_door “Front Door” — now: locked``.

        The entity id comes first; the friendly name (set by integrations and device names,
        so it could imitate another entity) follows in quotes, bounded, as does the state.
        """
        with self._boundary():
            state = await self._fetch_state(entity_id)
        if not isinstance(state, dict):
            raise _failed(f"Home Assistant sent a malformed state for {entity_id}", 200)
        attributes = state.get("attributes")
        attributes = attributes if isinstance(attributes, dict) else {}
        now = _bounded(str(state.get("state")), DESCRIBE_STATE)
        unit = attributes.get("unit_of_measurement")
        if isinstance(unit, str) and unit:
            now = f"{now} {_bounded(unit, 16)}"
        name = attributes.get("friendly_name")
        if isinstance(name, str) and name.strip():
            # Its own quote marks are shown escaped: the name cannot close its quotes.
            name = _bounded(name, DESCRIBE_NAME).replace("“", "\\u201c").replace("”", "\\u201d")
            return f"{entity_id} “{name}” — now: {now}"
        return f"{entity_id} — now: {now}"

    # ---- tools -----------------------------------------------------------------------

    async def _get_state(self, args: dict[str, Any]) -> Any:
        return await self._fetch_state(_str_arg(args, "entity_id"))

    async def _call_service(self, args: dict[str, Any]) -> Any:
        domain, service = _str_arg(args, "domain"), _str_arg(args, "service")
        body = {k: v for k, v in args.items() if k not in ("domain", "service")}
        entity_ids = body.get("entity_id")
        if entity_ids is not None:
            if isinstance(entity_ids, str):
                entity_ids = [entity_ids]
            if not isinstance(entity_ids, list) or not all(
                isinstance(e, str) and e for e in entity_ids
            ):
                raise InvalidParams("entity_id must be a string or a list of strings")
            # HA answers 200 [] for an unknown entity (and does nothing): it must not pass as a
            # success, so the entity is checked first, unless HA showed it to us a moment ago.
            unchecked = [e for e in entity_ids if not self._seen_lately(e)]
            for entity_id in unchecked:
                await self._fetch_state(entity_id)
        path = f"/api/services/{_segment(domain)}/{_segment(service)}"
        params = None
        if body.pop("return_response", False) is True:
            params = {"return_response": ""}  # HA's flag: {changed_states, service_response}
        changed = await self._request("POST", path, body=body, params=params, service_call=True)
        if changed == [] and entity_ids:
            # Nothing changed: make sure that is not because an entity vanished meanwhile.
            for entity_id in entity_ids:
                if entity_id not in unchecked:
                    self._seen.pop(entity_id, None)
                    await self._fetch_state(entity_id)
        return changed

    def _seen_lately(self, entity_id: str) -> bool:
        seen = self._seen.get(entity_id)
        return seen is not None and trio.current_time() - seen < SEEN_FOR

    async def _fire_event(self, args: dict[str, Any]) -> Any:
        event_type = _str_arg(args, "event_type")
        event_data = args.get("event_data")
        if event_data is None:
            event_data = {}
        if not isinstance(event_data, dict):
            raise InvalidParams("event_data must be an object")
        return await self._request("POST", f"/api/events/{_segment(event_type)}", body=event_data)

    def _window(self, args: dict[str, Any]) -> tuple[datetime, datetime]:
        hours = args.get("hours", 24)
        if isinstance(hours, bool) or not isinstance(hours, int | float) or not hours > 0:
            raise InvalidParams("hours must be a positive number")
        end = self._now().astimezone(UTC)
        return end - timedelta(hours=hours), end

    async def _get_logbook(self, args: dict[str, Any]) -> Any:
        entity_id = _str_arg(args, "entity_id")
        start, end = self._window(args)
        params = {"entity": entity_id, "end_time": end.isoformat()}
        path = f"/api/logbook/{_segment(start.isoformat())}"
        entries = await self._request("GET", path, params=params, entity_id=entity_id)
        if entries == []:
            await self._fetch_state(entity_id)  # [] for an unknown entity too: say which
        return entries

    async def _render_template(self, args: dict[str, Any]) -> Any:
        template = _str_arg(args, "template")
        return await self._template(template, {})

    async def _list_areas(self, args: dict[str, Any]) -> Any:
        return ha_templates.areas(await self._template(ha_templates.AREAS, {}))

    async def _list_entities(self, args: dict[str, Any]) -> Any:
        area, domain = args.get("area"), args.get("domain")
        variables = {"area": area or "", "domain": domain or ""}
        answer = await self._template(ha_templates.ENTITIES, variables)
        return ha_templates.entities(answer, area)

    async def _template(self, template: str, variables: dict[str, Any]) -> str:
        body = {"template": template, "variables": variables}
        text: str = await self._request("POST", "/api/template", body=body, acts=False, text=True)
        return text

    async def _get_history(self, args: dict[str, Any]) -> Any:
        entity_id = _str_arg(args, "entity_id")
        start, end = self._window(args)
        params = {
            "filter_entity_id": entity_id,
            "end_time": end.isoformat(),
            "minimal_response": "",
        }
        path = f"/api/history/period/{_segment(start.isoformat())}"
        history = await self._request("GET", path, params=params, entity_id=entity_id)
        if history == []:
            # HA answers [] for an entity it does not know: say so, as ha_get_state does
            await self._fetch_state(entity_id)
        return history

    # ---- plumbing --------------------------------------------------------------------

    @contextmanager
    def _boundary(self) -> Iterator[None]:
        """One call's deadline, with foreign exceptions mapped to :class:`ExecutionFailed`."""
        progress = Progress()
        token = _PROGRESS.set(progress)
        try:
            with (
                _map_transport_errors(self._url, self._timeout, progress),
                trio.fail_after(self._timeout),
            ):
                yield
        finally:
            _PROGRESS.reset(token)

    async def _fetch_state(self, entity_id: str) -> Any:
        path = f"/api/states/{_segment(entity_id)}"
        state = await self._request("GET", path, entity_id=entity_id)
        if len(self._seen) >= SEEN_MAX:
            self._seen.clear()
        self._seen[entity_id] = trio.current_time()
        return state

    async def _request(
        self,
        method: str,
        path: str,
        *,
        entity_id: str | None = None,
        body: Any = None,
        params: dict[str, str] | None = None,
        service_call: bool = False,
        acts: bool | None = None,
        text: bool = False,
    ) -> Any:
        if acts is None:
            acts = method == "POST"
        progress = _PROGRESS.get() if acts else None  # only POSTs act (not a template's)
        if method == "GET":
            response = await self._shared_read(path, params)
        else:
            response = await self._send(method, path, body, params, progress, service_call)
        if not response.is_success:
            raise _error_for(response, entity_id, service_call=service_call)
        if text:
            return response.text
        try:
            return response.json()
        except ValueError as exc:
            raise _failed(
                f"Home Assistant answered {response.status_code} with a body that is not JSON: "
                f"{snippet(response.text)}",
                response.status_code,
            ) from exc

    async def _shared_read(self, path: str, params: dict[str, str] | None) -> httpx.Response:
        """``GET path``: one request for every caller that asks for it before it is sent.

        A caller never gets an answer to a request sent before it asked: it joins a read still
        waiting to go out, or else queues one of its own behind the one in flight (so, with
        many asking for one entity, one read is in flight and the next gathers everyone who
        arrives meanwhile). Each caller parses the shared response for itself; a transport
        error reaches each as its own copy. A read whose caller is cancelled before the answer
        (its deadline, its connection gone) is read again by those who joined it.
        """
        key = (path, tuple(sorted(params.items())) if params else ())
        while True:
            read = self._reads.get(key)
            if read is None or read.sent:
                break
            await read.done.wait()
            if read.response is not None:
                return read.response
            if read.error is not None:
                raise copy.copy(read.error)
            # its caller was cancelled before the answer came: read again
        ahead = read
        mine = self._reads[key] = _Read()
        try:
            if ahead is not None:
                await ahead.done.wait()
            async with self._slots:
                mine.sent = True
                url = self._full_url(path) if params is None else self._merge(path)
                response = mine.response = await self._exchange("GET", url, params=params)
        except httpx.HTTPError as exc:
            mine.error = exc
            raise
        finally:
            if self._reads.get(key) is mine:
                del self._reads[key]
            mine.done.set()
        return response

    def _full_url(self, path: str) -> httpx.URL:
        """``path`` joined to Home Assistant's URL (:meth:`_merge`), parsed once per path."""
        url = self._urls.get(path)
        if url is None:
            if len(self._urls) >= URLS_MAX:
                self._urls.clear()
            url = self._urls[path] = self._merge(path)
        return url

    def _merge(self, path: str) -> httpx.URL:
        """``path`` under Home Assistant's URL, as ``httpx.AsyncClient(base_url=...)`` joins
        them: appended to the base's path (``http://h/ha/`` + ``/api/`` is ``/ha/api/``)."""
        url = httpx.URL(path)
        if not url.is_relative_url:
            return url
        return self._base.copy_with(raw_path=self._base.raw_path + url.raw_path.lstrip(b"/"))

    async def _exchange(
        self,
        method: str,
        url: httpx.URL,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        trace: Callable[[str, Mapping[str, Any]], Awaitable[None]] | None = None,
    ) -> httpx.Response:
        """One request through the executor's transport, its body read and its connection
        released. What ``AsyncClient.request`` would send (its default headers, the token, the
        timeouts as the ``timeout`` extension), without the client's layers: no redirect is
        followed (the token never goes anywhere else), no cookie is kept, no hook runs."""
        extensions: dict[str, Any] = {"timeout": self._timeouts}
        if trace is not None:
            extensions["trace"] = trace
        request = httpx.Request(
            method,
            url,
            params=params,
            headers=self._headers,
            json=body,
            extensions=extensions,
        )
        response = await self._transport.handle_async_request(request)
        response.request = request  # response.url, as the client sets it
        try:
            await response.aread()  # closes the stream (the connection goes back to the pool)
        except BaseException:
            await response.aclose()
            raise
        return response

    async def _send(
        self,
        method: str,
        path: str,
        body: Any,
        params: dict[str, str] | None,
        progress: Progress | None,
        service_call: bool,
    ) -> httpx.Response:
        url = self._full_url(path) if params is None else self._merge(path)
        async with self._slots:
            if progress is None:
                response = await self._exchange(method, url, body=body, params=params)
            else:
                started = trio.current_time()
                try:
                    response = await self._exchange(
                        method, url, body=body, params=params, trace=progress.trace
                    )
                except MAY_HAVE_RUN:
                    progress.may_have_run = True  # also where no trace is seen (test transports)
                    raise
                if service_call and trio.current_time() - started >= HA_SERVICE_LIMIT:
                    # Home Assistant answers after this long whether or not the service is done.
                    raise _unknown(
                        f"Home Assistant stopped waiting for the service after"
                        f" {HA_SERVICE_LIMIT:g} s (it may still be running)"
                    )
        return response


def _base_url(url: str) -> httpx.URL:
    """Home Assistant's URL with a trailing slash on its path, as httpx's ``base_url`` is."""
    base = httpx.URL(url)
    if base.raw_path.endswith(b"/"):
        return base
    return base.copy_with(raw_path=base.raw_path + b"/")


def _headers(token: str) -> httpx.Headers:
    """Every request's headers: those an ``httpx.AsyncClient`` sends by default, and the
    token. (``Accept-Encoding`` is httpx's without the optional codecs: the same on every
    install.)"""
    return httpx.Headers(
        {
            "Accept": "*/*",
            "Accept-Encoding": "gzip, deflate",
            "Connection": "keep-alive",
            "User-Agent": f"python-httpx/{httpx.__version__}",
            "Authorization": f"Bearer {token}",
        }
    )


class _ThroughClient(httpx.AsyncBaseTransport):
    """Requests sent through an ``httpx.AsyncClient`` made with the environment's proxy
    settings (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``), which it applies
    as it always has. Only when such a variable is set: a client's layers cost CPU on every
    request, and without a proxy the transport it would use is the executor's own."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._client.send(request, stream=True)

    async def aclose(self) -> None:
        await self._client.aclose()


def _environment_proxies() -> bool:
    """Does the environment name a proxy (httpx's client reads ``urllib``'s settings too)?"""
    proxies = urllib.request.getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


@asynccontextmanager
async def open_homeassistant(
    config: HomeAssistantSettings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    now: Callable[[], datetime] = _utcnow,
) -> AsyncIterator[HomeAssistant]:
    """One :class:`HomeAssistant` with its own connection pool for the body of the block: an
    ``httpx.AsyncHTTPTransport`` (HTTP/1.1, :data:`LIMITS`), or, when the environment names
    a proxy, an ``httpx.AsyncClient`` that applies it (:class:`_ThroughClient`).

    ``transport`` replaces the network (``httpx.MockTransport`` in tests); it is closed with
    the block. ``now`` is the wall clock used for history windows.
    """
    if transport is None:
        verify = client_ssl_context(config.url)
        if _environment_proxies():
            client = httpx.AsyncClient(limits=LIMITS, verify=verify, follow_redirects=False)
            transport = _ThroughClient(client)
        else:
            transport = httpx.AsyncHTTPTransport(verify=verify, limits=LIMITS)
    async with transport:
        yield HomeAssistant(transport, config, now=now)
