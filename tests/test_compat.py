"""``agentgate._compat``: each reliance on a dependency's internals, checked against it.

If one of these fails after an upgrade, the dependency changed under agentgate: read the item
in ``agentgate/_compat.py`` and decide again (and update the version it names).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def _fresh_python(code: str) -> Any:
    """Run ``code`` in a new interpreter; it prints one JSON value as its last line."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_telegram_is_imported_without_passport_support() -> None:
    # cryptography is installed here (trustme needs it), yet the gateway leaves it unloaded.
    seen = _fresh_python(
        "import json, sys\n"
        "from agentgate._compat import import_telegram_without_passport\n"
        "import_telegram_without_passport()\n"
        "from telegram._passport import credentials\n"
        "loaded = 'cryptography' in sys.modules\n"
        "import cryptography\n"  # still importable afterwards, for whoever needs it
        "print(json.dumps({'loaded': loaded, 'passport': credentials.CRYPTO_INSTALLED,"
        " 'guardian': 'agentgate.guardian.telegram' in sys.modules,"
        " 'later': cryptography.__name__}))\n"
    )
    assert seen == {
        "loaded": False,
        "passport": False,
        "guardian": True,
        "later": "cryptography",
    }


def test_the_import_is_a_plain_one_once_cryptography_is_loaded() -> None:
    seen = _fresh_python(
        "import json, sys\n"
        "import cryptography\n"
        "from agentgate._compat import import_telegram_without_passport\n"
        "import_telegram_without_passport()\n"
        "from telegram._passport import credentials\n"
        "print(json.dumps({'passport': credentials.CRYPTO_INSTALLED,"
        " 'kept': sys.modules['cryptography'] is cryptography}))\n"
    )
    assert seen == {"passport": True, "kept": True}


def test_the_pollers_idle_hook_is_trio_testings_without_importing_it() -> None:
    seen = _fresh_python(
        "import json, sys\n"
        "from agentgate._compat import import_telegram_without_passport, wait_all_tasks_blocked\n"
        "import_telegram_without_passport()\n"
        "quiet = 'trio.testing' not in sys.modules and 'pytest' not in sys.modules\n"
        "import trio.testing\n"
        "print(json.dumps({'quiet': quiet,"
        " 'same': wait_all_tasks_blocked is trio.testing.wait_all_tasks_blocked}))\n"
    )
    assert seen == {"quiet": True, "same": True}
