"""What keeps many pending approvals cheap (bench S6), without changing behaviour (fast tier)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing

from tests.fastgate import authed, fast_gateway, reply


class GatedHome:
    """An executor whose ``describe`` counts reads (per entity) and waits until released."""

    def __init__(self) -> None:
        self.calls = 0
        self.reads: dict[str, int] = {}
        self.release = trio.Event()

    async def describe(self, tool: str, args: dict[str, Any]) -> str:
        entity_id = args["entity_id"]
        self.calls += 1
        # Per entity: Trio runs ready tasks in no fixed order, so a global count would not say
        # which entity was read first.
        read = self.reads[entity_id] = self.reads.get(entity_id, 0) + 1
        await self.release.wait()
        return f"{entity_id} — now: off (read {read})"


async def test_asks_for_one_entity_share_one_state_read(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        home = GatedHome()
        fg.gateway.pipeline.executor = home  # type: ignore[assignment]
        texts: list[str | None] = []

        async def describe(entity_id: str) -> None:
            texts.append(
                await fg.gateway.pipeline.describe("ha_call_service", {"entity_id": entity_id})
            )

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(describe, "light.bedroom")
                nursery.start_soon(describe, "light.kitchen")
                await trio.testing.wait_all_tasks_blocked()
                assert home.calls == 2  # one read per entity, not one per ask
                home.release.set()
        assert sorted(t or "" for t in texts) == [
            "light.bedroom — now: off (read 1)",
        ] * 5 + ["light.kitchen — now: off (read 1)"]
        # nothing in flight any more: the next ask reads the state afresh
        assert await fg.gateway.pipeline.describe("x", {"entity_id": "light.bedroom"}) is not None
        assert home.calls == 3


async def test_a_joined_read_whose_reader_is_cancelled_is_read_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path) as fg:
        home = GatedHome()
        fg.gateway.pipeline.executor = home  # type: ignore[assignment]
        texts: list[str | None] = []
        leader = trio.CancelScope()

        async def lead() -> None:
            with leader:
                await fg.gateway.pipeline.describe("x", {"entity_id": "light.bedroom"})

        async def join() -> None:
            texts.append(await fg.gateway.pipeline.describe("x", {"entity_id": "light.bedroom"}))

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lead)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(join)
                await trio.testing.wait_all_tasks_blocked()
                assert home.calls == 1
                leader.cancel()  # its approval ended (deadline, shutdown) mid-read
                await trio.testing.wait_all_tasks_blocked()
                assert home.calls == 2  # the joiner reads for itself, it is not left waiting
                home.release.set()
        assert texts == ["light.bedroom — now: off (read 2)"]


async def test_the_card_still_shows_the_target_and_the_ask_still_times_out(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with fast_gateway(tmp_path, gateway={"approval_timeout": 30}) as fg:
        ws = await authed(fg)
        await ws.send_message(
            '{"jsonrpc":"2.0","id":3,"method":"tool_request","params":{"tool":"ha_call_service",'
            '"args":{"domain":"light","service":"turn_on","entity_id":"light.bedroom"}}}'
        )
        with trio.fail_after(60):
            shown = await fg.guardian.wait_for_card()
            assert shown.card.target is not None
            assert "light.bedroom" in shown.card.target
            answer = await reply(ws)
            # the agent has its answer first; the outcome's commit and card edit follow
            await fg.gateway.broker.idle()
        assert (answer["id"], answer["error"]["code"]) == (3, -32002)
        assert fg.gateway.broker.approvals == {}
        assert fg.home.service_calls == []
