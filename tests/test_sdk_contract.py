"""The SDK contract suite (``tests/client_contract.py``) against the REAL gateway.

Every case of :data:`CONTRACT` runs twice: under Trio (the SDK in the test's own Trio run) and
under asyncio (the SDK in a worker thread with its own asyncio loop, the gateway staying in the
test's Trio run). The gateway is :func:`serve_gateway` itself over TLS on 127.0.0.1, in front of
the fake Home Assistant on a real socket, with a scripted guardian.

Restarts: :class:`RealGateway` keeps one workdir (same CA, same ``gate.toml``, same store
file) and, after the first start on port 0, pins ``listen`` to the port it got, so a restarted
gateway is at the same URL and the SDK can reconnect to it. ``restart(crash=True)`` stops it
like ``kill -9`` as far as the store can tell (no shutdown sequence: pending approvals stay
pending and resume after the restart); ``crash=False`` is a planned restart (the asker hears
-32007 and pending approvals resume at the next start; docs/operations.md, "What survives what").
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from agentgate.client import (
    Backoff,
    GatewayShuttingDown,
    connect,
)
from agentgate.config import load_config
from agentgate.gateway import RunningGateway, serve_gateway
from agentgate.testing.fake_homeassistant import FakeHomeAssistant
from agentgate.testing.guardian import ScriptedGuardian
from agentgate.testing.harness import DEFAULT_TOKENS, write_certificates, write_gate_toml
from tests.client_contract import CONTRACT, GwFactory, PendingLog, deadline, gather

pytestmark = pytest.mark.slow

CEILING = 60.0
APPROVAL_TIMEOUT = 3

CONTRACT_POLICY = """\
rules:
  - {pattern: "ha_get_state(sensor.*)",           action: allow, description: reads}
  - {pattern: "ha_call_service(lock.unlock, *)",  action: deny,  description: locks}
  - {pattern: "ha_call_service(light.turn_on, *)", action: ask,  description: lights}
"""

_LISTEN_ANY = 'listen = "127.0.0.1:0"'


class RealGateway:
    """A real gateway that can be stopped and started again at the same URL with the same store.

    ``url``, ``ca_path`` and ``token`` are what an agent needs; ``press`` decides an approval
    as the guardian; ``restart`` stops and starts it (``crash=True``: no shutdown sequence).
    """

    def __init__(
        self, nursery: trio.Nursery, workdir: Path, home: FakeHomeAssistant, **toml: Any
    ) -> None:
        self.nursery = nursery
        self.workdir = workdir
        self.approval_timeout: float = APPROVAL_TIMEOUT
        self.token = DEFAULT_TOKENS["pi"]
        self.guardian = ScriptedGuardian()
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_path, cert, key = write_certificates(workdir)
        self.config_path = write_gate_toml(
            workdir,
            tokens=DEFAULT_TOKENS,
            ha_url=home.url,
            ha_token=home.token,
            tls=(cert, key),
            **{
                "policy": CONTRACT_POLICY,
                "gateway": {"approval_timeout": APPROVAL_TIMEOUT},
                **toml,
            },
        )
        self.url = ""
        self.starts = 0
        self._running: RunningGateway | None = None
        self._stopped = trio.Event()

    async def start(self) -> None:
        """Start the gateway; the first start picks a port, later ones reuse it."""
        config = load_config(self.config_path)
        stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[RunningGateway]) -> None:
            try:
                await serve_gateway(config, guardian=self.guardian, task_status=task_status)
            finally:
                stopped.set()

        running: RunningGateway = await self.nursery.start(run)
        self.guardian.control = running.gateway.controls
        self._running, self._stopped = running, stopped
        self.starts += 1
        if not self.url:
            self.url = running.url
            # Pin the port for restarts (write_gate_toml always writes port 0 first; a second
            # ``listen`` key through ``gateway=`` would be a duplicate TOML key).
            text = self.config_path.read_text()
            assert _LISTEN_ANY in text
            pinned = text.replace(_LISTEN_ANY, f'listen = "127.0.0.1:{running.port}"')
            self.config_path.write_text(pinned)
        assert running.url == self.url

    async def stop(self, *, crash: bool = False) -> None:
        """Stop the gateway and wait until it is gone.

        ``crash=True`` skips the shutdown sequence (approvals are not resolved, sockets are not
        closed politely): to the store it looks like ``kill -9``.
        """
        running = self._running
        assert running is not None, "not running"
        self._running = None
        if crash:

            async def no_shutdown(**kw: Any) -> None:
                pass

            running.gateway.shutdown = no_shutdown  # type: ignore[method-assign]  # fault injection
        running.request_stop()
        await self._stopped.wait()

    async def restart(self, *, crash: bool = True) -> None:
        """Stop (by default like a crash) and start again at the same URL with the same store."""
        await self.stop(crash=crash)
        await self.start()

    async def press(self, request_id: str, decision: str) -> str:
        """Decide as the guardian, once the card is shown; fail loudly if the gateway did not
        take the decision."""
        await self.guardian.card_of(request_id)
        answer = await self.guardian.press(request_id, decision)
        assert answer in ("approved", "denied"), answer
        return answer

    @property
    def running(self) -> RunningGateway:
        assert self._running is not None
        return self._running


@asynccontextmanager
async def real_gateway(
    workdir: Path, home: FakeHomeAssistant, **toml: Any
) -> AsyncIterator[RealGateway]:
    """A started :class:`RealGateway` for the body of the block (stopped cleanly afterwards).

    ``toml`` goes to :func:`write_gate_toml` (e.g. ``limits={...}``; keep ``approval_timeout``
    at 3 s if you pass ``gateway=``).
    """
    # The contract's home knows sensor.living_room and light.kitchen (client_contract docstring).
    home.set_state("sensor.living_room", "21.5", {"unit_of_measurement": "°C"})
    async with trio.open_nursery() as nursery:
        gateway = RealGateway(nursery, workdir, home, **toml)
        await gateway.start()
        try:
            yield gateway
        finally:
            if gateway._running is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await gateway.stop()
            nursery.cancel_scope.cancel()


@pytest.fixture
async def gate(workdir: Path, home: FakeHomeAssistant) -> AsyncIterator[RealGateway]:
    async with real_gateway(workdir, home) as gateway:
        yield gateway


# -- the two runners -------------------------------------------------------------------------


class _TrioHome:
    """:class:`tests.client_contract.Home` for a case running in the test's Trio run."""

    def __init__(self, gate: RealGateway) -> None:
        self.gate = gate
        self.approval_timeout = gate.approval_timeout

    async def press(self, request_id: str, decision: str) -> None:
        await self.gate.press(request_id, decision)

    async def restart_gateway(self) -> None:
        await self.gate.restart()

    async def settled(self) -> None:
        await self.gate.running.gateway.broker.idle()


class _AsyncioHome:
    """The same, awaited from an asyncio loop in a worker thread (hops into the Trio thread)."""

    def __init__(self, gate: RealGateway, token: trio.lowlevel.TrioToken) -> None:
        self.gate = gate
        self.token = token
        self.approval_timeout = gate.approval_timeout

    async def _trio(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return await asyncio.to_thread(trio.from_thread.run, afn, *args, trio_token=self.token)

    async def press(self, request_id: str, decision: str) -> None:
        await self._trio(self.gate.press, request_id, decision)

    async def restart_gateway(self) -> None:
        await self._trio(self.gate.restart)

    async def settled(self) -> None:
        await self._trio(self.gate.running.gateway.broker.idle)


Case = Callable[[GwFactory, Any], Awaitable[None]]


def _run_asyncio(case: Case, factory: GwFactory, home: _AsyncioHome) -> None:
    async def main() -> None:
        async with asyncio.timeout(CEILING):
            await case(factory, home)

    # A plain selector loop: trio-asyncio's loop policy is not involved in this thread.
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(main())


async def run_case(library: str, gate: RealGateway, case: Case) -> None:
    """Run ``case`` with the SDK under ``library`` ("trio" or "asyncio") against ``gate``."""
    factory = functools.partial(connect, gate.url, token=gate.token, ca=gate.ca_path)
    if library == "trio":
        with trio.fail_after(CEILING):
            await case(factory, _TrioHome(gate))
    else:
        home = _AsyncioHome(gate, trio.lowlevel.current_trio_token())
        with trio.fail_after(CEILING):
            await trio.to_thread.run_sync(_run_asyncio, case, factory, home, abandon_on_cancel=True)


LIBRARIES = pytest.mark.parametrize("library", ["trio", "asyncio"])


@LIBRARIES
@pytest.mark.parametrize("case", CONTRACT, ids=[c.__name__ for c in CONTRACT])
async def test_contract_against_the_real_gateway(
    library: str, gate: RealGateway, case: Case
) -> None:
    await run_case(library, gate, case)


# -- beyond the contract: restarts of the real gateway -----------------------------------------


@LIBRARIES
async def test_clean_restart_answers_shutdown_then_reconnects(
    library: str, gate: RealGateway
) -> None:
    """A clean restart answers a waiting ask with -32007 but keeps it pending; the SDK
    reconnects to the new gateway, where the guardian's Allow executes it and queues its
    result."""

    async def case(gw_factory: GwFactory, home: Any) -> None:
        pending = PendingLog()
        fast = Backoff(initial=0.1, maximum=0.5)
        async with deadline(30), gw_factory(on_pending=pending, backoff=fast) as gw:

            async def restart_cleanly() -> None:
                await pending.wait()
                await home.restart_cleanly()

            light = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}
            (_, error), (_, restart_error) = await gather(
                lambda: gw.call("ha_call_service", **light), restart_cleanly
            )
            assert restart_error is None, restart_error
            assert isinstance(error, GatewayShuttingDown), error
            request_id = pending.seen[0]["request_id"]
            assert error.data["request_id"] == request_id
            assert error.data["pending"] is True  # its result will be queued
            # the next call waits for the reconnection and works against the new gateway
            data = await gw.call("ha_get_state", entity_id="sensor.living_room")
            assert data["entity_id"] == "sensor.living_room"
            assert await gw.pending_results() == []
            await home.press(request_id, "allow")  # its card still works
            await home.settled()
            (entry,) = await gw.pending_results()
            assert (entry["request_id"], entry["status"]) == (request_id, "executed")

    class TrioHome(_TrioHome):
        async def restart_cleanly(self) -> None:
            await self.gate.restart(crash=False)

    class AsyncioHome(_AsyncioHome):
        async def restart_cleanly(self) -> None:
            await self._trio(functools.partial(self.gate.restart, crash=False))

    factory = functools.partial(connect, gate.url, token=gate.token, ca=gate.ca_path)
    with trio.fail_after(CEILING):
        if library == "trio":
            await case(factory, TrioHome(gate))
        else:
            home = AsyncioHome(gate, trio.lowlevel.current_trio_token())
            await trio.to_thread.run_sync(_run_asyncio, case, factory, home)
    assert gate.starts == 2


async def test_result_queued_while_away_survives_a_clean_restart(gate: RealGateway) -> None:
    """Decided after the agent left, queued, gateway restarted: the SDK still collects it."""
    pending = PendingLog()
    light = {"domain": "light", "service": "turn_on", "entity_id": "light.kitchen"}
    with trio.fail_after(CEILING):
        factory = functools.partial(connect, gate.url, token=gate.token, ca=gate.ca_path)
        async with factory(on_pending=pending) as gw:
            with trio.move_on_after(30) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(functools.partial(gw.call, "ha_call_service", **light))
                    params = await pending.wait()
                    nursery.cancel_scope.cancel()
            assert not scope.cancelled_caught
        # the agent is gone: the decision is queued for it
        await gate.running.gateway.door.gone("pi")
        await gate.press(params["request_id"], "allow")
        await gate.guardian.wait_for_update(params["request_id"])
        await gate.restart(crash=False)
        async with factory() as gw:
            collected = await gw.pending_results()  # queued before the restart: there at once
            (entry,) = collected
            assert entry["request_id"] == params["request_id"]
            assert entry["rpc_id"] == params["rpc_id"]
            assert entry["status"] == "executed"
            assert entry["data"]
            assert await gw.pending_results() == []  # handed out once
