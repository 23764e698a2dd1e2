"""``make demo`` (``python -m agentgate.demo [--auto] [--insecure]``): the product on one machine.

One ``trio.run`` starts, all on 127.0.0.1:

- a fake Home Assistant (``agentgate.testing.fake_homeassistant``) with a small simulated home;
- a fake Telegram Bot API (``agentgate.testing.fake_telegram``);
- the real gateway with TLS from a throw-away local CA (or plain ``ws://`` with ``--insecure``),
  the shipped ``permissions.yaml`` and the real Telegram guardian (python-telegram-bot) pointed at
  the fake Bot API;
- a terminal "guardian phone" (:mod:`agentgate.demo_phone`) that shows each approval card as
  Telegram would and presses Allow / Deny / Allow 1 h for you (keys ``a`` / ``d`` / ``h``);
- a scripted agent using the SDK: it reads a sensor (allowed by policy), turns on a light (the
  guardian is asked), the guardian changes their mind and presses ↩ Undo on the light's card,
  and the agent tries to unlock the front door (denied by policy). With ``--mcp`` the same agent
  is an MCP client (the official ``mcp`` Python client) talking to ``agentgate mcp``, the stdio
  bridge an MCP host would start.

The demo ends with the audit table and the audit log verified against the checkpoint the
guardians' chat received, then cleans up its temporary directory (``--keep DIR`` keeps the
store, its signing key and the checkpoints in DIR instead, for ``agentgate audit verify``).
``--auto`` presses Allow by itself and exits 0 only if everything behaved as expected (1
otherwise), with no TTY and no stdin needed; ``tests/test_demo.py`` runs it so it cannot rot.

Imports: testing (the fakes, the harness, the MCP client), client (the agent), demo_phone, audit and
store (the closing table), tlog and verify (the proof).
"""

from __future__ import annotations

import trio_asyncio  # isort: skip  # noqa: F401  # patch asyncio before httpx, anyio or telegram are imported

import argparse
import json
import logging
import secrets
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio

from agentgate import tlog
from agentgate.audit import Filters, format_table, query
from agentgate.client import (
    AgentgateError,
    ApprovalTimedOut,
    DeniedByGuardian,
    DeniedByPolicy,
    connect,
)
from agentgate.demo_phone import KeyReader, Phone, Style, cbreak
from agentgate.store import read_only
from agentgate.testing.fake_homeassistant import run_fake_homeassistant
from agentgate.testing.fake_telegram import run_fake_telegram
from agentgate.testing.harness import Harness, running_gateway
from agentgate.verify import Given, verify

__all__ = ["main", "run_demo"]

POLICY_FILE = Path(__file__).resolve().parent.parent / "permissions.yaml"
CHAT_ID = -1001
GUARDIAN_ID = 4242
GUARDIAN_NAME = "Alex"
AGENT = "pi"
APPROVAL_TIMEOUT = 60  # seconds: nobody at the keyboard? the card times out and the demo ends
SENSOR = "sensor.living_room_temperature"
LIGHT = "light.living_room"
LOCK = "lock.front_door"
WITNESS_FILE = "checkpoints.txt"  # beside the store: every checkpoint, as a witness file holds them

log = logging.getLogger("agentgate.demo")


@attrs.define
class Step:
    """One thing the agent tried, what happened, and whether that was what the demo expects."""

    title: str
    outcome: str = "not run"
    ok: bool = False


@attrs.define
class DemoResult:
    steps: list[Step]
    presses: list[str]
    audit: str
    audit_rows: int
    home_ok: bool
    proof: list[str] = attrs.field(factory=list)  # what verify said against the chat
    proven: bool = False

    @property
    def ok(self) -> bool:
        return (
            all(step.ok for step in self.steps)
            and self.home_ok
            and self.audit_rows >= 3
            and self.proven
        )


Scene = Callable[[int], Awaitable[Step]]
"""A scene the guardian plays between the agent's steps, given its number."""


class Narrator:
    """The agent's and the demo's voice: one prefix per speaker, colours only on a TTY."""

    def __init__(self, style: Style, out: TextIO) -> None:
        self.s = style
        self.out = out

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def demo(self, text: str) -> None:
        self.line(f"{self.s.bold('demo   │')} {text}")

    def agent(self, text: str) -> None:
        self.line(f"{self.s.cyan('agent  │')} {text}")

    def heading(self, text: str) -> None:
        self.line()
        self.line(self.s.bold(f"━━ {text} " + "━" * max(3, 66 - len(text))))


class _GatewayLog(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"gateway│ {record.levelname.lower()}: {record.getMessage()}"


class _ListeningOrWarnings(logging.Filter):
    """The gateway logs quietly (WARNING and up), plus its ``listening on ...`` line; the agent
    narrates its own outcomes, so the SDK's log shows errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("agentgate.client"):
            return record.levelno >= logging.ERROR
        return record.levelno >= logging.WARNING or record.getMessage().startswith("listening on")


def _setup_logging(style: Style, out: TextIO) -> logging.Handler:
    handler = logging.StreamHandler(out)
    handler.setFormatter(_GatewayLog())
    handler.addFilter(_ListeningOrWarnings())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("agentgate.gateway").setLevel(logging.INFO)
    return handler


def _describe(data: Any) -> str:
    """A service answer in plain words: ``21.5 °C`` for a sensor, ``light.x is now on`` ..."""
    if isinstance(data, dict) and "state" in data:
        unit = (data.get("attributes") or {}).get("unit_of_measurement")
        return f"{data['state']} {unit}" if unit else str(data["state"])
    if isinstance(data, list):
        changed = [f"{s.get('entity_id')} is now {s.get('state')}" for s in data if "state" in s]
        return ", ".join(changed) if changed else "nothing changed"
    return repr(data)


async def _agent(
    gw: Harness,
    say: Narrator,
    settle: Callable[[], Awaitable[None]],
    undo: Scene,
    *,
    interactive: bool,
) -> list[Step]:
    """The scripted agent: four requests through the SDK, each outcome in plain words, and
    between the second and the third the guardian's Undo (``undo``, scene 3).

    ``settle`` waits (briefly) for the phone to catch up, so the story reads in order.
    """
    s = say.s

    def on_pending(params: dict[str, Any]) -> None:
        say.agent(
            s.yellow("⏳ the policy says ask: the gateway sent a card to the guardian; waiting")
            + s.dim(f" (request {str(params.get('request_id', ''))[:8]}…)")
        )

    steps = [
        Step(f"read the living-room temperature ({SENSOR})"),
        Step(f"turn on the living-room light ({LIGHT})"),
        Step(f"unlock the front door ({LOCK})"),
        Step(f"unlock it through a scene (scene.apply naming {LOCK})"),
    ]
    ca = None if gw.ca_path is None else str(gw.ca_path)
    async with connect(gw.url, token=gw.tokens[AGENT], ca=ca, on_pending=on_pending) as agent:
        say.agent(f"connected to {gw.url} as {s.bold(agent.agent or AGENT)}")

        say.heading(f"1. the agent wants to {steps[0].title}")
        say.agent(f"→ ha_get_state entity_id={SENSOR}")
        try:
            data = await agent.call("ha_get_state", entity_id=SENSOR)
        except AgentgateError as exc:
            steps[0].outcome = f"refused: {exc.message}"
        else:
            steps[0].outcome = f"allowed by policy, executed at once: {_describe(data)}"
            steps[0].ok = True
        say.agent((s.green if steps[0].ok else s.red)(steps[0].outcome))

        say.heading(f"2. the agent wants to {steps[1].title}")
        say.agent(f"→ ha_call_service domain=light service=turn_on entity_id={LIGHT}")
        try:
            data = await agent.call(
                "ha_call_service", domain="light", service="turn_on", entity_id=LIGHT
            )
        except DeniedByGuardian as exc:
            steps[1].outcome = exc.message  # "denied by the guardian (Alex (4242))"
            steps[1].ok = interactive  # the person said no: fine, unless nobody was asked
        except ApprovalTimedOut as exc:
            steps[
                1
            ].outcome = (
                f"nobody decided in time: {exc.message.removeprefix('approval timed out: ')}"
            )
            steps[1].ok = interactive
        except AgentgateError as exc:
            steps[1].outcome = f"failed: {exc.message}"
        else:
            steps[1].outcome = f"approved by the guardian and executed: {_describe(data)}"
            steps[1].ok = True
        say.agent((s.green if steps[1].ok else s.red)(steps[1].outcome))
        await settle()
        steps.insert(2, await undo(3))

        say.heading(f"4. the agent wants to {steps[3].title}")
        say.agent(f"→ ha_call_service domain=lock service=unlock entity_id={LOCK}")
        try:
            data = await agent.call(
                "ha_call_service", domain="lock", service="unlock", entity_id=LOCK
            )
        except DeniedByPolicy as exc:
            why = exc.message.removeprefix("denied by policy: ")
            steps[3].outcome = f"denied by policy ({why}); nobody was asked, the door stays locked"
            steps[3].ok = True
        except AgentgateError as exc:
            steps[3].outcome = f"refused, but not by the policy: {exc.message}"
        else:
            steps[3].outcome = f"EXECUTED (this must never happen): {_describe(data)}"
        say.agent((s.green if steps[3].ok else s.red)(steps[3].outcome))

        say.heading(f"5. the agent wants to {steps[4].title}")
        scene = {LIGHT: "on", LOCK: "unlocked"}
        say.agent(f"→ ha_call_service domain=scene service=apply entities={json.dumps(scene)}")
        try:
            data = await agent.call(
                "ha_call_service", domain="scene", service="apply", entities=scene
            )
        except DeniedByPolicy as exc:
            why = exc.message.removeprefix("denied by policy: ")
            steps[4].outcome = (
                f"denied by policy ({why}): the lock is in the call's signature, the door"
                " stays locked"
            )
            steps[4].ok = True
        except AgentgateError as exc:
            steps[4].outcome = f"refused, but not by the policy: {exc.message}"
        else:
            steps[4].outcome = f"EXECUTED (this must never happen): {_describe(data)}"
        say.agent((s.green if steps[4].ok else s.red)(steps[4].outcome))
    return steps


async def _mcp_agent(
    gw: Harness,
    say: Narrator,
    settle: Callable[[], Awaitable[None]],
    undo: Scene,
    *,
    interactive: bool,
) -> list[Step]:
    """The same four requests (and Undo) as :func:`_agent`, as an MCP client through
    ``agentgate mcp``."""
    from agentgate.testing.mcp_client import mcp_stdio_client

    s = say.s
    waiting: set[str] = set()

    async def notice(progress: float, total: float | None, message: str | None) -> None:
        if message and not waiting:  # the first notice; more follow every few seconds
            waiting.add(message)
            say.agent(s.yellow(f"⏳ MCP progress: {message}"))

    def content(result: Any) -> str:
        return "\n".join(block.text for block in result.content if block.type == "text")

    steps = [
        Step(f"read the living-room temperature ({SENSOR})"),
        Step(f"turn on the living-room light ({LIGHT})"),
        Step(f"unlock the front door ({LOCK})"),
        Step(f"unlock it through a scene (scene.apply naming {LOCK})"),
    ]
    denied_by_policy = "denied by policy: "
    async with mcp_stdio_client(
        gw.url, token=gw.tokens[AGENT], ca=gw.ca_path, wait=APPROVAL_TIMEOUT + 10
    ) as mcp:
        tools = [tool.name for tool in (await mcp.list_tools()).tools]
        say.agent(
            f"MCP client connected to {s.bold('agentgate mcp')} (stdio) → {gw.url};"
            f" {len(tools)} tools"
        )

        say.heading(f"1. the agent wants to {steps[0].title}")
        say.agent(f"→ tools/call ha_get_state {{entity_id: {SENSOR}}}")
        result = await mcp.call_tool("ha_get_state", {"entity_id": SENSOR})
        if result.is_error:
            steps[0].outcome = f"refused: {content(result)}"
        else:
            data = (result.structured_content or {}).get("data")
            steps[0].outcome = f"allowed by policy, executed at once: {_describe(data)}"
            steps[0].ok = True
        say.agent((s.green if steps[0].ok else s.red)(steps[0].outcome))

        say.heading(f"2. the agent wants to {steps[1].title}")
        light = {"domain": "light", "service": "turn_on", "entity_id": LIGHT}
        say.agent(f"→ tools/call ha_call_service {json.dumps(light)}")
        result = await mcp.call_tool("ha_call_service", light, progress_callback=notice)
        text = content(result)
        if not result.is_error and (result.structured_content or {}).get("status") != "pending":
            data = (result.structured_content or {}).get("data")
            steps[1].outcome = f"approved by the guardian and executed: {_describe(data)}"
            steps[1].ok = True
        else:
            steps[1].outcome = text
            steps[1].ok = interactive and text.startswith(("denied by the guardian", "approval"))
        say.agent((s.green if steps[1].ok else s.red)(steps[1].outcome))
        await settle()
        steps.insert(2, await undo(3))

        denials: list[tuple[Step, dict[str, Any]]] = [
            (steps[3], {"domain": "lock", "service": "unlock", "entity_id": LOCK}),
            (
                steps[4],
                {
                    "domain": "scene",
                    "service": "apply",
                    "entities": {LIGHT: "on", LOCK: "unlocked"},
                },
            ),
        ]
        for step, args in denials:
            say.heading(f"{steps.index(step) + 1}. the agent wants to {step.title}")
            say.agent(f"→ tools/call ha_call_service {json.dumps(args)}")
            result = await mcp.call_tool("ha_call_service", args)
            text = content(result)
            if result.is_error and text.startswith(denied_by_policy):
                step.outcome = f"isError: {text}; nobody was asked, the door stays locked"
                step.ok = True
            elif result.is_error:
                step.outcome = f"refused, but not by the policy: {text}"
            else:
                step.outcome = f"EXECUTED (this must never happen): {text}"
            say.agent((s.green if step.ok else s.red)(step.outcome))
    return steps


def shipped_policy() -> str:
    """The repository's ``permissions.yaml``: the demo runs the policy users start from."""
    try:
        return POLICY_FILE.read_text()
    except OSError as exc:
        raise OSError(
            f"{POLICY_FILE}: {exc.strerror}; the demo runs from a source checkout"
        ) from exc


async def run_demo(
    workdir: Path,
    *,
    auto: bool,
    policy: str | None = None,
    insecure: bool = False,
    style: Style | None = None,
    out: TextIO = sys.stdout,
    keys: KeyReader | None = None,
    auto_pause: float = 1.5,
    mcp: bool = False,
    kept: bool = False,
) -> DemoResult:
    """Run the whole demo inside ``workdir`` (which the caller creates and removes).

    ``auto`` presses Allow by itself; otherwise ``keys`` (a :class:`KeyReader`) chooses, and
    with no keys left (stdin closed) the phone presses Allow too. ``policy`` is YAML text
    (default: the shipped ``permissions.yaml``). ``mcp``: the agent is an MCP client of
    ``agentgate mcp`` instead of an SDK user.
    """
    style = style or Style(False)
    say = Narrator(style, out)
    policy = shipped_policy() if policy is None else policy
    # Fresh secrets per run, as in real life: the agent's, Home Assistant's, the bot's.
    agent_token, ha_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    bot_token = f"{secrets.randbelow(10**9)}:{secrets.token_urlsafe(24)}"
    say.heading("starting: fake Home Assistant, fake Telegram Bot API, the real gateway")
    async with (
        run_fake_homeassistant(token=ha_token) as home,
        run_fake_telegram(token=bot_token, chat_id=CHAT_ID) as telegram,
    ):
        home.set_state(LIGHT, "off", {"brightness": None, "color_mode": None})
        say.demo(f"fake Home Assistant on {home.url} ({LIGHT} is off, {LOCK} is locked)")
        say.demo(f"fake Telegram Bot API on {telegram.base_url}")
        say.demo(f"policy: {POLICY_FILE.name} (sensors allow, lights ask, locks deny)")
        if insecure:
            say.demo(
                style.red(
                    style.bold("--insecure: plain ws:// WITHOUT TLS. Loopback only; never do this")
                    + style.bold(" on a network.")
                )
            )
        else:
            say.demo(
                "TLS: a throw-away local CA, made for this run"
                + (" (kept with the rest)" if kept else " and deleted with it")
            )
        async with running_gateway(
            workdir,
            home=home,
            use_telegram=True,
            tls=not insecure,
            tokens={AGENT: agent_token},
            policy=policy,
            gateway={"approval_timeout": APPROVAL_TIMEOUT},
            audit={"witness_file": str(workdir / WITNESS_FILE)},
            telegram={
                "token": bot_token,
                "chat_id": CHAT_ID,
                "allowed_users": [GUARDIAN_ID],
                "base_url": telegram.base_url,
            },
        ) as gw:
            phone = Phone(
                telegram,
                user_id=GUARDIAN_ID,
                user_name=GUARDIAN_NAME,
                style=style,
                keys=None if auto else keys,
                auto_pause=auto_pause,
                out=out,
            )
            say.demo(
                f"the guardian {GUARDIAN_NAME} (Telegram user {GUARDIAN_ID}) holds the phone;"
                " cards show up below"
            )

            async def settle() -> None:
                with trio.move_on_after(5):
                    await phone.settled()

            async def undo(number: int) -> Step:
                """The guardian changes their mind: ↩ Undo on the light's executed card."""
                step = Step(
                    f"the guardian changes their mind: ↩ Undo on the light's card ({LIGHT})"
                )
                say.heading(f"{number}. {step.title}")
                card = phone.undoable()
                if card is None:
                    step.outcome = "nothing to undo: the light was not turned on"
                    step.ok = not auto
                else:
                    answer = await phone.undo(card)
                    await settle()
                    light = (home.state(LIGHT) or {}).get("state")
                    if answer is None:
                        step.outcome, step.ok = f"kept: {LIGHT} stays {light}", not auto
                    elif light == "off":
                        step.outcome = f"undone by the guardian: {LIGHT} is off again"
                        step.ok = True
                    else:
                        step.outcome = f"not undone: {answer}"
                say.demo((style.green if step.ok else style.red)(step.outcome))
                return step

            async with trio.open_nursery() as nursery:
                nursery.start_soon(phone.run)
                agent = _mcp_agent if mcp else _agent
                steps = await agent(gw, say, settle, undo, interactive=not auto)
                await settle()
                nursery.cancel_scope.cancel()
            light, lock = home.state(LIGHT), home.state(LOCK)
            say.heading("stopping the gateway")
        # Turned on, then undone: off again (the guardian may do otherwise at the keyboard).
        home_ok = (lock or {}).get("state") == "locked" and (
            not auto or (light or {}).get("state") == "off"
        )
        # The gateway signed a checkpoint at its stop and posted it, silently, to the chat.
        chat = [m.text for m in telegram.messages.values() if m.silent]
    conn = read_only(workdir / "agentgate.db")
    try:
        entries = query(conn, Filters())
        proof, proven = _prove(conn, workdir, chat[-1] if chat else None)
    finally:
        conn.close()
    return DemoResult(
        steps=steps,
        presses=phone.presses,
        audit=format_table(entries, width=80),
        audit_rows=len(entries),
        home_ok=home_ok,
        proof=proof,
        proven=proven,
    )


def _prove(conn: Any, workdir: Path, message: str | None) -> tuple[list[str], bool]:
    """What ``agentgate audit verify --checkpoint`` says of the store, given the chat's message."""
    if message is None:
        return ["the chat received no checkpoint"], False
    given = [Given("the chat's checkpoint", note) for note in tlog.find_notes(message)]
    report = verify(
        conn,
        store=str(workdir / "agentgate.db"),
        given=given,
        key_file=workdir / "agentgate.audit-key",
    )
    note = next((n for n in tlog.find_notes(message) if isinstance(n, tlog.Checkpoint)), None)
    lines = []
    if note is not None:
        lines.append(
            f"the guardians' chat holds the checkpoint the gateway signed as it stopped:"
            f" {note.short()}"
        )
    integrity = "ok" if not report.integrity else f"FAILED ({report.integrity[0]})"
    completeness = "ok" if not report.completeness else f"FAILED ({report.completeness[0]})"
    lines.append(f"integrity: {integrity}; completeness against the chat: {completeness}")
    return lines, report.ok


def _summary(result: DemoResult, say: Narrator) -> None:
    s = say.s
    say.heading(f"the audit log ({result.audit_rows} rows): agentgate audit --store …/agentgate.db")
    say.line(result.audit)
    say.heading("the audit log, proven: agentgate audit verify --checkpoint <the chat's>")
    for line in result.proof:
        say.demo((s.green if result.proven else s.red)(line))
    say.heading("what happened")
    for n, step in enumerate(result.steps, 1):
        mark = s.green("✔") if step.ok else s.red("✘")
        say.line(f" {mark} {n}. {step.title}: {step.outcome}")
    if not result.home_ok:
        say.line(f" {s.red('✘')} the home is not in the expected state afterwards")
    say.line()
    if result.ok:
        say.line(s.green(s.bold("demo finished: everything behaved as expected.")))
    else:
        say.line(s.red(s.bold("demo finished: something did NOT behave as expected.")))


async def _main(
    args: argparse.Namespace, workdir: Path, style: Style, policy: str
) -> DemoResult | None:
    """The demo under a SIGINT/SIGTERM watcher: Ctrl-C stops everything cleanly."""
    result: DemoResult | None = None

    async def demo(cancel: Callable[[], None]) -> None:
        nonlocal result
        result = await run_demo(
            workdir,
            auto=args.auto,
            policy=policy,
            insecure=args.insecure,
            style=style,
            keys=KeyReader(),
            auto_pause=args.pause,
            mcp=args.mcp,
            kept=args.keep is not None,
        )
        cancel()

    async def watch_signals(cancel: Callable[[], None]) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                print(f"\n{signal.Signals(signum).name}: stopping the demo", flush=True)
                cancel()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(demo, nursery.cancel_scope.cancel)
        nursery.start_soon(watch_signals, nursery.cancel_scope.cancel)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the demo: 0 when everything behaved as expected, 1 otherwise, 2 for bad usage,
    130 when interrupted (Ctrl-C)."""
    parser = argparse.ArgumentParser(
        prog="python -m agentgate.demo",
        description="agentgate on one machine: fake home, fake Telegram, the real gateway.",
    )
    parser.add_argument(
        "--auto", action="store_true", help="unattended: the phone presses Allow by itself"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plain ws:// on loopback instead of TLS"
    )
    parser.add_argument(
        "--mcp",
        action="store_true",
        help="the agent is an MCP client (official mcp client) of agentgate mcp (stdio bridge)",
    )
    parser.add_argument("--no-color", action="store_true", help="no colours even on a terminal")
    parser.add_argument(
        "--pause", type=float, default=1.5, help="seconds --auto waits before pressing (1.5)"
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="keep the store, its audit key and the checkpoints in DIR (new or empty), for"
        " agentgate audit verify",
    )
    args = parser.parse_args(argv)
    if args.pause < 0:
        parser.error("--pause must be 0 or more")
    keep = None if args.keep is None else Path(args.keep).resolve()
    if keep is not None:
        if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
            parser.error(f"--keep: {args.keep} must be a new or empty directory")
        keep.mkdir(parents=True, exist_ok=True)
    style = Style.for_stream(sys.stdout, force_off=args.no_color)
    try:
        policy = shipped_policy()
    except OSError as exc:
        print(f"agentgate demo: {exc}", file=sys.stderr)
        return 2
    handler = _setup_logging(style, sys.stdout)
    say = Narrator(style, sys.stdout)
    say.line(style.bold("agentgate demo") + " — an agent asks, a policy decides, a human approves.")
    if not args.auto:
        say.line(
            "When a card appears, press a (Allow), d (Deny) or h (Allow 1 h); u undoes the light."
            " Ctrl-C quits."
        )
    try:
        with (
            tempfile.TemporaryDirectory(prefix="agentgate-demo-")
            if keep is None
            else nullcontext(str(keep)) as tmp,
            cbreak(0) if not args.auto else nullcontext(False),
        ):
            result = trio.run(_main, args, Path(tmp), style, policy)
    finally:
        logging.getLogger().removeHandler(handler)
    if result is None:
        return 130
    _summary(result, say)
    if keep is not None:
        say.line(
            f"kept in {keep}: agentgate.db (the store), agentgate.audit-key (its signing key),"
            f" {WITNESS_FILE} (the checkpoints, as a witness file holds them). Try:"
        )
        say.line(
            f"  agentgate audit verify --store {keep / 'agentgate.db'}"
            f" --checkpoint {keep / WITNESS_FILE}"
        )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
