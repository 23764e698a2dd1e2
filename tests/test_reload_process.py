"""Hot reload and the new rule fields as an operator meets them: ``agentgate serve`` in its own
process reloaded by ``SIGHUP`` and by ``agentgate reload``; ``config check``, ``serve`` and
``check`` on rules with ``approvals`` and ``quota``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.processes import agent_websocket, gateway_process, write_gateway_files

pytestmark = pytest.mark.slow

CEILING = 60
ASK_LIGHTS = """\
rules:
  - pattern: "ha_get_state(sensor.*)"
    action: allow
  - pattern: "ha_call_service(light.*)"
    action: ask
"""
ALLOW_LIGHTS = ASK_LIGHTS.replace("action: ask", "action: allow")
LIGHT_ON = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}


def agentgate(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentgate", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def call(ws: object, rpc_id: int, method: str, **params: object) -> dict[str, object]:
    send = ws.send_message  # type: ignore[attr-defined]
    get = ws.get_message  # type: ignore[attr-defined]
    await send(json.dumps({"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params}))
    while True:
        frame: dict[str, object] = json.loads(await get())
        if frame.get("id") == rpc_id:
            return frame


async def test_sighup_and_agentgate_reload_swap_the_policy_of_a_running_gateway(
    tmp_path: Path, home: FakeHomeAssistant
) -> None:
    files = write_gateway_files(tmp_path / "gate", home=home, policy=ASK_LIGHTS)
    policy = files.workdir / "permissions.yaml"
    with trio.fail_after(CEILING):
        async with gateway_process(files) as gw:
            async with agent_websocket(gw.url, files.client_ssl()) as ws:
                auth = await call(ws, 0, "auth", token=files.tokens["pi"])
                assert auth.get("result"), auth
                asked = await call(ws, 1, "tool_request", tool="ha_call_service", args=LIGHT_ON)
                # No guardian in this gate.toml: an ask fails closed.
                assert asked["error"]["code"] == -32004  # type: ignore[index]

                policy.write_text(ALLOW_LIGHTS)
                gw.process.send_signal(signal.SIGHUP)
                line = await gw.process.wait_for_output("configuration reloaded by SIGHUP")
                assert "policy.file sha256 " in line
                done = await call(ws, 2, "tool_request", tool="ha_call_service", args=LIGHT_ON)
                assert done["result"]["status"] == "executed"  # type: ignore[index]

                policy.write_text("rules: [")
                gw.process.send_signal(signal.SIGHUP)
                line = await gw.process.wait_for_output("configuration reload by SIGHUP failed")
                assert "invalid YAML" in line
                assert gw.alive()
                again = await call(ws, 3, "tool_request", tool="ha_call_service", args=LIGHT_ON)
                assert again["result"]["status"] == "executed"  # type: ignore[index]

                policy.write_text(ASK_LIGHTS)
                proc = await trio.to_thread.run_sync(
                    lambda: agentgate("reload", "--config", str(files.config))
                )
                assert proc.returncode == 0, proc.stderr
                assert proc.stdout.startswith(f"reloaded: {files.config}\n  policies: ")
                asked = await call(ws, 4, "tool_request", tool="ha_call_service", args=LIGHT_ON)
                assert asked["error"]["code"] == -32004  # type: ignore[index]
            gw.terminate()
            assert await gw.wait() == 0
        assert not (files.workdir / "agentgate.sock").exists()  # removed at a clean stop
    proc = agentgate("reload", "--config", str(files.config))
    assert proc.returncode == 3
    assert "no gateway answers on" in proc.stderr


def write_two_person(directory: Path, users: list[int]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "permissions.yaml").write_text(
        'rules:\n  - pattern: "ha_call_service(lock.*)"\n    action: ask\n    approvals: 2\n'
    )
    text = (
        '[gateway]\nlisten = "127.0.0.1:0"\n\n[agents.pi]\n'
        'token = "pi-token-0123456789abcdef"\n\n'
        f'[guardian.telegram]\ntoken = "123:abc"\nchat_id = -1\nallowed_users = {users}\n'
    )
    path = directory / "gate.toml"
    path.write_text(text)
    return path


def test_a_rule_needing_more_guardians_than_there_are_is_refused(tmp_path: Path) -> None:
    write_two_person(tmp_path, [111])
    proc = agentgate("config", "check", "gate.toml", "--insecure", "--no-bind", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        "rules[0].approvals: 2 guardians must allow, but guardian.telegram.allowed_users has 1"
        in proc.stderr
    )
    proc = agentgate("serve", "gate.toml", "--insecure", cwd=tmp_path)
    assert proc.returncode == 2
    assert "rules[0].approvals" in proc.stderr
    write_two_person(tmp_path, [111, 222])
    proc = agentgate("config", "check", "gate.toml", "--insecure", "--no-bind", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The terminal guardian is one person.
    proc = agentgate(
        "config", "check", "gate.toml", "--insecure", "--no-bind", "--terminal-guardian",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "but the terminal guardian has 1" in proc.stderr


def test_check_shows_approvals_and_quota(tmp_path: Path) -> None:
    policy = tmp_path / "permissions.yaml"
    policy.write_text(
        "rules:\n"
        '  - pattern: "ha_call_service(lock.*)"\n    action: ask\n    approvals: 2\n'
        '  - pattern: "ha_call_service(light.*)"\n    action: allow\n    quota: "20/h"\n'
    )
    lock = ["ha_call_service", "domain=lock", "service=unlock", "entity_id=lock.front_door"]
    proc = agentgate("check", "--policy", str(policy), *lock)
    assert proc.returncode == 3
    assert "approvals: 2 guardians must press Allow (two-person rule)\n" in proc.stdout
    proc = agentgate("check", "--policy", str(policy), "--json", *lock)
    assert json.loads(proc.stdout)["approvals"] == 2
    light = ["ha_call_service", "domain=light", "service=turn_on", "entity_id=light.kitchen"]
    proc = agentgate("check", "--policy", str(policy), *light)
    assert proc.returncode == 0
    assert "quota:     20 per hour for this agent, then it asks\n" in proc.stdout
    assert json.loads(agentgate("check", "--policy", str(policy), "--json", *light).stdout)[
        "quota"
    ] == ("20 per hour")
