"""Shared fixtures: a fake home on real sockets, a real gateway over TLS, raw agents."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agentgate.testing.fake_homeassistant import FakeHomeAssistant, run_fake_homeassistant


@pytest.fixture
async def home() -> AsyncIterator[FakeHomeAssistant]:
    async with run_fake_homeassistant() as ha:
        yield ha


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "gate"
