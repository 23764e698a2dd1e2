"""The Makefile as a newcomer meets it: ``make`` lists the targets, a wrong Python gets one line,
the first install says what it does. Runs ``make`` in a copy of the two files it reads."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("make") is None, reason="needs make"),
]

REPO = Path(__file__).resolve().parent.parent


def make(directory: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, directory / name)
    return subprocess.run(
        ["make", "--no-print-directory", *argv],
        cwd=directory, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("argv", [[], ["help"]])
def test_make_alone_lists_the_targets(tmp_path: Path, argv: list[str]) -> None:
    proc = make(tmp_path, *argv)
    assert proc.returncode == 0, proc.stderr
    for target in ("test", "demo", "test-ha", "bench", "soak", "clean"):
        assert f"\n  make {target} " in proc.stdout
    assert not (tmp_path / ".venv").exists()  # listing installs nothing


def test_a_python_outside_3_11_to_3_13_gets_one_line(tmp_path: Path) -> None:
    old = tmp_path / "python3.10"
    old.write_text(  # answers like Python 3.10 would to the Makefile's two questions
        '#!/bin/sh\ncase "$2" in *version.split*) echo 3.10.13 ;; *) echo 0 ;; esac\n'
    )
    old.chmod(0o755)
    proc = make(tmp_path, "venv", f"PYTHON={old}")
    assert proc.returncode != 0
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert f"agentgate needs Python 3.11 to 3.13; {old} is 3.10.13" in line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / ".venv").exists()

    proc = make(tmp_path, "venv", "PYTHON=no-such-python")
    (line,) = proc.stderr.splitlines()
    assert "no-such-python was not found" in line


def test_the_first_install_says_what_it_does(tmp_path: Path) -> None:
    proc = make(tmp_path, "-n", "venv", f"PYTHON={sys.executable}")
    assert proc.returncode == 0, proc.stderr
    assert "first run: creating .venv with Python " in proc.stdout
    assert "installing agentgate into .venv" in proc.stdout
