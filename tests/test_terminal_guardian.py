"""The terminal guardian: cards in the terminal, keys decide, nothing decided for anyone.

In-process, :class:`TerminalGuardian` is wired into a real gateway (TLS, fake Home Assistant)
with its keys written into a pipe; then ``agentgate serve --terminal-guardian`` runs as a user
runs it, keys on its stdin, an agent calling through the SDK.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio

from agentgate.client import ApprovalTimedOut, DeniedByGuardian, connect
from agentgate.guardian import Action, ApprovalCard, PendingCard, PressAnswer
from agentgate.guardian.terminal import KeySource, Style, TerminalGuardian
from agentgate.store import read_only
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.harness import Harness, running_gateway
from agentgate.testing.processes import Spawned, write_gateway_files

CEILING = 30
LIGHT = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}


class Screen(io.StringIO):
    """The terminal: what was printed, and an event for each print."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = trio.Event()

    def write(self, text: str) -> int:
        written = super().write(text)
        self.changed.set()
        self.changed = trio.Event()
        return written

    async def wait_for(self, needle: str, count: int = 1) -> None:
        while self.getvalue().count(needle) < count:
            await self.changed.wait()


@contextmanager
def key_pipe() -> Iterator[tuple[KeySource, int]]:
    read_end, write_end = os.pipe()
    try:
        yield KeySource(read_end), write_end
    finally:
        os.close(read_end)
        with suppress(OSError):  # the test closed it to end the input
            os.close(write_end)


@asynccontextmanager
async def terminal_gateway(
    workdir: Path, home: FakeHomeAssistant, keys: KeySource, **toml: object
) -> AsyncIterator[tuple[Harness, TerminalGuardian, Screen]]:
    screen = Screen()
    guardian = TerminalGuardian(user="op (terminal)", keys=keys, out=screen, style=Style(False))
    async with (
        running_gateway(workdir, home=home, guardian=guardian, **toml) as gw,
        trio.open_nursery() as nursery,
    ):
        guardian.control = gw.gateway.controls
        nursery.start_soon(guardian.run)
        yield gw, guardian, screen
        nursery.cancel_scope.cancel()


async def test_allow_with_a_key(workdir: Path, home: FakeHomeAssistant) -> None:
    with key_pipe() as (keys, typing), trio.fail_after(CEILING):
        async with terminal_gateway(workdir, home, keys) as (gw, _, screen):
            async with connect(gw.url, token=gw.tokens["pi"], ssl_context=gw.client_ssl) as agent:
                async with trio.open_nursery() as nursery:
                    result: list[object] = []

                    async def call() -> None:
                        result.append(await agent.call("ha_call_service", **LIGHT))

                    nursery.start_soon(call)
                    await screen.wait_for("Your move")
                    os.write(typing, b"x")  # not a button: said so, nothing decided
                    await screen.wait_for("is not a button")
                    os.write(typing, b"a")
                await gw.settled()
            out = screen.getvalue()
    assert "Approval needed" in out
    assert "Signature: ha_call_service(light.turn_on, light.kitchen)" in out
    assert "[ ✅ Allow ]  [ ❌ Deny ]" in out
    assert "op (terminal) presses Allow" in out
    assert out.count("Your move") == 1  # a decided card is not offered again
    assert "✅ Executed by op (terminal)" in out
    # The edit shows the target as it is after the call.
    assert out.count("Target: light.kitchen “Kitchen Light” — now: on") == 1
    assert home.state("light.kitchen")["state"] == "on"  # type: ignore[index]
    conn = read_only(gw.config.store.path)
    try:
        (row,) = conn.execute("SELECT resolution, resolved_by FROM audit_log WHERE kind='request'")
    finally:
        conn.close()
    assert tuple(row) == ("executed", "op (terminal)")


async def test_the_audit_checkpoint_is_shown_at_the_stop(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with key_pipe() as (keys, _), trio.fail_after(CEILING):
        async with (
            terminal_gateway(workdir, home, keys) as (gw, _, screen),
            connect(gw.url, token=gw.tokens["pi"], ssl_context=gw.client_ssl) as agent,
        ):
            await agent.call("ha_get_state", entity_id="sensor.living_room_temperature")
    out = screen.getvalue()
    # The stop signs a checkpoint; the terminal shows it as the chat would.
    assert "🧾 Audit checkpoint: 3 events" in out
    assert "agentgate/" in out


async def test_the_card_on_screen_is_the_card_a_key_decides(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    """An ask arriving while the guardian looks at another card waits its turn: it is not
    drawn (with its buttons) under the prompt of the first, where a key would decide the first."""
    bedroom = "Signature: ha_call_service(light.turn_on, light.bedroom)"
    outcomes: dict[str, str] = {}
    with key_pipe() as (keys, typing), trio.fail_after(CEILING):
        async with (
            terminal_gateway(workdir, home, keys) as (gw, guardian, screen),
            connect(gw.url, token=gw.tokens["pi"], ssl_context=gw.client_ssl) as agent,
            trio.open_nursery() as nursery,
        ):

            async def ask(entity_id: str) -> None:
                try:
                    await agent.call("ha_call_service", **{**LIGHT, "entity_id": entity_id})
                    outcomes[entity_id] = "executed"
                except DeniedByGuardian:
                    outcomes[entity_id] = "denied"

            nursery.start_soon(ask, "light.kitchen")
            await screen.wait_for("Your move")
            nursery.start_soon(ask, "light.bedroom")
            await guardian.cards_waiting(2)
            after_prompt = screen.getvalue().rsplit("Your move", 1)[1]
            assert bedroom not in after_prompt  # the second card waits its turn
            os.write(typing, b"a")  # decides the card on screen: the kitchen's
            await screen.wait_for("Your move", 2)
            last_card = screen.getvalue().rsplit("Approval needed", 1)[1]
            assert bedroom in last_card  # drawn now, just above its own prompt
            os.write(typing, b"d")
    assert outcomes == {"light.kitchen": "executed", "light.bedroom": "denied"}
    assert home.state("light.bedroom")["state"] == "off"  # type: ignore[index]


async def test_a_key_typed_before_the_card_decides_nothing(
    workdir: Path, home: FakeHomeAssistant
) -> None:
    with key_pipe() as (keys, typing), trio.fail_after(CEILING):
        async with terminal_gateway(workdir, home, keys) as (gw, _, screen):
            os.write(typing, b"a")  # nobody has seen a card yet
            outcome: list[BaseException] = []
            async with (
                connect(gw.url, token=gw.tokens["pi"], ssl_context=gw.client_ssl) as agent,
                trio.open_nursery() as nursery,
            ):

                async def call() -> None:
                    try:
                        await agent.call("ha_call_service", **LIGHT)
                    except DeniedByGuardian as exc:
                        outcome.append(exc)

                nursery.start_soon(call)
                await screen.wait_for("Your move")
                os.write(typing, b"d")
            assert len(outcome) == 1
            assert "op (terminal)" in str(outcome[0])
    assert home.state("light.kitchen")["state"] == "off"  # type: ignore[index]


async def test_closed_stdin_decides_nothing(workdir: Path, home: FakeHomeAssistant) -> None:
    """Without a keyboard the card waits and times out: never an allow."""
    with key_pipe() as (keys, typing), trio.fail_after(CEILING):
        os.close(typing)
        async with terminal_gateway(workdir, home, keys, gateway={"approval_timeout": 2}) as (
            gw,
            _,
            screen,
        ):
            async with connect(gw.url, token=gw.tokens["pi"], ssl_context=gw.client_ssl) as agent:
                with pytest.raises(ApprovalTimedOut):
                    await agent.call("ha_call_service", **LIGHT)
            await screen.wait_for("stdin is closed")
    assert home.state("light.kitchen")["state"] == "off"  # type: ignore[index]


# --- agentgate serve --terminal-guardian, as a user runs it -------------------------------------


async def test_serve_terminal_guardian(workdir: Path, home: FakeHomeAssistant) -> None:
    files = write_gateway_files(
        workdir,
        home=home,
        telegram={"token": "${GUARDIAN_BOT_TOKEN}", "chat_id": 1, "allowed_users": [1]},
    )
    log = workdir / "serve.log"
    argv = [str(Path(sys.executable).parent / "agentgate"), "serve", str(files.config)]
    env = {k: v for k, v in os.environ.items() if k != "GUARDIAN_BOT_TOKEN"}
    with log.open("ab") as sink:  # no bot token anywhere: the Telegram table is not used
        popen = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the harness does the same
            [*argv, "--terminal-guardian"],
            stdin=subprocess.PIPE,
            stdout=sink,
            stderr=sink,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )
    process = Spawned(popen, log, tuple(argv))
    assert popen.stdin is not None
    try:
        with trio.fail_after(CEILING):
            line = await process.wait_for_output("listening on wss://")
            url = "wss://" + line.split("wss://", 1)[1].split()[0] + "/"
            banner = await process.wait_for_output("terminal guardian:")
            assert "No phone and no Telegram are involved" in banner
            results: list[object] = []
            async with (
                connect(url, token=files.tokens["pi"], ssl_context=files.client_ssl()) as gw,
                trio.open_nursery() as nursery,
            ):

                async def call() -> None:
                    results.append(await gw.request("ha_call_service", LIGHT))

                nursery.start_soon(call)
                await process.wait_for_output("Your move")
                popen.stdin.write(b"h")
                popen.stdin.flush()
            assert results[0]["status"] == "executed"  # type: ignore[index]
            await process.wait_for_output("Executed by")
            process.terminate()
            assert await process.wait() == 0
    finally:
        popen.stdin.close()
        process.close()
    out = process.output()
    assert "presses Allow 1 h" in out
    assert "⏱ Allowed for 1 h: the same request from pi runs without" in out
    assert "Traceback" not in out


class _Control:
    """The gateway's side, as far as the terminal guardian sees it: one approval pending from
    before a restart, and the presses it gets."""

    def __init__(self, card: ApprovalCard) -> None:
        self.earlier = [PendingCard(card, "12345:678")]  # a card the last run showed
        self.decided: list[tuple[str, str, str, str]] = []
        self.done = trio.Event()

    async def pending(self) -> list[PendingCard]:
        return self.earlier

    async def decide(self, request_id: str, action: Action, by: str, *, message_ref: str) -> Any:
        self.decided.append((request_id, action.value, by, message_ref))
        self.done.set()
        return PressAnswer("approved", decided=True)


async def test_an_approval_from_before_a_restart_is_shown_and_decided() -> None:
    card = ApprovalCard(
        request_id="r-1", agent="pi", tool="ha_call_service", args=LIGHT,
        signature="ha_call_service(light.turn_on, light.kitchen)",
        matched="rule 1: ha_call_service(light.*) (ask)", expires_at=time.time() + 600,
    )  # fmt: skip
    control = _Control(card)
    with key_pipe() as (keys, typing), trio.fail_after(CEILING):
        screen = Screen()
        guardian = TerminalGuardian(user="op (terminal)", keys=keys, out=screen, style=Style(False))
        guardian.control = control  # type: ignore[assignment]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guardian.run)
            await screen.wait_for("Your move")
            os.write(typing, b"a")
            await control.done.wait()
            nursery.cancel_scope.cancel()
    assert "an approval from before the restart, still pending" in screen.getvalue()
    assert control.decided == [("r-1", "allow", "op (terminal)", "12345:678")]


async def test_undo_and_always_allow_with_keys(workdir: Path, home: FakeHomeAssistant) -> None:
    """``u`` undoes the latest executed call once no card waits; ``w`` (Always allow) is a key
    only on a card that offers it."""
    with key_pipe() as (keys, typing), trio.fail_after(CEILING):
        async with terminal_gateway(
            workdir, home, keys, guardian_settings={"suggest_after": 1}
        ) as (gw, _, screen):
            async with connect(gw.url, token=gw.tokens["pi"], ssl_context=gw.client_ssl) as agent:
                for n, key in ((1, b"a"), (2, b"w")):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(lambda: agent.call("ha_call_service", **LIGHT))
                        await screen.wait_for("Your move", n)
                        if n == 1:
                            assert "[w] Always allow" not in screen.getvalue()
                            os.write(typing, b"w")  # not offered on this card
                            await screen.wait_for("is not a button of this card")
                        else:
                            assert "[w] Always allow" in screen.getvalue()
                            assert "[ 🔁 Always allow ]" in screen.getvalue()
                        os.write(typing, key)
                    await gw.settled()
                    if n == 1:
                        await screen.wait_for("[u] undo ha_call_service(light.turn_on")
                        os.write(typing, b"u")
                        await screen.wait_for("💬 undone: light.kitchen: off")
                        assert home.state("light.kitchen")["state"] == "off"  # type: ignore[index]
                # Always allow: the third call runs without a card.
                await agent.call("ha_call_service", **LIGHT)
                assert screen.getvalue().count("Your move") == 2
            out = screen.getvalue()
    assert "op (terminal) presses ↩ Undo" in out
    assert "op (terminal) presses Always allow" in out
    assert "🔁 Allowed always" in out
