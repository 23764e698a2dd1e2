"""Real tier against a real Home Assistant core (``scripts/real-ha``; ``make test-ha``).

``scripts/real-ha test`` starts one core for the whole run and passes it in through
``AGENTGATE_REAL_HA_URL`` / ``AGENTGATE_REAL_HA_TOKEN``. Run directly
(``.venv/bin/pytest -m realha tests/realha``) without them, the ``real_ha`` fixture starts a core
itself through the same script (installing it first if needed: ~1 min cold) and stops it at the
end. Either way a core that cannot be had FAILS the tests; nothing here skips.

Every test module here sets ``pytestmark = pytest.mark.realha`` (``make test`` deselects
them) and nothing happens at import, so collecting the main suite never needs Home Assistant.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from attrs import frozen

from tests.realha.contract import Home

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "real-ha"
# a cold install downloads ~800 MB of venv; the script itself bounds the start at 120 s
START_CEILING = 900


@frozen
class RealHA:
    """A running Home Assistant core: where it is, a token, and entities known to exist.

    The entity ids come from ``scripts/realha/configuration.yaml`` (``demo:``, a template
    light, input_booleans and a script); tests may change their state, so each test sets the
    state it starts from.
    """

    url: str
    token: str
    version: str = "2025.4.4"
    light: str = "light.bed_light"  # demo light: brightness, colour temperature
    template_light: str = "light.kitchen"  # template light driving input_boolean.kitchen_power
    template_power: str = "input_boolean.kitchen_power"
    flag: str = "input_boolean.test_flag"
    lock: str = "lock.kitchen_door"  # demo lock, unlocked at start; 2 s "locking" step
    jamming_lock: str = "lock.poorly_installed_door"  # goes "jammed" after locking
    locked_lock: str = "lock.front_door"  # demo lock, locked at start; no "open" support
    openable_lock: str = "lock.openable_lock"  # demo lock with the open feature
    cover: str = "cover.kitchen_window"
    climate: str = "climate.hvac"  # demo thermostat, 7-35 °C: out of range is HA's 500
    echo_script: str = "script.echo"  # answers {"echo": text} with ?return_response
    missing: str = "light.does_not_exist"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_real_ha(directory: Path) -> RealHA:
    """Start a core of our own through ``scripts/real-ha start``; fail the test if it can't."""
    try:
        proc = subprocess.run(
            [str(SCRIPT), "start", str(directory), str(_free_port())],
            capture_output=True,
            text=True,
            timeout=START_CEILING,
            check=False,
        )
    except subprocess.TimeoutExpired:
        stop_real_ha(directory)
        pytest.fail(f"scripts/real-ha start did not finish within {START_CEILING} s")
    if proc.returncode != 0:
        pytest.fail(f"scripts/real-ha start failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    info = json.loads((directory / "realha.json").read_text())
    return RealHA(url=info["url"], token=info["token"], version=info["version"])


def stop_real_ha(directory: Path) -> None:
    """Stop the core started in ``directory`` (by its recorded pid; SIGKILL as a last resort)."""
    result = subprocess.run(
        [str(SCRIPT), "stop", str(directory)], capture_output=True, timeout=60, check=False
    )
    pid_file = directory / "hass.pid"
    if result.returncode != 0 and pid_file.exists():
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)  # not our child: nothing to wait() on while the kernel reaps it


@pytest.fixture(scope="session")
def real_ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealHA]:
    """The session's core: from ``scripts/real-ha test``'s env vars, else started here."""
    url = os.environ.get("AGENTGATE_REAL_HA_URL")
    token = os.environ.get("AGENTGATE_REAL_HA_TOKEN")
    if url and token:
        yield RealHA(url=url.rstrip("/"), token=token)
        return
    directory = tmp_path_factory.mktemp("real-ha")
    ha = start_real_ha(directory)
    try:
        yield ha
    finally:
        stop_real_ha(directory)


@pytest.fixture
def own_real_ha(tmp_path: Path) -> Iterator[tuple[RealHA, Path]]:
    """A second, private core for tests that stop it (the session's core stays up)."""
    directory = tmp_path / "own-real-ha"
    ha = start_real_ha(directory)
    try:
        yield ha, directory
    finally:
        stop_real_ha(directory)


@pytest.fixture
def ha_home(real_ha: RealHA) -> Home:
    """The contract modules' home (``tests/realha/contract.py``): the session's real core."""
    return Home(
        url=real_ha.url,
        token=real_ha.token,
        real=True,
        light=real_ha.light,
        switchable=real_ha.flag,
        lock=real_ha.locked_lock,
        openable_lock=real_ha.openable_lock,
        climate=real_ha.climate,
        script=real_ha.echo_script,
        missing=real_ha.missing,
    )
