"""The registry of known tools: their JSON Schemas, argument validation and signatures.

Every request is validated here *before* its signature is built, so a signature is always
unambiguous and can be matched safely by the policy's fnmatch globs (docs/policy.md, "Validation"):

- ``args`` is a JSON object of bounded depth and size; every string in it, keys included and
  however deeply nested, is free of the glob and separator characters ``* ? [ ] ( ) ,`` and
  of control characters (0x00-0x1f, 0x7f);
- Home Assistant identifiers (``domain``, ``service``, ``entity_id``, ``event_type``) are
  strings matching ``^[a-z_][a-z0-9_]*(\\.[a-z0-9_]+)?$``; an ``entity_id`` needs the dot
  (``domain.object_id``), a ``domain`` or ``service`` has none;
- arguments outside a tool's schema are refused, except ``ha_call_service``'s service data,
  which passes through; its targeting keys other than ``entity_id`` (``area_id``,
  ``device_id``, ``floor_id``, ``label_id``, ``target``) are refused because a rule written
  for one entity would not see them.

**Every entity a service call can touch is in its signature** (:func:`references`): the named
``entity_id`` first, then every other entity reference anywhere in the service data, sorted and
de-duplicated - the keys or items of ``entities``, the items of ``snapshot_entities``, an
``entity_id`` nested at any depth, and any other string (value or key) that is an entity id of a
domain Home Assistant has (:data:`ENTITY_DOMAINS`). Each is compared the way Home Assistant
reads it (surrounding whitespace stripped, lowercased), so ``" Lock.Front_Door"`` counts. Where
Home Assistant expects an entity (``entity_id``, ``entities``, ``snapshot_entities``), anything
that is not one is refused. The policy then decides on the full signature *and* on each
reference alone (:func:`signature_checks`); the strictest decision wins.

Services that act on things their call does not name (scripts, automations, scenes, ...) are
*indirect* (:data:`INDIRECT_SERVICES`): cards say so, and the shipped policy asks for them.

Every refusal is :class:`~agentgate.errors.InvalidParams` (-32602) naming the argument.

Imports: errors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from attrs import frozen

from agentgate.errors import InvalidParams

__all__ = [
    "ENTITY_DOMAINS",
    "FORBIDDEN_CHARACTERS",
    "INDIRECT_SERVICES",
    "MAX_DEPTH",
    "MAX_ITEMS",
    "MAX_STRING_LENGTH",
    "TARGETING_KEYS",
    "TOOLS",
    "Reference",
    "Signature",
    "ToolSpec",
    "build_signature",
    "check_value",
    "grantable",
    "indirect_reason",
    "is_known_tool",
    "list_tools",
    "references",
    "signature",
    "signature_checks",
    "validate_args",
]

FORBIDDEN_CHARACTERS: Final = frozenset("*?[](),") | frozenset(map(chr, range(0x20))) | {"\x7f"}
"""Characters no string in ``args`` may contain: glob syntax, signature syntax, controls."""

MAX_DEPTH: Final = 8
"""Deepest nesting of objects/arrays in ``args`` (the ``args`` object itself is depth 1)."""

MAX_ITEMS: Final = 1000
"""Most values and keys ``args`` may hold in total."""

MAX_STRING_LENGTH: Final = 8192
"""Longest string (value or key) anywhere in ``args``."""

TARGETING_KEYS: Final = ("area_id", "device_id", "floor_id", "label_id", "target")
"""``ha_call_service`` keys that would target entities a signature does not name."""

ENTITY_DOMAINS: Final = frozenset(
    {
        # Home Assistant's entity platforms (homeassistant.const.Platform) ...
        "ai_task", "air_quality", "alarm_control_panel", "assist_satellite", "binary_sensor",
        "button", "calendar", "camera", "climate", "conversation", "cover", "date", "datetime",
        "device_tracker", "event", "fan", "geo_location", "humidifier", "image",
        "image_processing", "lawn_mower", "light", "lock", "mailbox", "media_player", "notify",
        "number", "remote", "scene", "select", "sensor", "siren", "stt", "switch", "text",
        "time", "todo", "tts", "update", "vacuum", "valve", "wake_word", "water_heater",
        "weather",
        # ... and the integrations whose entities live in their own domain.
        "alert", "automation", "counter", "group", "input_boolean", "input_button",
        "input_datetime", "input_number", "input_select", "input_text", "person", "plant",
        "proximity", "schedule", "script", "sun", "tag", "timer", "zone",
    }
)  # fmt: skip
"""Entity domains: a string ``domain.object_id`` of one of these is an entity reference."""

INDIRECT_SERVICES: Final[Mapping[str, str]] = {
    "script": "runs a script: what it does is not part of this call",
    "automation": "triggers or switches an automation, which can do anything",
    "scene": "sets every state the scene holds, named here or not",
    "homeassistant": "acts on entities of any domain, or on Home Assistant itself",
    "python_script": "runs Python code inside Home Assistant",
    "pyscript": "runs Python code inside Home Assistant",
    "shell_command": "runs a command on the Home Assistant host",
    "rest_command": "sends an HTTP request from Home Assistant",
    "conversation": 'Assist turns the text into actions ("unlock the front door")',
    "mqtt": "publishes a raw message that devices obey",
    "hassio": "controls add-ons and the Home Assistant host",
    "zwave_js": "sends raw commands to Z-Wave devices",
    "zha": "sends raw commands to Zigbee devices",
    "knx": "sends raw telegrams on the KNX bus",
    "modbus": "writes raw Modbus registers and coils",
    "homematic": "sets raw values on Homematic devices",
    "deconz": "writes raw attributes of deCONZ devices",
    "esphome": "runs an action a device defines",
    "google_assistant_sdk": "Google Assistant turns the text into actions",
}
"""Service domains that act on things their call does not name, and why (shown on cards)."""

_EVENT_IS_INDIRECT = "an event can trigger any automation"
# Indirect domains whose effect is fixed by the entities the signature names (a scene's
# states, an automation's definition), and the service data that keeps it so; for the others
# it is the data: the text Assist reads, a script's variables, the payload of a raw command.
# An automation triggered with `variables` or `skip_condition` does what the data says.
_GRANTABLE_INDIRECT: Final[Mapping[str, frozenset[str]]] = {
    "scene": frozenset({"entities", "snapshot_entities", "scene_id", "transition"}),
    "automation": frozenset(),
}

_IDENTIFIER = r"^[a-z_][a-z0-9_]*(\.[a-z0-9_]+)?$"
_ENTITY_ID = r"^[a-z_][a-z0-9_]*\.[a-z0-9_]+$"
_NAME = r"^[a-z_][a-z0-9_]*$"
_TOOL_NAME = re.compile(_NAME)
_ENTITY = re.compile(_ENTITY_ID)
# Keys under which Home Assistant expects entity ids (cv.entity_ids, scene's STATES_SCHEMA).
_ENTITY_KEYS: Final = frozenset({"entity_id", "entities", "snapshot_entities"})
_NOT_SERVICE_DATA: Final = frozenset({"domain", "service", "entity_id", "return_response"})
_AREA_ID = r"^[a-z0-9_]+$"

_ENTITY_ID_SCHEMA: Final = {
    "type": "string",
    "pattern": _ENTITY_ID,
    "description": "an entity id, domain.object_id, e.g. sensor.living_room",
}


@frozen
class ToolSpec:
    """One known tool: what ``list_tools`` shows and how its signature is built.

    ``schema`` is the JSON Schema of ``args`` (the subset the validator understands:
    ``type``, ``enum``, ``pattern``, ``minLength``, ``maxLength``, ``minimum``, ``maximum``,
    ``exclusiveMinimum``, ``exclusiveMaximum``, ``items``, ``minItems``, ``maxItems``,
    ``properties``, ``required``, ``additionalProperties``). ``has_parts`` says whether the
    signature has a parenthesised part list (``ha_get_state(sensor.temp)``), is the bare name
    (``ha_get_states``), or either (None: ``ha_list_entities`` with or without filters).

    ``text_args`` are free-text arguments (a template, a message): they may hold any character
    but controls other than newline and tab, because they never enter the signature as they
    are (a tool names them by length and digest, or leaves them to the card). ``read_only``
    and ``destructive`` become the MCP annotations; ``preview`` renders the request a call
    will send, for the approval card (HTTP tools).
    """

    name: str
    description: str
    schema: Mapping[str, Any]
    build: Callable[[Mapping[str, Any]], tuple[str, ...]]
    has_parts: bool | None = True
    # Every entity the call can touch (appended to build's parts), for tools whose arguments
    # can name several.
    references: Callable[[Mapping[str, Any]], tuple[Reference, ...]] | None = None
    text_args: frozenset[str] = frozenset()
    read_only: bool = False
    destructive: bool = True
    title: str = ""
    preview: Callable[[Mapping[str, Any]], str] | None = None

    def signature(self, args: Mapping[str, Any]) -> str:
        """The policy signature of already validated ``args``."""
        return self.build_signature(args).text

    def build_signature(self, args: Mapping[str, Any]) -> Signature:
        """The :class:`Signature` of already validated ``args``: ``build``'s parts, then the
        entities of ``references``."""
        refs = self.references(args) if self.references is not None else ()
        text = _format(self.name, self.build(args) + tuple(ref.entity_id for ref in refs))
        return Signature(text, signature_checks(text) if refs else (text,), refs)

    def to_wire(self) -> dict[str, Any]:
        """The ``list_tools`` entry: ``{"name", "description", "args", "annotations"}``
        (MCP's tool annotations: hints for clients, never a gate)."""
        annotations: dict[str, Any] = {
            "readOnlyHint": self.read_only,
            "destructiveHint": not self.read_only and self.destructive,
        }
        if self.title:
            annotations["title"] = self.title
        return {
            "name": self.name,
            "description": self.description,
            "args": dict(self.schema),
            "annotations": annotations,
        }


@frozen
class Reference:
    """An entity a call can touch, and where in its arguments it was found."""

    entity_id: str
    why: str  # e.g. "entity_id", "a key of entities", "the value at variables.door"
    path: str = "entity_id"  # where in the arguments: "entities", "variables.door"

    def __str__(self) -> str:
        return f"{self.entity_id} ({self.why})"


@frozen
class Signature:
    """A request's signature, the signatures the policy checks, and the entities behind them."""

    text: str
    checks: tuple[str, ...]  # ``text`` first, then one per entity reference
    references: tuple[Reference, ...] = ()


def _format(name: str, parts: tuple[str, ...]) -> str:
    return f"{name}({', '.join(parts)})" if parts else name


def signature_checks(text: str) -> tuple[str, ...]:
    """The signatures the policy decides on for signature ``text``: the text itself, and for a
    service call naming several entities, ``ha_call_service(domain.service, ENTITY)`` for each.

    Derived from the text alone (parts never contain ``, `` or parentheses), so a decision stays
    a pure function of the signature.
    """
    if not text.startswith("ha_call_service(") or not text.endswith(")"):
        return (text,)
    parts = text[len("ha_call_service(") : -1].split(", ")
    if len(parts) <= 2:
        return (text,)
    action = parts[0]
    return (text, *dict.fromkeys(f"ha_call_service({action}, {entity})" for entity in parts[1:]))


def _as_entity(text: str) -> str | None:
    """``text`` as Home Assistant would read it as an entity id, if it is one of a known domain."""
    candidate = text.strip().lower()
    if _ENTITY.match(candidate) and candidate.partition(".")[0] in ENTITY_DOMAINS:
        return candidate
    return None


def _expected_entity(text: str, path: str, what: str = "") -> str:
    """An entity id where Home Assistant expects one; anything else is refused."""
    candidate = text.strip().lower()
    if not _ENTITY.match(candidate):
        raise InvalidParams(
            f"{path}: {what}{_preview(text)} is not an entity id (domain.object_id):"
            " name each entity"
        )
    return candidate


def _call_service_references(args: Mapping[str, Any]) -> tuple[Reference, ...]:
    """The named ``entity_id`` first, then every other reference in the service data, sorted."""
    named = args.get("entity_id")
    found: dict[str, Reference] = {}

    def add(entity_id: str, why: str, path: str) -> None:
        if entity_id != named and entity_id not in found:
            found[entity_id] = Reference(entity_id, why, path)

    def expected(value: Any, path: str, *, keys: bool) -> None:
        # Where Home Assistant reads entity ids: a string, a list of them, or (``entities``) a
        # mapping keyed by them whose values are walked like any other data.
        if isinstance(value, str):
            add(_expected_entity(value, path), f"in {path}", path)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    visit(item, f"{path}[{index}]")
                elif isinstance(item, str):
                    add(_expected_entity(item, f"{path}[{index}]"), f"in {path}", path)
                else:
                    raise InvalidParams(f"{path}[{index}]: expected an entity id")
        elif keys and isinstance(value, dict):
            for key, item in value.items():
                add(_expected_entity(key, path, "key "), f"a key of {path}", path)
                visit(item, f"{path}.{key}")
        else:
            raise InvalidParams(f"{path}: expected an entity id or a list of entity ids")

    def visit(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                if key in _ENTITY_KEYS:
                    expected(item, where, keys=key != "entity_id")
                    continue
                entity = _as_entity(key)
                if entity is not None:
                    add(entity, f"the key {where}", where)
                visit(item, where)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                visit(item, f"{path}[{index}]")
        elif isinstance(value, str):
            entity = _as_entity(value)
            if entity is not None:
                add(entity, f"the value at {path}", path)

    visit({k: v for k, v in args.items() if k not in _NOT_SERVICE_DATA}, "")
    scene_id = args.get("scene_id")
    if isinstance(scene_id, str) and (args.get("domain"), args.get("service")) == (
        "scene",
        "create",
    ):
        # scene.create writes the scene scene.<scene_id> (replacing one of that name).
        if not _TOOL_NAME.match(scene_id):
            raise InvalidParams("scene_id: expected a slug such as evening_lights")
        add(f"scene.{scene_id}", "the scene scene_id creates or replaces", "scene_id")
    first = (Reference(named, "entity_id"),) if isinstance(named, str) else ()
    return first + tuple(found[entity] for entity in sorted(found))


def _object_schema(
    properties: Mapping[str, Any], required: tuple[str, ...] = (), **extra: Any
) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": dict(properties),
        "required": list(required),
        "additionalProperties": False,
    }
    schema.update(extra)
    return schema


_SPECS: Final = (
    ToolSpec(
        name="ha_get_state",
        description="Read the state and attributes of one Home Assistant entity.",
        schema=_object_schema({"entity_id": _ENTITY_ID_SCHEMA}, ("entity_id",)),
        build=lambda args: (args["entity_id"],),
        read_only=True,
        title="Read one Home Assistant entity",
    ),
    ToolSpec(
        name="ha_get_states",
        description="Read the states of every Home Assistant entity.",
        schema=_object_schema({}),
        build=lambda args: (),
        has_parts=False,
        read_only=True,
        title="Read every Home Assistant entity",
    ),
    ToolSpec(
        name="ha_call_service",
        description=(
            "Call a Home Assistant service (action) on one entity, e.g. light.turn_on for "
            "light.bedroom. Any other field is passed through as service data; every entity it "
            "names joins the request's signature. Targeting by area_id, device_id, floor_id, "
            "label_id or target is refused: name the entity."
        ),
        schema=_object_schema(
            {
                "domain": {"type": "string", "pattern": _NAME, "description": "e.g. light"},
                "service": {"type": "string", "pattern": _NAME, "description": "e.g. turn_on"},
                "entity_id": _ENTITY_ID_SCHEMA,
                "return_response": {
                    "type": "boolean",
                    "description": (
                        "true for services that return data (calendar.get_events,"
                        " weather.get_forecasts, todo.get_items): the answer is"
                        " {changed_states, service_response}"
                    ),
                },
            },
            ("domain", "service"),
            additionalProperties=True,
            propertyNames={"not": {"enum": list(TARGETING_KEYS)}},
        ),
        build=lambda args: (f"{args['domain']}.{args['service']}",),
        references=_call_service_references,
        title="Call a Home Assistant service",
    ),
    ToolSpec(
        name="ha_fire_event",
        description="Fire a Home Assistant event, with optional event data.",
        schema=_object_schema(
            {
                "event_type": {"type": "string", "pattern": _IDENTIFIER},
                "event_data": {"type": "object"},
            },
            ("event_type",),
        ),
        build=lambda args: (args["event_type"],),
        title="Fire a Home Assistant event",
    ),
    ToolSpec(
        name="ha_get_services",
        description="List the services (actions) Home Assistant offers.",
        schema=_object_schema({}),
        build=lambda args: (),
        has_parts=False,
        read_only=True,
        title="List Home Assistant services",
    ),
    ToolSpec(
        name="ha_get_config",
        description="Read Home Assistant's configuration (version, location, units).",
        schema=_object_schema({}),
        build=lambda args: (),
        has_parts=False,
        read_only=True,
        title="Read Home Assistant's configuration",
    ),
    ToolSpec(
        name="ha_get_history",
        description="Read the state history of one entity over the last `hours` (default 24).",
        schema=_object_schema(
            {
                "entity_id": _ENTITY_ID_SCHEMA,
                "hours": {"type": "number", "exclusiveMinimum": 0, "maximum": 168, "default": 24},
            },
            ("entity_id",),
        ),
        build=lambda args: (args["entity_id"],),
        read_only=True,
        title="Read an entity's history",
    ),
    ToolSpec(
        name="ha_render_template",
        description=(
            "Render a Home Assistant (Jinja) template, e.g. \"{{ states('sensor.x') }}\";"
            " the rendered text is the answer. A template can read anything Home Assistant"
            " knows, so the guardian usually reads it first."
        ),
        schema=_object_schema(
            {"template": {"type": "string", "minLength": 1, "maxLength": MAX_STRING_LENGTH}},
            ("template",),
        ),
        build=lambda args: (),
        has_parts=False,
        text_args=frozenset({"template"}),
        read_only=True,
        title="Render a Home Assistant template",
    ),
    ToolSpec(
        name="ha_list_areas",
        description="List Home Assistant's areas: [{area_id, name}].",
        schema=_object_schema({}),
        build=lambda args: (),
        has_parts=False,
        read_only=True,
        title="List Home Assistant areas",
    ),
    ToolSpec(
        name="ha_list_entities",
        description=(
            "List entities with their friendly names and areas: [{entity_id, name, area_id}],"
            " optionally only those in one area (its area_id, e.g. kitchen) and/or of one"
            " domain (e.g. light)."
        ),
        schema=_object_schema(
            {
                "area": {"type": "string", "pattern": _AREA_ID, "description": "an area_id"},
                "domain": {"type": "string", "pattern": _NAME, "description": "e.g. light"},
            }
        ),
        build=lambda args: tuple(f"{key}={args[key]}" for key in ("area", "domain") if key in args),
        has_parts=None,
        read_only=True,
        title="List Home Assistant entities",
    ),
    ToolSpec(
        name="ha_get_logbook",
        description=(
            "Read the logbook of one entity (what happened, and who or what did it) over the"
            " last `hours` (default 24, at most 168)."
        ),
        schema=_object_schema(
            {
                "entity_id": _ENTITY_ID_SCHEMA,
                "hours": {"type": "number", "exclusiveMinimum": 0, "maximum": 168, "default": 24},
            },
            ("entity_id",),
        ),
        build=lambda args: (args["entity_id"],),
        read_only=True,
        title="Read an entity's logbook",
    ),
)

TOOLS: Final[Mapping[str, ToolSpec]] = {spec.name: spec for spec in _SPECS}
"""Every tool the gateway knows how to execute, by name."""


def list_tools() -> list[dict[str, Any]]:
    """The ``list_tools`` result: ``[{"name", "description", "args": <JSON Schema>}]``."""
    return [spec.to_wire() for spec in TOOLS.values()]


def is_known_tool(tool: object) -> bool:
    """Whether ``tool`` names a tool of the registry."""
    return isinstance(tool, str) and tool in TOOLS


def validate_args(
    tool: object,
    args: object,
    *,
    allow_unknown: bool = False,
    specs: Mapping[str, ToolSpec] | None = None,
) -> None:
    """Check ``args`` for ``tool``; raise :class:`InvalidParams` naming what is wrong.

    An unknown tool is refused (``unknown tool: X``) unless ``allow_unknown`` is set, which
    only the policy tooling does (``agentgate check``): an unknown tool is never executed.
    Its arguments must then all be strings. ``specs`` are the tools known (default
    :data:`TOOLS`; a gateway passes its HTTP tools too).
    """
    signature(tool, args, allow_unknown=allow_unknown, specs=specs)


def signature(
    tool: object,
    args: object,
    *,
    allow_unknown: bool = False,
    specs: Mapping[str, ToolSpec] | None = None,
) -> str:
    """Validate ``args`` for ``tool`` and return the request's policy signature.

    Known tools use their own builder (``ha_call_service(light.turn_on, light.bedroom)``);
    unknown tools (only with ``allow_unknown``) list their string values in sorted-key order
    (``my_tool(v1, v2)``), or are the bare name without arguments.
    """
    return build_signature(tool, args, allow_unknown=allow_unknown, specs=specs).text


def build_signature(
    tool: object,
    args: object,
    *,
    allow_unknown: bool = False,
    specs: Mapping[str, ToolSpec] | None = None,
) -> Signature:
    """Validate ``args`` for ``tool``: its :class:`Signature`, with what the policy checks."""
    if not isinstance(tool, str):
        raise InvalidParams(f"tool must be a string, got {_json_type(tool)}")
    if not isinstance(args, dict):
        raise InvalidParams("args must be an object")
    spec = (TOOLS if specs is None else specs).get(tool)
    if spec is None:
        if not _TOOL_NAME.fullmatch(tool):
            raise InvalidParams(f"invalid tool name {_preview(tool)}: expected {_NAME}")
        if not allow_unknown:
            raise InvalidParams(f"unknown tool: {tool}")
    _check_tree(args, spec.text_args if spec is not None else frozenset())
    if spec is None:
        for key, value in args.items():
            if not isinstance(value, str):
                raise InvalidParams(
                    f"{key}: expected a string (unknown tool {tool}), got {_json_type(value)}"
                )
        text = _format(tool, tuple(args[key] for key in sorted(args)))
        return Signature(text, (text,))
    _check_schema(spec, args)
    return spec.build_signature(args)


def references(tool: str, args: Mapping[str, Any]) -> tuple[Reference, ...]:
    """Every entity already validated ``args`` can touch, with where each was found."""
    spec = TOOLS.get(tool)
    if spec is None or spec.references is None:
        return ()
    return spec.references(args)


def indirect_reason(tool: str, args: Mapping[str, Any]) -> str | None:
    """Why the call acts on things it does not name, or None (see :data:`INDIRECT_SERVICES`)."""
    if tool == "ha_fire_event":
        return _EVENT_IS_INDIRECT
    if tool == "ha_call_service":
        domain = args.get("domain")
        if isinstance(domain, str):
            return INDIRECT_SERVICES.get(domain)
    return None


def grantable(tool: str, args: Mapping[str, Any]) -> bool:
    """Whether "Allow 1 h" may cover this call: not where the signature leaves out what the call
    does (scripts, Assist, raw device and shell commands, events, templates), since one grant
    would approve any data for an hour."""
    if tool in ("ha_fire_event", "ha_render_template"):
        return False
    domain = args.get("domain") if tool == "ha_call_service" else None
    if domain not in INDIRECT_SERVICES:
        return True
    data = _GRANTABLE_INDIRECT.get(str(domain))
    return data is not None and set(args) - _NOT_SERVICE_DATA <= data


def _check_schema(spec: ToolSpec, args: dict[str, Any]) -> None:
    schema = spec.schema
    properties: Mapping[str, Any] = schema["properties"]
    for name in schema["required"]:
        if name not in args:
            raise InvalidParams(f"{name}: required argument missing")
    if spec.name == "ha_call_service":
        for key in TARGETING_KEYS:
            if key in args:
                raise InvalidParams(
                    f"targeting by {key} is not allowed: name the entity with entity_id"
                )
    if not schema["additionalProperties"]:
        for key in args:
            if key not in properties:
                allowed = ", ".join(properties) or "none"
                raise InvalidParams(f"{key}: unknown argument for {spec.name} (allowed: {allowed})")
    for name, prop in properties.items():
        if name in args:
            check_value(name, args[name], prop)


_IDENTIFIER_PATTERNS: Final = frozenset({_IDENTIFIER, _ENTITY_ID, _NAME, _AREA_ID})


def check_value(name: str, value: Any, prop: Mapping[str, Any]) -> None:
    """Check one argument against its JSON Schema (the subset :class:`ToolSpec` names);
    :class:`InvalidParams` naming ``name`` (a path such as ``tags[2]``) if it does not fit."""
    expected = prop.get("type")
    got = _json_type(value)
    if expected == "integer":
        if got != "number" or not (isinstance(value, int) or value.is_integer()):
            raise InvalidParams(f"{name}: expected an integer, got {_shown_type(value)}")
    elif expected is not None and got != expected:
        raise InvalidParams(f"{name}: expected {_article(expected)}, got {got}")
    enum = prop.get("enum")
    if enum is not None and not any(value == item and type(value) is type(item) for item in enum):
        choices = ", ".join(_preview(str(item)) for item in enum)
        raise InvalidParams(f"{name}: expected one of {choices}, got {_preview(str(value))}")
    if isinstance(value, str):
        _check_text(name, value, prop)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        _check_number(name, value, prop)
    elif isinstance(value, list):
        low, high = prop.get("minItems"), prop.get("maxItems")
        if low is not None and len(value) < low:
            raise InvalidParams(f"{name}: expected at least {low} items, got {len(value)}")
        if high is not None and len(value) > high:
            raise InvalidParams(f"{name}: expected at most {high} items, got {len(value)}")
        items = prop.get("items")
        if items is not None:
            for index, item in enumerate(value):
                check_value(f"{name}[{index}]", item, items)


def _check_text(name: str, value: str, prop: Mapping[str, Any]) -> None:
    pattern = prop.get("pattern")
    if pattern is not None and not re.fullmatch(pattern, value):
        if pattern in _IDENTIFIER_PATTERNS:
            hint = "domain.object_id, " if pattern == _ENTITY_ID else ""
            raise InvalidParams(
                f"{name}: invalid identifier {_preview(value)}: expected {hint}"
                f"lowercase letters, digits and underscores ({pattern})"
            )
        raise InvalidParams(f"{name}: {_preview(value)} does not match {pattern}")
    low, high = prop.get("minLength"), prop.get("maxLength")
    if low is not None and len(value) < low:
        raise InvalidParams(f"{name}: expected at least {low} characters, got {len(value)}")
    if high is not None and len(value) > high:
        raise InvalidParams(f"{name}: expected at most {high} characters, got {len(value)}")


def _check_number(name: str, value: float, prop: Mapping[str, Any]) -> None:
    low = prop.get("exclusiveMinimum")
    high = prop.get("maximum")
    if (low is not None and not value > low) or (high is not None and not value <= high):
        if low is not None and high is not None:
            raise InvalidParams(
                f"{name}: must be greater than {low} and at most {high}, got {value}"
            )
        bound = f"greater than {low}" if low is not None else f"at most {high}"
        raise InvalidParams(f"{name}: must be {bound}, got {value}")
    minimum, below = prop.get("minimum"), prop.get("exclusiveMaximum")
    if minimum is not None and not value >= minimum:
        raise InvalidParams(f"{name}: must be at least {minimum}, got {value}")
    if below is not None and not value < below:
        raise InvalidParams(f"{name}: must be less than {below}, got {value}")


def _shown_type(value: Any) -> str:
    kind = _json_type(value)
    return f"{kind} {value!r}" if kind == "number" else kind


def _check_tree(args: dict[str, Any], text_args: frozenset[str] = frozenset()) -> None:
    """Walk ``args``: JSON types only, bounded depth and size, no forbidden character (in a
    free-text argument, ``text_args``, no control character but newline and tab)."""
    budget = [MAX_ITEMS]

    def visit(value: Any, path: str, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise InvalidParams(f"args too large: more than {MAX_ITEMS} values")
        if isinstance(value, str):
            if depth == 1 and path in text_args:
                _check_free_text(value, path)
            else:
                _check_string(value, path or "args", what="")
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise InvalidParams(f"{path or 'args'}: nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise InvalidParams(f"{path or 'args'}: object keys must be strings")
                    _check_string(key, path or "args", what=f"key {_preview(key)} in ")
                    budget[0] -= 1
                    visit(item, f"{path}.{key}" if path else key, depth + 1)
            else:
                for index, item in enumerate(value):
                    visit(item, f"{path}[{index}]", depth + 1)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidParams(f"{path}: numbers must be finite, got {value}")
        elif value is not None and not isinstance(value, bool | int):
            raise InvalidParams(f"{path}: not a JSON value ({type(value).__name__})")

    visit(args, "", 0)


_TEXT_FORBIDDEN: Final = frozenset(map(chr, range(0x20))) - {"\n", "\t"} | {"\x7f"}


def _check_free_text(text: str, path: str) -> None:
    if len(text) > MAX_STRING_LENGTH:
        raise InvalidParams(f"{path}: string longer than {MAX_STRING_LENGTH} characters")
    for char in text:
        if char in _TEXT_FORBIDDEN:
            raise InvalidParams(f"{path}: forbidden character {char!r} (U+{ord(char):04X})")


def _check_string(text: str, path: str, *, what: str) -> None:
    if len(text) > MAX_STRING_LENGTH:
        raise InvalidParams(f"{what}{path}: string longer than {MAX_STRING_LENGTH} characters")
    for char in text:
        if char in FORBIDDEN_CHARACTERS:
            shown = repr(char) if char.isprintable() else f"{char!r} (U+{ord(char):04X})"
            raise InvalidParams(f"{what}{path}: forbidden character {shown}")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _article(type_name: str) -> str:
    return f"an {type_name}" if type_name[0] in "aeiou" else f"a {type_name}"


def _preview(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
