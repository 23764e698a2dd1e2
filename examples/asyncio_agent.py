"""A small agentgate agent written with asyncio, using the SDK (``agentgate.client``).

The same SDK names as under Trio: ``connect()`` sees that asyncio is running and uses its
asyncio transport. It collects results decided while it was away, reads sensors concurrently
over one connection, asks to turn a light on (usually ``ask``: a human decides in Telegram)
and handles the ways a request can be refused. Run it against a gateway::

    export AGENTGATE_URL=wss://127.0.0.1:8443/ AGENTGATE_CA=ca.pem
    python examples/asyncio_agent.py --token - < token.txt     # the token from stdin
    python examples/asyncio_agent.py --url wss://gate:8443/ --token "$AGENT_TOKEN" --ca ca.pem

Exit status: 0 done (even if the light was refused: that is an answer), 3 connection or
authentication failed. The Trio version is ``examples/trio_agent.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from agentgate.client import (
    AgentgateError,
    ApprovalTimedOut,
    AuthenticationFailed,
    ConnectionLost,
    DeniedByGuardian,
    DeniedByPolicy,
    connect,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("AGENTGATE_URL"), help="$AGENTGATE_URL")
    parser.add_argument(
        "--token",
        default=os.environ.get("AGENTGATE_TOKEN"),
        help="'-' reads it from stdin (default: $AGENTGATE_TOKEN)",
    )
    parser.add_argument("--ca", default=os.environ.get("AGENTGATE_CA"), help="$AGENTGATE_CA")
    parser.add_argument(
        "--sensor",
        action="append",
        help="a sensor to read (repeatable; default sensor.living_room_temperature)",
    )
    parser.add_argument("--light", default="light.kitchen")
    parser.add_argument(
        "--wait", type=float, default=300, help="seconds to wait for the guardian at most"
    )
    args = parser.parse_args()
    args.sensor = args.sensor or ["sensor.living_room_temperature"]
    if args.token == "-":  # noqa: S105 - "-" means: read it from stdin (not in shell history)
        args.token = sys.stdin.readline().strip()
    if not args.url or not args.token:
        parser.error("need --url and --token (or AGENTGATE_URL and AGENTGATE_TOKEN)")
    return args


def show_queued(entries: list[dict[str, Any]]) -> None:
    """Queued results: outcomes of calls whose connection was gone when they were decided."""
    for entry in entries:
        outcome = entry.get("data") if entry["status"] == "executed" else entry.get("error")
        print(f"queued: {entry['tool']} (rpc_id {entry['rpc_id']}) {entry['status']}: {outcome}")


async def main(args: argparse.Namespace) -> int:
    async def on_pending(params: dict[str, Any]) -> None:
        # Called (sync or async hooks both work) when a request needs a human.
        print(f"waiting for the guardian (request {params['request_id']})...", flush=True)

    try:
        async with connect(args.url, token=args.token, ca=args.ca, on_pending=on_pending) as gw:
            print(f"connected as {gw.agent}")
            show_queued(await gw.pending_results())

            # 1. Read sensors concurrently: the calls share one connection.
            states = await asyncio.gather(
                *(gw.call("ha_get_state", entity_id=sensor) for sensor in args.sensor)
            )
            for state in states:
                unit = state.get("attributes", {}).get("unit_of_measurement", "")
                print(f"{state['entity_id']} = {state['state']} {unit}".rstrip())

            # 2. Ask for a light. The SDK sets no timeout of its own: bound the wait here.
            light = {"domain": "light", "service": "turn_on", "entity_id": args.light}
            try:
                async with asyncio.timeout(args.wait):
                    await gw.call("ha_call_service", **light)
                print(f"{args.light} is on")
            except DeniedByPolicy as err:  # permissions.yaml says no: do not retry
                print(f"denied by policy: {err.data.get('signature')}")
            except DeniedByGuardian:  # the human said no
                print("the guardian said no")
            except ApprovalTimedOut:  # nobody decided in time
                print("nobody answered in time")
            except TimeoutError:
                # The gateway still decides; the outcome arrives via pending_results() later.
                print(f"gave up after {args.wait:g} s; the outcome will be queued")

            # 3. Anything that was queued meanwhile (the SDK collects it in the background).
            show_queued(await gw.pending_results())
    except (AuthenticationFailed, ConnectionLost) as err:
        print(f"cannot use the gateway: {err.message}", file=sys.stderr)
        return 3
    except AgentgateError as err:  # e.g. ExecutionFailed: the sensor does not exist
        print(f"request failed ({err.code}): {err.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
