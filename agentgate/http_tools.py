"""HTTP tools from configuration: a tools file in, checked tool specs and exact requests out.

An operator describes an HTTP API's tools in a YAML file named by ``[services.http.NAME]
tools`` (docs/services.md)::

    tools:
      - name: add_item                       # the tool is http_NAME_add_item
        description: Add an item to the shopping list.
        method: POST                         # GET, POST, PUT, PATCH or DELETE
        path: /buckets/home/collections/{list}/records
        args:                                # a JSON Schema per argument, plus where it goes
          list: {type: string, pattern: "^[a-z]+$"}          # in the path: {list}
          item: {type: string, maxLength: 100, in: body, field: data.item}
          note: {type: string, text: true, in: body, field: data.note, required: false}
        signature: [list, item, note]        # the order of the signature's parts (optional)

What the gateway guarantees for every such tool:

- **Argument-complete signatures.** ``http_shop_add_item(list=home, item=milk,
  note=sha256:…)``: every argument given is a ``key=value`` part, in the order of
  ``signature`` (every argument exactly once; default: as declared). A free-text argument
  (``text: true``: any character but controls other than newline and tab) is named by the
  sha256 of its value, so a glob cannot be steered by it and a grant covers only that text.
  Other strings follow the validation of every tool (no ``* ? [ ] ( ) ,``, no controls),
  so parts never run into each other. Absent optional arguments are left out.
- **Paths cannot move.** A path argument is checked against its schema, must not be empty,
  ``.`` or ``..``, nor hold ``/`` or ``\\`` (servers that decode ``%2F`` before routing would
  resolve ``..%2F``), and is percent-encoded whole (``?``, ``#``, ``%`` included): it stays
  one segment of the URL under ``base_url``, on its host.
- **The card shows the request as it is sent**: method, URL with its query, the
  authentication scheme (never the secret), and the JSON body byte for byte
  (:meth:`HttpTool.request` builds both the preview and what goes on the wire).

Errors in a tools file are :class:`~agentgate.config.ConfigError` lines naming the file and
the key path (``tools.yaml: tools[1].args.id.in: expected one of path, query, body``).

Imports: tools, config (ConfigError, the service's table), errors, policy (its YAML loader).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote, urlencode, urlsplit

import yaml
from attrs import frozen

from agentgate import tools
from agentgate.config import Config, ConfigError, HttpServiceConfig
from agentgate.errors import InvalidParams
from agentgate.policy import StrictLoader

__all__ = [
    "METHODS",
    "BuiltRequest",
    "HttpArg",
    "HttpTool",
    "http_tools",
    "known_tools",
    "load_tools_file",
]

METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE")
READ_METHODS: Final = frozenset({"GET"})
Where = Literal["path", "query", "body"]

_TOOL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_ARG_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*){0,3}$")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# What a path template may hold outside its placeholders: RFC 3986 path characters without
# '%' (no pre-encoded bytes to misread), '?' and '#' (query args go in `args`).
_PATH_TEXT = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")
_TYPES: Final = ("string", "integer", "number", "boolean")
_SCHEMA_KEYS: Final = frozenset(
    {
        "type",
        "description",
        "enum",
        "pattern",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
    }
)
_ARG_KEYS: Final = frozenset({"in", "required", "text", "field"}) | _SCHEMA_KEYS
_TOOL_KEYS: Final = (
    "name",
    "description",
    "method",
    "path",
    "args",
    "signature",
    "read_only",
    "destructive",
)
_DIGEST_CHARS = 32  # hex characters of sha256 naming a free-text value in a signature


@frozen
class HttpArg:
    """One argument of an HTTP tool: its JSON Schema, where it goes, how it is named."""

    name: str
    where: Where
    schema: Mapping[str, Any]
    required: bool = True
    text: bool = False
    field: tuple[str, ...] = ()  # its place in the JSON body (default: its name)


@frozen
class BuiltRequest:
    """One request exactly as it goes out, and as the approval card shows it."""

    method: str
    url: str  # base_url + the encoded path + the encoded query
    body: bytes | None

    def preview(self, auth: str) -> str:
        """The card's text: method and URL, the authentication (scheme only), the body."""
        lines = [f"{self.method} {self.url}"]
        if auth:
            lines.append(auth)
        if self.body is not None:
            lines += ["Content-Type: application/json", "", self.body.decode("utf-8")]
        return "\n".join(lines)


@frozen
class HttpTool:
    """One tool of a tools file, bound to its service's ``base_url``."""

    service: str
    short: str  # as written in the tools file
    description: str
    method: str
    path: str
    args: tuple[HttpArg, ...]
    order: tuple[str, ...]
    base_url: str
    read_only: bool
    destructive: bool
    auth: str = ""  # e.g. "Authorization: Bearer (the token in gate.toml, not shown)"

    @property
    def name(self) -> str:
        return f"http_{self.service}_{self.short}"

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the tool's arguments (what ``list_tools`` shows)."""
        properties = {}
        for arg in self.args:
            prop = {k: v for k, v in arg.schema.items() if k != "description"}
            description = arg.schema.get("description")
            where = f"in the {arg.where}" + (" (free text)" if arg.text else "")
            prop["description"] = f"{description} ({where})" if description else where
            properties[arg.name] = prop
        return {
            "type": "object",
            "properties": properties,
            "required": [arg.name for arg in self.args if arg.required],
            "additionalProperties": False,
        }

    def parts(self, args: Mapping[str, Any]) -> tuple[str, ...]:
        """The signature's parts for already validated ``args``."""
        by_name = {arg.name: arg for arg in self.args}
        out = []
        for name in self.order:
            if name in args:
                out.append(f"{name}={_part(by_name[name], args[name])}")
        return tuple(out)

    def spec(self) -> tools.ToolSpec:
        """The :class:`~agentgate.tools.ToolSpec` the gateway validates and signs with."""
        has_parts: bool | None = True
        if not self.args:
            has_parts = False
        elif not any(arg.required for arg in self.args):
            has_parts = None
        return tools.ToolSpec(
            name=self.name,
            description=self.description,
            schema=self.schema(),
            build=self.parts,
            has_parts=has_parts,
            text_args=frozenset(arg.name for arg in self.args if arg.text),
            read_only=self.read_only,
            destructive=self.destructive,
            title=f"{self.service}: {self.short.replace('_', ' ')}",
            preview=lambda args: self.request(args).preview(self.auth),
        )

    def request(self, args: Mapping[str, Any]) -> BuiltRequest:
        """The request for already validated ``args``; InvalidParams (-32602) for a path
        argument that would leave its segment (empty, ``.`` or ``..``)."""

        def segment(match: re.Match[str]) -> str:
            name = match.group(1)
            value = _text(args[name])
            if value in ("", ".", "..") or "/" in value or "\\" in value:
                raise InvalidParams(
                    f"{name}: a path argument cannot be empty, . or .., nor hold / or \\"
                    " (it names one path segment)"
                )
            return quote(value, safe="")

        path = _PLACEHOLDER.sub(segment, self.path)
        query = [
            (arg.name, _text(args[arg.name]))
            for arg in self.args
            if arg.where == "query" and arg.name in args
        ]
        url = self.base_url + path
        if query:
            url += "?" + urlencode(query, quote_via=quote)
        body: dict[str, Any] | None = None
        if self.method != "GET":
            body = {}
            for arg in self.args:
                if arg.where == "body" and arg.name in args:
                    _place(body, arg.field or (arg.name,), args[arg.name])
        data = None
        if body is not None and (body or self.method in ("POST", "PUT", "PATCH")):
            data = json.dumps(body, indent=2, ensure_ascii=False).encode("utf-8")
        return BuiltRequest(self.method, url, data)


def _text(value: Any) -> str:
    """A path or query value as text: strings as they are, numbers and booleans as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _part(arg: HttpArg, value: Any) -> str:
    if arg.text:
        digest = hashlib.sha256(str(value).encode("utf-8", "surrogatepass")).hexdigest()
        return f"sha256:{digest[:_DIGEST_CHARS]}"
    if isinstance(value, float) and value.is_integer() and arg.schema.get("type") == "integer":
        value = int(value)
    return _text(value)


def _place(body: dict[str, Any], field: tuple[str, ...], value: Any) -> None:
    target = body
    for key in field[:-1]:
        target = target.setdefault(key, {})
    target[field[-1]] = value


# -- loading ------------------------------------------------------------------------------------


def http_tools(config: Config) -> dict[str, HttpTool]:
    """Every HTTP tool of every ``[services.http.NAME]``, by name; ConfigError listing every
    problem of every tools file (file and key path) and every name used twice."""
    found: dict[str, HttpTool] = {}
    problems: list[str] = []
    for name, service in config.services.http.items():
        try:
            loaded = load_tools_file(service.tools, service)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        for tool in loaded:
            if tool.name in found or tool.name in tools.TOOLS:
                problems.append(
                    f"{_display(service.tools)}: tools: {tool.name} is also a tool of another"
                    f" service ([services.http.{name}]): rename one"
                )
            found[tool.name] = tool
    if problems:
        raise ConfigError(*problems)
    return found


def known_tools(config: Config) -> dict[str, tools.ToolSpec]:
    """Home Assistant's tools and the configuration's HTTP tools: what a policy can name."""
    return {**tools.TOOLS, **{name: t.spec() for name, t in http_tools(config).items()}}


def _auth_line(service: HttpServiceConfig) -> str:
    if service.auth == "bearer":
        return "Authorization: Bearer (the token in gate.toml, not shown)"
    if service.auth == "basic":
        return f"Authorization: Basic ({service.username} and the password in gate.toml)"
    if service.auth == "header":
        return f"{service.header}: (the token in gate.toml, not shown)"
    return ""


def load_tools_file(path: str | os.PathLike[str], service: HttpServiceConfig) -> list[HttpTool]:
    """The tools of one tools file for ``service``; ConfigError naming every problem."""
    label = _display(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{label}: cannot read: {reason}") from exc
    try:
        document = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{label}: invalid YAML: {where}{getattr(exc, 'problem', exc)}") from exc
    problems: list[str] = []
    loaded: list[HttpTool] = []
    if not isinstance(document, dict) or set(document) != {"tools"}:
        raise ConfigError(f"{label}: expected a mapping with one key, tools (a list of tools)")
    entries = document["tools"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{label}: tools: expected a non-empty list of tools")
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"tools[{index}]"
        try:
            tool = _tool(entry, where, service)
        except _Problems as exc:
            problems.extend(f"{label}: {line}" for line in exc.lines)
            continue
        if tool.short in seen:
            problems.append(f"{label}: {where}.name: {tool.short} is already a tool of this file")
        seen.add(tool.short)
        loaded.append(tool)
    if problems:
        raise ConfigError(*problems)
    return loaded


class _Problems(Exception):
    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


def _tool(entry: object, where: str, service: HttpServiceConfig) -> HttpTool:
    if not isinstance(entry, dict):
        raise _Problems([f"{where}: expected a mapping (name, description, method, path, args)"])
    problems: list[str] = []
    for key in entry:
        if key not in _TOOL_KEYS:
            problems.append(
                f"{where}: unknown key {_shown(key)} (expected {', '.join(_TOOL_KEYS)})"
            )
    for key in ("name", "description", "method", "path"):
        if key not in entry:
            problems.append(f"{where}: missing required key {key}")
    if problems:
        raise _Problems(problems)
    name, description, method, path = (entry[k] for k in ("name", "description", "method", "path"))
    if not isinstance(name, str) or not _TOOL_NAME.match(name):
        problems.append(f"{where}.name: expected {_TOOL_NAME.pattern}, got {_shown(name)}")
    if not isinstance(description, str) or not description.strip():
        problems.append(f"{where}.description: expected a non-empty string")
    if method not in METHODS:
        problems.append(
            f"{where}.method: expected one of {', '.join(METHODS)}, got {_shown(method)}"
        )
    placeholders: list[str] = []
    if not isinstance(path, str) or not path.startswith("/"):
        problems.append(f'{where}.path: expected a path starting with "/", got {_shown(path)}')
    else:
        placeholders = _placeholders(path, f"{where}.path", problems)
    raw_args = entry.get("args", {})
    if raw_args is None:
        raw_args = {}
    args: list[HttpArg] = []
    if not isinstance(raw_args, dict):
        problems.append(f"{where}.args: expected a mapping of argument name to its schema")
    else:
        for arg_name, raw in raw_args.items():
            arg = _arg(arg_name, raw, f"{where}.args.{arg_name}", placeholders, method, problems)
            if arg is not None:
                args.append(arg)
        for placeholder in placeholders:
            if placeholder not in raw_args:
                problems.append(f"{where}.path: {{{placeholder}}} is not an argument in args")
    order = tuple(arg.name for arg in args)
    if "signature" in entry:
        order = _order(entry["signature"], f"{where}.signature", raw_args, problems)
    read_only = _flag(entry, "read_only", method in READ_METHODS, where, problems)
    destructive = _flag(entry, "destructive", not read_only, where, problems)
    if read_only and method not in READ_METHODS:
        problems.append(f"{where}.read_only: a {method} request changes something: only GET reads")
    fields = [arg.field or (arg.name,) for arg in args if arg.where == "body"]
    for index, field in enumerate(fields):
        for other in fields[:index]:
            shorter = min(len(field), len(other))
            if field[:shorter] == other[:shorter]:
                problems.append(
                    f"{where}.args: body fields {'.'.join(other)} and {'.'.join(field)} overlap"
                )
    if problems:
        raise _Problems(problems)
    return HttpTool(
        service=service.name,
        short=str(name),
        description=str(description).strip(),
        method=str(method),
        path=str(path),
        args=tuple(args),
        order=order,
        base_url=service.base_url,
        read_only=read_only,
        destructive=destructive,
        auth=_auth_line(service),
    )


def _placeholders(path: str, where: str, problems: list[str]) -> list[str]:
    names = _PLACEHOLDER.findall(path)
    rest = _PLACEHOLDER.sub("x", path)
    if not _PATH_TEXT.match(rest) or "{" in rest or "}" in rest:
        problems.append(
            f"{where}: only letters, digits, - . _ ~ / and {{argument}} placeholders may appear"
            " (no ?, #, % or spaces: query arguments go in args with in: query)"
        )
    segments = rest.split("/")[1:]
    if any(segment in (".", "..") for segment in segments) or "//" in rest:
        problems.append(f"{where}: no empty, . or .. segments")
    for name in names:
        if not _ARG_NAME.match(name):
            problems.append(f"{where}: {{{name}}}: expected an argument name ({_ARG_NAME.pattern})")
    if len(set(names)) != len(names):
        problems.append(f"{where}: each placeholder may appear once")
    return names


def _arg(
    name: object, raw: object, where: str, placeholders: list[str], method: str, problems: list[str]
) -> HttpArg | None:
    if not isinstance(name, str) or not _ARG_NAME.match(name):
        problems.append(f"{where}: argument names must match {_ARG_NAME.pattern}")
        return None
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping (a JSON Schema, and in/required/text)")
        return None
    before = len(problems)
    for key in raw:
        if key not in _ARG_KEYS:
            known = ", ".join(sorted(_ARG_KEYS))
            problems.append(f"{where}: unknown key {_shown(key)} (expected one of {known})")
    in_path = name in placeholders
    default: Where = "path" if in_path else ("query" if method in ("GET", "DELETE") else "body")
    place = raw.get("in", default)
    if place not in ("path", "query", "body"):
        problems.append(f"{where}.in: expected one of path, query, body, got {_shown(place)}")
        return None
    if in_path and place != "path":
        problems.append(f"{where}.in: {{{name}}} is in the path: in must be path")
    if place == "path" and not in_path:
        problems.append(f"{where}.in: path, but the path has no {{{name}}}")
    if place == "body" and method == "GET":
        problems.append(f"{where}.in: a GET request has no body: use query")
    kind = raw.get("type")
    if kind not in _TYPES:
        problems.append(
            f"{where}.type: expected one of {', '.join(_TYPES)}, got {_shown(kind)}"
            " (arrays and objects are not supported yet)"
        )
    text = _flag(raw, "text", False, where, problems)
    if text and kind != "string":
        problems.append(f"{where}.text: only a string can be free text")
    if text and place == "path":
        problems.append(f"{where}.text: a path argument cannot be free text")
    required = _flag(raw, "required", True, where, problems)
    if in_path and not required:
        problems.append(f"{where}.required: a path argument is always required")
    field: tuple[str, ...] = ()
    if "field" in raw:
        value = raw["field"]
        if place != "body":
            problems.append(f"{where}.field: only a body argument has a field")
        elif not isinstance(value, str) or not _FIELD.match(value):
            problems.append(f"{where}.field: expected a dotted JSON key such as data.item")
        else:
            field = tuple(value.split("."))
    schema = {k: v for k, v in raw.items() if k in _SCHEMA_KEYS}
    _check_schema(schema, str(kind), where, problems)
    if len(problems) > before:
        return None
    if kind == "string" and place == "path":
        schema.setdefault("minLength", 1)
    return HttpArg(name, place, schema, required=required, text=text, field=field)


def _check_schema(schema: dict[str, Any], kind: str, where: str, problems: list[str]) -> None:
    for key in ("minLength", "maxLength"):
        value = schema.get(key)
        if value is not None and (not _is_int(value) or value < 0 or kind != "string"):
            problems.append(f"{where}.{key}: expected a non-negative integer, for a string")
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        value = schema.get(key)
        if value is not None and (not _is_number(value) or kind not in ("integer", "number")):
            problems.append(f"{where}.{key}: expected a number, for an integer or a number")
    pattern = schema.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str) or kind != "string":
            problems.append(f"{where}.pattern: expected a regular expression, for a string")
        else:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"{where}.pattern: not a regular expression: {exc}")
    enum = schema.get("enum")
    if enum is not None:
        python: dict[str, type | tuple[type, ...]] = {
            "string": str,
            "integer": int,
            "number": (int, float),
            "boolean": bool,
        }
        expected = python.get(kind)
        if (
            not isinstance(enum, list)
            or not enum
            or expected is None
            or not all(isinstance(item, expected) for item in enum)
            or (kind != "boolean" and any(isinstance(item, bool) for item in enum))
        ):
            problems.append(f"{where}.enum: expected a non-empty list of {kind} values")
    description = schema.get("description")
    if description is not None and not isinstance(description, str):
        problems.append(f"{where}.description: expected a string")


def _order(value: object, where: str, raw_args: object, problems: list[str]) -> tuple[str, ...]:
    names = list(raw_args) if isinstance(raw_args, dict) else []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        problems.append(f"{where}: expected a list of argument names")
        return ()
    missing = [name for name in names if name not in value]
    unknown = [item for item in value if item not in names]
    if missing:
        problems.append(
            f"{where}: leaves out {', '.join(missing)}: a signature names every argument"
            " (a free-text one by its digest)"
        )
    if unknown:
        problems.append(f"{where}: {', '.join(unknown)} is not an argument in args")
    if len(set(value)) != len(value):
        problems.append(f"{where}: names an argument twice")
    return tuple(value)


def _flag(
    entry: Mapping[str, Any], key: str, default: bool, where: str, problems: list[str]
) -> bool:
    value = entry.get(key, default)
    if not isinstance(value, bool):
        problems.append(f"{where}.{key}: expected true or false, got {_shown(value)}")
        return default
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shown(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _display(path: str | os.PathLike[str]) -> str:
    try:
        return os.fspath(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return os.fspath(path)


def origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of ``url``, for same-origin checks (default ports filled)."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port
