"""``agentgate audit verify | proof | key | compact``: the audit log's proofs, from the shell.

Each reads the store read-only (``compact`` writes, next to a running gateway or not) and finds
it as ``agentgate audit`` does: ``--config gate.toml`` (no secret needs to be set) or ``--store
FILE``; the signing key is ``[audit] key``, or ``NAME.audit-key`` beside the store.

Exit status: 0, 1 (``verify``: the log does not verify; ``proof``: nothing to prove yet;
``compact``: refused), 2 invalid input (``cli.UsageError``).

What the store says is printed through :mod:`agentgate.inert`: whoever could write the store
chose it, and agents chose the arguments events hold.

Imports: cli (UsageError), config, store, eventlog, tlog, verify, inert, auditkey and checkpoints
(``key``, ``compact``).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sqlite3
import sys
import time
from pathlib import Path

from agentgate import eventlog, tlog
from agentgate.cli import EXIT_FAILED, EXIT_OK, UsageError
from agentgate.config import Config
from agentgate.inert import inert, inert_json
from agentgate.store import read_only
from agentgate.verify import Given, proof, verify

__all__ = ["run"]


def run(args: argparse.Namespace, store: Path) -> int:
    config = _config(args)
    key_file = (
        config.audit.key_path(store)
        if config is not None
        else store.with_name(store.stem + ".audit-key")
    )
    action = args.audit_action
    if action == "verify":
        return _verify(args, store, key_file)
    if action == "proof":
        return _proof(args, store)
    if action == "key":
        return _key(store, key_file)
    if action == "compact":
        return _compact(args, store, key_file, config)
    raise UsageError(f"unknown audit action {action!r}")


def _config(args: argparse.Namespace) -> Config | None:
    if getattr(args, "store", None):
        return None
    from agentgate.config import ConfigError, load_config

    try:
        return load_config(
            getattr(args, "config", None) or "gate.toml", insecure=True, secrets=False
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


def _open(store: Path) -> sqlite3.Connection:
    conn = read_only(store)
    try:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='audit_events'"
        ).fetchone()
    except sqlite3.Error as exc:
        conn.close()
        raise UsageError(f"cannot read {store}: {exc}") from exc
    if found is None:
        conn.close()
        raise UsageError(
            f"{store} has no event log yet: it was written by an older agentgate; start the"
            " gateway once (it upgrades the store in place)"
        )
    return conn


def _given(texts: list[str]) -> list[Given]:
    given: list[Given] = []
    for text in texts:
        if text == "-":
            source, content = "stdin", sys.stdin.read()
        elif "\n" not in text and Path(text).is_file():
            source, content = text, Path(text).read_text(encoding="utf-8", errors="replace")
        else:
            source, content = "the checkpoint given", text
        notes = tlog.find_notes(content)
        if not notes:
            raise UsageError(f"--checkpoint: no checkpoint found in {source}")
        for n, note in enumerate(notes, 1):
            label = source if len(notes) == 1 else f"{source} #{n}"
            given.append(Given(label, note))
    return given


def _verify(args: argparse.Namespace, store: Path, key_file: Path) -> int:
    given = _given(args.checkpoint)
    pinned = list(args.key)
    for vkey in pinned:
        try:
            tlog.parse_vkey(vkey)
        except tlog.NoteError as exc:
            raise UsageError(f"--key {vkey[:40]!r}: {exc}") from exc
    conn = _open(store)
    try:
        report = verify(conn, store=str(store), given=given, pinned=pinned, key_file=key_file)
    except sqlite3.Error as exc:
        raise UsageError(f"cannot read the audit log in {store}: {exc}") from exc
    finally:
        conn.close()
    if getattr(args, "json", False):
        print(inert_json(report.to_json()))
    else:
        print("\n".join(inert(line) for line in report.text().split("\n")))
    return EXIT_OK if report.ok else EXIT_FAILED


def _proof(args: argparse.Namespace, store: Path) -> int:
    conn = _open(store)
    try:
        checkpoint, proofs, later = proof(conn, args.request_id)
    except (sqlite3.Error, tlog.NoteError, ValueError, TypeError) as exc:
        raise UsageError(f"cannot prove {inert(args.request_id)}: {inert(str(exc))}") from exc
    finally:
        conn.close()
    if getattr(args, "json", False):
        print(
            inert_json(
                {
                    "request_id": args.request_id,
                    "checkpoint": None if checkpoint is None else checkpoint.text(),
                    "tree_size": None if checkpoint is None else checkpoint.size,
                    "root_hash": None if checkpoint is None else eventlog.b64(checkpoint.root),
                    "proofs": [p.to_json() for p in proofs],
                    "not_yet_covered": later,
                },
            )
        )
    else:
        if checkpoint is not None and proofs:
            print(f"checkpoint (tree size {checkpoint.size}):")
            for line in checkpoint.text().rstrip("\n").split("\n"):
                print("  " + inert(line))
        for p in proofs:
            print(f"event {p.seq}: leaf hash {eventlog.b64(p.leaf)}")
            print(f"  {inert(p.body)}")
            print("  inclusion path (RFC 9162, bottom first):")
            for h in p.path:
                print(f"    {eventlog.b64(h)}")
        if later:
            print(f"not covered by a checkpoint yet: event(s) {', '.join(map(str, later))}")
        if not proofs and not later:
            print(f"no event has request id {inert(args.request_id)}")
    return EXIT_OK if proofs else EXIT_FAILED


def _key(store: Path, key_file: Path) -> int:
    conn = _open(store)
    try:
        named = eventlog.log_key(conn)
    finally:
        conn.close()
    if named is None:
        raise UsageError(f"{store}: the audit log has no key yet: start the gateway once")
    origin, vkey = named
    print(inert(vkey))
    if key_file.exists():
        from agentgate.auditkey import KeyFileError, load_key

        try:
            mine = load_key(key_file).vkey(origin)
        except KeyFileError as exc:
            print(f"agentgate: warning: {exc}", file=sys.stderr)
        else:
            if mine != vkey:
                print(
                    f"agentgate: warning: {key_file} is NOT this key: the gateway will not start"
                    " with it",
                    file=sys.stderr,
                )
    else:
        print(f"agentgate: warning: no key file at {key_file}", file=sys.stderr)
    return EXIT_OK


def _compact(args: argparse.Namespace, store: Path, key_file: Path, config: Config | None) -> int:
    from agentgate.auditkey import KeyFileError, load_key
    from agentgate.checkpoints import LogSigner
    from agentgate.store import compact_offline

    keep_days = args.keep_days
    if keep_days is None and config is not None:
        keep_days = config.store.keep_days
    if keep_days is None or not keep_days > 0:
        raise UsageError("compact: give --keep-days DAYS (or set [store] keep_days)")
    conn = _open(store)
    try:
        named = eventlog.log_key(conn)
    finally:
        conn.close()
    if named is None:
        raise UsageError(f"{store}: the audit log has no key yet: start the gateway once")
    try:
        signer = LogSigner(load_key(key_file), named[0])
    except KeyFileError as exc:
        raise UsageError(str(exc)) from exc
    if signer.vkey != named[1]:
        raise UsageError(f"{key_file} is not the key this audit log is signed with")
    now = time.time()
    try:
        user = getpass.getuser()
    except Exception:
        user = "operator"
    by = f"{user} (shell, uid {os.getuid()})"
    try:
        done = compact_offline(
            store, now - keep_days * 86400, sign=signer, at=now, by=by, keep_days=keep_days
        )
    except eventlog.CompactionRefused as exc:
        print(f"agentgate: compaction refused: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if done is None:
        print(f"nothing to prune: no event is older than {keep_days:g} days")
    else:
        print(
            f"pruned {done.pruned} event(s) older than {keep_days:g} days; the log now begins at"
            f" event {done.cut} (the pruned range's root is kept: verify still works)"
        )
    return EXIT_OK
