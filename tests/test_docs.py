"""Documents that must stay true: the quick start and its transcript, the systemd unit's
paths, the operations guide's answers. Fast: they read files."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
TRANSCRIPT = (REPO / "docs" / "quickstart-transcript.md").read_text(encoding="utf-8")
OPERATIONS = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
UNIT = (REPO / "examples" / "agentgate.service").read_text(encoding="utf-8")


def _normal(line: str) -> str:
    """A shell line without its comment, its whitespace normalised."""
    return " ".join(re.sub(r"(^|\s+)#.*$", "", line).split())


def _quick_start_commands() -> list[str]:
    """Every shell line of README steps 1-5, and step 8's audit command: what the transcript
    must have run."""
    start = README.index("## Quick start")
    tried = README[start : README.index("**6. ", start)]
    watched = README[README.index("**8. ", start) : README.index("## Policy", start)]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", tried, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if _normal(line):
                commands.append(_normal(line))
    commands += re.findall(r"`(agentgate audit --config gate\.toml)`", watched)
    return commands


def test_every_quick_start_command_ran_in_the_transcript() -> None:
    commands = _quick_start_commands()
    assert len(commands) >= 14, commands
    ran = {_normal(line.split("$ ", 1)[1]) for line in TRANSCRIPT.splitlines()
           if re.match(r"^(gateway|agent)\$ ", line)}  # fmt: skip
    assert [c for c in commands if c not in ran] == []
    assert "What did not go as the README says" not in TRANSCRIPT
    assert "Not as the README says" not in TRANSCRIPT


def test_the_transcript_shows_a_card_decided_in_the_terminal_and_no_secret() -> None:
    assert "No phone and no Telegram are involved" in TRANSCRIPT
    assert "Approval needed" in TRANSCRIPT
    assert "presses Allow" in TRANSCRIPT
    assert "executed by" in TRANSCRIPT  # the audit table
    assert "<AGENT_TOKEN>" in TRANSCRIPT
    assert not re.search(r"eyJ[A-Za-z0-9_-]{20,}", TRANSCRIPT)  # no Home Assistant token


def test_the_unit_file_names_only_paths_its_header_creates() -> None:
    header = "\n".join(line for line in UNIT.splitlines() if line.startswith("#"))
    body = "\n".join(line for line in UNIT.splitlines() if not line.startswith("#"))
    (doc,) = re.findall(r"^Documentation=file://(\S+)$", body, re.MULTILINE)
    directory, name = doc.rsplit("/", 1)
    assert f"-t {directory} README.md docs/*.md" in header
    assert (REPO / "docs" / name).is_file()
    env_file = re.search(r"^EnvironmentFile=(\S+)$", body, re.MULTILINE)
    assert env_file is not None
    assert f"install -m 0600 /dev/null {env_file.group(1)}" in header
    for binary in re.findall(r"^Exec\w+=(\S+)", body, re.MULTILINE):
        assert binary == "/opt/agentgate/bin/agentgate"
    assert "python3 -m venv /opt/agentgate" in header
    assert "install -d -o agentgate -g agentgate -m 0700 /var/lib/agentgate" in header
    # The hand check runs as the service does, secrets from the environment file, none typed.
    assert "systemd-run --pipe --wait -p User=agentgate -p EnvironmentFile=" in header


def test_operations_answers_the_first_questions() -> None:
    for heading in (
        "### Try an approval without Telegram",
        "### Agent tokens: add, rotate, revoke",
        '### Grants ("Allow 1 h", "Always allow"): list and revoke',
        "### A second guardian",
        "### The guardian's phone is lost",
    ):
        assert heading in OPERATIONS
    assert "umask 077" in OPERATIONS  # a backup readable by its owner only
    assert "decisions, warnings" not in OPERATIONS  # the journal does not hold decisions
