"""A small agentgate agent written with Trio, using the SDK (``agentgate.client``).

It collects results decided while it was away, reads an entity (``--sensor``, default
``sun.sun``, which every Home Assistant with its default configuration has; the shipped policy
allows reading it), then, if you name one with ``--light``, asks to turn a light on (the shipped
policy says ``ask``: the guardian decides) and handles the ways a request can be refused. Run it
against a gateway::

    export AGENTGATE_URL=wss://localhost:8443/ AGENTGATE_CA=gate.crt
    python examples/trio_agent.py --token - < token.txt        # the token from stdin
    python examples/trio_agent.py --token - --sensor sensor.outside_temperature \
        --light light.kitchen < token.txt                       # entities of your home

Exit status: 0 done (a refused light is an answer too), 1 a request failed (e.g. the entity
does not exist in your home: pass one that does with --sensor), 2 bad arguments, 3 connection
or authentication failed. The asyncio version is ``examples/asyncio_agent.py``; the code inside
``main`` is the same.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import trio

from agentgate.client import (
    AgentgateError,
    ApprovalTimedOut,
    AuthenticationFailed,
    ConnectionLost,
    DeniedByGuardian,
    DeniedByPolicy,
    Gateway,
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
        "--sensor", default="sun.sun", help="an entity to read (default sun.sun, in every home)"
    )
    parser.add_argument(
        "--light", help="a light to ask to turn on (the guardian decides); without it: no ask"
    )
    parser.add_argument(
        "--wait", type=float, default=300, help="seconds to wait for the guardian at most"
    )
    args = parser.parse_args()
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


async def ask_for_light(gw: Gateway, light: str, wait: float) -> None:
    """Ask to turn ``light`` on and say how it ended; the policy (``ask``) makes a human decide."""
    with trio.move_on_after(wait) as waited:
        try:
            await gw.call("ha_call_service", domain="light", service="turn_on", entity_id=light)
            print(f"{light} is on")
        except DeniedByPolicy as err:  # permissions.yaml says no: do not retry
            print(f"denied by policy: {err.data.get('signature')}")
        except DeniedByGuardian:  # the human said no
            print("the guardian said no")
        except ApprovalTimedOut:  # nobody decided in time
            print("nobody answered in time")
    if waited.cancelled_caught:
        # The gateway still decides; the outcome arrives via pending_results() later.
        print(f"gave up after {wait:g} s; the outcome will be queued")


async def main(args: argparse.Namespace) -> int:
    def on_pending(params: dict[str, Any]) -> None:
        # Called when a request needs a human; its answer comes later on the same call.
        print(f"waiting for the guardian (request {params['request_id']})...", flush=True)

    try:
        async with connect(args.url, token=args.token, ca=args.ca, on_pending=on_pending) as gw:
            print(f"connected as {gw.agent}")
            show_queued(await gw.pending_results())

            # 1. Read a sensor. The result is Home Assistant's state object.
            state = await gw.call("ha_get_state", entity_id=args.sensor)
            unit = state.get("attributes", {}).get("unit_of_measurement", "")
            print(f"{args.sensor} = {state['state']} {unit}".rstrip())

            # 2. Ask for a light. The SDK sets no timeout of its own: bound the wait here.
            if args.light:
                await ask_for_light(gw, args.light, args.wait)
            else:
                print("no --light given: nothing to ask the guardian")

            # 3. Anything that was queued meanwhile (the SDK collects it in the background).
            show_queued(await gw.pending_results())
    except (AuthenticationFailed, ConnectionLost) as err:
        print(f"cannot use the gateway: {err.message}", file=sys.stderr)
        return 3
    except AgentgateError as err:  # e.g. ExecutionFailed: the entity does not exist
        print(f"request failed ({err.code}): {err.message}", file=sys.stderr)
        if "not found" in err.message:
            print("(pass an entity of your home with --sensor)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(trio.run(main, parse_args()))
