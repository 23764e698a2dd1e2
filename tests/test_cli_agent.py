"""``agentgate call`` / ``tools`` / ``pending`` and the SDK examples, against a REAL gateway.

The CLI calls ``trio.run`` itself, so each invocation of ``main([...])`` runs in a worker
thread (``trio.to_thread.run_sync``) while the gateway (:class:`RealGateway`, the contract's
policy: sensors allowed, ``lock.unlock`` denied, ``light.turn_on`` ask, approval_timeout 3 s)
runs in the test's Trio run. Every exit status is produced by a real gateway; the protocol
codes the CLI cannot provoke (-32600, -32601, -32700) are checked on the mapping itself.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from agentgate import cli_agent
from agentgate.cli import main
from agentgate.client import connect
from agentgate.errors import (
    ERRORS_BY_CODE,
    AgentgateError,
    ConnectionLost,
    DeniedByPolicy,
)
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from tests.client_contract import PendingLog
from tests.test_sdk_contract import RealGateway, real_gateway

REPO = Path(__file__).resolve().parent.parent
CEILING = 30

LIGHT = ["ha_call_service", "domain=light", "service=turn_on", "entity_id=light.kitchen"]
LOCK = ["ha_call_service", "domain=lock", "service=unlock", "entity_id=lock.front_door"]
SENSOR = ["ha_get_state", "entity_id=sensor.living_room"]
WAITING = re.compile(r"agentgate: waiting for the guardian \(expires \d\d:\d\d:\d\d UTC\)\.\.\.")


@pytest.fixture
async def gate(workdir: Path, home: FakeHomeAssistant) -> AsyncIterator[RealGateway]:
    async with real_gateway(workdir, home) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (cli_agent.ENV_URL, cli_agent.ENV_TOKEN, cli_agent.ENV_CA, "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)


def conn(gate: RealGateway, *, token: str | None = None) -> list[str]:
    """The connection flags for ``gate``."""
    return ["--url", gate.url, "--token", token or gate.token, "--ca", str(gate.ca_path)]


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``agentgate ARGV`` in a worker thread; return (status, stdout, stderr)."""
    status = await trio.to_thread.run_sync(main, list(argv), abandon_on_cancel=True)
    out, err = capsys.readouterr()
    return status, out, err


# --- 0: ok ---------------------------------------------------------------------------------------


async def test_call_prints_the_data_and_exits_0(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(CEILING):
        status, out, err = await cli(capsys, "call", *conn(gate), *SENSOR)
    assert (status, err) == (0, "")
    data = json.loads(out)
    assert data["entity_id"] == "sensor.living_room"
    assert data["state"] == "21.5"


async def test_call_json_prints_the_whole_result_options_last(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(CEILING):  # README and --help write the options after TOOL key=value
        status, out, _ = await cli(capsys, "call", *SENSOR, *conn(gate), "--json")
    assert status == 0
    (line,) = out.splitlines()
    result = json.loads(line)
    assert result["status"] == "executed"
    assert result["request_id"]
    assert result["data"]["entity_id"] == "sensor.living_room"


async def test_env_vars_and_token_from_stdin(
    gate: RealGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cli_agent.ENV_URL, gate.url)
    monkeypatch.setenv(cli_agent.ENV_CA, str(gate.ca_path))
    monkeypatch.setattr(sys, "stdin", io.StringIO(gate.token + "\n"))
    with trio.fail_after(CEILING):
        status, out, err = await cli(capsys, "call", "--token", "-", *SENSOR)
        assert (status, err) == (0, "")
        assert json.loads(out)["entity_id"] == "sensor.living_room"
        monkeypatch.setenv(cli_agent.ENV_TOKEN, gate.token)
        status, out, _ = await cli(capsys, "tools")
    assert status == 0
    assert "ha_get_state" in out


async def test_system_store_via_ssl_cert_file_needs_no_ca(
    gate: RealGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(gate.ca_path))
    with trio.fail_after(CEILING):
        status, out, _ = await cli(
            capsys, "call", "--url", gate.url, "--token", gate.token, *SENSOR
        )
    assert status == 0
    assert json.loads(out)["entity_id"] == "sensor.living_room"


async def test_ask_allowed_prints_waiting_then_exits_0(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome: list[tuple[int, str, str]] = []
    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                outcome.append(await cli(capsys, "call", *conn(gate), *LIGHT))

            nursery.start_soon(call)
            shown = await gate.guardian.wait_for_card()
            await gate.press(shown.card.request_id, "allow")
    ((status, out, err),) = outcome
    assert status == 0
    assert WAITING.search(err), err
    assert json.loads(out)[0]["entity_id"] == "light.kitchen"  # HA: the changed states


async def test_tools_lists_names_and_descriptions(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(CEILING):
        status, out, _ = await cli(capsys, "tools", *conn(gate))
        assert status == 0
        lines = {line.split()[0]: line for line in out.splitlines()}
        assert {"ha_get_state", "ha_get_states", "ha_call_service"} <= set(lines)
        assert len(lines["ha_get_state"].split()) > 1  # a description follows the name
        status, out, _ = await cli(capsys, "tools", *conn(gate), "--json")
    assert status == 0
    tools = json.loads(out)
    assert all({"name", "description", "args"} <= set(tool) for tool in tools)


async def test_pending_collects_a_queued_result_once(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    pending = PendingLog()
    light = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}
    with trio.fail_after(CEILING):
        # an agent asks, then goes away; the guardian allows; the result is queued
        async with (
            connect(gate.url, token=gate.token, ca=gate.ca_path, on_pending=pending) as gw,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(lambda: gw.call("ha_call_service", **light))
            params = await pending.wait()
            nursery.cancel_scope.cancel()
        await gate.running.gateway.door.gone("pi")
        await gate.press(params["request_id"], "allow")
        await gate.guardian.wait_for_update(params["request_id"])

        status, out, _ = await cli(capsys, "pending", *conn(gate))
        assert status == 0
        (entry,) = json.loads(out)
        assert (entry["request_id"], entry["rpc_id"], entry["status"]) == (
            params["request_id"],
            params["rpc_id"],
            "executed",
        )
        status, out, _ = await cli(capsys, "pending", *conn(gate), "--json")
    assert status == 0
    assert json.loads(out) == []


async def queue_a_result(gate: RealGateway) -> dict[str, Any]:
    """An agent asks, then goes away; the guardian allows: one result queued for "pi"."""
    pending = PendingLog()
    light = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}
    async with (
        connect(gate.url, token=gate.token, ca=gate.ca_path, on_pending=pending) as gw,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(lambda: gw.call("ha_call_service", **light))
        params = await pending.wait()
        nursery.cancel_scope.cancel()
    await gate.running.gateway.door.gone("pi")
    await gate.press(params["request_id"], "allow")
    await gate.guardian.wait_for_update(params["request_id"])
    return params


async def test_call_leaves_queued_results_to_pending_and_says_so(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(CEILING):
        params = await queue_a_result(gate)
        status, out, err = await cli(capsys, "call", *conn(gate), *SENSOR)
        assert status == 0
        assert json.loads(out)["entity_id"] == "sensor.living_room"
        assert await gate.running.gateway.store.queued_count("pi") == 1  # not collected
        assert err == (
            "agentgate: 1 queued result waits for this agent: `agentgate pending` prints it\n"
        )
        status, out, _ = await cli(capsys, "pending", *conn(gate))
        assert status == 0
        assert [e["request_id"] for e in json.loads(out)] == [params["request_id"]]


async def test_pending_acknowledges_only_what_it_printed(
    gate: RealGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def cannot_print(value: Any, *, compact: bool) -> None:
        raise OSError(5, "Input/output error")

    with trio.fail_after(CEILING):
        params = await queue_a_result(gate)
        with monkeypatch.context() as patched:
            patched.setattr(cli_agent, "_print_json", cannot_print)  # stdout fails
            status, out, err = await cli(capsys, "pending", *conn(gate))
        assert status == 4
        assert "cannot print the queued results" in err
        assert "they stay queued" in err
        status, out, _ = await cli(capsys, "pending", *conn(gate))
        assert status == 0
        assert [e["request_id"] for e in json.loads(out)] == [params["request_id"]]
        assert await gate.running.gateway.store.queued_count("pi") == 0
        status, out, _ = await cli(capsys, "pending", *conn(gate))
    assert (status, json.loads(out)) == (0, [])


# --- 1: denied -----------------------------------------------------------------------------------


async def test_denied_by_policy_exits_1_with_signature(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(CEILING):
        status, out, err = await cli(capsys, "call", *conn(gate), *LOCK)
    assert status == 1
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("agentgate: denied by policy: ")
    assert "denied by policy: denied by policy" not in line
    assert "ha_call_service(lock.unlock, *)" in line  # the rule that decided
    assert "(signature: ha_call_service(lock.unlock, lock.front_door), request_id: " in line


async def test_denied_by_policy_json_error_on_stdout(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(CEILING):
        status, out, _ = await cli(capsys, "call", *conn(gate), "--json", *LOCK)
    assert status == 1
    error = json.loads(out)["error"]
    assert error["code"] == -32003
    assert error["data"]["signature"] == "ha_call_service(lock.unlock, lock.front_door)"


async def test_denied_by_guardian_exits_1(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome: list[tuple[int, str, str]] = []
    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                outcome.append(await cli(capsys, "call", *conn(gate), *LIGHT))

            nursery.start_soon(call)
            shown = await gate.guardian.wait_for_card()
            await gate.press(shown.card.request_id, "deny")
    ((status, out, err),) = outcome
    assert status == 1
    assert out == ""
    assert WAITING.search(err), err
    # Said once: not "denied by the guardian: denied by the guardian (...)".
    assert "agentgate: denied by the guardian (test guardian (1)) (signature: " in err
    assert err.count("denied by the guardian") == 1
    assert "signature: ha_call_service(light.turn_on, light.kitchen)" in err


# --- 2: invalid input ----------------------------------------------------------------------------


async def test_invalid_params_from_the_gateway_exit_2(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(CEILING):
        status, _, err = await cli(capsys, "call", *conn(gate), "ha_get_state", "entity_id=s.*")
        assert status == 2
        assert err.startswith("agentgate: invalid arguments: ")
        status, _, err = await cli(capsys, "call", *conn(gate), "no_such_tool")
    assert status == 2
    assert "unknown tool" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["call", "--url", "wss://127.0.0.1:9/", "--token", "t", "ha_get_state", "oops"],
         "expected key=value"),
        (["call", "--url", "wss://127.0.0.1:9/", "--token", "t", "x", "n:=nope"], "not JSON"),
        (["call", "--token", "t", "ha_get_states"], "no gateway URL"),
        (["call", "--url", "wss://127.0.0.1:9/", "ha_get_states"], "no token"),
        (["call", "--url", "http://127.0.0.1:9/", "--token", "t", "ha_get_states"], "wss://"),
        (["call", "--url", "ws://127.0.0.1:9/", "--token", "t", "--ca", "x.pem", "t"], "wss://"),
        (["call", "--url", "wss://127.0.0.1:9/", "--token", "t", "--ca", "/nonexistent.pem",
          "ha_get_states"], "cannot load"),
        (["call", "--url", "wss://:x/", "--token", "t", "ha_get_states"], "URL"),
        (["call"], "required"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2_without_connecting(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_token_from_empty_stdin_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["pending", "--url", "wss://127.0.0.1:9/", "--token", "-"]) == 2
    assert "no token on stdin" in capsys.readouterr().err


# --- 3: connection / auth ------------------------------------------------------------------------


async def test_bad_token_exits_3(gate: RealGateway, capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(CEILING):
        status, out, err = await cli(
            capsys, "call", *conn(gate, token="wrong-token-0123456"), *SENSOR
        )
    assert (status, out) == (3, "")
    assert err.startswith("agentgate: authentication failed")


async def test_untrusted_certificate_exits_3(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(CEILING):  # no --ca, and the system store does not know the test CA
        status, _, err = await cli(capsys, "tools", "--url", gate.url, "--token", gate.token)
    assert status == 3
    assert err.startswith("agentgate: connection failed: ")
    assert "certificate not trusted" in err
    assert "pass --ca FILE" in err


async def test_unreachable_gateway_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with trio.fail_after(CEILING):
        status, _, err = await cli(capsys, "pending", "--url", f"ws://127.0.0.1:{port}/",
                                   "--token", "t")  # fmt: skip
    assert status == 3
    assert "connection failed" in err


async def test_gateway_shutting_down_exits_3(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome: list[tuple[int, str, str]] = []
    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                outcome.append(await cli(capsys, "call", *conn(gate), *LIGHT))

            nursery.start_soon(call)
            await gate.guardian.wait_for_card()
            await gate.stop()  # a clean shutdown answers the waiting ask with -32007
    ((status, _, err),) = outcome
    assert status == 3
    assert "agentgate: gateway shutting down" in err


# --- 4, 5, 6 -------------------------------------------------------------------------------------


async def test_execution_failed_exits_4(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(CEILING):  # allowed by policy, but Home Assistant answers 404
        status, out, err = await cli(capsys, "call", *conn(gate), "ha_get_state",
                                     "entity_id=sensor.nowhere")  # fmt: skip
    assert (status, out) == (4, "")
    assert err.startswith("agentgate: execution failed: ")
    assert "signature: ha_get_state(sensor.nowhere)" in err


async def test_approval_timed_out_exits_5(
    gate: RealGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(gate.approval_timeout + CEILING):
        status, _, err = await cli(capsys, "call", *conn(gate), *LIGHT)
    assert status == 5
    assert WAITING.search(err), err
    assert "agentgate: approval timed out" in err


async def test_rate_limited_exits_6(
    workdir: Path, home: FakeHomeAssistant, capsys: pytest.CaptureFixture[str]
) -> None:
    async with real_gateway(workdir, home, limits={"requests_per_minute": 1}) as gate:
        with trio.fail_after(CEILING):
            assert (await cli(capsys, "call", *conn(gate), *SENSOR))[0] == 0
            status, _, err = await cli(capsys, "call", *conn(gate), *SENSOR)
    assert status == 6
    assert err.startswith("agentgate: rate limited")


# --- the mapping itself (fast tier) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (-32700, 2),
        (-32600, 2),
        (-32601, 2),
        (-32602, 2),
        (-32603, 4),
        (-32001, 1),
        (-32002, 5),
        (-32003, 1),
        (-32004, 4),
        (-32005, 3),
        (-32006, 6),
        (-32007, 3),
    ],
)
def test_every_error_code_has_its_exit_status(code: int, status: int) -> None:
    assert cli_agent.exit_status(ERRORS_BY_CODE[code]()) == status


def test_connection_lost_and_unknown_codes() -> None:
    assert cli_agent.exit_status(ConnectionLost()) == 3
    unknown = AgentgateError("odd")
    unknown.code = -32099  # type: ignore[misc]
    assert cli_agent.exit_status(unknown) == 4
    assert cli_agent.describe_error(unknown) == "error -32099: odd"


def test_describe_error_does_not_repeat_the_label() -> None:
    data = {"signature": "t(a)", "request_id": "r-1"}
    assert (
        cli_agent.describe_error(DeniedByPolicy("denied by policy: rule 0: t(*) (deny)", data=data))
        == "denied by policy: rule 0: t(*) (deny) (signature: t(a), request_id: r-1)"
    )
    assert cli_agent.describe_error(DeniedByPolicy()) == "denied by policy"


# --- real processes: python -m agentgate, and the examples ----------------------------------------


def _env(gate: RealGateway, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTGATE_")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


async def test_python_m_agentgate_call_subprocess(gate: RealGateway) -> None:
    with trio.fail_after(CEILING):
        done = await trio.run_process(
            [sys.executable, "-m", "agentgate", "call", "--token", "-", *SENSOR],
            stdin=(gate.token + "\n").encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=_env(gate, AGENTGATE_URL=gate.url, AGENTGATE_CA=str(gate.ca_path)),
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["entity_id"] == "sensor.living_room"
    denied = await trio.run_process(
        [sys.executable, "-m", "agentgate", "call", *conn(gate), *LOCK],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=_env(gate),
    )
    assert denied.returncode == 1
    assert b"agentgate: denied by policy: " in denied.stderr


async def _run_example(
    gate: RealGateway, script: str, decision: str
) -> subprocess.CompletedProcess[bytes]:
    """Run an example agent as a process; press ``decision`` on the card it asks for."""
    result: list[subprocess.CompletedProcess[bytes]] = []
    argv = [sys.executable, str(REPO / "examples" / script), "--url", gate.url, "--wait", "20",
            "--sensor", "sensor.living_room_temperature", "--light", "light.kitchen"]  # fmt: skip
    env = _env(gate, AGENTGATE_TOKEN=gate.token, AGENTGATE_CA=str(gate.ca_path))
    with trio.fail_after(CEILING):
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                result.append(
                    await trio.run_process(
                        argv, capture_stdout=True, capture_stderr=True, check=False, env=env
                    )
                )

            nursery.start_soon(run)
            count = len(gate.guardian.cards) + 1
            shown = await gate.guardian.wait_for_card(count)
            await gate.press(shown.card.request_id, decision)
    (done,) = result
    assert done.returncode == 0, done.stderr.decode()
    return done


@pytest.mark.parametrize("script", ["trio_agent.py", "asyncio_agent.py"])
async def test_example_agents_run_against_a_real_gateway(gate: RealGateway, script: str) -> None:
    allowed = (await _run_example(gate, script, "allow")).stdout.decode()
    assert "connected as pi" in allowed
    assert "sensor.living_room_temperature = 21.5 °C" in allowed
    assert "waiting for the guardian (request " in allowed
    assert "light.kitchen is on" in allowed
    denied = (await _run_example(gate, script, "deny")).stdout.decode()
    assert "the guardian said no" in denied


async def test_example_agent_reports_a_bad_token(gate: RealGateway) -> None:
    argv = [sys.executable, str(REPO / "examples" / "asyncio_agent.py"), "--url", gate.url,
            "--ca", str(gate.ca_path), "--token", "-"]  # fmt: skip
    with trio.fail_after(CEILING):
        done = await trio.run_process(
            argv, stdin=b"wrong-token-0123456\n", capture_stdout=True, capture_stderr=True,
            check=False, env=_env(gate),
        )  # fmt: skip
    assert done.returncode == 3
    assert b"cannot use the gateway: " in done.stderr


async def test_ctrl_c_while_waiting_says_the_call_is_still_pending(gate: RealGateway) -> None:
    """Ctrl-C (SIGINT) while ``agentgate call`` waits for the guardian: the request stays with
    the gateway, and the message says how to collect its result."""
    argv = [str(Path(sys.executable).parent / "agentgate"), "call", *conn(gate), *LIGHT]
    with trio.fail_after(CEILING):
        process = await trio.lowlevel.open_process(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(gate)
        )
        try:
            assert process.stderr is not None
            err = b""
            while b"waiting for the guardian" not in err:
                chunk = await process.stderr.receive_some()
                assert chunk, err
                err += chunk
            await gate.guardian.wait_for_card()
            process.send_signal(signal.SIGINT)
            while chunk := await process.stderr.receive_some():
                err += chunk
            status = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            assert process.stderr is not None
            await process.stderr.aclose()
    assert status == 130
    text = err.decode()
    assert "agentgate: still pending (request " in text
    assert "`agentgate pending` will collect the result" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("script", ["trio_agent.py", "asyncio_agent.py"])
async def test_example_says_which_entity_to_pass(gate: RealGateway, script: str) -> None:
    """An entity the home does not have: exit 1 and a hint; no --light: nobody is asked."""
    argv = [sys.executable, str(REPO / "examples" / script), "--url", gate.url,
            "--sensor", "sensor.nope"]  # fmt: skip
    env = _env(gate, AGENTGATE_TOKEN=gate.token, AGENTGATE_CA=str(gate.ca_path))
    with trio.fail_after(CEILING):
        done = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, env=env
        )
    assert done.returncode == 1, done.stderr.decode()
    err = done.stderr.decode()
    assert "entity not found: sensor.nope" in err
    assert "(pass an entity of your home with --sensor)" in err
    assert gate.guardian.cards == {}


async def test_raw_agent_never_prints_the_token(gate: RealGateway) -> None:
    raw = str(REPO / "examples" / "raw_agent.py")
    argv = [sys.executable, raw, "--url", gate.url, "--ca", str(gate.ca_path), "--token", "-",
            "--entity", "sensor.living_room"]  # fmt: skip
    with trio.fail_after(CEILING):
        done = await trio.run_process(
            argv, stdin=(gate.token + "\n").encode(), capture_stdout=True, capture_stderr=True,
            check=False, env=_env(gate),
        )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert '"token":"***"' in out
    assert gate.token not in out + done.stderr.decode()
    assert "# sensor.living_room = 21.5" in out
