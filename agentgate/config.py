"""The gateway configuration: ``gate.toml`` → a frozen :class:`Config` (docs/configuration.md).

:func:`load_config` works in four steps and reports every problem of every step in one
:class:`ConfigError` whose lines read ``FILE: KEY.PATH: what was expected``:

1. read the file and parse it as TOML (errors name the file and the line; nothing else can
   be checked after this one fails);
2. replace ``${VAR}`` in every string from the environment (``$${`` is a literal ``${``);
   in secret keys (:data:`Secret`, :data:`AgentToken`) only when ``secrets`` is true;
3. structure the document into the ``@frozen`` classes below with a cattrs converter that
   forbids unknown keys (suggesting the key meant) and whose scalar hooks are strict (a bool is
   not a number, a number is not a string), then make relative paths absolute against the
   directory of ``gate.toml``. A value that fails is dropped and structuring goes on without
   it, so the next step still runs;
4. cross-field checks: at least one agent, exactly one token form per agent, no shared tokens,
   TLS files (unless ``insecure``), policy files.

A problem that follows from one already reported (the same key, or a key inside it) is not
reported twice. A new table needs nothing here but its class and a field in :class:`Config`.

Secrets (tokens) never appear in a ``repr`` or an error message.

Imports: nothing of agentgate (cattrs, attrs, tomllib).
"""

import difflib
import functools
import hashlib
import hmac
import json
import math
import os
import re
import secrets as _secrets
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin
from urllib.parse import urlsplit

import attrs
import cattrs
from attrs import field, frozen
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn

if TYPE_CHECKING:
    import ssl

__all__ = [
    "AgentConfig",
    "AuditConfig",
    "Config",
    "ConfigError",
    "GatewayConfig",
    "GuardianConfig",
    "HomeAssistantConfig",
    "HttpServiceConfig",
    "LimitsConfig",
    "McpConfig",
    "PolicyConfig",
    "ServicesConfig",
    "StoreConfig",
    "TelegramConfig",
    "client_ssl_context",
    "inspect_config",
    "load_config",
    "policy_files",
    "split_listen",
]

AGENT_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
MIN_TOKEN_LENGTH = 16
MIN_CARD_CHARS = 512
MAX_CARD_CHARS = 4096
MIN_MESSAGE_BYTES = 1024
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MIN_OUTBOX_BYTES = 65536
MAX_OUTBOX_BYTES = 1 << 30
MIN_RESPONSE_BYTES = 1024
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
HTTP_SERVICE_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
HTTP_AUTH = ("none", "bearer", "header", "basic")

_AGENT_NAME_RE = re.compile(AGENT_NAME_PATTERN)
_HTTP_SERVICE_RE = re.compile(HTTP_SERVICE_PATTERN)
# RFC 9110 token characters; the names that carry framing or the connection are refused.
_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection", "cookie"}
)
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# `$${` is an escaped literal `${`; otherwise `${` up to the next `}` (or the end: unterminated).
_ENV_REF_RE = re.compile(r"\$\$\{|\$\{(?P<name>[^}]*)(?P<close>\}?)")

KeyPath = tuple[str | int, ...]


class ConfigError(Exception):
    """The configuration cannot be used. ``str()`` is one line per problem, each naming the
    file, the dotted key path and what was expected, e.g.
    ``gate.toml: limits.requests_per_minute: expected a positive integer, got "ten"``.
    ``problems`` holds the same lines as a tuple."""

    def __init__(self, *problems: str) -> None:
        self.problems: tuple[str, ...] = problems
        super().__init__("\n".join(problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


# --------------------------------------------------------------------------- value checks


class _Invalid(ValueError):
    """A value was rejected by a check; ``subpath`` extends the key path (list indices)."""

    def __init__(self, message: str, subpath: KeyPath = ()) -> None:
        super().__init__(message)
        self.message = message
        self.subpath = subpath


@frozen
class _Check:
    """``Annotated`` metadata: the structure hook for the annotated field; ``secret`` marks a
    credential (resolved from the environment only where it is used)."""

    fn: Callable[[Any], Any]
    secret: bool = False


def _show(value: object) -> str:
    """A value as it would read in TOML, for "got ..." (long strings shortened)."""
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return json.dumps(text, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # TOML dates and times


def _as_int(value: object) -> int | None:
    """``value`` if it is an integer (a bool is not), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    return value


def _secret(value: object) -> str:
    # Never echo a secret: only its type or emptiness.
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    if not value:
        raise _Invalid('expected a non-empty string, got ""')
    return value


def _agent_token(value: object) -> str:
    token = _secret(value)
    if len(token) < MIN_TOKEN_LENGTH:
        raise _Invalid(
            f"token too short: expected at least {MIN_TOKEN_LENGTH} characters, got {len(token)}"
        )
    return token


def _sha256_hex(value: object) -> str:
    if not isinstance(value, str) or not _SHA256_RE.match(value):
        got = f"{len(value)} characters" if isinstance(value, str) else _show(value)
        raise _Invalid(
            "expected a sha256 digest (64 hexadecimal characters, "
            f"see `agentgate hash-token`), got {got}"
        )
    return value.lower()


def _integer(value: object) -> int:
    number = _as_int(value)
    if number is None:
        raise _Invalid(f"expected an integer, got {_show(value)}")
    return number


def _positive_int(value: object) -> int:
    number = _as_int(value)
    if number is None or number <= 0:
        raise _Invalid(f"expected a positive integer, got {_show(value)}")
    return number


def _non_negative_int(value: object) -> int:
    number = _as_int(value)
    if number is None or number < 0:
        raise _Invalid(f"expected a non-negative integer, got {_show(value)}")
    return number


def _seconds(value: object) -> float:
    integer = _as_int(value)
    number = value if isinstance(value, float) else None
    if integer is not None:
        try:
            number = float(integer)
        except OverflowError:
            number = None
    if number is None or not math.isfinite(number) or number <= 0:
        raise _Invalid(f"expected a positive number of seconds, got {_show(value)}")
    return number


def _positive_number(unit: str) -> Callable[[object], float]:
    """A check for a positive, finite number of ``unit`` (days, minutes)."""

    def check(value: object) -> float:
        try:
            return _seconds(value)
        except _Invalid:
            raise _Invalid(f"expected a positive number of {unit}, got {_show(value)}") from None

    return check


def _non_negative_seconds(value: object) -> float:
    if _as_int(value) == 0 or value == 0.0:
        return 0.0
    try:
        return _seconds(value)
    except _Invalid:
        raise _Invalid(
            f"expected a number of seconds, 0 or more (0 turns it off), got {_show(value)}"
        ) from None


def _int_in(low: int, high: int, note: str) -> Callable[[object], int]:
    """A check for an integer from ``low`` to ``high``; ``note`` says what the bound is."""

    def check(value: object) -> int:
        number = _as_int(value)
        if number is None or not low <= number <= high:
            raise _Invalid(f"expected an integer from {low} to {high} ({note}), got {_show(value)}")
        return number

    return check


def _user_ids(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        got = "an empty array" if value == [] else _show(value)
        raise _Invalid(f"expected a non-empty array of Telegram user ids, got {got}")
    for index, item in enumerate(value):
        if _as_int(item) is None:
            raise _Invalid(f"expected an integer user id, got {_show(item)}", (index,))
    return tuple(value)


def split_listen(listen: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:8443"`` for IPv6) into host and port; ValueError if bad."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError(listen)
    elif ":" in host:
        raise ValueError(listen)  # an IPv6 address needs brackets
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(listen)
    if any(c.isspace() for c in host):
        raise ValueError(listen)
    return host, int(port)


def _listen(value: object) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        split_listen(value)
    except ValueError:
        raise _Invalid(
            f'expected "host:port" (e.g. "0.0.0.0:8443" or "[::1]:8443"), got {_show(value)}'
        ) from None
    return value


def _http_url(value: object) -> str:
    if isinstance(value, str):
        try:
            parts = urlsplit(value)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018  (raises ValueError for a bad port)
        except ValueError:
            ok = False
        if "@" in parts.netloc if ok else "@" in value:
            # Never echoed: the part before "@" is a password. Tokens have keys of their own.
            raise _Invalid(
                "a URL must not hold a user name or password (user:password@host);"
                " put the token in the table's token key"
            )
        if ok and not parts.query and not parts.fragment:
            return value.rstrip("/")
    raise _Invalid(f"expected an http:// or https:// URL, got {_show(value)}")


def _path(value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"expected a file path (a string), got {_show(value)}")
    return Path(value).expanduser()


def _card_overflow(value: object) -> str:
    if value not in ("refuse", "document"):
        raise _Invalid(f'expected "refuse" or "document", got {_show(value)}')
    return str(value)


def _witness(value: object) -> str:
    if value not in ("telegram", "none"):
        raise _Invalid(f'expected "telegram" (the guardians\' chat) or "none", got {_show(value)}')
    return str(value)


def _durability(value: object) -> str:
    if value not in ("normal", "full"):
        raise _Invalid(f'expected "normal" or "full", got {_show(value)}')
    return str(value)


def _http_auth(value: object) -> str:
    if value not in HTTP_AUTH:
        raise _Invalid(
            f"expected one of {', '.join(map(json.dumps, HTTP_AUTH))}, got {_show(value)}"
        )
    return str(value)


def _header_name(value: object) -> str:
    if not isinstance(value, str) or not _HEADER_NAME_RE.match(value):
        raise _Invalid(f'expected an HTTP header name such as "X-Api-Key", got {_show(value)}')
    if value.lower() in _RESERVED_HEADERS:
        raise _Invalid(f"{value} is set by the gateway itself: pick the header the API reads")
    return value


def _mcp_path(value: object) -> str:
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or len(value) > 256
        or any(c in value for c in "?#%")
        or any(c.isspace() or ord(c) < 0x20 for c in value)
    ):
        raise _Invalid(f'expected a URL path such as "/mcp", got {_show(value)}')
    return value


def _origins(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(
            f'expected an array of origins such as ["https://app.example"], got {_show(value)}'
        )
    for index, item in enumerate(value):
        ok = isinstance(item, str)
        if ok:
            try:
                parts = urlsplit(item)
                ok = parts.scheme in ("http", "https") and bool(parts.hostname)
                ok = ok and not (parts.path or parts.query or parts.fragment or "@" in parts.netloc)
                parts.port  # noqa: B018  (raises ValueError for a bad port)
            except ValueError:
                ok = False
        if not ok:
            raise _Invalid(
                f'expected an origin such as "https://app.example" (scheme://host[:port]),'
                f" got {_show(item)}",
                (index,),
            )
    return tuple(str(item).lower() for item in value)


Durability = Annotated[str, _Check(_durability)]
Witness = Annotated[str, _Check(_witness)]
Days = Annotated[float, _Check(_positive_number("days"))]
Minutes = Annotated[float, _Check(_positive_number("minutes"))]
HttpAuth = Annotated[str, _Check(_http_auth)]
HeaderName = Annotated[str, _Check(_header_name)]
ResponseBytes = Annotated[
    int, _Check(_int_in(MIN_RESPONSE_BYTES, MAX_RESPONSE_BYTES, "1 KiB to 16 MiB"))
]
CardChars = Annotated[
    int, _Check(_int_in(MIN_CARD_CHARS, MAX_CARD_CHARS, "what one Telegram message holds"))
]
CardOverflow = Annotated[str, _Check(_card_overflow)]
String = Annotated[str, _Check(_string)]
Secret = Annotated[str, _Check(_secret, secret=True)]
AgentToken = Annotated[str, _Check(_agent_token, secret=True)]
Sha256Hex = Annotated[str, _Check(_sha256_hex)]
Integer = Annotated[int, _Check(_integer)]
PositiveInt = Annotated[int, _Check(_positive_int)]
NonNegativeInt = Annotated[int, _Check(_non_negative_int)]
Seconds = Annotated[float, _Check(_seconds)]
SecondsOrOff = Annotated[float, _Check(_non_negative_seconds)]
MessageBytes = Annotated[int, _Check(_int_in(MIN_MESSAGE_BYTES, MAX_MESSAGE_BYTES, "16 MiB"))]
OutboxBytes = Annotated[int, _Check(_int_in(MIN_OUTBOX_BYTES, MAX_OUTBOX_BYTES, "1 GiB"))]
UserIds = Annotated[tuple[int, ...], _Check(_user_ids)]
Listen = Annotated[str, _Check(_listen)]
HttpUrl = Annotated[str, _Check(_http_url)]
FilePath = Annotated[Path, _Check(_path)]
McpPath = Annotated[str, _Check(_mcp_path)]
Origins = Annotated[tuple[str, ...], _Check(_origins)]


# --------------------------------------------------------------------------- the model


@frozen(kw_only=True)
class GatewayConfig:
    """``[gateway]``: where to listen, TLS, and the two protocol deadlines (seconds)."""

    listen: Listen = "0.0.0.0:8443"
    tls_cert: FilePath | None = None
    tls_key: FilePath | None = None
    auth_deadline: Seconds = 10.0
    approval_timeout: Seconds = 900.0
    # The operator's control socket (agentgate reload, grants --revoke, undo); default: the
    # file agentgate.sock next to the store.
    control_socket: FilePath | None = None

    @property
    def host(self) -> str:
        """The host part of ``listen`` (IPv6 without brackets)."""
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        """The port part of ``listen``; 0 means "pick a free port"."""
        return split_listen(self.listen)[1]


@frozen(kw_only=True)
class StoreConfig:
    """``[store]``: the SQLite file (audit log and pending approvals)."""

    path: FilePath = Path("data/agentgate.db")
    # "normal": WAL commits survive a crash or kill -9 of the gateway (not a power cut);
    # "full": every commit is also fsync'd, surviving a power cut, at a cost in throughput.
    synchronous: Durability = "normal"
    # Audit events older than this many days are pruned by a compaction (audited, signed;
    # at start and daily). None: everything is kept.
    keep_days: Days | None = None


@frozen(kw_only=True)
class AuditConfig:
    """``[audit]``: the audit log's signed checkpoints and where they are witnessed
    (docs/configuration.md, ``[audit]``)."""

    # The Ed25519 key that signs checkpoints; default: NAME.audit-key beside the store.
    key: FilePath | None = None
    checkpoint_every: PositiveInt = 100  # events
    checkpoint_minutes: Minutes = 60.0  # ... or minutes, whichever comes first
    # "telegram": each checkpoint is also posted, silently, to the guardians' chat (the
    # default when a guardian is configured); "none": not posted.
    witness: Witness | None = None
    witness_file: FilePath | None = None  # each checkpoint is also appended to this file

    def key_path(self, store: Path) -> Path:
        """Where the signing key is: ``key``, else ``NAME.audit-key`` beside the store."""
        return self.key or store.with_name(store.stem + ".audit-key")


@frozen(kw_only=True)
class PolicyConfig:
    """``[policy]``: the default policy file for every agent."""

    file: FilePath = Path("permissions.yaml")


@frozen(kw_only=True)
class AgentConfig:
    """``[agents.NAME]``: one agent, its credential and optional per-agent overrides.

    Exactly one of ``token`` (the plain token) and ``token_sha256`` (its sha256, lower-case
    hex) is set by :func:`load_config`.
    """

    name: String
    token: AgentToken | None = field(default=None, repr=False)
    token_sha256: Sha256Hex | None = None
    policy: FilePath | None = None
    requests_per_minute: PositiveInt | None = None
    max_pending: PositiveInt | None = None

    @property
    def digest(self) -> bytes:
        """The sha256 digest of this agent's token (raises ValueError if no token is set)."""
        if self.token is not None:
            return hashlib.sha256(self.token.encode("utf-8", "surrogatepass")).digest()
        if self.token_sha256 is not None:
            return bytes.fromhex(self.token_sha256)
        raise ValueError(f"agent {self.name!r} has no token")

    def matches(self, token: str) -> bool:
        """Whether ``token`` is this agent's token, compared in constant time on digests."""
        if not isinstance(token, str) or (self.token is None and self.token_sha256 is None):
            return False
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(presented, self.digest)


@frozen(kw_only=True)
class TelegramConfig:
    """``[guardian.telegram]``: the approval bot, where cards go and who may decide."""

    token: Secret = field(repr=False)
    chat_id: Integer
    allowed_users: UserIds
    base_url: HttpUrl | None = None
    send_retries: NonNegativeInt = 3


@frozen(kw_only=True)
class GuardianConfig:
    """``[guardian]``: the human in the loop (Telegram only, for now), and what a card holds.

    A card shows every argument in full. ``max_card_chars`` bounds it (visible characters
    after rendering); a call whose card would be longer is refused with -32602
    (``card_overflow = "refuse"``) or its arguments are sent as an attached document before
    the card (``"document"``).
    """

    telegram: TelegramConfig | None = None
    max_card_chars: CardChars = MAX_CARD_CHARS
    card_overflow: CardOverflow = "refuse"
    # Seconds an executed call's ↩ Undo is offered (0: no snapshots, no Undo).
    undo_window: SecondsOrOff = 600.0
    # Approvals of one signature (30 days, no denial) before its card offers "Always allow"
    # (0: never offered).
    suggest_after: NonNegativeInt = 3


@frozen(kw_only=True)
class HomeAssistantConfig:
    """``[services.homeassistant]``: base URL (no trailing slash), token, per-call timeout."""

    url: HttpUrl
    token: Secret = field(repr=False)
    timeout: Seconds = 10.0


@frozen(kw_only=True)
class HttpServiceConfig:
    """``[services.http.NAME]``: an HTTP API whose tools a tools file describes
    (docs/services.md). Its tools are named ``http_NAME_TOOL``.

    ``auth`` says how the gateway authenticates: ``"bearer"`` (``token``), ``"header"``
    (``header`` = ``token``), ``"basic"`` (``username``, ``password``) or ``"none"``. The
    secrets come from ``${VAR}`` and appear nowhere else: not in cards, audit rows or logs.
    """

    name: String
    base_url: HttpUrl
    tools: FilePath
    auth: HttpAuth = "none"
    token: Secret | None = field(default=None, repr=False)
    header: HeaderName | None = None
    username: String | None = None
    password: Secret | None = field(default=None, repr=False)
    timeout: Seconds = 10.0
    ca: FilePath | None = None
    max_response_bytes: ResponseBytes = 1 << 20

    def secrets(self) -> tuple[str, ...]:
        """The credential's secret values (never shown anywhere; scrubbed from answers)."""
        found = [self.token, self.password]
        if self.username is not None and self.password is not None:
            import base64

            pair = f"{self.username}:{self.password}".encode()
            found.append(base64.b64encode(pair).decode("ascii"))
        return tuple(s for s in found if s)


@frozen(kw_only=True)
class ServicesConfig:
    """``[services]``: the services the gateway executes against."""

    homeassistant: HomeAssistantConfig | None = None
    http: dict[str, HttpServiceConfig] = field(factory=dict)


@frozen(kw_only=True)
class LimitsConfig:
    """``[limits]``: per-agent and per-address limits (docs/configuration.md, ``[limits]``)."""

    max_pending_per_agent: PositiveInt = 10
    requests_per_minute: PositiveInt = 60
    failed_auth_per_minute: PositiveInt = 5
    max_message_bytes: MessageBytes = 65536
    # Replies waiting for one agent to read them; past this the connection closes (1008).
    max_outbox_bytes: OutboxBytes = 16 * 1024 * 1024
    # Sockets: in all; not yet authenticated (TLS and WebSocket handshakes included) per
    # source address; authenticated per agent. Over them a connection is refused at once.
    max_connections: PositiveInt = 256
    max_unauthenticated_per_address: PositiveInt = 8
    max_connections_per_agent: PositiveInt = 8


@frozen(kw_only=True)
class McpConfig:
    """``[mcp]``: the Model Context Protocol endpoint (Streamable HTTP) on the gateway itself.

    Absent table: no endpoint. TLS is ``[gateway]``'s certificate and key. ``wait`` is how long
    a ``tools/call`` waits for the guardian before answering "pending"; a request carrying an
    ``Origin`` header that ``allowed_origins`` does not list is refused (HTTP 403).
    """

    listen: Listen
    path: McpPath = "/mcp"
    wait: Seconds = 50.0
    allowed_origins: Origins = ()

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


@frozen(kw_only=True)
class Config:
    """A validated ``gate.toml``; every path in it is absolute."""

    source: FilePath
    gateway: GatewayConfig = GatewayConfig()
    store: StoreConfig = StoreConfig()
    policy: PolicyConfig = PolicyConfig()
    agents: dict[str, AgentConfig] = field(factory=dict)
    guardian: GuardianConfig = GuardianConfig()
    services: ServicesConfig = ServicesConfig()
    limits: LimitsConfig = LimitsConfig()
    mcp: McpConfig | None = None
    audit: AuditConfig = AuditConfig()

    def agent_limits(self, name: str) -> tuple[int, int]:
        """``(requests_per_minute, max_pending)`` for agent ``name``: its own overrides, else
        ``[limits]``. KeyError for an unknown agent."""
        agent = self.agents[name]
        return (
            agent.requests_per_minute or self.limits.requests_per_minute,
            agent.max_pending or self.limits.max_pending_per_agent,
        )

    def control_socket(self) -> Path:
        """Where the operator's control socket is: ``[gateway] control_socket``, else
        ``agentgate.sock`` next to the store."""
        return self.gateway.control_socket or self.store.path.parent / "agentgate.sock"

    def agent_policy(self, name: str) -> Path:
        """The policy file for agent ``name``: its own, else ``[policy] file``."""
        return self.agents[name].policy or self.policy.file

    def find_agent(self, token: str) -> AgentConfig | None:
        """The agent whose token this is, or None. Every agent is compared (no early exit)."""
        found = None
        for agent in self.agents.values():
            if agent.matches(token):
                found = agent
        return found


def policy_files(config: Config) -> dict[str, Path]:
    """Every policy file the config refers to, by the key that names it: ``"policy.file"``
    for the default, ``"agents.NAME.policy"`` for each agent with its own."""
    files = {"policy.file": config.policy.file}
    for name, agent in config.agents.items():
        if agent.policy is not None:
            files[_format_path(("agents", name, "policy"))] = agent.policy
    return files


def client_ssl_context(url: str) -> "ssl.SSLContext":
    """The TLS context for an outgoing HTTP/1.1 client whose requests all go to ``url``'s origin.

    ``https://``: httpx's default verification (certifi's CA bundle, or ``$SSL_CERT_FILE`` /
    ``$SSL_CERT_DIR``), built once per process for those settings and shared by every client:
    each context holds ~140 parsed CA certificates (~0.8 MiB). Share it only between HTTP/1.1
    clients (httpcore sets the context's ALPN list on every connection). ``http://``: no TLS is
    ever negotiated, so a context that verifies and trusts no CA: it loads nothing, and any TLS
    attempt through it fails closed. Pass the result as ``httpx.AsyncClient(verify=...)``.
    """
    import ssl

    if urlsplit(url).scheme.lower() != "https":
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname, no CA
    return _verified_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _verified_context(cafile: str | None, capath: str | None) -> "ssl.SSLContext":
    import httpx

    # httpx reads these same two variables itself; they are this cache's key.
    del cafile, capath
    return httpx.create_ssl_context()


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    insecure: bool = False,
    secrets: bool = True,
    ignore: Iterable[str] = (),
) -> Config:
    """Read, validate and return the gateway configuration at ``path``.

    ``env`` (default ``os.environ``) supplies ``${VAR}`` substitutions. With ``insecure``
    the TLS files may be absent (plain ``ws://``). With ``secrets=False`` a ``${VAR}`` in a
    secret key (the tokens) is not read from the environment: a placeholder that matches no
    token stands in, for tools that read the file but never use a secret (``agentgate audit``,
    ``check --config``, ``config check --no-secrets``); such a config must not be served.
    ``ignore`` names tables (dotted, e.g. ``"guardian.telegram"``) left out entirely, as if
    absent. Raises :class:`ConfigError` naming the file, the key path and what was expected
    for every problem found.
    """
    config, problems = inspect_config(
        path, env=env, insecure=insecure, secrets=secrets, ignore=ignore
    )
    if problems or config is None:
        raise ConfigError(*(line for _, line in problems))
    return config


def inspect_config(
    path: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    insecure: bool = False,
    secrets: bool = True,
    ignore: Iterable[str] = (),
) -> tuple[Config | None, list[tuple[str, str]]]:
    """:func:`load_config` for ``agentgate config check``: what could be read (every value
    that failed left at its default; None if the file cannot be structured at all) and every
    problem as ``(dotted key, line)``. Raises :class:`ConfigError` only when the file cannot
    be read or is not TOML."""
    label = os.fspath(path)
    source = Path(os.path.abspath(label))
    environ: Mapping[str, str] = os.environ if env is None else env

    try:
        text = source.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not valid UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read the file: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL byte in the path
        raise ConfigError(f"{label}: cannot read the file: {exc}") from exc
    try:
        raw = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, int digit limit, nesting
        raise ConfigError(f"{label}: invalid TOML: {exc}") from exc

    for table in ignore:
        _drop(raw, tuple(table.split(".")))
    problems = _Problems()
    try:
        document = _substitute(raw, (), environ, problems, secrets=secrets)
    except RecursionError as exc:
        raise ConfigError(f"{label}: invalid TOML: nested too deeply") from exc
    _inject_names(document, source, problems)
    config = _structure(document, problems)
    if config is not None:
        config = _resolve_paths(config, source.parent)
        problems.extend(_cross_check(config, insecure=insecure))
    return config, [(_format_path(key), _problem(label, key, message)) for key, message in problems]


class _Problems(list[tuple[KeyPath, str]]):
    """Problems in the order found; one that follows from a reported one is left out."""

    def follows(self, key: KeyPath) -> bool:
        """Whether a problem at ``key`` would repeat one already reported (same key, or one
        inside the other): a value that failed is dropped, and its absence would be next."""
        return any(
            seen and (key[: len(seen)] == seen or seen[: len(key)] == key) for seen, _ in self
        )

    def extend(self, found: Iterable[tuple[KeyPath, str]]) -> None:
        fresh = [(key, message) for key, message in found if not self.follows(key)]
        super().extend(fresh)


def _structure(document: dict[str, Any], problems: _Problems) -> Config | None:
    """The document as a :class:`Config`; each value that fails is reported, then dropped,
    and structuring tries again without it (None when nothing more can be dropped)."""
    for _ in range(64):  # each round drops at least one key
        try:
            return _converter.structure(document, Config)
        except Exception as exc:  # every structuring failure becomes a located problem
            found = _collect(exc, ())
        problems.extend(found)
        if not any([_drop_for(document, key) for key, _ in found]):
            return None
    return None


def _drop(document: dict[str, Any], key: KeyPath) -> bool:
    """Remove ``key`` from the document; False if it is not there."""
    *parents, last = key
    table: Any = document
    for part in parents:
        table = table.get(part) if isinstance(table, dict) else None
    if isinstance(table, dict) and last in table:
        del table[last]
        return True
    return False


def _drop_for(document: dict[str, Any], key: KeyPath) -> bool:
    """Drop what a problem at ``key`` is about: the value (a whole array, for one bad item),
    or, for a key that is missing, the table that needs it."""
    names: tuple[str, ...] = ()
    for part in key:
        if not isinstance(part, str):  # an array item: the array goes
            break
        names = (*names, part)
    while names:
        if _drop(document, names):
            return True
        names = names[:-1]
    return False


def _problem(label: str, key: KeyPath, message: str) -> str:
    return f"{label}: {_format_path(key)}: {message}" if key else f"{label}: {message}"


def _format_path(key: KeyPath) -> str:
    out = ""
    for part in key:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY_RE.match(part) else json.dumps(part, ensure_ascii=False)
            out += f".{text}" if out else text
    return out


def _substitute(
    value: Any,
    key: KeyPath,
    env: Mapping[str, str],
    problems: list[tuple[KeyPath, str]],
    *,
    secrets: bool,
) -> Any:
    """A copy of the document with ``${VAR}`` replaced in every string (in secret keys only
    when ``secrets``; otherwise by a placeholder that no agent can present)."""
    if isinstance(value, dict):
        return {
            k: _substitute(v, (*key, k), env, problems, secrets=secrets) for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _substitute(v, (*key, i), env, problems, secrets=secrets) for i, v in enumerate(value)
        ]
    if not isinstance(value, str) or "$" not in value:
        return value
    resolve = secrets or not _is_secret_key(key)

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, closed = match.group("name"), match.group("close")
        if not closed:
            problems.append((key, "unterminated ${ (write $${ for a literal ${)"))
        elif not _ENV_NAME_RE.match(name):
            problems.append((key, f"invalid environment variable reference ${{{name}}}"))
        elif not resolve:
            return f"\x00unresolved:{name}:{_secrets.token_hex(16)}"
        elif name not in env:
            problems.append((key, f"environment variable {name} is not set"))
        else:
            return env[name]
        return ""

    return _ENV_REF_RE.sub(replace, value)


def _is_secret_key(key: KeyPath) -> bool:
    """Whether ``key`` is a secret field of :class:`Config` (found through the classes)."""
    type_: Any = Config
    for part in key:
        type_ = _without_none(type_)
        if attrs.has(type_) and isinstance(part, str):
            fields = attrs.fields_dict(type_)
            if part not in fields:
                return False
            type_ = fields[part].type
        elif get_origin(type_) is dict:
            type_ = get_args(type_)[1]
        else:
            return False
    type_ = _without_none(type_)
    return get_origin(type_) is Annotated and any(
        isinstance(m, _Check) and m.secret for m in type_.__metadata__
    )


def _without_none(type_: Any) -> Any:
    if get_origin(type_) in (Union, types.UnionType):
        rest = [arg for arg in get_args(type_) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else type_
    return type_


def _inject_names(
    document: dict[str, Any], source: Path, problems: list[tuple[KeyPath, str]]
) -> None:
    """Fill the fields that come from outside the table: ``source`` and each agent's name."""
    if "source" in document:
        problems.append((("source",), "unknown key"))
    document["source"] = str(source)
    services = document.get("services")
    http = services.get("http") if isinstance(services, dict) else None
    if isinstance(http, dict):
        for name, table in http.items():
            if not _HTTP_SERVICE_RE.match(name):
                problems.append(
                    (("services", "http", name), f"service name must match {HTTP_SERVICE_PATTERN}")
                )
            if isinstance(table, dict):
                if "name" in table:
                    problems.append((("services", "http", name, "name"), "unknown key"))
                table["name"] = name
    agents = document.get("agents")
    if not isinstance(agents, dict):
        return
    for name, table in agents.items():
        if not _AGENT_NAME_RE.match(name):
            problems.append((("agents", name), f"agent name must match {AGENT_NAME_PATTERN}"))
        if isinstance(table, dict):
            if "name" in table:
                problems.append((("agents", name, "name"), "unknown key"))
            table["name"] = name


def _collect(exc: BaseException, key: KeyPath) -> list[tuple[KeyPath, str]]:
    """Walk cattrs' exception tree into ``(key path, message)`` pairs."""
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        found = [p for sub, note in with_notes for p in _collect(sub, (*key, note.name))]
        return found + [p for sub in without for p in _collect(sub, key)]
    if isinstance(exc, IterableValidationError):
        with_index, without = exc.group_exceptions()
        found = [p for sub, note in with_index for p in _collect(sub, (*key, note.index))]
        return found + [p for sub in without for p in _collect(sub, key)]
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [f.name for f in attrs.fields(exc.cl) if f.name not in _INJECTED]
        return [((*key, extra), _unknown_key(extra, known)) for extra in sorted(exc.extra_fields)]
    if isinstance(exc, _Invalid):
        return [((*key, *exc.subpath), exc.message)]
    if isinstance(exc, KeyError):
        return [(key, "required key is missing")]
    return [(key, f"invalid value ({exc})")]


_INJECTED = frozenset({"source", "name"})  # filled by _inject_names, never written in the file


def _unknown_key(key: str, known: Sequence[str]) -> str:
    """ "unknown key", with the key meant when one is close, else the keys there are."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]}?)"
    return f"unknown key (expected one of: {', '.join(known)})" if known else "unknown key"


def _resolve_paths(config: Config, base: Path) -> Config:
    def resolve(path: Path) -> Path:
        return Path(os.path.normpath(base / path))

    def maybe(path: Path | None) -> Path | None:
        return None if path is None else resolve(path)

    gateway = config.gateway
    return attrs.evolve(
        config,
        gateway=attrs.evolve(
            gateway,
            tls_cert=maybe(gateway.tls_cert),
            tls_key=maybe(gateway.tls_key),
            control_socket=maybe(gateway.control_socket),
        ),
        store=attrs.evolve(config.store, path=resolve(config.store.path)),
        audit=attrs.evolve(
            config.audit,
            key=maybe(config.audit.key),
            witness_file=maybe(config.audit.witness_file),
        ),
        policy=attrs.evolve(config.policy, file=resolve(config.policy.file)),
        agents={
            name: attrs.evolve(agent, policy=maybe(agent.policy))
            for name, agent in config.agents.items()
        },
        services=attrs.evolve(
            config.services,
            http={
                name: attrs.evolve(service, tools=resolve(service.tools), ca=maybe(service.ca))
                for name, service in config.services.http.items()
            },
        ),
    )


def _cross_check(config: Config, *, insecure: bool) -> list[tuple[KeyPath, str]]:
    problems: list[tuple[KeyPath, str]] = []
    if not config.agents:
        problems.append(
            (("agents",), "at least one agent is required ([agents.NAME] with a token)")
        )
    seen: dict[bytes, str] = {}
    for name, agent in config.agents.items():
        if (agent.token is None) == (agent.token_sha256 is None):
            problems.append((("agents", name), "expected exactly one of token or token_sha256"))
            continue
        field_name = "token" if agent.token is not None else "token_sha256"
        other = seen.setdefault(agent.digest, name)
        if other != name:
            problems.append(
                (
                    ("agents", name, field_name),
                    f"same token as {_format_path(('agents', other))} "
                    "(every agent needs its own token)",
                )
            )
    if not insecure:
        for tls_key in ("tls_cert", "tls_key"):
            tls_path: Path | None = getattr(config.gateway, tls_key)
            if tls_path is None:
                problems.append(
                    (
                        ("gateway", tls_key),
                        "required (TLS is mandatory; plain ws:// only with --insecure)",
                    )
                )
            else:
                problems.extend(_require_file(("gateway", tls_key), tls_path))
    problems.extend(_require_file(("policy", "file"), config.policy.file))
    for name, agent in config.agents.items():
        if agent.policy is not None:
            problems.extend(_require_file(("agents", name, "policy"), agent.policy))
    for name, service in config.services.http.items():
        problems.extend(_check_http_service(name, service))
    return problems


_AUTH_KEYS: Mapping[str, tuple[str, ...]] = {
    "none": (),
    "bearer": ("token",),
    "header": ("header", "token"),
    "basic": ("username", "password"),
}


def _check_http_service(name: str, service: HttpServiceConfig) -> list[tuple[KeyPath, str]]:
    key: KeyPath = ("services", "http", name)
    problems: list[tuple[KeyPath, str]] = []
    needed = _AUTH_KEYS[service.auth]
    for field_name in ("token", "header", "username", "password"):
        given = getattr(service, field_name) is not None
        if field_name in needed and not given:
            problems.append(((*key, field_name), f'required with auth = "{service.auth}"'))
        elif given and field_name not in needed:
            problems.append(
                ((*key, field_name), f'not used with auth = "{service.auth}": remove it')
            )
    if service.token is not None and any(c in service.token for c in "\r\n\x00"):
        problems.append(((*key, "token"), "must not contain line breaks or NUL"))
    problems.extend(_require_file((*key, "tools"), service.tools))
    if service.ca is not None:
        problems.extend(_require_file((*key, "ca"), service.ca))
        if urlsplit(service.base_url).scheme != "https":
            problems.append(((*key, "ca"), "only used with an https:// base_url"))
    return problems


def _require_file(key: KeyPath, path: Path) -> list[tuple[KeyPath, str]]:
    if path.is_file():
        return []
    if path.exists():
        return [(key, f"not a file: {path}")]
    return [(key, f"file not found: {path}")]


def _is_dict_type(type_: Any) -> bool:
    return get_origin(type_) is dict


def _make_converter() -> cattrs.Converter:
    """One converter for gate.toml: unknown keys forbidden, every field checked by its hook."""
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def is_checked(type_: Any) -> bool:
        return get_origin(type_) is Annotated and any(
            isinstance(m, _Check) for m in type_.__metadata__
        )

    def checked_hook(type_: Any) -> Callable[[Any, Any], Any]:
        check = next(m for m in type_.__metadata__ if isinstance(m, _Check))
        return lambda value, _: check.fn(value)

    def table_hook(cls: Any) -> Callable[[Any, Any], Any]:
        structure = make_dict_structure_fn(cls, converter)

        def hook(value: Any, type_: Any) -> Any:
            if not isinstance(value, dict):
                raise _Invalid(f"expected a table, got {_show(value)}")
            return structure(value, type_)

        return hook

    def mapping_hook(type_: Any) -> Callable[[Any, Any], Any]:
        structure = converter.gen_structure_mapping(type_)

        def hook(value: Any, type_: Any) -> Any:
            if not isinstance(value, dict):
                raise _Invalid(f"expected a table, got {_show(value)}")
            return structure(value, type_)

        return hook

    converter.register_structure_hook_factory(attrs.has, table_hook)
    converter.register_structure_hook_factory(_is_dict_type, mapping_hook)
    converter.register_structure_hook_factory(is_checked, checked_hook)
    return converter


_converter = _make_converter()
