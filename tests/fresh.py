"""Run code in a new interpreter: for what only a fresh process shows (imports, start-up state)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def fresh_python(code: str) -> Any:
    """Run ``code`` in a new interpreter; it prints one JSON value as its last line."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])
