"""S5's floor: the three exchanges between a press and the agent's result, each alone.

S5 presses a button once the card has been shown for :data:`PRESS_PAUSE` seconds, so every press
finds the processes idle and their code cold (on this VM the same httpx POST takes ~2.5 ms after
50 ms idle and ~1.3 ms back to back). The floor is measured the same way: each exchange on its
own, bare (no gateway logic), one every :data:`PRESS_PAUSE` seconds, across processes:

1. **Bot API**: a bare httpx client (a worker process) long-polls the fake Bot API; the
   orchestrator presses a button; time from the press to the client's parsed update.
2. **Home Assistant**: a bare httpx client POSTs the service call the executor sends.
3. **Agent**: a bare trio-websocket server sends a result-sized frame over TLS to a client in a
   worker process; time from the send to the client's parsed frame.

The floor is the sum of the three medians: what the path from a press to a result costs here
with nothing of agentgate's own in it. ``python -m bench.legs botapi|wss SPEC`` are the workers.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from agentgate.testing.fake_telegram import FakeTelegram
from agentgate.testing.harness import client_ssl_context, write_certificates
from bench import procs
from bench.stats import median

PRESS_PAUSE = 0.05  # seconds between a card being shown and its press, in S5 and here
ROOT = str(Path(__file__).resolve().parent.parent)
# About the size of S5's result frame: the light's states as Home Assistant lists them.
RESULT_FRAME = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {
            "status": "executed",
            "request_id": "3f2b1c9e-1111-2222-3333-444455556666",
            "data": [
                {
                    "entity_id": "light.kitchen",
                    "state": "on",
                    "attributes": {"friendly_name": "Kitchen Light", "brightness": 255},
                    "last_changed": "2026-11-26T03:00:00.000000+00:00",
                    "last_updated": "2026-11-26T03:00:00.000000+00:00",
                    "context": {"id": "01JDX0000000000000000000", "user_id": None},
                }
            ],
        },
    }
)
CARD = "🛡 Approval needed\n" + "Agent: agent0000\nTool: ha_call_service\n" * 8


async def bot_api_leg(tg: FakeTelegram, n: int) -> float:
    """Median ms from a press to a bare long-polling client's parsed update."""
    async with httpx.AsyncClient() as client:
        sent = await client.post(
            f"{tg.base_url}{procs.TG_TOKEN}/sendMessage",
            json={
                "chat_id": procs.TG_CHAT,
                "text": CARD,
                "reply_markup": {
                    "inline_keyboard": [
                        [{"text": "Allow", "callback_data": "allow:x"}],
                        [{"text": "Deny", "callback_data": "deny:x"}],
                    ]
                },
            },
        )
    message_id = sent.json()["result"]["message_id"]
    spec = {"url": f"{tg.base_url}{procs.TG_TOKEN}/getUpdates", "n": n}
    pressed: list[float] = []
    with trio.fail_after(30 + n):
        worker = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bench.legs", "botapi", json.dumps(spec)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert worker.stdout is not None
        output = b""
        lines: list[bytes] = []
        async for chunk in worker.stdout:
            output += chunk
            while b"\n" in output:
                line, output = output.split(b"\n", 1)
                lines.append(line)
                if line == b"polling" and len(pressed) < n:
                    await trio.sleep(PRESS_PAUSE)
                    pressed.append(time.time())
                    tg.press(message_id, "allow:x", user_id=procs.TG_USER)
        if await worker.wait() != 0:
            raise RuntimeError(f"Bot API leg worker failed ({worker.returncode})")
    got: list[float] = json.loads(lines[-1])["got"]
    return median([(b - a) * 1000 for a, b in zip(pressed, got, strict=True)][3:])


async def home_leg(home: procs.Home, n: int) -> float:
    """Median ms of the executor's POST, one every PRESS_PAUSE seconds (turn_on, turn_off...)."""
    headers = {"Authorization": f"Bearer {procs.HA_TOKEN}"}
    times = []
    async with httpx.AsyncClient(base_url=home.url, headers=headers) as client:
        for i in range(n + 3):
            await trio.sleep(PRESS_PAUSE)
            service = "turn_off" if i % 2 else "turn_on"
            t0 = time.perf_counter()
            reply = await client.post(
                f"/api/services/light/{service}", json={"entity_id": "light.kitchen"}
            )
            reply.raise_for_status()
            reply.json()
            times.append((time.perf_counter() - t0) * 1000)
    return median(times[3:])


async def wss_leg(workdir: Path, n: int) -> float:
    """Median ms from a bare WSS server's send to the client's parsed frame."""
    import trio_websocket

    ca, cert, key = await trio.to_thread.run_sync(_certificates, workdir)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    done = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        for _ in range(n + 3):
            await trio.sleep(PRESS_PAUSE)
            sent = time.time()
            await ws.send_message(RESULT_FRAME.replace('"id": 7', f'"sent": {sent!r}', 1))
        await ws.aclose()
        done.set()

    with trio.fail_after(30 + n):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, server_tls)
            )
            url = f"wss://127.0.0.1:{server.port}/"
            spec = {"url": url, "ca": str(ca)}
            result = await trio.run_process(
                [sys.executable, "-m", "bench.legs", "wss", json.dumps(spec)],
                capture_stdout=True,
                cwd=ROOT,
            )
            await done.wait()
            nursery.cancel_scope.cancel()
    latencies: list[float] = json.loads(result.stdout)["latencies"]
    return median(latencies[3:])


def _certificates(workdir: Path) -> tuple[Path, Path, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    return write_certificates(workdir)


# -- the worker processes ----------------------------------------------------------------------


async def _botapi_worker(spec: dict[str, Any]) -> dict[str, Any]:
    got: list[float] = []
    offset = 0
    async with httpx.AsyncClient(timeout=20) as client:
        for _ in range(spec["n"]):
            print("polling", flush=True)
            reply = await client.post(spec["url"], json={"offset": offset, "timeout": 10})
            updates = reply.json()["result"]
            got.append(time.time())
            offset = updates[-1]["update_id"] + 1
    return {"got": got}


async def _wss_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import trio_websocket

    latencies: list[float] = []
    context = client_ssl_context(Path(spec["ca"]))
    async with trio_websocket.open_websocket_url(spec["url"], ssl_context=context) as ws:
        while True:
            try:
                frame = json.loads(await ws.get_message())
            except trio_websocket.ConnectionClosed:
                break
            latencies.append((time.time() - frame["sent"]) * 1000)
    return {"latencies": latencies}


def main() -> None:
    workers = {"botapi": _botapi_worker, "wss": _wss_worker}
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(trio.run(workers[mode], spec)), flush=True)


if __name__ == "__main__":
    main()
