"""``agentgate check``, ``agentgate config check`` and ``agentgate hash-token`` (README, --help)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agentgate.cli import COMMANDS, main

REPO = Path(__file__).resolve().parent.parent
SHIPPED = str(REPO / "permissions.yaml")
TOKEN = "0123456789abcdef0123"

LIGHT = ["ha_call_service", "domain=light", "service=turn_on", "entity_id=light.bedroom"]
LOCK = ["ha_call_service", "domain=lock", "service=unlock", "entity_id=lock.front_door"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# --- check: exit status per decision --------------------------------------------------------


def test_check_allow_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(
        capsys, "check", "--policy", SHIPPED, "ha_get_state", "entity_id=sensor.temp"
    )
    assert status == 0
    assert out.splitlines() == [
        "signature: ha_get_state(sensor.temp)",
        "decision:  allow",
        "matched:   rule 0: ha_get_state(sensor.*) (allow)",
        "           sensor readings",
    ]
    assert err == ""


def test_check_deny_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "check", "--policy", SHIPPED, *LOCK)
    assert status == 1
    assert "decision:  deny" in out


def test_check_ask_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "check", "--policy", SHIPPED, *LIGHT)
    assert status == 3
    assert "signature: ha_call_service(light.turn_on, light.bedroom)" in out


def test_check_fallback_ask_exits_3(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "p.yaml"
    empty.write_text("rules: []\n", encoding="utf-8")
    status, out, _ = run(capsys, "check", "--policy", str(empty), "ha_get_states")
    assert status == 3
    assert "matched:   fallback (ask)" in out


SCENE_WITH_A_LOCK = [
    "ha_call_service",
    "domain=scene",
    "service=apply",
    'entities:={"light.kitchen": "on", "lock.front_door": "unlocked"}',
]


def test_check_shows_every_entity_and_why_it_is_there(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "check", "--policy", SHIPPED, *SCENE_WITH_A_LOCK)
    assert status == 1
    assert out.splitlines() == [
        "signature: ha_call_service(scene.apply, light.kitchen, lock.front_door)",
        "entities:  light.kitchen (a key of entities)",
        "           lock.front_door (a key of entities)",
        "decision:  deny",
        "matched:   rule 24: ha_call_service(*, lock.*) (deny)",
        "           no call that names a lock, wherever (homeassistant.toggle, scene.apply, ...)",
        "indirect:  scene.apply sets every state the scene holds, named here or not",
    ]
    status, out, _ = run(capsys, "check", "--json", "--policy", SHIPPED, *SCENE_WITH_A_LOCK)
    assert status == 1
    assert json.loads(out)["entities"] == [
        {"entity_id": "light.kitchen", "why": "a key of entities"},
        {"entity_id": "lock.front_door", "why": "a key of entities"},
    ]


def test_check_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "check", "--policy", SHIPPED, *LOCK, "--json")
    assert status == 1
    assert json.loads(out) == {
        "signature": "ha_call_service(lock.unlock, lock.front_door)",
        "decision": "deny",
        "matched": "rule 23: ha_call_service(lock.*) (deny)",
        "entities": [{"entity_id": "lock.front_door", "why": "entity_id"}],
    }


def test_check_json_values(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(
        capsys,
        "check",
        "--json",
        "--policy",
        SHIPPED,
        "ha_get_history",
        "entity_id=sensor.temp",
        "hours:=12.5",
    )
    assert status == 0
    assert json.loads(out)["signature"] == "ha_get_history(sensor.temp)"


def test_check_unknown_tool_uses_sorted_keys_and_warns(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "check", "--policy", SHIPPED, "my_tool", "b=2", "a=1")
    assert status == 3
    assert "signature: my_tool(1, 2)" in out
    assert "my_tool is not a known tool" in err


# --- check: invalid input exits 2 -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["ha_get_state", "entity_id=sensor.*"],
            "agentgate: invalid params: entity_id: forbidden character '*'",
        ),
        (
            ["ha_get_state", "entity_id:=[1]"],
            "agentgate: invalid params: entity_id: expected a string, got array",
        ),
        (
            ["ha_call_service", "domain=light", "service=turn_on", "area_id=kitchen"],
            "agentgate: invalid params: targeting by area_id is not allowed: "
            "name the entity with entity_id",
        ),
        (
            ["ha_get_history", "entity_id=sensor.t", "hours:=200"],
            "agentgate: invalid params: hours: must be greater than 0 and at most 168, got 200",
        ),
        (
            ["ha_get_state", "entity_id"],
            "agentgate: expected key=value or key:=JSON, got 'entity_id'",
        ),
        (["ha_get_state", "=x"], "agentgate: missing key in '=x'"),
        (["ha_get_state", "a=1", "a=2"], "agentgate: argument 'a' given twice"),
        (
            ["ha_get_history", "entity_id=sensor.t", "hours:=NaN"],
            "agentgate: hours: not JSON: 'NaN'",
        ),
        (["Bad-Tool"], "agentgate: invalid params: invalid tool name 'Bad-Tool'"),
    ],
)
def test_check_invalid_input_exits_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    status, out, err = run(capsys, "check", "--policy", SHIPPED, *args)
    assert status == 2
    assert out == ""
    assert err.startswith(message)


def test_check_needs_a_policy(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "check", "ha_get_states")
    assert status == 2
    assert "need --policy FILE" in err


def test_check_agent_needs_config(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "check", "--agent", "pi", "ha_get_states")
    assert status == 2
    assert "--agent needs --config" in err


def test_check_bad_policy_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text('rules:\n  - {pattern: "*", action: alow}\n', encoding="utf-8")
    status, _, err = run(capsys, "check", "--policy", str(bad), "ha_get_states")
    assert status == 2
    assert err == (
        f'agentgate: {bad}: rules[0].action: expected one of allow, deny, ask, got "alow"\n'
    )
    status, _, err = run(capsys, "check", "--policy", str(tmp_path / "nope.yaml"), "ha_get_states")
    assert status == 2
    assert "cannot read: No such file or directory" in err


def test_check_prints_lint_warnings(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text('rules:\n  - {pattern: "ha_get_stat(*)", action: allow}\n', encoding="utf-8")
    status, _, err = run(capsys, "check", "--policy", str(path), "ha_get_states")
    assert status == 3
    assert err == (
        f"agentgate: warning: {path}: rules[0] 'ha_get_stat(*)': "
        "no known tool is called 'ha_get_stat' (did you mean ha_get_state?)\n"
    )


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--policy"]) == 2
    assert main(["nonsense"]) == 2
    assert main([]) == 2
    assert main(["config"]) == 2
    capsys.readouterr()
    assert main(["--help"]) == 0


# --- check with --config / --agent ----------------------------------------------------------


@pytest.fixture
def gate_toml(tmp_path: Path) -> Path:
    (tmp_path / "permissions.yaml").write_text(
        Path(SHIPPED).read_text(encoding="utf-8"), encoding="utf-8"
    )
    (tmp_path / "pi.yaml").write_text(
        'rules:\n  - {pattern: "ha_call_service(light.*)", action: allow}\n', encoding="utf-8"
    )
    path = tmp_path / "gate.toml"
    path.write_text(
        f"""
[gateway]
listen = "127.0.0.1:0"

[policy]
file = "permissions.yaml"

[agents.pi]
token = "{TOKEN}"
policy = "pi.yaml"

[agents.other]
token_sha256 = "{hashlib.sha256(b"another-token-0123456789").hexdigest()}"
""",
        encoding="utf-8",
    )
    return path


def test_check_uses_the_agents_policy(capsys: pytest.CaptureFixture[str], gate_toml: Path) -> None:
    status, out, _ = run(capsys, "check", "--config", str(gate_toml), "--agent", "pi", *LIGHT)
    assert status == 0
    assert "matched:   rule 0: ha_call_service(light.*) (allow)" in out


def test_check_agent_without_own_policy_uses_default(
    capsys: pytest.CaptureFixture[str], gate_toml: Path
) -> None:
    status, _, _ = run(capsys, "check", "--config", str(gate_toml), "--agent", "other", *LIGHT)
    assert status == 3
    status, _, _ = run(capsys, "check", "--config", str(gate_toml), *LIGHT)
    assert status == 3


def test_check_policy_wins_over_config(capsys: pytest.CaptureFixture[str], gate_toml: Path) -> None:
    argv = ["check", "--policy", SHIPPED, "--config", str(gate_toml), "--agent", "pi", *LIGHT]
    status, _, _ = run(capsys, *argv)
    assert status == 3


def test_check_unknown_agent(capsys: pytest.CaptureFixture[str], gate_toml: Path) -> None:
    status, _, err = run(capsys, "check", "--config", str(gate_toml), "--agent", "nope", *LIGHT)
    assert status == 2
    assert f"no agent 'nope' in {gate_toml} (agents: other, pi)" in err


# --- config check -----------------------------------------------------------------------------


def test_config_check_ok(
    capsys: pytest.CaptureFixture[str], gate_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(gate_toml.parent)
    status, out, err = run(capsys, "config", "check", "gate.toml", "--insecure")
    assert status == 0
    assert (
        out
        == "ok: 2 agents, policies: policy.file (permissions.yaml), agents.pi.policy (pi.yaml)\n"
    )
    assert err == ""


def test_config_check_needs_tls_without_insecure(
    capsys: pytest.CaptureFixture[str], gate_toml: Path
) -> None:
    status, out, err = run(capsys, "config", "check", str(gate_toml))
    assert status == 2
    assert out == ""
    assert "gateway.tls_cert: required" in err


def test_config_check_bad_policy(capsys: pytest.CaptureFixture[str], gate_toml: Path) -> None:
    (gate_toml.parent / "pi.yaml").write_text("rules: [\n", encoding="utf-8")
    status, _, err = run(capsys, "config", "check", str(gate_toml), "--insecure")
    assert status == 2
    assert "pi.yaml: invalid YAML" in err


def test_config_check_prints_policy_warnings(
    capsys: pytest.CaptureFixture[str], gate_toml: Path
) -> None:
    (gate_toml.parent / "pi.yaml").write_text(
        'rules:\n  - {pattern: "ha_get_states(*)", action: allow}\n', encoding="utf-8"
    )
    status, out, err = run(capsys, "config", "check", str(gate_toml), "--insecure")
    assert status == 0
    assert out.startswith("ok: 2 agents")
    assert "agentgate: warning: " in err
    assert "ha_get_states takes no arguments" in err


def test_config_check_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, _, err = run(capsys, "config", "check", str(tmp_path / "gate.toml"))
    assert status == 2
    assert "cannot read" in err


# --- hash-token ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stdin", [TOKEN, TOKEN + "\n", TOKEN + "\r\n"])
def test_hash_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stdin: str
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status, out, err = run(capsys, "hash-token")
    assert status == 0
    assert out == hashlib.sha256(TOKEN.encode()).hexdigest() + "\n"
    assert err == ""


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_hash_token_empty_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stdin: str
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status, out, err = run(capsys, "hash-token")
    assert (status, out) == (2, "")
    assert err == "agentgate: hash-token: empty token on stdin\n"


def test_hash_token_warns_about_short_tokens(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    status, out, err = run(capsys, "hash-token")
    assert status == 0
    assert out == hashlib.sha256(b"short").hexdigest() + "\n"
    assert "shorter than 16 characters" in err


def test_hash_token_matches_the_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from agentgate.config import load_config

    monkeypatch.setattr(sys, "stdin", io.StringIO(TOKEN + "\n"))
    _, digest, _ = run(capsys, "hash-token")
    (tmp_path / "permissions.yaml").write_text("rules: []\n", encoding="utf-8")
    (tmp_path / "gate.toml").write_text(
        f'[agents.pi]\ntoken_sha256 = "{digest.strip()}"\n', encoding="utf-8"
    )
    config = load_config(tmp_path / "gate.toml", insecure=True)
    found = config.find_agent(TOKEN)
    assert found is not None
    assert found.name == "pi"


# --- serve's config errors and the dispatch table -----------------------------------------------


def test_serve_with_a_broken_config_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, _, err = run(capsys, "serve", str(tmp_path / "missing.toml"))
    assert status == 2
    assert "missing.toml" in err


def test_dispatch_table_names() -> None:
    assert [command.name for command in COMMANDS] == [
        "serve",
        "check",
        "config",
        "hash-token",
        "audit",
        "reload",
        "grants",
        "undo",
        "call",
        "tools",
        "pending",
        "mcp",
    ]


# --- the real thing: python -m agentgate ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "status", "decision"),
    [
        (["ha_get_state", "entity_id=sensor.temp"], 0, "allow"),
        (LIGHT, 3, "ask"),
        (LOCK, 1, "deny"),
    ],
)
def test_python_m_agentgate_check(argv: list[str], status: int, decision: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentgate",
            "check",
            "--policy",
            "permissions.yaml",
            "--json",
            *argv,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == status, proc.stderr
    assert json.loads(proc.stdout)["decision"] == decision
    assert proc.stderr == ""
