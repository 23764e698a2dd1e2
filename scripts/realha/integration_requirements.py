"""Print the pip requirements of every integration the test core loads (one per line).

Run with the Home Assistant venv's python after the core itself is installed: HA's own
``bootstrap`` says which integrations it always loads, and each integration's
``manifest.json`` names its requirements and dependencies. Nothing is started.

Usage: python integration_requirements.py [extra_domain ...]
Only used by ``scripts/real-ha lock`` to compute the pinned set; ``install`` reads the lock.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import homeassistant
import homeassistant.bootstrap as bootstrap

COMPONENTS = Path(homeassistant.__file__).parent / "components"

# What scripts/realha/configuration.yaml loads, plus what HA imports lazily on REST calls
# (GET /api/services inspects camera/stream features).
CONFIGURED = {
    "api",
    "http",
    "auth",
    "onboarding",
    "websocket_api",
    "logger",
    "system_log",
    "network",
    "input_boolean",
    "template",
    "script",
    "light",
    "lock",
    "cover",
    "demo",
    "history",
    "logbook",
    "shopping_list",
    "frontend",
    "recorder",
    "camera",
    "stream",
}


def main(extra: list[str]) -> None:
    domains = set(bootstrap.DEFAULT_INTEGRATIONS) | set(bootstrap.CORE_INTEGRATIONS)
    domains |= CONFIGURED | set(extra)
    # demo forwards its config entry to a platform in many entity domains
    domains |= {
        p.stem for p in (COMPONENTS / "demo").glob("*.py") if (COMPONENTS / p.stem).is_dir()
    }
    requirements: set[str] = set()
    seen: set[str] = set()
    todo = sorted(domains)
    while todo:
        domain = todo.pop()
        manifest = COMPONENTS / domain / "manifest.json"
        if domain in seen or not manifest.is_file():
            continue
        seen.add(domain)
        data = json.loads(manifest.read_text())
        requirements.update(data.get("requirements", []))
        todo += data.get("dependencies", []) + data.get("after_dependencies", [])
    # PyAV (stream) only transcodes video, which no test does; it is a large wheel.
    print("\n".join(sorted(r for r in requirements if not r.lower().startswith("av="))))


if __name__ == "__main__":
    main(sys.argv[1:])
