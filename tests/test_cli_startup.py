"""``agentgate config check`` checks what ``serve`` needs, and ``serve`` fails in one line.

Every test runs the real ``agentgate`` command in a subprocess, as an operator (or systemd's
``ExecStartPre=``) does: exit status, stdout and stderr are the behaviour under test. Nothing
here depends on file modes (the suite may run as root, for whom every mode bit says yes).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import trio
import trustme

from agentgate.store import open_store
from agentgate.testing.harness import write_certificates

pytestmark = pytest.mark.slow

AGENTGATE = Path(sys.executable).parent / "agentgate"
TOKEN = "pi-token-0123456789abcdef"
ENV = {"AGENT_TOKEN": TOKEN, "HA_TOKEN": "home-assistant-token", "BOT_TOKEN": "123:abc"}


def agentgate(
    *argv: str, cwd: Path, env: Mapping[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """``agentgate ARGV`` as a user runs it; a hang fails the test after 60 s."""
    environ = {k: v for k, v in os.environ.items() if k not in ENV}
    environ.update(ENV if env is None else env)
    return subprocess.run(
        [str(AGENTGATE), *argv],
        cwd=cwd,
        env=environ,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write_gate(
    directory: Path, *, listen: str = "127.0.0.1:0", extra: str = "", tls: bool = True
) -> Path:
    (directory / "permissions.yaml").write_text(
        'rules:\n  - {pattern: "ha_get_state(sensor.*)", action: allow}\n', encoding="utf-8"
    )
    lines = ["[gateway]", f'listen = "{listen}"']
    if tls:
        (directory / "certs").mkdir(exist_ok=True)
        _, cert, key = write_certificates(directory / "certs")
        lines += [f'tls_cert = "{cert.relative_to(directory)}"']
        lines += [f'tls_key = "{key.relative_to(directory)}"']
    lines += ["", "[agents.pi]", 'token = "${AGENT_TOKEN}"', "", extra]
    path = directory / "gate.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port this test process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def assert_one_line_exit_2(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("agentgate: ")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], proc.stderr


# --- config check: every problem in one run ------------------------------------------------------


def test_config_check_reports_every_problem_at_once(tmp_path: Path) -> None:
    """Secrets, a typo'd key, a missing certificate and a typo'd tool: one run, every line."""
    path = write_gate(tmp_path, extra='[store]\npathh = "x.db"\n', tls=False)
    text = path.read_text().replace(
        'listen = "127.0.0.1:0"',
        'listen = "127.0.0.1:0"\ntls_cert = "certs/gate.crt"\ntls_key = "certs/gate.key"',
    )
    path.write_text(text)
    (tmp_path / "permissions.yaml").write_text(
        'rules:\n  - {pattern: "ha_call_servce(lock.*)", action: deny}\n'
    )
    proc = agentgate("config", "check", "gate.toml", cwd=tmp_path, env={})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "agentgate: gate.toml: agents.pi.token: environment variable AGENT_TOKEN is not set",
        "agentgate: gate.toml: store.pathh: unknown key (did you mean path?)",
        f"agentgate: gate.toml: gateway.tls_cert: file not found: {tmp_path}/certs/gate.crt",
        f"agentgate: gate.toml: gateway.tls_key: file not found: {tmp_path}/certs/gate.key",
        f"agentgate: {tmp_path}/permissions.yaml: rules[0] 'ha_call_servce(lock.*)': no known"
        " tool is called 'ha_call_servce' (did you mean ha_call_service?);"
        " --allow-unknown-tools accepts it",
    ]


def test_config_check_ok_and_its_flags(tmp_path: Path) -> None:
    write_gate(tmp_path)
    proc = agentgate("config", "check", "gate.toml", cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == "ok: 1 agent, policies: policy.file (permissions.yaml)\n"
    # --no-secrets: the tokens' variables are not needed (audit, check --config do the same).
    proc = agentgate("config", "check", "gate.toml", "--no-secrets", cwd=tmp_path, env={})
    assert (proc.returncode, proc.stderr) == (0, "")
    proc = agentgate("config", "check", "gate.toml", cwd=tmp_path, env={})
    assert proc.returncode == 2
    assert "AGENT_TOKEN is not set" in proc.stderr


def test_unknown_tool_is_an_error_unless_allowed(tmp_path: Path) -> None:
    write_gate(tmp_path)
    (tmp_path / "permissions.yaml").write_text(
        'rules:\n  - {pattern: "ha_call_servce(lock.*)", action: deny}\n'
    )
    assert_one_line_exit_2(
        agentgate("config", "check", "gate.toml", cwd=tmp_path),
        "no known tool is called 'ha_call_servce' (did you mean ha_call_service?)",
    )
    proc = agentgate("config", "check", "gate.toml", "--allow-unknown-tools", cwd=tmp_path)
    assert proc.returncode == 0
    assert "agentgate: warning: " in proc.stderr
    assert "ha_call_servce" in proc.stderr


# --- what serve needs: the listen address, the store, the TLS files ---------------------------


@pytest.mark.parametrize("command", [["config", "check"], ["serve"]])
def test_port_in_use_names_the_holder(tmp_path: Path, held_port: int, command: list[str]) -> None:
    write_gate(tmp_path, listen=f"127.0.0.1:{held_port}")
    proc = agentgate(*command, "gate.toml", cwd=tmp_path)
    assert_one_line_exit_2(
        proc,
        f"gate.toml: gateway.listen: cannot listen on 127.0.0.1:{held_port}",
        f"already in use by pid {os.getpid()}",
    )
    proc = agentgate("config", "check", "gate.toml", "--no-bind", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("command", [["config", "check"], ["serve"]])
def test_store_that_cannot_be_created_or_opened(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    write_gate(tmp_path, extra='[store]\npath = "a-file/data/agentgate.db"\n')
    proc = agentgate(*command, "gate.toml", cwd=tmp_path)
    assert_one_line_exit_2(proc, "gate.toml: store.path: cannot create", "is not a directory")

    write_gate(tmp_path, extra='[store]\npath = "gate.toml"\n')
    proc = agentgate(*command, "gate.toml", cwd=tmp_path)
    assert_one_line_exit_2(proc, "store.path:", "is not an agentgate store (not an SQLite file)")


def _other_key(directory: Path) -> Path:
    other = trustme.CA().issue_cert("127.0.0.1")
    path = directory / "other.key"
    other.private_key_pem.write_to_path(str(path))
    path.chmod(0o600)
    return path


def _encrypted_key(directory: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    plain = serialization.load_pem_private_key(
        (directory / "certs" / "gate.key").read_bytes(), password=None
    )
    path = directory / "encrypted.key"
    path.write_bytes(
        plain.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("command", [["config", "check"], ["serve"]])
@pytest.mark.parametrize(
    ("case", "needles"),
    [
        (
            "swapped",
            ["gateway.tls_cert:", "holds no PEM certificate (tls_cert and tls_key swapped?)"],
        ),
        ("key is the cert", ["gateway.tls_key:", "holds no PEM private key"]),
        ("other key", ["gateway.tls_key:", "is not the private key of the certificate"]),
        ("encrypted", ["gateway.tls_key:", "encrypted with a passphrase"]),
        ("unreadable", ["gateway.tls_key:", "cannot read", "Is a directory"]),
    ],
)
def test_tls_files_that_cannot_serve(
    tmp_path: Path, command: list[str], case: str, needles: list[str]
) -> None:
    path = write_gate(tmp_path)
    cert, key = "certs/gate.crt", "certs/gate.key"
    replace = {
        "swapped": (key, cert),
        "key is the cert": (cert, cert),
        "other key": (cert, str(_other_key(tmp_path))),
        "encrypted": (cert, str(_encrypted_key(tmp_path))),
        "unreadable": (cert, "certs"),
    }[case]
    text = path.read_text().replace(f'tls_cert = "{cert}"', f'tls_cert = "{replace[0]}"')
    path.write_text(text.replace(f'tls_key = "{key}"', f'tls_key = "{replace[1]}"'))
    if case == "unreadable":  # a directory: "not a file" in config, then nothing else to say
        needles = ["gateway.tls_key:", "not a file"]
    # stdin is a pipe with nothing in it: an OpenSSL passphrase prompt would fail, not hang.
    proc = agentgate(*command, "gate.toml", cwd=tmp_path)
    if case == "swapped":
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert "tls_cert and tls_key swapped?" in proc.stderr
        return
    assert_one_line_exit_2(proc, *needles)


def test_insecure_is_refused_off_loopback(tmp_path: Path) -> None:
    write_gate(tmp_path, listen="0.0.0.0:0", tls=False)
    proc = agentgate("serve", "gate.toml", "--insecure", cwd=tmp_path)
    assert_one_line_exit_2(proc, "gateway.listen: --insecure", "only allowed on a loopback address")


def test_insecure_is_refused_for_an_mcp_endpoint_off_loopback(tmp_path: Path) -> None:
    write_gate(tmp_path, tls=False, extra='[mcp]\nlisten = "0.0.0.0:0"\n')
    proc = agentgate("serve", "gate.toml", "--insecure", cwd=tmp_path)
    assert_one_line_exit_2(proc, "mcp.listen: --insecure", "only allowed on a loopback address")


def test_a_failure_while_starting_is_one_line_traceback_only_with_debug(tmp_path: Path) -> None:
    """A store written by a newer agentgate fails inside the running start-up, not in the
    checks before it: still one line and exit 2; ``--log-level debug`` adds the traceback."""
    write_gate(tmp_path)
    store = tmp_path / "data" / "agentgate.db"
    store.parent.mkdir()
    with sqlite3.connect(store) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (999)")
    conn.close()
    proc = agentgate("serve", "gate.toml", cwd=tmp_path)
    assert_one_line_exit_2(proc, "gate.toml: store.path:", "newer than this agentgate")
    proc = agentgate("serve", "gate.toml", "--log-level", "debug", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("agentgate: gate.toml: store.path:")


# --- secrets only where they are used ------------------------------------------------------------


def test_audit_and_check_read_gate_toml_without_any_secret(tmp_path: Path) -> None:
    """The shipped gate.toml names three secrets; reading the audit log or checking a request
    needs none of them (the systemd unit keeps them in a file only systemd reads)."""
    shipped = Path(__file__).resolve().parent.parent
    for name in ("gate.toml", "permissions.yaml"):
        (tmp_path / name).write_text((shipped / name).read_text())

    async def create_store() -> None:
        async with open_store(tmp_path / "data" / "agentgate.db", inline=True):
            pass

    trio.run(create_store)
    proc = agentgate("audit", "--config", "gate.toml", cwd=tmp_path, env={})
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == "(no audit rows match)\n"
    proc = agentgate(
        "check", "--config", "gate.toml", "ha_get_state", "entity_id=sun.sun", cwd=tmp_path, env={}
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "decision:  allow" in proc.stdout
    proc = agentgate("config", "check", "gate.toml", "--no-secrets", "--insecure", cwd=tmp_path,
                     env={})  # fmt: skip
    assert "environment variable" not in proc.stderr
