"""The tool registry: schemas, argument validation and signatures (docs/policy.md)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentgate.errors import InvalidParams
from agentgate.tools import (
    FORBIDDEN_CHARACTERS,
    INDIRECT_SERVICES,
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_STRING_LENGTH,
    TARGETING_KEYS,
    TOOLS,
    build_signature,
    grantable,
    indirect_reason,
    is_known_tool,
    list_tools,
    signature,
    signature_checks,
    validate_args,
)


def rejected(tool: object, args: object, *, allow_unknown: bool = False) -> str:
    with pytest.raises(InvalidParams) as info:
        validate_args(tool, args, allow_unknown=allow_unknown)
    assert info.value.code == -32602
    return info.value.message


def call(**extra: Any) -> dict[str, Any]:
    return {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom", **extra}


# --- signatures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        ("ha_get_state", {"entity_id": "sensor.temp"}, "ha_get_state(sensor.temp)"),
        ("ha_get_states", {}, "ha_get_states"),
        ("ha_get_services", {}, "ha_get_services"),
        ("ha_get_config", {}, "ha_get_config"),
        (
            "ha_call_service",
            call(brightness=120, rgb_color=[1, 2, 3]),
            "ha_call_service(light.turn_on, light.bedroom)",
        ),
        (
            "ha_call_service",
            {"domain": "scene", "service": "turn_on"},
            "ha_call_service(scene.turn_on)",
        ),
        ("ha_fire_event", {"event_type": "my_event"}, "ha_fire_event(my_event)"),
        (
            "ha_fire_event",
            {"event_type": "my.event", "event_data": {"a": [1, {"b": None}]}},
            "ha_fire_event(my.event)",
        ),
        ("ha_get_history", {"entity_id": "sensor.temp"}, "ha_get_history(sensor.temp)"),
        (
            "ha_get_history",
            {"entity_id": "sensor.temp", "hours": 168},
            "ha_get_history(sensor.temp)",
        ),
        (
            "ha_get_history",
            {"entity_id": "sensor.temp", "hours": 0.5},
            "ha_get_history(sensor.temp)",
        ),
    ],
)
def test_signatures_of_known_tools(tool: str, args: dict[str, Any], expected: str) -> None:
    assert signature(tool, args) == expected
    assert TOOLS[tool].signature(args) == expected


def test_unknown_tool_signature_uses_sorted_keys() -> None:
    args = {"zeta": "last", "alpha": "first", "mid": "middle"}
    assert signature("my_tool", args, allow_unknown=True) == "my_tool(first, middle, last)"
    assert signature("my_tool", {}, allow_unknown=True) == "my_tool"


def test_unknown_tool_is_refused_for_execution() -> None:
    assert rejected("my_tool", {}) == "unknown tool: my_tool"
    assert not is_known_tool("my_tool")
    assert is_known_tool("ha_get_state")


@pytest.mark.parametrize("value", [1, 1.5, True, None, ["a"], {"a": "b"}])
def test_unknown_tool_values_must_be_strings(value: object) -> None:
    assert "expected a string" in rejected("my_tool", {"x": value}, allow_unknown=True)


@pytest.mark.parametrize("name", ["My_tool", "1tool", "tool-x", "tool.x", "", "tool(x)", "t\n"])
def test_tool_names_must_be_lowercase_identifiers(name: str) -> None:
    assert "invalid tool name" in rejected(name, {}, allow_unknown=True)


def test_tool_must_be_a_string() -> None:
    assert rejected(["ha_get_state"], {}) == "tool must be a string, got array"


# --- shape ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [[], "x", 1, None, True])
def test_args_must_be_an_object(args: object) -> None:
    assert rejected("ha_get_states", args) == "args must be an object"


@pytest.mark.parametrize(
    ("tool", "args", "missing"),
    [
        ("ha_get_state", {}, "entity_id"),
        ("ha_get_history", {"hours": 3}, "entity_id"),
        ("ha_fire_event", {"event_data": {}}, "event_type"),
        ("ha_call_service", {"service": "turn_on"}, "domain"),
        ("ha_call_service", {"domain": "light"}, "service"),
    ],
)
def test_required_arguments(tool: str, args: dict[str, Any], missing: str) -> None:
    assert rejected(tool, args) == f"{missing}: required argument missing"


@pytest.mark.parametrize(
    ("tool", "args", "extra"),
    [
        ("ha_get_state", {"entity_id": "sensor.t", "attribute": "x"}, "attribute"),
        ("ha_get_states", {"filter": "x"}, "filter"),
        ("ha_get_history", {"entity_id": "sensor.t", "days": 1}, "days"),
        ("ha_fire_event", {"event_type": "e", "data": {}}, "data"),
    ],
)
def test_arguments_outside_the_schema(tool: str, args: dict[str, Any], extra: str) -> None:
    assert rejected(tool, args).startswith(f"{extra}: unknown argument for {tool}")


def test_service_data_passes_through() -> None:
    validate_args("ha_call_service", call(brightness_pct=50, transition=2.5, flash="short"))


@pytest.mark.parametrize("key", TARGETING_KEYS)
def test_targeting_keys_are_refused(key: str) -> None:
    message = rejected("ha_call_service", call(**{key: "kitchen"}))
    assert message == f"targeting by {key} is not allowed: name the entity with entity_id"
    # even without entity_id, and whatever the value's type
    assert "targeting" in rejected(
        "ha_call_service", {"domain": "light", "service": "turn_on", key: ["a", "b"]}
    )


def test_entity_id_must_be_a_single_string() -> None:
    message = rejected("ha_call_service", call(entity_id=["light.a", "light.b"]))
    assert message == "entity_id: expected a string, got array"


# --- identifiers ---------------------------------------------------------------------------

IDENTIFIER_ARGS = [
    ("ha_get_state", {}, "entity_id"),
    ("ha_get_history", {}, "entity_id"),
    ("ha_fire_event", {}, "event_type"),
    ("ha_call_service", {"domain": "light", "service": "turn_on"}, "entity_id"),
    ("ha_call_service", {"service": "turn_on"}, "domain"),
    ("ha_call_service", {"domain": "light"}, "service"),
]


@pytest.mark.parametrize(("tool", "base", "name"), IDENTIFIER_ARGS)
@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (1, "number"),
        (1.5, "number"),
        (True, "boolean"),
        (False, "boolean"),
        (None, "null"),
        (["light.x"], "array"),
        ({"a": "b"}, "object"),
    ],
)
def test_identifiers_must_be_strings_never_stringified(
    tool: str, base: dict[str, Any], name: str, value: object, kind: str
) -> None:
    assert rejected(tool, {**base, name: value}) == f"{name}: expected a string, got {kind}"


@pytest.mark.parametrize(("tool", "base", "name"), IDENTIFIER_ARGS)
@pytest.mark.parametrize("value", ["", "Light.x", "light x", "1light.x", "light.x.y", "light-x"])
def test_identifiers_must_match_the_pattern(
    tool: str, base: dict[str, Any], name: str, value: str
) -> None:
    assert rejected(tool, {**base, name: value}).startswith(f"{name}: invalid identifier")


@pytest.mark.parametrize("tool", ["ha_get_state", "ha_get_history"])
def test_entity_id_needs_a_dot(tool: str) -> None:
    assert "domain.object_id" in rejected(tool, {"entity_id": "all"})


def test_entity_id_all_cannot_target_everything() -> None:
    assert "invalid identifier" in rejected("ha_call_service", call(entity_id="all"))


@pytest.mark.parametrize("name", ["domain", "service"])
def test_domain_and_service_have_no_dot(name: str) -> None:
    assert "invalid identifier" in rejected("ha_call_service", call(**{name: "a.b"}))


def test_event_type_may_have_one_dot() -> None:
    validate_args("ha_fire_event", {"event_type": "my_integration.ping"})


@pytest.mark.parametrize("hours", [0, -1, 168.01, 1000, float("inf")])
def test_history_hours_range(hours: float) -> None:
    message = rejected("ha_get_history", {"entity_id": "sensor.t", "hours": hours})
    assert message.startswith("hours:")


@pytest.mark.parametrize("hours", ["24", True, None, [24]])
def test_history_hours_must_be_a_number(hours: object) -> None:
    message = rejected("ha_get_history", {"entity_id": "sensor.t", "hours": hours})
    assert message.startswith("hours: expected a number")


def test_event_data_must_be_an_object() -> None:
    assert rejected("ha_fire_event", {"event_type": "e", "event_data": []}) == (
        "event_data: expected an object, got array"
    )


# --- forbidden characters ------------------------------------------------------------------


@pytest.mark.parametrize("char", sorted("*?[](),"))
def test_each_forbidden_character_in_identifiers(char: str) -> None:
    assert rejected("ha_get_state", {"entity_id": f"sensor.a{char}"}) == (
        f"entity_id: forbidden character {char!r}"
    )


@pytest.mark.parametrize("code", [*range(0x20), 0x7F])
def test_each_control_character(code: int) -> None:
    char = chr(code)
    message = rejected("ha_call_service", call(message=f"hello{char}"))
    assert message == f"message: forbidden character {char!r} (U+{code:04X})"


def test_forbidden_set_is_exactly_the_documented_one() -> None:
    expected = set("*?[](),") | {chr(c) for c in range(0x20)} | {"\x7f"}
    assert expected == FORBIDDEN_CHARACTERS


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (call(data={"a": {"b": ["ok", "x*"]}}), "data.a.b[1]: forbidden character '*'"),
        (call(data={"a(": 1}), "key 'a(' in data: forbidden character '('"),
        (call(**{"bad,key": 1}), "key 'bad,key' in args: forbidden character ','"),
        (call(colors=["red", "gr?en"]), "colors[1]: forbidden character '?'"),
    ],
)
def test_forbidden_characters_in_service_data_nested_and_keys(
    args: dict[str, Any], expected: str
) -> None:
    assert rejected("ha_call_service", args) == expected


def test_forbidden_characters_in_event_data() -> None:
    args = {"event_type": "e", "event_data": {"note": "a]"}}
    assert rejected("ha_fire_event", args) == "event_data.note: forbidden character ']'"


def test_forbidden_characters_in_unknown_tool_values() -> None:
    message = rejected("my_tool", {"x": "a)b"}, allow_unknown=True)
    assert message == "x: forbidden character ')'"


# --- bounds --------------------------------------------------------------------------------


def test_nesting_depth_is_bounded() -> None:
    value: Any = "leaf"
    for _ in range(MAX_DEPTH - 1):
        value = [value]
    validate_args("ha_call_service", call(data=value))  # args + 7 levels: allowed
    message = rejected("ha_call_service", call(data=[value]))
    assert message.endswith(f"nested deeper than {MAX_DEPTH} levels")


def test_total_size_is_bounded() -> None:
    message = rejected("ha_call_service", call(data=list(range(MAX_ITEMS))))
    assert message == f"args too large: more than {MAX_ITEMS} values"


def test_string_length_is_bounded() -> None:
    message = rejected("ha_call_service", call(text="x" * (MAX_STRING_LENGTH + 1)))
    assert message == f"text: string longer than {MAX_STRING_LENGTH} characters"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_numbers_must_be_finite(value: float) -> None:
    assert "finite" in rejected("ha_call_service", call(level=value))


@pytest.mark.parametrize("value", [(1, 2), {1, 2}, b"x", object()])
def test_non_json_values_are_refused(value: object) -> None:
    assert "not a JSON value" in rejected("ha_call_service", call(data=value))


def test_non_string_keys_are_refused() -> None:
    assert rejected("ha_call_service", call(data={1: "x"})) == "data: object keys must be strings"


# --- list_tools ----------------------------------------------------------------------------


def test_list_tools_wire_shape() -> None:
    listed = list_tools()
    assert [entry["name"] for entry in listed] == list(TOOLS)
    assert set(TOOLS) == {
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
    for entry in listed:
        assert set(entry) == {"name", "description", "args", "annotations"}
        assert entry["args"]["type"] == "object"
        assert entry["description"]
    by_name = {entry["name"]: entry["args"] for entry in listed}
    assert by_name["ha_call_service"]["required"] == ["domain", "service"]
    assert by_name["ha_call_service"]["additionalProperties"] is True
    assert by_name["ha_get_state"]["additionalProperties"] is False
    assert by_name["ha_get_history"]["properties"]["hours"]["default"] == 24


# --- property: nothing but InvalidParams ----------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)
identifier_like = st.sampled_from(["light", "turn_on", "light.bedroom", "sensor.t", "e", "all"])
arg_names = st.sampled_from(
    ["entity_id", "domain", "service", "event_type", "event_data", "hours", "area_id", "target"]
) | st.text(max_size=8)
tool_names = st.sampled_from([*TOOLS, "my_tool"]) | st.text(max_size=10)
random_args = st.dictionaries(arg_names, json_values | identifier_like, max_size=6)


@settings(max_examples=400, deadline=None)
@given(tool=tool_names, args=random_args | json_values, allow_unknown=st.booleans())
def test_validation_never_raises_anything_but_invalid_params(
    tool: str, args: object, allow_unknown: bool
) -> None:
    try:
        result = signature(tool, args, allow_unknown=allow_unknown)
    except InvalidParams as exc:
        code, message = exc.code, exc.message
    else:
        code, message = 0, "ok"
        assert isinstance(result, str)
        assert result.startswith(tool)
        assert not (set(result) & (FORBIDDEN_CHARACTERS - set("(),")))
    assert code in (0, -32602)
    assert message


# --- every entity a service call names is in its signature (issue: a deny nothing can break) ---


def refs(**data: Any) -> list[tuple[str, str]]:
    args = {"domain": "script", "service": "turn_on", **data}
    return [(r.entity_id, r.why) for r in build_signature("ha_call_service", args).references]


def test_the_named_entity_comes_first_then_the_rest_sorted_and_once() -> None:
    args = {
        "domain": "scene",
        "service": "apply",
        "entity_id": "scene.evening",
        "entities": {"lock.front_door": "unlocked", "light.kitchen": "on", "scene.evening": 1},
        "snapshot_entities": ["light.kitchen", "cover.garage"],
    }
    found = build_signature("ha_call_service", args)
    assert found.text == (
        "ha_call_service(scene.apply, scene.evening, cover.garage, light.kitchen, lock.front_door)"
    )
    assert found.checks == (
        found.text,
        "ha_call_service(scene.apply, scene.evening)",
        "ha_call_service(scene.apply, cover.garage)",
        "ha_call_service(scene.apply, light.kitchen)",
        "ha_call_service(scene.apply, lock.front_door)",
    )
    assert [r.why for r in found.references] == [
        "entity_id",
        "in snapshot_entities",
        "a key of entities",
        "a key of entities",
    ]


def test_without_entity_id_the_references_follow_the_service() -> None:
    args = {"domain": "scene", "service": "apply", "entities": {"lock.front_door": "unlocked"}}
    assert signature("ha_call_service", args) == "ha_call_service(scene.apply, lock.front_door)"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"vars": {"door": "lock.front_door"}}, ("lock.front_door", "the value at vars.door")),
        ({"a": [{"b": {"entity_id": ["switch.x"]}}]}, ("switch.x", "in a[0].b.entity_id")),
        ({"entities": ["light.a"]}, ("light.a", "in entities")),
        ({"entities": [{"entity_id": "light.b"}]}, ("light.b", "in entities[0].entity_id")),
        ({"v": "  Lock.Front_Door "}, ("lock.front_door", "the value at v")),  # HA strips, lowers
        ({"v": "loc\u212a.front_door"}, ("lock.front_door", "the value at v")),  # Kelvin sign
        ({"lock.front_door": 1}, ("lock.front_door", "the key lock.front_door")),
        ({"snapshot_entities": "lock.front_door"}, ("lock.front_door", "in snapshot_entities")),
    ],
)  # fmt: skip
def test_references_anywhere_in_service_data(
    data: dict[str, Any], expected: tuple[str, str]
) -> None:
    assert refs(**data) == [expected]


@pytest.mark.parametrize(
    "value", ["v1.2", "foo.bar", "hello", "light", "lock.", "no.such_domain", "1.5", "a.b.c"]
)
def test_other_strings_are_not_references(value: str) -> None:
    assert refs(message=value) == []


@pytest.mark.parametrize(
    "data",
    [
        {"x": {"entity_id": "all"}},
        {"x": {"entity_id": "not an entity"}},
        {"x": {"entity_id": 5}},
        {"entities": {"all": "on"}},
        {"snapshot_entities": [1]},
        {"entities": [["light.a"]]},
    ],
)
def test_where_home_assistant_expects_entities_anything_else_is_refused(
    data: dict[str, Any],
) -> None:
    with pytest.raises(InvalidParams, match="entity id"):
        refs(**data)


def test_other_tools_have_their_entity_alone() -> None:
    found = build_signature("ha_get_state", {"entity_id": "sensor.x"})
    assert (found.text, found.checks, found.references) == (
        "ha_get_state(sensor.x)",
        ("ha_get_state(sensor.x)",),
        (),
    )


def test_signature_checks_come_from_the_text_alone() -> None:
    assert signature_checks("ha_get_states") == ("ha_get_states",)
    assert signature_checks("ha_call_service(light.turn_on, light.x)") == (
        "ha_call_service(light.turn_on, light.x)",
    )
    assert signature_checks("ha_call_service(a.b, x.y, x.y)") == (
        "ha_call_service(a.b, x.y, x.y)",
        "ha_call_service(a.b, x.y)",
    )


@pytest.mark.parametrize(
    ("args", "indirect"),
    [
        ({"domain": "script", "service": "turn_on"}, True),
        ({"domain": "scene", "service": "apply"}, True),
        ({"domain": "shell_command", "service": "reboot"}, True),
        ({"domain": "conversation", "service": "process"}, True),
        ({"domain": "light", "service": "turn_on"}, False),
    ],
)
def test_indirect_services_are_marked(args: dict[str, Any], indirect: bool) -> None:
    assert (indirect_reason("ha_call_service", args) is not None) == indirect
    assert set(INDIRECT_SERVICES) >= {
        "script",
        "automation",
        "scene",
        "homeassistant",
        "python_script",
        "shell_command",
        "rest_command",
        "pyscript",
    }
    assert indirect_reason("ha_fire_event", {"event_type": "x"}) is not None
    assert indirect_reason("ha_get_state", {"entity_id": "sensor.x"}) is None


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.integers() | st.text(max_size=30) | st.sampled_from(["lock.a", "light.b"]),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
        max_leaves=20,
    )
)
def test_every_reference_is_checked_alone(data: Any) -> None:
    args = {"domain": "script", "service": "x", "data": data}
    try:
        found = build_signature("ha_call_service", args)
    except InvalidParams:
        return
    entities = [r.entity_id for r in found.references]
    assert len(entities) == len(set(entities))
    for entity in entities:
        assert entity in found.text
        assert f"ha_call_service(script.x, {entity})" in found.checks
    if "lock.a" in json.dumps(data):
        assert "lock.a" in entities


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        ("ha_call_service", {"domain": "light", "service": "turn_on"}, True),
        ("ha_call_service", {"domain": "scene", "service": "apply"}, True),  # names its entities
        ("ha_call_service", {"domain": "automation", "service": "trigger"}, True),
        ("ha_call_service", {"domain": "automation", "service": "trigger", "variables": {}}, False),
        (
            "ha_call_service",
            {"domain": "automation", "service": "trigger", "skip_condition": True},
            False,
        ),
        (
            "ha_call_service",
            {"domain": "scene", "service": "apply", "entities": {"light.a": "on"}},
            True,
        ),
        ("ha_call_service", {"domain": "scene", "service": "create", "scene_id": "x"}, True),
        ("ha_call_service", {"domain": "script", "service": "turn_on"}, False),  # its variables
        ("ha_call_service", {"domain": "conversation", "service": "process"}, False),  # its text
        ("ha_call_service", {"domain": "mqtt", "service": "publish"}, False),
        ("ha_fire_event", {"event_type": "x"}, False),  # its event_data
        ("ha_get_state", {"entity_id": "sensor.x"}, True),
    ],
)
def test_allow_for_an_hour_only_where_the_signature_says_what_runs(
    tool: str, args: dict[str, Any], expected: bool
) -> None:
    assert grantable(tool, args) is expected


def test_scene_create_names_the_scene_it_writes() -> None:
    args = {
        "domain": "scene",
        "service": "create",
        "scene_id": "front_door",
        "entities": {"light.porch": "on"},
    }
    assert signature("ha_call_service", args) == (
        "ha_call_service(scene.create, light.porch, scene.front_door)"
    )
    with pytest.raises(InvalidParams, match="scene_id: expected a slug"):
        signature("ha_call_service", {**args, "scene_id": "Front Door"})
