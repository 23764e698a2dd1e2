"""Durable before execute: the row that lets a call run is fsync'd before the call is sent.

A power cut cannot be staged here, so the tests check what makes it safe: the commit of every
allowed call's decision row and of every approval's move to ``executing`` ran with
``synchronous = FULL`` (SQLite fsyncs the WAL at that commit, and with it every commit before),
and it completed before Home Assistant saw the request. Other writes stay ``normal``, and
concurrent durable writes share one fsync (group commit).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from agentgate.store import AuditEntry, open_store
from tests.fastgate import MockHome, authed, call, fast_gateway, reply

NOW = 1_800_000_000.0
CEILING = 20
ALLOW_LIGHTS = """\
rules:
  - pattern: "ha_get_state(*)"
    action: allow
  - pattern: "ha_call_service(light.*)"
    action: allow
  - pattern: "ha_call_service(switch.*)"
    action: ask
"""

# What must be on disk before a call runs: allowed decisions, approvals moved to executing,
# and the audit events that record both (``event ID``).
MUST_BE_DURABLE = (
    "SELECT request_id FROM audit_log WHERE decision = 'allow'"
    " UNION SELECT request_id FROM pending_requests WHERE state = 'executing'"
    " UNION SELECT 'event ' || e.request_id FROM audit_events e"
    " JOIN audit_log l ON l.seq = e.seq WHERE l.decision = 'allow'"
    " UNION SELECT 'event ' || request_id FROM audit_events WHERE type = 'executing'"
)


class RecordingConnection:
    """The store's connection, noting what each COMMIT made durable (``synchronous = FULL``,
    i.e. 2, at that commit) and the level of every commit."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.durable: set[str] = set()
        self.levels: list[int] = []

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.strip().upper() != "COMMIT":
            return self._conn.execute(sql, *args)
        level = self._conn.execute("PRAGMA synchronous").fetchone()[0]
        covered = {r[0] for r in self._conn.execute(MUST_BE_DURABLE)}  # this transaction's view
        result = self._conn.execute(sql, *args)
        self.levels.append(level)
        if level >= 2:  # FULL: the WAL is fsync'd at this commit, everything before it too
            self.durable |= covered
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class CheckingHome(MockHome):
    """A home that checks, at every request it gets, that every allowed decision and every
    executing approval committed so far was committed durably."""

    def __init__(self, db: Path) -> None:
        super().__init__()
        self.db = db
        self.recorder: RecordingConnection | None = None
        self.violations: list[set[str]] = []
        self.checked = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        if self.recorder is not None and request.url.path != "/api/":
            reader = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
            try:  # what is committed now, as any reader (or a reboot) sees it
                committed = {r[0] for r in reader.execute(MUST_BE_DURABLE)}
            finally:
                reader.close()
            self.checked += 1
            if not committed <= self.recorder.durable:
                self.violations.append(committed - self.recorder.durable)
        return super().handler(request)


@pytest.mark.parametrize("inline_store", [True, None], ids=["inline", "as-served"])
async def test_nothing_is_sent_before_its_row_is_fsyncd(
    tmp_path: Path, inline_store: bool | None
) -> None:
    home = CheckingHome(tmp_path / "agentgate.db")
    home.states["switch.fan"] = {"entity_id": "switch.fan", "state": "off", "attributes": {}}
    with trio.fail_after(CEILING):
        async with fast_gateway(
            tmp_path, home=home, inline_store=inline_store, policy=ALLOW_LIGHTS
        ) as fg:
            recorder = RecordingConnection(fg.gateway.store._conn)
            fg.gateway.store._conn = recorder  # type: ignore[assignment]
            home.recorder = recorder
            ws = await authed(fg)
            # Allowed reads and writes, several at once (they share commits), then an ask.
            for i in range(10):
                await ws.send_message(
                    json.dumps(
                        {
                            "jsonrpc": "2.0",
                            "id": i,
                            "method": "tool_request",
                            "params": {
                                "tool": "ha_get_state",
                                "args": {"entity_id": "sensor.temp"},
                            },
                        }
                    )
                )
            for _ in range(10):
                assert (await reply(ws))["result"]["status"] == "executed"
            light = {"domain": "light", "service": "turn_on", "entity_id": "light.bedroom"}
            answer = await call(ws, 20, "tool_request", tool="ha_call_service", args=light)
            assert answer["result"]["status"] == "executed"
            fan = {"domain": "switch", "service": "turn_on", "entity_id": "switch.fan"}
            await ws.send_message(
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": 21,
                        "method": "tool_request",
                        "params": {"tool": "ha_call_service", "args": fan},
                    }
                )
            )
            shown = await fg.guardian.wait_for_card()
            assert shown.card.args == fan
            assert await fg.guardian.press(shown.card.request_id, "allow") == "approved"
            await fg.gateway.broker.idle()
            fg.gateway.store._conn = recorder._conn  # type: ignore[assignment]
    assert home.violations == []
    assert home.checked >= 5  # reads asked together share GETs: at least one, then 2 + 2
    assert sum(1 for covered in recorder.durable if covered.startswith("event ")) == 12
    assert [p for p, _ in home.service_calls] == [
        "/api/services/light/turn_on",
        "/api/services/switch/turn_on",
    ]
    # Only the commits that precede an execution pay for an fsync.
    assert 1 in recorder.levels
    assert recorder.levels.count(2) < len(recorder.levels)


async def test_concurrent_durable_writes_share_fsyncs(tmp_path: Path) -> None:
    async with open_store(tmp_path / "a.db") as store:  # as served: normal, durable in a thread

        async def write(i: int, durable: bool) -> None:
            entry = AuditEntry(NOW, "pi", f"r{i}", "t", {}, "t", "allow", "rule")
            await store.audit(entry, durable=durable)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(write, i, i % 4 != 0)
        assert len(await store.audit_rows()) == 200
        assert 0 < store.synced < 150  # 150 durable writes, fewer fsyncs
