"""Give the running test core two areas and put entities in them (ha_list_areas/_entities).

Usage: python seed_areas.py URL TOKEN   (the Home Assistant venv's python: aiohttp is there)

Areas live in HA's registries, which only its WebSocket API edits while it runs:
``config/area_registry/create`` makes Kitchen (area_id kitchen) and Bedroom (bedroom), and
``config/entity_registry/update`` puts light.kitchen (the template light) in the kitchen and
light.bed_light (a demo light) in the bedroom. Idempotent: an area that exists is kept.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiohttp

AREAS = {"Kitchen": ["light.kitchen"], "Bedroom": ["light.bed_light"]}


async def main(url: str, token: str) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/api/websocket") as ws:
        assert (await ws.receive_json())["type"] == "auth_required"
        await ws.send_json({"type": "auth", "access_token": token})
        assert (await ws.receive_json())["type"] == "auth_ok"
        ids = iter(range(1, 1000))

        async def call(**message: Any) -> Any:
            message["id"] = next(ids)
            await ws.send_json(message)
            while True:
                answer = await ws.receive_json()
                if answer.get("id") == message["id"]:
                    if not answer.get("success"):
                        raise SystemExit(f"{message['type']} failed: {answer.get('error')}")
                    return answer.get("result")

        existing = {a["name"]: a["area_id"] for a in await call(type="config/area_registry/list")}
        for name, entities in AREAS.items():
            area_id = existing.get(name)
            if area_id is None:
                area_id = (await call(type="config/area_registry/create", name=name))["area_id"]
            for entity_id in entities:
                await call(
                    type="config/entity_registry/update", entity_id=entity_id, area_id=area_id
                )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
