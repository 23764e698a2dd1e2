"""The fixed templates behind ``ha_list_areas`` and ``ha_list_entities``, and their answers.

Home Assistant renders them (``POST /api/template``) and builds the JSON itself with
``tojson``; an agent's filters travel as the template's ``variables``, never spliced into its
text, so no argument can change what the template does. The fake home
(:mod:`agentgate.testing.fake_homeassistant`) renders these same strings with Jinja and the
same functions, and ``make test-ha`` holds both to one answer.

Imports: errors.
"""

from __future__ import annotations

import json
from typing import Any, Final

from agentgate.errors import ExecutionFailed

__all__ = ["AREAS", "ENTITIES", "areas", "entities"]

AREAS: Final = (
    "{%- set ns = namespace(out=[]) -%}"
    "{%- for area in areas() -%}"
    '{%- set ns.out = ns.out + [{"area_id": area, "name": area_name(area)}] -%}'
    "{%- endfor -%}"
    "{{ ns.out | tojson }}"
)
"""``[{"area_id", "name"}]`` for every area of the area registry."""

ENTITIES: Final = (
    "{%- set ns = namespace(out=[]) -%}"
    "{%- if area -%}{%- set ids = area_entities(area) -%}"
    "{%- else -%}{%- set ids = states | map(attribute='entity_id') | list -%}{%- endif -%}"
    "{%- for entity_id in ids | sort -%}"
    "{%- if not domain or entity_id.startswith(domain ~ '.') -%}"
    '{%- set ns.out = ns.out + [{"entity_id": entity_id,'
    ' "name": state_attr(entity_id, "friendly_name"), "area_id": area_id(entity_id)}] -%}'
    "{%- endif -%}"
    "{%- endfor -%}"
    '{{ {"area": area_name(area) if area else none, "entities": ns.out} | tojson }}'
)
"""``{"area": name or null, "entities": [{"entity_id", "name", "area_id"}]}``; the variables
``area`` (an area_id, or "") and ``domain`` (or "") filter."""


def _parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise ExecutionFailed(
            "Home Assistant rendered the listing as something other than JSON",
            data={"status": 200, "service": "homeassistant"},
        ) from None


def areas(text: str) -> list[dict[str, Any]]:
    """The agent's answer for :data:`AREAS` as rendered."""
    found = _parsed(text)
    if not isinstance(found, list):
        raise ExecutionFailed(
            "Home Assistant sent a malformed area list",
            data={"status": 200, "service": "homeassistant"},
        )
    return found


def entities(text: str, area: str | None) -> list[dict[str, Any]]:
    """The agent's answer for :data:`ENTITIES` as rendered; an area Home Assistant does not
    know is an error (it would otherwise read as an empty area)."""
    found = _parsed(text)
    if not isinstance(found, dict) or not isinstance(found.get("entities"), list):
        raise ExecutionFailed(
            "Home Assistant sent a malformed entity list",
            data={"status": 200, "service": "homeassistant"},
        )
    if area and found.get("area") is None:
        raise ExecutionFailed(
            f"area not found: {area}", data={"status": None, "service": "homeassistant"}
        )
    listed: list[dict[str, Any]] = found["entities"]
    return listed
