"""The door's floor: a bare trio-websocket echo over TLS, in its own process.

``python -m bench.door CERT KEY`` serves WSS on a free port of 127.0.0.1 and prints its URL.
For every text frame it reads it parses the JSON-RPC id and answers with :data:`RESULT`, a frame
the size of S1-S3's result (``ha_get_state`` of the benchmarks' sensor, wrapped as the gateway
wraps it), carrying that id: the least a gateway does per request at its door, on the same
stack (trio, trio-websocket, Python's ``ssl`` with a server context like the gateway's). The
client is a :mod:`bench.load` worker in ``echo`` mode; :func:`bench.procs.echo_server` starts
the server.
"""

from __future__ import annotations

import json
import signal
import ssl
import sys
from functools import partial

import trio
import trio_websocket

from bench.fasthome import ENTITIES, state_object

ENTITY = "sensor.living_room_temperature"
MAX_MESSAGE = 1024 * 1024  # the gateway's default max_message_size


def _result_frame() -> str:
    state, attributes = ENTITIES[ENTITY]
    result = {
        "status": "executed",
        "request_id": "3f2b1c9e-1111-2222-3333-444455556666",
        "data": state_object(ENTITY, state, attributes),
    }
    return '{"jsonrpc": "2.0", "id": %s, "result": ' + json.dumps(result) + "}"


RESULT = _result_frame()  # "%s" is the request's id, JSON-encoded


def request_frame(rpc_id: int) -> str:
    """The request the echo client sends: the SDK's ``ha_get_state`` call."""
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": rpc_id,
            "method": "tool_request",
            "params": {"tool": "ha_get_state", "args": {"entity_id": ENTITY}},
        }
    )


async def _echo(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            rpc_id = json.loads(await ws.get_message()).get("id")
            await ws.send_message(RESULT % json.dumps(rpc_id))
    except trio_websocket.ConnectionClosed:
        return  # the client is done


async def serve(cert: str, key: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                _echo,
                "127.0.0.1",
                0,
                context,
                max_message_size=MAX_MESSAGE,
            )
        )
        print(f"wss://127.0.0.1:{server.port}/", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


if __name__ == "__main__":
    trio.run(serve, sys.argv[1], sys.argv[2])
