"""A process that writes the audit log without end, for ``kill -9`` (``test_audit_crash.py``).

``python -m tests.audit_writer STORE WITNESS_FILE MODE``: opens the store as ``agentgate serve``
does (commits on the event loop, durable ones and WAL checkpoints in worker threads) and, with
MODE ``append``, records requests and their outcomes from several tasks at once (every third
decision durable, outcomes posted), signing a checkpoint every 25 events; with MODE
``checkpoint``, signs a checkpoint after every event, each appended to WITNESS_FILE. It prints
``events N`` now and then, so the test can kill it mid-write; with MODE ``checkpoint`` it also
prints ``signing N`` from inside the transaction that writes every 50th checkpoint, and lingers
there, so the test can kill it in the middle of checkpointing for certain.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import trio

from agentgate import tlog
from agentgate.approvals import Outcome
from agentgate.auditkey import create_key, load_key
from agentgate.checkpoints import LogSigner, _append_note, new_origin
from agentgate.eventlog import Tip
from agentgate.store import AuditEntry, open_store


async def main(db: Path, witness: Path, mode: str) -> None:
    key_file = db.with_name(db.stem + ".audit-key")
    async with open_store(db) as store:
        named = await store.log_key()
        if named is None:
            signer = LogSigner(create_key(key_file), new_origin())
            await store.append_event("key", {"origin": signer.origin, "vkey": signer.vkey})
        else:
            signer = LogSigner(load_key(key_file), named[0])
        every = 1 if mode == "checkpoint" else 25
        sign = signer
        if mode == "checkpoint":
            signed = [0]

            def lingering(tip: Tip) -> tlog.Checkpoint:
                # Inside the store's transaction, now and then: nothing of it is committed yet,
                # and the process does nothing else until the kill.
                signed[0] += 1
                if signed[0] % 50 == 0:
                    print(f"signing {tip.size}", flush=True)
                    time.sleep(0.5)
                return signer(tip)

            sign = lingering  # type: ignore[assignment]

        async def checkpoints() -> None:
            seen = store.appended
            while True:
                await store.wait_appended(seen + every)
                seen = store.appended
                checkpoint = await store.write_checkpoint(sign, 0.0)
                if checkpoint is not None:
                    await trio.to_thread.run_sync(_append_note, witness, checkpoint.text())

        async def requests(task: int) -> None:
            n = 0
            while True:
                n += 1
                request_id = f"{task}-{n}"
                entry = AuditEntry(float(n), "pi", request_id, "t", {"n": n}, "t()", "allow", "r")
                await store.audit(entry, durable=n % 3 == 0)
                await store.resolve_audit(
                    request_id,
                    Outcome.EXECUTED,
                    resolved_by=None,
                    resolved_at=n + 0.5,
                    result={"task": task, "n": n},
                    wait=n % 2 == 0,  # half of them posted, as the pipeline does
                )
                if n % 10 == 0 and task == 0:
                    print(f"events {store.appended}", flush=True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(checkpoints)
            for task in range(4):
                nursery.start_soon(requests, task)


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
