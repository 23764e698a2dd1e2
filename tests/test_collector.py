"""``agentgate serve`` sets the garbage collector's thresholds for its process (bench S6), and
only ``serve`` does: importing agentgate, or embedding its gateway, leaves them alone.

Run in a fresh interpreter: the thresholds are the whole process's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from agentgate.serve import COLLECTOR_THRESHOLDS


def _fresh_python(code: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_serve_sets_the_thresholds_before_the_loop_runs() -> None:
    seen = _fresh_python(
        "import gc, json, types\n"
        "default = gc.get_threshold()\n"
        "import agentgate.serve as serve\n"
        "imported = gc.get_threshold()\n"
        "ran = []\n"
        "serve.load_config = lambda *a, **k: types.SimpleNamespace(\n"
        "    guardian=types.SimpleNamespace(telegram=None))\n"
        "serve._preflight = lambda *a, **k: []\n"
        "serve.trio = types.SimpleNamespace(run=lambda main: ran.append(gc.get_threshold()))\n"
        "status = serve.run_serve('gate.toml')\n"
        "print(json.dumps({'default': default, 'imported': imported, 'ran': ran,"
        " 'status': status}))\n"
    )
    assert seen["imported"] == seen["default"]  # importing changes nothing
    assert seen["ran"] == [list(COLLECTOR_THRESHOLDS)]  # set before the event loop starts
    assert seen["status"] == 0
    young, middle, old = COLLECTOR_THRESHOLDS
    assert young > seen["default"][0]  # a larger young generation, never a disabled collector
    assert middle > 0
    assert old > 0
