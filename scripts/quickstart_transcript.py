"""Run the README's quick start from a fresh clone against a real Home Assistant core, with the
terminal guardian, and write what happened to docs/quickstart-transcript.md.

    AGENTGATE_REAL_HA_CACHE=.cache/realha .venv/bin/python scripts/quickstart_transcript.py

Steps 1-5 and 8 of the README are run as written, each in bash with the environment the steps
before it left (a second terminal, for the agent, starts from a clean one). What a person
would type differently is substituted and said so: the repository to clone, the Home Assistant
token and URL (a real core started with scripts/real-ha), the agent token pasted into the
second terminal. Secrets never reach the transcript: every token is shown as <NAME>.

Needs git, openssl, bash, Python 3.11-3.13 as python3, a package index for `pip install .`, and
what scripts/real-ha needs (Python 3.13; AGENTGATE_REAL_HA_CACHE reuses an installed core).
Exit status 0 when every step did what the README says, 1 otherwise (the transcript is written
either way, so a failing step can be read).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
STEP_TIMEOUT = 600  # seconds for one command (pip install included)
WAIT = 60  # seconds for the gateway to show something


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Shell:
    """One terminal: bash commands run one after the other, each seeing the environment and
    the directory the one before it left."""

    def __init__(self, name: str, cwd: Path, env: dict[str, str], secrets: dict[str, str]):
        self.name = name
        self.cwd = cwd
        self.env = env
        self.secrets = secrets  # value -> what the transcript shows instead

    def mask(self, text: str) -> str:
        for value, shown in self.secrets.items():
            if value:
                text = text.replace(value, shown)
        return text

    def run(self, command: str, *, stdin: str = "") -> tuple[int, str]:
        """Run ``command`` (bash), return (status, output with stderr), secrets masked."""
        with tempfile.TemporaryDirectory() as scratch:
            env_file, cwd_file = Path(scratch, "env"), Path(scratch, "cwd")
            script = (
                f"{command}\nstatus=$?\nenv -0 > {shlex.quote(str(env_file))}\n"
                f"pwd > {shlex.quote(str(cwd_file))}\nexit $status\n"
            )
            done = subprocess.run(
                ["bash", "-c", script],
                cwd=self.cwd,
                env=self.env,
                input=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=STEP_TIMEOUT,
                check=False,
            )
            if env_file.exists():
                pairs = env_file.read_text().split("\0")
                self.env = dict(p.split("=", 1) for p in pairs if "=" in p)
            if cwd_file.exists():
                self.cwd = Path(cwd_file.read_text().strip())
        return done.returncode, self.mask(done.stdout)


class Transcript:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.failures: list[str] = []

    def text(self, text: str) -> None:
        self.parts.append(text.strip("\n") + "\n")

    def block(self, lines: str, lang: str = "console") -> None:
        self.parts.append(f"```{lang}\n{lines.rstrip()}\n```\n")

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)
            self.text(f"**Not as the README says:** {what}")


def step(
    shell: Shell,
    out: Transcript,
    command: str,
    *,
    shown: str | None = None,
    expect_status: int | None = 0,
    keep: int = 60,
) -> str:
    """Run one command; show it (``shown``: how the README writes it) and its output."""
    status, output = shell.run(command)
    # pip's notices and this machine's index settings say nothing about agentgate
    noise = ("[notice]", "WARNING: Location", "Looking in ")
    lines = [x for x in output.rstrip("\n").splitlines() if not x.startswith(noise)]
    if len(lines) > keep:
        cut = len(lines) - keep
        lines = [*lines[: keep // 2], f"… ({cut} lines)", *lines[-keep // 2 :]]
    shown_command = shell.mask(shown or command)
    out.block("\n".join([f"{shell.name}$ {shown_command}", *lines]))
    if expect_status is not None:
        out.expect(status == expect_status, f"`{shown_command}` exited {status}")
    return output


class Gateway:
    """``agentgate serve`` in terminal 1, its output in a file, keys on its stdin."""

    def __init__(self, shell: Shell, command: str) -> None:
        self.shell = shell
        self.log = Path(tempfile.mkstemp(prefix="serve-", suffix=".log")[1])
        self.sink: IO[bytes] = self.log.open("wb")
        self.popen = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=shell.cwd,
            env={**shell.env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.PIPE,
            stdout=self.sink,
            stderr=subprocess.STDOUT,
        )
        self.shown = 0

    def output(self) -> str:
        return self.shell.mask(self.log.read_text(errors="replace"))

    def wait_for(self, needle: str, count: int = 1) -> bool:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.output().count(needle) >= count:
                return True
            if self.popen.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    def news(self) -> str:
        """What it printed since the last call."""
        text = self.output()
        new, self.shown = text[self.shown :], len(text)
        return new

    def press(self, key: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(key.encode())
        self.popen.stdin.flush()

    def stop(self) -> int:
        self.popen.send_signal(signal.SIGINT)
        try:
            return self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()
        finally:
            self.sink.close()


def start_home_assistant(work: Path) -> tuple[str, str, Path]:
    directory = work / "homeassistant"
    port = free_port()
    done = subprocess.run(
        [str(REPO / "scripts" / "real-ha"), "start", str(directory), str(port)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"scripts/real-ha start failed:\n{done.stderr}")
    url, token = done.stdout.split()
    return url, token, directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "quickstart-transcript.md"))
    args = parser.parse_args(argv)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="agentgate-quickstart-"))
    ha_url, ha_token, ha_dir = start_home_assistant(work)
    base_env = {
        "HOME": os.environ.get("HOME", str(work)),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
    }
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONFIG_FILE"):
        if name in os.environ:
            base_env[name] = os.environ[name]
    pyenv = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    if Path(pyenv, "shims").is_dir():  # python3 as the user has it
        base_env["PATH"] = f"{pyenv}/shims:{pyenv}/bin:" + base_env["PATH"]
    secrets = {ha_token: "<HA_TOKEN>"}
    out = Transcript()
    gateway: Gateway | None = None
    try:
        out.text(
            f"""# The quick start, run from a fresh clone

Generated by `scripts/quickstart_transcript.py` on {dt.date.today().isoformat()} from commit
`{commit}`: README steps 1-5 and 8 as written, in bash, against a real Home Assistant core
(2025.4.4, started with `scripts/real-ha` at `{ha_url}`, with the `sun` and `demo`
integrations, so it has `sun.sun`, `light.kitchen` and `lock.front_door`), with the terminal
guardian. Substituted, and said so where it happens: the repository to clone, the Home
Assistant URL and token, the agent token pasted into the second terminal. Every token is shown
as `<NAME>`. Steps 6 and 7 need a real Telegram bot and a second device, so they are not here.
Re-run it with `.venv/bin/python scripts/quickstart_transcript.py`.

## 1. Install"""
        )
        one = Shell("gateway", work, dict(base_env), secrets)
        step(
            one,
            out,
            f"git clone --quiet {shlex.quote(str(REPO))} agentgate && cd agentgate"
            f" && git checkout --quiet {commit}",
            shown="git clone <this repository> agentgate && cd agentgate",
        )
        step(one, out, "python3 -m venv .venv && .venv/bin/pip install .", keep=2)
        step(one, out, 'export PATH="$PWD/.venv/bin:$PATH"')

        out.text(
            "## 2.-3. The Home Assistant token, gate.toml, the secrets\n\n"
            "The token comes from the core `scripts/real-ha` started (a person creates one in"
            " their profile). In `gate.toml`, the README's one edit: `[services.homeassistant]"
            " url`."
        )
        step(
            one,
            out,
            f'sed -i \'s#^url = "http://homeassistant.local:8123"#url = "{ha_url}"#\' gate.toml'
            " && grep -n '^url' gate.toml",
        )
        listen_port = 8443
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0", 8443))  # the README's own listen address
            except OSError:
                listen_port = free_port()
        if listen_port != 8443:
            out.text(
                f"Port 8443 is taken on this machine (other tests run here): the gateway"
                f" listens on {listen_port} instead, and the commands below say so."
            )
            step(one, out, f"sed -i 's#^listen = .*#listen = \"0.0.0.0:{listen_port}\"#' gate.toml")
        step(
            one,
            out,
            "export AGENT_TOKEN="
            "\"$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')\"",
        )
        agent_token = one.env["AGENT_TOKEN"]
        secrets[agent_token] = "<AGENT_TOKEN>"
        step(
            one,
            out,
            f'export HA_TOKEN="{ha_token}"',
            shown='export HA_TOKEN="eyJ..."                         # from Home Assistant',
        )
        step(one, out, 'echo "agent token: $AGENT_TOKEN"')

        out.text("## 4. A TLS certificate")
        step(one, out, "mkdir -p certs")
        step(
            one,
            out,
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -days 825 -nodes"
            ' -keyout certs/gate.key -out certs/gate.crt -subj "/CN=agentgate"'
            ' -addext "subjectAltName=DNS:gate.local,DNS:localhost,IP:127.0.0.1"',
        )
        step(one, out, "chmod 600 certs/gate.key")

        out.text(
            "## 5. Try it before you create a bot\n\nFirst what a mistake looks like: the"
            " certificate's key swapped for the certificate itself. Then the real check."
        )
        step(
            one,
            out,
            "sed 's#^tls_key = .*#tls_key = \"certs/gate.crt\"#' gate.toml > mistake.toml"
            " && agentgate config check mistake.toml --terminal-guardian; rm mistake.toml",
            expect_status=None,
        )
        check = step(one, out, "agentgate config check gate.toml --terminal-guardian")
        out.expect(check.startswith("ok: "), "config check did not say ok")

        out.text(
            "Terminal 1 runs the gateway, with the approval cards in it (its output is shown"
            " as it comes, between the agent's commands):"
        )
        out.block("gateway$ agentgate serve gate.toml --terminal-guardian")
        gateway = Gateway(one, "agentgate serve gate.toml --terminal-guardian")
        out.expect(gateway.wait_for("listening on wss://"), "the gateway did not listen")
        out.block(gateway.news(), "text")

        out.text(
            "Terminal 2 is the agent, on the same machine, in a fresh environment; the agent"
            " token is pasted from step 3:"
        )
        two = Shell("agent", one.cwd, dict(base_env), secrets)
        url = "wss://localhost:8443" if listen_port == 8443 else f"wss://localhost:{listen_port}"
        step(two, out, 'export PATH="$PWD/.venv/bin:$PATH"')
        step(
            two,
            out,
            f"export AGENTGATE_URL={url} AGENTGATE_TOKEN={shlex.quote(agent_token)}",
            shown=f"export AGENTGATE_URL={url} AGENTGATE_TOKEN=<the agent token>",
        )
        read = step(two, out, "agentgate call ha_get_state entity_id=sun.sun --ca certs/gate.crt")
        out.expect('"entity_id": "sun.sun"' in read, "sun.sun was not read")

        out.text("The light: the policy says *ask*, so the card appears in terminal 1.")
        light = (
            "agentgate call ha_call_service domain=light service=turn_on"
            " entity_id=light.kitchen --ca certs/gate.crt"
        )
        with tempfile.TemporaryFile("w+") as light_out:
            call = subprocess.Popen(
                ["bash", "-c", light],
                cwd=two.cwd,
                env=two.env,
                stdout=light_out,
                stderr=subprocess.STDOUT,
                text=True,
            )
            card = gateway.wait_for("Your move")
            out.expect(card, "no approval card appeared in terminal 1")
            out.text("Terminal 1 shows the card; a is pressed there:")
            gateway.press("a")
            status = call.wait(WAIT)
            gateway.wait_for("card updated")
            out.block(gateway.news(), "text")
            light_out.seek(0)
            out.text("Terminal 2, meanwhile:")
            out.block(f"agent$ {light}\n{two.mask(light_out.read())}")
            out.expect(status == 0, f"the light call exited {status}")

        out.text("The lock: denied by policy, nobody is asked (exit status 1).")
        step(
            two,
            out,
            "agentgate call ha_call_service domain=lock service=unlock entity_id=lock.front_door"
            " --ca certs/gate.crt",
            expect_status=1,
        )
        out.text("What the agent hears when its TLS settings are wrong (exit status 3):")
        step(two, out, "agentgate call ha_get_state entity_id=sun.sun", expect_status=3)
        plain = url.replace("wss://", "ws://")
        step(
            two,
            out,
            f"agentgate call ha_get_state entity_id=sun.sun --url {plain}",
            expect_status=3,
        )
        out.text("And terminal 1, which logs the failed handshake:")
        gateway.wait_for("TLS handshake from")
        out.block(gateway.news(), "text")

        out.text(
            "## 8. Watch what happens\n\nIn terminal 2, where no secret is set: the audit log"
            " reads only the store's path from `gate.toml`."
        )
        audit = step(two, out, "agentgate audit --config gate.toml")
        out.expect("executed by" in audit, "the audit log has no guardian-approved row")

        out.text("Ctrl-C in terminal 1 stops the gateway:")
        stopped = gateway.stop()
        out.block(gateway.news(), "text")
        out.expect(stopped == 0, f"agentgate serve exited {stopped}")
        gateway = None
    finally:
        if gateway is not None:
            gateway.stop()
        subprocess.run(
            [str(REPO / "scripts" / "real-ha"), "stop", str(ha_dir)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        shutil.rmtree(work, ignore_errors=True)
    if out.failures:
        listed = "\n".join(f"- {failure}" for failure in out.failures)
        out.text(f"## What did not go as the README says\n\n{listed}")
    text = "\n".join(out.parts)
    text = re.sub(r"[ \t]+\n", "\n", text)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(out.failures)} problems)")
    return 1 if out.failures else 0


if __name__ == "__main__":
    sys.exit(main())
