"""The policy engine: loading, precedence, explanations and lint (docs/policy.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentgate.errors import InvalidParams
from agentgate.policy import Evaluation, Matched, Policy, PolicyError, load_policy, parse_policy
from agentgate.tools import INDIRECT_SERVICES, TOOLS

REPO = Path(__file__).resolve().parent.parent


def policy(text: str) -> Policy:
    return parse_policy(text, "p.yaml")


def load_error(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "permissions.yaml")
    return str(info.value)


# --- precedence ----------------------------------------------------------------------------


def test_deny_beats_a_more_specific_allow() -> None:
    p = policy(
        """
rules:
  - {pattern: "ha_call_service(lock.unlock, lock.front_door)", action: allow}
  - {pattern: "ha_call_service(lock.*)", action: deny, description: locks are for humans}
"""
    )
    result = p.evaluate(
        "ha_call_service", {"domain": "lock", "service": "unlock", "entity_id": "lock.front_door"}
    )
    assert result.decision == "deny"
    assert result.matched == Matched(
        "rule", "deny", 1, "ha_call_service(lock.*)", "locks are for humans"
    )
    assert str(result.matched) == "rule 1: ha_call_service(lock.*) (deny)"


def test_allow_beats_ask_whatever_the_order() -> None:
    p = policy(
        """
rules:
  - {pattern: "ha_get_state(*)", action: ask}
  - {pattern: "ha_get_state(sensor.*)", action: allow}
"""
    )
    result = p.evaluate("ha_get_state", {"entity_id": "sensor.temp"})
    assert (result.decision, str(result.matched)) == (
        "allow",
        "rule 1: ha_get_state(sensor.*) (allow)",
    )
    assert p.evaluate("ha_get_state", {"entity_id": "light.x"}).decision == "ask"


def test_ask_rule_beats_defaults() -> None:
    p = policy(
        """
rules:
  - {pattern: "ha_get_state(light.*)", action: ask}
defaults:
  - {pattern: "*", action: allow}
"""
    )
    assert p.evaluate_signature("ha_get_state(light.x)").decision == "ask"
    assert str(p.evaluate_signature("ha_get_states").matched) == "default 0: * (allow)"


def test_rules_beat_defaults_even_a_deny_default() -> None:
    p = policy(
        """
rules:
  - {pattern: "ha_get_states", action: allow}
defaults:
  - {pattern: "*", action: deny}
"""
    )
    assert p.evaluate_signature("ha_get_states").decision == "allow"
    assert p.evaluate_signature("ha_get_config").decision == "deny"


def test_defaults_apply_in_order_first_match_wins() -> None:
    p = policy(
        """
defaults:
  - {pattern: "ha_get_*", action: allow}
  - {pattern: "ha_*", action: deny}
  - {pattern: "*", action: ask}
"""
    )
    assert str(p.evaluate_signature("ha_get_config").matched) == "default 0: ha_get_* (allow)"
    assert str(p.evaluate_signature("ha_fire_event(x)").matched) == "default 1: ha_* (deny)"
    assert str(p.evaluate_signature("my_tool(x)").matched) == "default 2: * (ask)"


def test_fallback_is_ask() -> None:
    p = policy("rules: []\n")
    result = p.evaluate("ha_get_states", {})
    assert result == Evaluation("ha_get_states", "ask", Matched("fallback", "ask"))
    assert str(result.matched) == "fallback (ask)"
    assert result.to_dict() == {
        "signature": "ha_get_states",
        "decision": "ask",
        "matched": "fallback (ask)",
    }


def test_first_matching_deny_is_reported() -> None:
    p = policy(
        """
rules:
  - {pattern: "ha_call_service(lock.*)", action: deny}
  - {pattern: "ha_call_service(*)", action: deny}
"""
    )
    assert p.evaluate_signature("ha_call_service(lock.lock, lock.x)").matched.index == 0


def test_matching_is_case_sensitive() -> None:
    p = policy('rules:\n  - {pattern: "HA_GET_STATES", action: allow}\n')
    assert p.evaluate_signature("ha_get_states").matched.kind == "fallback"


def test_pattern_without_entity_matches_only_the_bare_call() -> None:
    p = policy('rules:\n  - {pattern: "ha_call_service(light.turn_on)", action: allow}\n')
    assert p.evaluate_signature("ha_call_service(light.turn_on)").decision == "allow"
    assert p.evaluate_signature("ha_call_service(light.turn_on, light.x)").decision == "ask"


def test_evaluate_validates_first() -> None:
    p = policy('defaults:\n  - {pattern: "*", action: allow}\n')
    with pytest.raises(InvalidParams, match=r"forbidden character '\*'"):
        p.evaluate("ha_get_state", {"entity_id": "sensor.*"})
    with pytest.raises(InvalidParams, match="unknown tool: my_tool"):
        p.evaluate("my_tool", {})
    assert p.evaluate("my_tool", {"b": "2", "a": "1"}, allow_unknown=True).signature == (
        "my_tool(1, 2)"
    )


def test_a_glob_cannot_be_smuggled_through_arguments() -> None:
    # Without validation, entity_id "lock.x, light.y" would read like a light call.
    p = policy('rules:\n  - {pattern: "ha_call_service(*, light.*)", action: allow}\n')
    with pytest.raises(InvalidParams):
        p.evaluate(
            "ha_call_service",
            {"domain": "lock", "service": "unlock", "entity_id": "lock.x, light.y"},
        )


# --- the shipped permissions.yaml ----------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "args", "decision"),
    [
        ("ha_get_state", {"entity_id": "sensor.temp"}, "allow"),
        ("ha_get_states", {}, "ask"),
        ("ha_get_services", {}, "allow"),
        ("ha_get_history", {"entity_id": "climate.x"}, "allow"),
        ("ha_get_history", {"entity_id": "person.me"}, "deny"),
        (
            "ha_call_service",
            {"domain": "homeassistant", "service": "toggle", "entity_id": "light.x"},
            "deny",
        ),
        (
            "ha_call_service",
            {"domain": "switch", "service": "toggle", "entity_id": "lock.x"},
            "deny",
        ),
        ("ha_get_state", {"entity_id": "person.me"}, "deny"),
        ("ha_call_service", {"domain": "light", "service": "turn_on"}, "ask"),
        ("ha_call_service", {"domain": "lock", "service": "unlock", "entity_id": "lock.x"}, "deny"),
        ("ha_fire_event", {"event_type": "my_event"}, "ask"),
        ("ha_call_service", {"domain": "switch", "service": "turn_on"}, "ask"),
    ],
)
def test_shipped_policy(tool: str, args: dict[str, Any], decision: str) -> None:
    assert load_policy(REPO / "permissions.yaml").evaluate(tool, args).decision == decision


def test_shipped_policy_has_no_warnings() -> None:
    assert load_policy(REPO / "permissions.yaml").warnings == ()


# --- load errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "rules:\n"
            + '  - {pattern: "a", action: allow}\n' * 3
            + '  - {pattern: "ha_get_states", action: alow}\n',
            'permissions.yaml: rules[3].action: expected one of allow, deny, ask, got "alow"',
        ),
        (
            'defaults:\n  - {pattern: "*", action: true}\n',
            "permissions.yaml: defaults[0].action: expected one of allow, deny, ask, got true",
        ),
        (
            "rules:\n  - {action: allow}\n",
            'permissions.yaml: rules[0]: missing required key "pattern"',
        ),
        (
            'rules:\n  - {pattern: "*"}\n',
            'permissions.yaml: rules[0]: missing required key "action"',
        ),
        (
            'rules:\n  - {pattern: "*", action: ask, desc: x}\n',
            'permissions.yaml: rules[0]: unknown key "desc" '
            "(expected pattern, action, description, approvals, quota)",
        ),
        (
            "rules:\n  - {pattern: 3, action: ask}\n",
            "permissions.yaml: rules[0].pattern: expected a non-empty string, got 3",
        ),
        (
            'rules:\n  - {pattern: "", action: ask}\n',
            'permissions.yaml: rules[0].pattern: expected a non-empty string, got ""',
        ),
        (
            'rules:\n  - {pattern: "*", action: ask, description: [x]}\n',
            'permissions.yaml: rules[0].description: expected a string, got ["x"]',
        ),
        (
            "rules:\n  - just a string\n",
            "permissions.yaml: rules[0]: expected a mapping with pattern and action, "
            'got "just a string"',
        ),
        (
            "rules: {pattern: x}\n",
            "permissions.yaml: rules: expected a list, got a mapping",
        ),
        (
            "rule: []\n",
            'permissions.yaml: unknown key "rule" (expected defaults, rules)',
        ),
        (
            "- a\n",
            "permissions.yaml: expected a mapping with rules and defaults, got a list",
        ),
        (
            "",
            "permissions.yaml: empty policy: expected a mapping with rules and defaults",
        ),
        (
            "rules: [\n",
            "permissions.yaml: invalid YAML: line 2 column 1: expected the node content, "
            "but found '<stream end>'",
        ),
        (
            "rules:\n  - pattern: a\n    action: allow\n    action: deny\n",
            "permissions.yaml: invalid YAML: line 4 column 5: duplicate key 'action'",
        ),
    ],
)
def test_load_errors(text: str, expected: str) -> None:
    assert load_error(text) == expected


def test_load_error_for_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(missing)
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text('rules:\n  - {pattern: "ha_get_states", action: allow}\n', encoding="utf-8")
    loaded = load_policy(path)
    assert loaded.source == str(path)
    assert loaded.evaluate_signature("ha_get_states").decision == "allow"


def test_null_sections_and_description_are_empty() -> None:
    p = policy("rules:\ndefaults:\n")
    assert (p.rules, p.defaults) == ((), ())
    p = policy('rules:\n  - {pattern: "*", action: ask, description: null}\n')
    assert p.rules[0].description == ""


def test_yaml_tags_are_refused() -> None:
    assert "invalid YAML" in load_error("rules: !!python/object:os.system {}\n")


# --- lint ----------------------------------------------------------------------------------


def lint(*rules: str, defaults: tuple[str, ...] = ()) -> list[str]:
    text = "rules:\n" + "".join(f"  - {r}\n" for r in rules)
    if defaults:
        text += "defaults:\n" + "".join(f"  - {d}\n" for d in defaults)
    return list(policy(text).warnings)


def test_lint_allow_shadowed_by_deny_with_same_pattern() -> None:
    assert lint(
        '{pattern: "ha_get_state(sensor.x)", action: allow}',
        '{pattern: "ha_get_state(sensor.x)", action: deny}',
    ) == [
        "p.yaml: rules[0] 'ha_get_state(sensor.x)': never used: deny rule rules[1] "
        "'ha_get_state(sensor.x)' matches everything this allow rule does, and deny wins"
    ]


def test_lint_ask_shadowed_by_deny_star() -> None:
    warnings = lint('{pattern: "ha_get_states", action: ask}', '{pattern: "*", action: deny}')
    assert warnings == [
        "p.yaml: rules[0] 'ha_get_states': never used: deny rule rules[1] '*' matches "
        "everything this ask rule does, and deny wins"
    ]


def test_lint_literal_allow_inside_a_deny_glob() -> None:
    warnings = lint(
        '{pattern: "ha_call_service(lock.unlock, lock.front)", action: allow}',
        '{pattern: "ha_call_service(lock.*)", action: deny}',
        '{pattern: "ha_call_service(*, lock.*)", action: deny}',
    )
    assert len(warnings) == 1
    assert "never used: deny rule rules[1]" in warnings[0]


def test_lint_exact_duplicates() -> None:
    assert lint(
        '{pattern: "ha_get_states", action: allow}',
        '{pattern: "ha_get_states", action: allow, description: again}',
    ) == ["p.yaml: rules[1] 'ha_get_states': duplicate of rules[0]"]


def test_lint_shadowed_default() -> None:
    warnings = lint(
        defaults=('{pattern: "*", action: ask}', '{pattern: "ha_get_*", action: allow}')
    )
    assert warnings == [
        "p.yaml: defaults[1] 'ha_get_*': never used: defaults[0] '*' comes first and matches "
        "everything this one does"
    ]


def test_lint_typo_in_tool_name() -> None:
    assert lint('{pattern: "ha_get_stat(sensor.*)", action: allow}') == [
        "p.yaml: rules[0] 'ha_get_stat(sensor.*)': no known tool is called 'ha_get_stat'"
        " (did you mean ha_get_state?)"
    ]


def test_lint_glob_tool_part_is_not_a_typo() -> None:
    assert (
        lint('{pattern: "ha_get_*", action: allow}', '{pattern: "*(lock.*)", action: deny}') == []
    )


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("ha_get_state(a(b))", "'(', ')' cannot appear inside arguments"),
        ("ha_get_state(sensor.\t*)", "'\\t' cannot appear inside arguments"),
        ("ha_call_service(light.*,light.x)", "arguments in a signature are separated by ', '"),
        ("ha_get_state(Sensor.x)", "Home Assistant identifiers are lowercase"),
        ("ha_get_states(*)", "ha_get_states takes no arguments"),
        ("ha_get_state", "ha_get_state's signature always has arguments"),
    ],
)
def test_lint_patterns_that_can_never_match(pattern: str, problem: str) -> None:
    text = f"rules:\n  - pattern: {pattern!r}\n    action: allow\n".replace("'", '"')
    warnings = policy(text).warnings
    assert len(warnings) == 1
    assert warnings[0].startswith(f"p.yaml: rules[0] {pattern!r}: never matches: ")
    assert problem in warnings[0]


@pytest.mark.parametrize(
    "pattern",
    ["ha_call_service(*,*)", "ha_call_service(light.*)*", "*", "ha_get_state([a-z]*.x)"],
)
def test_lint_quiet_on_patterns_that_can_match(pattern: str) -> None:
    assert lint(f'{{pattern: "{pattern}", action: allow}}') == []


# --- property: nothing but InvalidParams ----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=20,
)
SHIPPED = load_policy(REPO / "permissions.yaml")


@settings(max_examples=300, deadline=None)
@given(
    tool=st.sampled_from([*TOOLS, "my_tool"]) | st.text(max_size=8),
    args=st.dictionaries(
        st.sampled_from(["entity_id", "domain", "service", "event_type", "hours"])
        | st.text(max_size=6),
        json_values | st.sampled_from(["light", "turn_on", "light.x", "sensor.t"]),
        max_size=5,
    )
    | json_values,
    allow_unknown=st.booleans(),
)
def test_evaluate_never_raises_anything_but_invalid_params(
    tool: str, args: object, allow_unknown: bool
) -> None:
    try:
        result = SHIPPED.evaluate(tool, args, allow_unknown=allow_unknown)
    except InvalidParams as exc:
        code = exc.code
    else:
        code = 0
        assert result.decision in ("allow", "deny", "ask")
    assert code in (0, -32602)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parse_policy_never_raises_anything_but_policy_error(text: str) -> None:
    try:
        parse_policy(text, "fuzz.yaml")
    except PolicyError as exc:
        message = str(exc)
    else:
        message = "fuzz.yaml: ok"
    assert message.startswith("fuzz.yaml: ")


def test_decisions_are_remembered_per_signature() -> None:
    policy = parse_policy(
        "rules:\n  - pattern: 'ha_get_state(sensor.*)'\n    action: allow\n", "memo.yaml"
    )
    first = policy.evaluate_signature("ha_get_state(sensor.a)")
    assert policy.evaluate_signature("ha_get_state(sensor.a)") is first
    assert policy.evaluate_signature("ha_get_state(light.a)").decision == "ask"


# --- a call naming several entities: each is checked alone, the strictest decision wins -----


def test_a_deny_on_one_entity_holds_wherever_it_is_named() -> None:
    p = policy(
        """
rules:
  - {pattern: "ha_call_service(scene.*)", action: allow}
  - {pattern: "ha_call_service(scene.apply, lock.*)", action: deny, description: no locks}
"""
    )
    # The full signature does not match the deny rule (a light comes first): the entity does.
    args = {"domain": "scene", "service": "apply", "entities": {"light.a": 1, "lock.x": 2}}
    result = p.evaluate("ha_call_service", args)
    assert result.signature == "ha_call_service(scene.apply, light.a, lock.x)"
    assert result.decision == "deny"
    assert result.checked == "ha_call_service(scene.apply, lock.x)"
    assert result.reason == (
        "rule 1: ha_call_service(scene.apply, lock.*) (deny)"
        " on ha_call_service(scene.apply, lock.x)"
    )
    assert result.matched.description == "no locks"


def test_ask_beats_allow_across_entities() -> None:
    p = policy(
        """
rules:
  - {pattern: "ha_call_service(scene.apply, light.*)", action: allow}
defaults:
  - {pattern: "*", action: ask}
"""
    )
    lights = {"domain": "scene", "service": "apply", "entities": {"light.a": 1, "light.b": 2}}
    assert p.evaluate("ha_call_service", lights).decision == "allow"
    # The glob matches the full signature (its * spans ", switch.pump"); the switch alone asks.
    mixed = {**lights, "entities": {"light.a": 1, "switch.pump": 2}}
    result = p.evaluate("ha_call_service", mixed)
    assert result.decision == "ask"
    assert result.checked == "ha_call_service(scene.apply, switch.pump)"
    assert str(result.matched) == "default 0: * (ask)"


def test_an_evaluation_decided_by_its_full_signature_names_no_check() -> None:
    result = SHIPPED.evaluate(
        "ha_call_service", {"domain": "light", "service": "turn_on", "entity_id": "light.x"}
    )
    assert result.checked is None
    assert result.reason == str(result.matched)


@pytest.mark.parametrize(
    ("tool", "args", "decision"),
    [
        ("ha_get_config", {}, "ask"),  # the home's coordinates
        ("ha_get_state", {"entity_id": "device_tracker.phone"}, "ask"),
        ("ha_get_history", {"entity_id": "device_tracker.phone"}, "ask"),
        ("ha_get_state", {"entity_id": "zone.home"}, "ask"),
        ("ha_get_state", {"entity_id": "sensor.phone_geocoded_location"}, "deny"),
        ("ha_get_history", {"entity_id": "sensor.phone_geocoded_location"}, "deny"),
        ("ha_get_state", {"entity_id": "sensor.outdoor_temperature"}, "allow"),
        ("ha_get_state", {"entity_id": "sensor.home_phone_distance"}, "deny"),
        ("ha_get_history", {"entity_id": "sensor.home_phone_direction_of_travel"}, "deny"),
        ("ha_get_state", {"entity_id": "sensor.phone_wifi_bssid"}, "deny"),
        ("ha_get_state", {"entity_id": "proximity.home"}, "ask"),
        ("ha_get_history", {"entity_id": "geo_location.quake_1"}, "ask"),
        ("ha_get_state", {"entity_id": "sun.sun"}, "allow"),  # the region, not the home
        ("ha_call_service", {"domain": "script", "service": "turn_on"}, "ask"),
        ("ha_call_service", {"domain": "shell_command", "service": "x"}, "ask"),
        ("ha_call_service", {"domain": "hassio", "service": "host_reboot"}, "deny"),
        (
            "ha_call_service",
            {"domain": "scene", "service": "apply", "entities": {"alarm_control_panel.h": "x"}},
            "deny",
        ),
        (
            "ha_call_service",
            {"domain": "script", "service": "x", "variables": {"door": "lock.front_door"}},
            "deny",
        ),
    ],
)
def test_shipped_policy_keeps_its_privacy_and_its_locks(
    tool: str, args: dict[str, Any], decision: str
) -> None:
    assert SHIPPED.evaluate(tool, args).decision == decision


@pytest.mark.parametrize("domain", sorted(INDIRECT_SERVICES))
def test_shipped_policy_has_a_rule_of_its_own_for_every_indirect_service(domain: str) -> None:
    result = SHIPPED.evaluate("ha_call_service", {"domain": domain, "service": "x"})
    assert result.decision in ("ask", "deny")
    assert str(result.matched).startswith("rule "), result.matched  # not the catch-all default


def test_lint_a_domain_deny_without_its_entity_companion() -> None:
    warnings = lint('{pattern: "ha_call_service(alarm_control_panel.*)", action: deny}')
    assert len(warnings) == 1
    assert "denies the alarm_control_panel services only" in warnings[0]
    assert "'ha_call_service(*, alarm_control_panel.*)'" in warnings[0]
    assert (
        lint(
            '{pattern: "ha_call_service(alarm_control_panel.*)", action: deny}',
            '{pattern: "ha_call_service(*, alarm_control_panel.*)", action: deny}',
        )
        == []
    )
    assert lint('{pattern: "ha_call_service(mydomain.*)", action: deny}') == []  # not an entity
