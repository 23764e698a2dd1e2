"""``agentgate serve`` sets the garbage collector's thresholds for its process (bench S6), and
only ``serve`` does: importing agentgate, or embedding its gateway, leaves them alone.

Run in a fresh interpreter: the thresholds are the whole process's.
"""

from __future__ import annotations

from agentgate.serve import COLLECTOR_THRESHOLDS
from tests.fresh import fresh_python


def test_serve_sets_the_thresholds_before_the_loop_runs() -> None:
    seen = fresh_python(
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
