"""gate.toml loading: the shipped example, every error message exactly, paths, tokens."""

import hashlib
import shutil
from pathlib import Path

import pytest

from agentgate.config import (
    AgentConfig,
    Config,
    ConfigError,
    GatewayConfig,
    load_config,
    policy_files,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "gate.toml"

TOKEN = "pi-token-0123456789abcdef"
ENV = {
    "AGENT_TOKEN": TOKEN,
    "GUARDIAN_BOT_TOKEN": "123456:telegram-bot-token",
    "HA_TOKEN": "home-assistant-long-lived-token",
}

MINIMAL = """\
[gateway]
listen = "127.0.0.1:0"
tls_cert = "certs/gate.crt"
tls_key = "certs/gate.key"

[agents.pi]
token = "${AGENT_TOKEN}"
"""


def _write(directory: Path, text: str, *, certs: bool = True) -> Path:
    """gate.toml with ``text`` in ``directory``, next to a policy file (and TLS files)."""
    (directory / "permissions.yaml").write_text("defaults: []\nrules: []\n")
    if certs:
        (directory / "certs").mkdir(exist_ok=True)
        (directory / "certs" / "gate.crt").write_text("cert")
        (directory / "certs" / "gate.key").write_text("key")
    path = directory / "gate.toml"
    path.write_text(text)
    return path


def _error(path: Path, *, env: dict[str, str] | None = None, insecure: bool = False) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV if env is None else env, insecure=insecure)
    return str(info.value)


# --------------------------------------------------------------------------- shipped example


def _copy_shipped(directory: Path) -> Path:
    path = directory / "gate.toml"
    shutil.copy(SHIPPED, path)
    policy = REPO / "permissions.yaml"
    if policy.is_file():
        shutil.copy(policy, directory / "permissions.yaml")
    else:  # written in parallel by someone else; a stand-in keeps this test independent
        (directory / "permissions.yaml").write_text("defaults: []\nrules: []\n")
    return path


def test_shipped_config_loads_insecure(tmp_path: Path) -> None:
    config = load_config(_copy_shipped(tmp_path), env=ENV, insecure=True)

    assert config.source == tmp_path / "gate.toml"
    assert config.gateway == GatewayConfig(
        listen="0.0.0.0:8443",
        tls_cert=tmp_path / "certs/gate.crt",
        tls_key=tmp_path / "certs/gate.key",
        auth_deadline=10.0,
        approval_timeout=900.0,
    )
    assert (config.gateway.host, config.gateway.port) == ("0.0.0.0", 8443)
    assert config.store.path == tmp_path / "data/agentgate.db"
    assert config.policy.file == tmp_path / "permissions.yaml"
    assert list(config.agents) == ["pi"]
    pi = config.agents["pi"]
    assert (pi.name, pi.token, pi.token_sha256, pi.policy) == ("pi", TOKEN, None, None)
    telegram = config.guardian.telegram
    assert telegram is not None
    assert telegram.token == ENV["GUARDIAN_BOT_TOKEN"]
    assert telegram.chat_id == -1001234567890
    assert telegram.allowed_users == (123456789,)
    assert telegram.base_url is None
    ha = config.services.homeassistant
    assert ha is not None
    assert (ha.url, ha.token, ha.timeout) == (
        "http://homeassistant.local:8123",
        ENV["HA_TOKEN"],
        10.0,
    )
    limits = config.limits
    assert (
        limits.max_pending_per_agent,
        limits.requests_per_minute,
        limits.failed_auth_per_minute,
        limits.max_message_bytes,
    ) == (10, 60, 5, 65536)
    assert config.agent_limits("pi") == (60, 10)
    assert policy_files(config) == {"policy.file": tmp_path / "permissions.yaml"}


def test_shipped_config_loads_with_tls_files(tmp_path: Path) -> None:
    path = _copy_shipped(tmp_path)
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "gate.crt").write_text("cert")
    (tmp_path / "certs" / "gate.key").write_text("key")

    config = load_config(path, env=ENV)

    assert config.gateway.tls_cert == tmp_path / "certs" / "gate.crt"


def test_shipped_config_in_place() -> None:
    if not (REPO / "permissions.yaml").is_file():
        pytest.skip("permissions.yaml is not in the repository yet")
    config = load_config(SHIPPED, env=ENV, insecure=True)
    assert config.policy.file == REPO / "permissions.yaml"


def test_secrets_stay_out_of_repr(tmp_path: Path) -> None:
    config = load_config(_copy_shipped(tmp_path), env=ENV, insecure=True)
    text = repr(config)
    for secret in ENV.values():
        assert secret not in text


# --------------------------------------------------------------------------- defaults, paths


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL), env=ENV)

    assert (config.gateway.auth_deadline, config.gateway.approval_timeout) == (10.0, 900.0)
    assert (config.gateway.host, config.gateway.port) == ("127.0.0.1", 0)
    assert config.store.path == tmp_path / "data" / "agentgate.db"
    assert config.policy.file == tmp_path / "permissions.yaml"
    assert config.guardian.telegram is None
    assert config.services.homeassistant is None
    assert config.limits.max_message_bytes == 65536


def test_relative_paths_are_relative_to_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "policies").mkdir()
    (conf / "policies" / "pi.yaml").write_text("rules: []\n")
    _write(
        conf,
        MINIMAL
        + 'policy = "policies/pi.yaml"\n'
        + '[store]\npath = "../var/gate.db"\n'
        + f'[policy]\nfile = "{conf / "permissions.yaml"}"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config("../etc/gate.toml", env=ENV)

    assert config.source == conf / "gate.toml"
    assert config.store.path == tmp_path / "var" / "gate.db"
    assert config.policy.file == conf / "permissions.yaml"
    assert config.gateway.tls_cert == conf / "certs" / "gate.crt"
    assert config.agents["pi"].policy == conf / "policies" / "pi.yaml"
    assert config.agent_policy("pi") == conf / "policies" / "pi.yaml"
    assert policy_files(config) == {
        "policy.file": conf / "permissions.yaml",
        "agents.pi.policy": conf / "policies" / "pi.yaml",
    }


def test_small_positive_values_are_accepted(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'tls_key = "certs/gate.key"',
        'tls_key = "certs/gate.key"\nauth_deadline = 2\napproval_timeout = 0.5',
    )
    text += "requests_per_minute = 5000\nmax_pending = 1\n"
    text += "[limits]\nrequests_per_minute = 1\nmax_message_bytes = 1024\n"

    config = load_config(_write(tmp_path, text), env=ENV)

    assert (config.gateway.auth_deadline, config.gateway.approval_timeout) == (2.0, 0.5)
    assert config.limits.requests_per_minute == 1
    assert config.agent_limits("pi") == (5000, 1)


def test_env_substitution_in_nested_strings_and_lists(tmp_path: Path) -> None:
    text = (
        MINIMAL.replace('"127.0.0.1:0"', '"${HOST}:${PORT}"')
        + '[guardian.telegram]\ntoken = "${BOT}"\nchat_id = 1\nallowed_users = [1]\n'
        + 'base_url = "http://${HOST}:8081/bot$${literal}"\n'
    )
    env = {**ENV, "HOST": "127.0.0.2", "PORT": "9000", "BOT": "1:abc"}

    config = load_config(_write(tmp_path, text), env=env)

    assert config.gateway.listen == "127.0.0.2:9000"
    assert config.guardian.telegram is not None
    assert config.guardian.telegram.token == "1:abc"
    assert config.guardian.telegram.base_url == "http://127.0.0.2:8081/bot${literal}"


def test_environment_defaults_to_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_TOKEN", TOKEN)
    assert load_config(_write(tmp_path, MINIMAL)).agents["pi"].token == TOKEN


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("[::1]:8443", "::1", 8443),
        ("localhost:0", "localhost", 0),
        ("0.0.0.0:65535", "0.0.0.0", 65535),
    ],
)
def test_listen_host_and_port(listen: str, host: str, port: int) -> None:
    gateway = GatewayConfig(listen=listen)
    assert (gateway.host, gateway.port) == (host, port)


def test_ha_url_trailing_slash_is_stripped(tmp_path: Path) -> None:
    text = MINIMAL + '[services.homeassistant]\nurl = "https://ha.example:8123/"\ntoken = "t"\n'
    config = load_config(_write(tmp_path, text), env=ENV)
    assert config.services.homeassistant is not None
    assert config.services.homeassistant.url == "https://ha.example:8123"


# --------------------------------------------------------------------------- tokens


def test_matches_plain_token() -> None:
    agent = AgentConfig(name="pi", token=TOKEN)
    assert agent.matches(TOKEN)
    assert not agent.matches(TOKEN + "x")
    assert not agent.matches("")
    assert not agent.matches("\ud800")  # a lone surrogate from JSON never crashes
    assert not agent.matches(None)  # type: ignore[arg-type]


def test_token_sha256_is_normalised_and_matches(tmp_path: Path) -> None:
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    text = MINIMAL.replace('token = "${AGENT_TOKEN}"', f'token_sha256 = "{digest.upper()}"')

    agent = load_config(_write(tmp_path, text), env={}).agents["pi"]

    assert agent.token is None
    assert agent.token_sha256 == digest
    assert agent.matches(TOKEN)
    assert not agent.matches("wrong-token-0123456789")


def test_find_agent(tmp_path: Path) -> None:
    text = MINIMAL + '[agents.kitchen]\ntoken = "kitchen-token-0123456789"\n'
    config = load_config(_write(tmp_path, text), env=ENV)
    assert config.find_agent("kitchen-token-0123456789") is config.agents["kitchen"]
    assert config.find_agent(TOKEN) is config.agents["pi"]
    assert config.find_agent("nobody-0123456789abc") is None


def test_agent_without_any_token_matches_nothing() -> None:
    assert not AgentConfig(name="pi").matches("")


# --------------------------------------------------------------------------- error messages


def test_missing_env_var(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    assert _error(path, env={}) == (
        f"{path}: agents.pi.token: environment variable AGENT_TOKEN is not set"
    )


def test_bad_env_references(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + '[store]\npath = "${1X}/${OPEN"\n')
    assert _error(path) == (
        f"{path}: store.path: invalid environment variable reference ${{1X}}\n"
        f"{path}: store.path: unterminated ${{ (write $${{ for a literal ${{)"
    )


def test_error_names_the_file_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, MINIMAL + '[limits]\nrequests_per_minute = "ten"\n')
    monkeypatch.chdir(tmp_path)
    assert _error(Path("gate.toml")) == (
        'gate.toml: limits.requests_per_minute: expected a positive integer, got "ten"'
    )


def test_typo_top_level(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "[limit]\nrequests_per_minute = 5\n")
    assert _error(path) == f"{path}: limit: unknown key (did you mean limits?)"


def test_typo_nested(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL.replace("listen =", "listne ="))
    assert _error(path) == f"{path}: gateway.listne: unknown key (did you mean listen?)"


def test_typo_in_agent_and_telegram(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + "policcy = 'x.yaml'\n"
        + "[guardian.telegram]\ntoken = 't'\nchat_id = 1\nallowed_users = [1]\nallowed_user = [2]\n"
    )
    path = _write(tmp_path, text)
    assert _error(path) == (
        f"{path}: agents.pi.policcy: unknown key (did you mean policy?)\n"
        f"{path}: guardian.telegram.allowed_user: unknown key (did you mean allowed_users?)"
    )


def test_unknown_key_without_a_close_match_lists_the_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "[store]\nlocation = 'x.db'\n")
    assert (
        _error(path)
        == f"{path}: store.location: unknown key (expected one of: path, synchronous, keep_days)"
    )


def test_every_stage_reports_at_once(tmp_path: Path) -> None:
    """A missing variable, a typo, a bad value and a missing TLS file: one run, four lines,
    and nothing that merely follows from one of them."""
    text = MINIMAL.replace("listen =", "listne =") + "[limits]\nrequests_per_minute = 0\n"
    path = _write(tmp_path, text, certs=False)
    assert _error(path, env={}).splitlines() == [
        f"{path}: agents.pi.token: environment variable AGENT_TOKEN is not set",
        f"{path}: gateway.listne: unknown key (did you mean listen?)",
        f"{path}: limits.requests_per_minute: expected a positive integer, got 0",
        f"{path}: gateway.tls_cert: file not found: {tmp_path / 'certs' / 'gate.crt'}",
        f"{path}: gateway.tls_key: file not found: {tmp_path / 'certs' / 'gate.key'}",
    ]


def test_a_table_that_cannot_be_read_still_lets_the_rest_be_checked(tmp_path: Path) -> None:
    text = MINIMAL + "[guardian.telegram]\ntoken = 't'\n" + '[policy]\nfile = "nope.yaml"\n'
    path = _write(tmp_path, text)
    assert _error(path).splitlines() == [
        f"{path}: guardian.telegram.chat_id: required key is missing",
        f"{path}: guardian.telegram.allowed_users: required key is missing",
        f"{path}: policy.file: file not found: {tmp_path / 'nope.yaml'}",
    ]


def test_secrets_false_reads_no_secret_from_the_environment(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + '[services.homeassistant]\nurl = "${HA_URL}"\ntoken = "${HA_TOKEN}"\n'
        + '[guardian.telegram]\ntoken = "${BOT}"\nchat_id = 1\nallowed_users = [1]\n'
    )
    path = _write(tmp_path, text)
    config = load_config(path, env={"HA_URL": "http://ha:8123"}, secrets=False)
    assert config.services.homeassistant is not None
    assert config.services.homeassistant.url == "http://ha:8123"  # not a secret: resolved
    tokens = [config.agents["pi"].token, config.services.homeassistant.token]
    assert config.guardian.telegram is not None
    tokens.append(config.guardian.telegram.token)
    assert all(t is not None and t.startswith("\x00unresolved:") for t in tokens)
    assert config.find_agent(str(tokens[0])) is not None  # only the placeholder itself matches
    assert config.find_agent("") is None
    # Everything else is still checked, and a non-secret variable still must be set.
    assert _error_no_secrets(path, {}) == (
        f"{path}: services.homeassistant.url: environment variable HA_URL is not set"
    )


def _error_no_secrets(path: Path, env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env, secrets=False)
    return str(info.value)


def test_ignore_leaves_a_table_out(tmp_path: Path) -> None:
    text = MINIMAL + '[guardian.telegram]\ntoken = "${BOT}"\nchat_id = "x"\n'
    path = _write(tmp_path, text)
    config = load_config(path, env=ENV, ignore=["guardian.telegram"])
    assert config.guardian.telegram is None


def test_reserved_names_are_unknown_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, 'source = "x"\n' + MINIMAL + 'name = "other"\n')
    assert _error(path) == f"{path}: source: unknown key\n{path}: agents.pi.name: unknown key"


POSITIVE_INT = "expected a positive integer, got "
MESSAGE_BYTES = "expected an integer from 1024 to 16777216 (16 MiB), got "
SECONDS = "expected a positive number of seconds, got "


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("requests_per_minute", '"ten"', POSITIVE_INT + '"ten"'),
        ("requests_per_minute", "0", POSITIVE_INT + "0"),
        ("max_pending_per_agent", "-1", POSITIVE_INT + "-1"),
        ("failed_auth_per_minute", "true", POSITIVE_INT + "true"),
        ("requests_per_minute", "1.5", POSITIVE_INT + "1.5"),
        ("requests_per_minute", "[1]", POSITIVE_INT + "an array"),
        ("max_message_bytes", "1023", MESSAGE_BYTES + "1023"),
        ("max_message_bytes", "16777217", MESSAGE_BYTES + "16777217"),
        ("max_connections", "0", POSITIVE_INT + "0"),
        ("max_unauthenticated_per_address", '"8"', POSITIVE_INT + '"8"'),
        ("max_connections_per_agent", "-8", POSITIVE_INT + "-8"),
        ("max_connections_per_agent", "2.5", POSITIVE_INT + "2.5"),
    ],
)
def test_bad_limits(tmp_path: Path, key: str, value: str, expected: str) -> None:
    path = _write(tmp_path, MINIMAL + f"[limits]\n{key} = {value}\n")
    assert _error(path) == f"{path}: limits.{key}: {expected}"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("auth_deadline", "0", SECONDS + "0"),
        ("auth_deadline", "-2.5", SECONDS + "-2.5"),
        ("approval_timeout", "false", SECONDS + "false"),
        ("approval_timeout", '"900"', SECONDS + '"900"'),
        ("approval_timeout", "inf", SECONDS + "inf"),
        ("approval_timeout", "nan", SECONDS + "nan"),
    ],
)
def test_bad_timeouts(tmp_path: Path, key: str, value: str, expected: str) -> None:
    path = _write(tmp_path, MINIMAL.replace("[agents.pi]", f"{key} = {value}\n\n[agents.pi]"))
    assert _error(path) == f"{path}: gateway.{key}: {expected}"


def test_bad_agent_override(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "requests_per_minute = 0\nmax_pending = true\n")
    assert _error(path) == (
        f"{path}: agents.pi.requests_per_minute: expected a positive integer, got 0\n"
        f"{path}: agents.pi.max_pending: expected a positive integer, got true"
    )


def test_ha_timeout_zero(tmp_path: Path) -> None:
    text = MINIMAL + '[services.homeassistant]\nurl = "http://ha:8123"\ntoken = "t"\ntimeout = 0\n'
    path = _write(tmp_path, text)
    assert _error(path) == (
        f"{path}: services.homeassistant.timeout: expected a positive number of seconds, got 0"
    )


@pytest.mark.parametrize(
    "listen",
    ["8443", "localhost", ":8443", "host:", "host:65536", "host:-1", "::1:8443", "[]:1", "a b:1"],
)
def test_bad_listen(tmp_path: Path, listen: str) -> None:
    path = _write(tmp_path, MINIMAL.replace('"127.0.0.1:0"', f'"{listen}"'))
    assert _error(path) == (
        f'{path}: gateway.listen: expected "host:port" (e.g. "0.0.0.0:8443" or "[::1]:8443"), '
        f'got "{listen}"'
    )


def test_listen_not_a_string(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL.replace('"127.0.0.1:0"', "8443"))
    assert _error(path) == (
        f'{path}: gateway.listen: expected "host:port" (e.g. "0.0.0.0:8443" or "[::1]:8443"), '
        "got 8443"
    )


def test_missing_tls_key_when_not_insecure(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL.replace('tls_key = "certs/gate.key"\n', ""))
    assert _error(path) == (
        f"{path}: gateway.tls_key: required (TLS is mandatory; plain ws:// only with --insecure)"
    )
    assert load_config(path, env=ENV, insecure=True).gateway.tls_key is None


def test_missing_tls_file(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    (tmp_path / "certs" / "gate.crt").unlink()
    assert _error(path) == (
        f"{path}: gateway.tls_cert: file not found: {tmp_path / 'certs' / 'gate.crt'}"
    )
    load_config(path, env=ENV, insecure=True)  # not needed for plain ws://


def test_tls_path_is_a_directory(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL.replace("certs/gate.key", "certs"))
    assert _error(path) == f"{path}: gateway.tls_key: not a file: {tmp_path / 'certs'}"


def test_missing_policy_files(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + 'policy = "pi.yaml"\n')
    (tmp_path / "permissions.yaml").unlink()
    assert _error(path, insecure=True) == (
        f"{path}: policy.file: file not found: {tmp_path / 'permissions.yaml'}\n"
        f"{path}: agents.pi.policy: file not found: {tmp_path / 'pi.yaml'}"
    )


def test_empty_allowed_users(tmp_path: Path) -> None:
    text = MINIMAL + "[guardian.telegram]\ntoken = 't'\nchat_id = 1\nallowed_users = []\n"
    path = _write(tmp_path, text)
    assert _error(path) == (
        f"{path}: guardian.telegram.allowed_users: "
        "expected a non-empty array of Telegram user ids, got an empty array"
    )


def test_bad_telegram_values(tmp_path: Path) -> None:
    text = (
        MINIMAL + "[guardian.telegram]\ntoken = ''\nchat_id = '-100'\nallowed_users = [1, true]\n"
    )
    path = _write(tmp_path, text)
    assert _error(path) == (
        f'{path}: guardian.telegram.token: expected a non-empty string, got ""\n'
        f'{path}: guardian.telegram.chat_id: expected an integer, got "-100"\n'
        f"{path}: guardian.telegram.allowed_users[1]: expected an integer user id, got true"
    )


def test_missing_required_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "[guardian.telegram]\ntoken = 't'\n")
    assert _error(path) == (
        f"{path}: guardian.telegram.chat_id: required key is missing\n"
        f"{path}: guardian.telegram.allowed_users: required key is missing"
    )


def test_table_expected(tmp_path: Path) -> None:
    path = _write(tmp_path, "limits = 5\n" + MINIMAL)
    assert _error(path) == f"{path}: limits: expected a table, got 5"


def test_agents_must_be_a_table(tmp_path: Path) -> None:
    path = _write(
        tmp_path, MINIMAL.split("[agents.pi]")[0].replace("[gateway]", 'agents = "pi"\n[gateway]')
    )
    assert _error(path) == f'{path}: agents: expected a table, got "pi"'


def test_bad_ha_url(tmp_path: Path) -> None:
    text = MINIMAL + '[services.homeassistant]\nurl = "ftp://ha"\ntoken = "t"\n'
    path = _write(tmp_path, text)
    assert _error(path) == (
        f'{path}: services.homeassistant.url: expected an http:// or https:// URL, got "ftp://ha"'
    )


def test_duplicate_tokens(tmp_path: Path) -> None:
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    text = (
        MINIMAL
        + '[agents.kitchen]\ntoken = "${AGENT_TOKEN}"\n'
        + f'[agents."hall.v2"]\ntoken_sha256 = "{digest}"\n'
    )
    path = _write(tmp_path, text)
    assert _error(path) == (
        f"{path}: agents.kitchen.token: same token as agents.pi "
        "(every agent needs its own token)\n"
        f'{path}: agents."hall.v2".token_sha256: same token as agents.pi '
        "(every agent needs its own token)"
    )


@pytest.mark.parametrize("digest", ["abc", "g" * 64, "a" * 65])
def test_bad_token_sha256(tmp_path: Path, digest: str) -> None:
    path = _write(
        tmp_path, MINIMAL.replace('token = "${AGENT_TOKEN}"', f'token_sha256 = "{digest}"')
    )
    assert _error(path) == (
        f"{path}: agents.pi.token_sha256: expected a sha256 digest (64 hexadecimal characters, "
        f"see `agentgate hash-token`), got {len(digest)} characters"
    )


def test_short_token_is_not_echoed(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    message = _error(path, env={"AGENT_TOKEN": "hunter2"})
    assert message == (
        f"{path}: agents.pi.token: token too short: expected at least 16 characters, got 7"
    )


@pytest.mark.parametrize(
    "body",
    [
        'token = "${AGENT_TOKEN}"\ntoken_sha256 = "' + "a" * 64 + '"\n',
        "policy = 'permissions.yaml'\n",
    ],
    ids=["both", "neither"],
)
def test_exactly_one_token_form(tmp_path: Path, body: str) -> None:
    path = _write(tmp_path, MINIMAL.replace('token = "${AGENT_TOKEN}"\n', body))
    assert _error(path) == f"{path}: agents.pi: expected exactly one of token or token_sha256"


def test_no_agents(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL.split("[agents.pi]")[0])
    assert _error(path) == (
        f"{path}: agents: at least one agent is required ([agents.NAME] with a token)"
    )


def test_bad_agent_name(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL.replace("[agents.pi]", '[agents."pi zero"]'))
    assert _error(path) == (
        f'{path}: agents."pi zero": agent name must match ^[A-Za-z0-9_.-]{{1,64}}$'
    )


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "[limits]\nrequests_per_minute = \n")
    message = _error(path)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 9" in message


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    assert _error(path) == f"{path}: cannot read the file: No such file or directory"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gate.toml"
    path.write_bytes(b"[gateway]\nlisten = '\xff'\n")
    assert _error(path) == f"{path}: not valid UTF-8 text (byte 20)"


def test_config_error_collects_every_problem(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "[limits]\nrequests_per_minute = 0\nmax_message_bytes = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV)
    assert len(info.value.problems) == 2
    assert str(info.value) == "\n".join(info.value.problems)


def test_agent_limits_unknown_agent(tmp_path: Path) -> None:
    config: Config = load_config(_write(tmp_path, MINIMAL), env=ENV)
    with pytest.raises(KeyError):
        config.agent_limits("nobody")


def test_store_durability_is_normal_or_full(tmp_path: Path) -> None:
    base = '[gateway]\nlisten = "127.0.0.1:0"\n[agents.pi]\ntoken = "0123456789abcdef0123"\n'
    (tmp_path / "permissions.yaml").write_text("rules: []\n")
    (tmp_path / "gate.toml").write_text(base + '[store]\nsynchronous = "full"\n')
    assert load_config(tmp_path / "gate.toml", insecure=True).store.synchronous == "full"
    (tmp_path / "gate.toml").write_text(base + '[store]\nsynchronous = "off"\n')
    with pytest.raises(ConfigError, match=r'store\.synchronous: expected "normal" or "full"'):
        load_config(tmp_path / "gate.toml", insecure=True)


@pytest.mark.parametrize(
    "table", ["services.homeassistant", "guardian.telegram"], ids=["homeassistant", "telegram"]
)
def test_a_url_with_credentials_is_refused_without_echoing_them(tmp_path: Path, table: str) -> None:
    url = "http://admin:hunter2-secret@ha.internal:8123"
    extra = "chat_id = 1\nallowed_users = [1]\n" if table == "guardian.telegram" else ""
    key = "base_url" if table == "guardian.telegram" else "url"
    text = MINIMAL + f'[{table}]\n{key} = "{url}"\ntoken = "t"\n{extra}'
    message = _error(_write(tmp_path, text))
    assert message == (
        f"{tmp_path / 'gate.toml'}: {table}.{key}: a URL must not hold a user name or password"
        " (user:password@host); put the token in the table's token key"
    )
    assert "hunter2" not in message
    assert "admin" not in message


def test_connection_limits(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL), env=ENV)
    limits = config.limits
    assert (
        limits.max_connections,
        limits.max_unauthenticated_per_address,
        limits.max_connections_per_agent,
    ) == (256, 8, 8)
    text = MINIMAL + (
        "[limits]\nmax_connections = 1\nmax_unauthenticated_per_address = 1\n"
        "max_connections_per_agent = 100000\n"
    )
    limits = load_config(_write(tmp_path, text), env=ENV).limits
    assert (
        limits.max_connections,
        limits.max_unauthenticated_per_address,
        limits.max_connections_per_agent,
    ) == (1, 1, 100000)  # every positive integer (docs/configuration.md, "Ranges")


def test_card_and_outbox_limits(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL), env=ENV)
    assert (config.guardian.max_card_chars, config.guardian.card_overflow) == (4096, "refuse")
    assert config.limits.max_outbox_bytes == 16 * 1024 * 1024
    good = MINIMAL + '[guardian]\nmax_card_chars = 1000\ncard_overflow = "document"\n'
    good += "[limits]\nmax_outbox_bytes = 1048576\n"
    config = load_config(_write(tmp_path, good), env=ENV)
    assert (config.guardian.max_card_chars, config.guardian.card_overflow) == (1000, "document")
    assert config.limits.max_outbox_bytes == 1 << 20
    bad = MINIMAL + '[guardian]\nmax_card_chars = 5000\ncard_overflow = "truncate"\n'
    bad += "[limits]\nmax_outbox_bytes = 10\n"
    path = _write(tmp_path, bad)
    assert _error(path).splitlines() == [
        f"{path}: guardian.max_card_chars: expected an integer from 512 to 4096 (what one"
        " Telegram message holds), got 5000",
        f'{path}: guardian.card_overflow: expected "refuse" or "document", got "truncate"',
        f"{path}: limits.max_outbox_bytes: expected an integer from 65536 to 1073741824 (1 GiB),"
        " got 10",
    ]
