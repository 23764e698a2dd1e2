"""Signed checkpoints of the audit log, their witnesses, and retention.

:func:`open_audit_log` loads the signing key (creating it, mode 0600, at the first start) and
checks it against the key the log names, so the gateway never signs with another key: a key
file that is missing or foreign stops the start with the key to fix (``audit.key``). Then
:class:`AuditLog` runs beside the gateway:

- **Checkpoints.** Every ``[audit] checkpoint_every`` events or ``checkpoint_minutes`` minutes,
  whichever comes first, and at a clean stop, the log's tree size and root hash are signed and
  kept in the store (``audit_checkpoints``).
- **Witnesses.** A checkpoint in the same file as the events proves nothing to whoever can
  rewrite that file, so each one also goes where that person cannot reach: the guardians' chat
  (a silent message through the :class:`~agentgate.guardian.Guardian`, at most one a minute:
  a newer checkpoint covers the older ones) and ``[audit] witness_file`` (appended, fsync'd).
  ``agentgate audit verify --checkpoint`` checks the log against such a copy.
- **Retention.** With ``[store] keep_days``, a compaction at start and daily prunes older
  events through :meth:`agentgate.store.Store.compact` (audited and signed).

Imports: auditkey (the one module that imports ``cryptography``), config, eventlog, guardian,
store, tlog.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final

import trio

from agentgate import tlog
from agentgate.auditkey import AuditKey, KeyFileError, create_key, load_key
from agentgate.config import Config, ConfigError
from agentgate.eventlog import CompactionRefused, Tip
from agentgate.guardian import Guardian
from agentgate.store import Store, StoreUnavailable

__all__ = ["WITNESS_GAP", "AuditLog", "LogSigner", "open_audit_log", "witness_text"]

log = logging.getLogger(__name__)

WITNESS_GAP: Final = 60.0  # seconds between two checkpoints posted to the guardians' chat
WITNESS_WAIT: Final = 20.0  # seconds one post may take (the chat's send queue included)
FINAL_WAIT: Final = 3.0  # ... at a clean stop, inside the gateway's 5 s
RETENTION_EVERY: Final = 86400.0  # seconds between two compactions (keep_days)


class LogSigner:
    """Signs checkpoints of one log (``origin``) with its key (an :class:`eventlog.Signer`)."""

    def __init__(self, key: AuditKey, origin: str) -> None:
        self.key = key
        self.origin = origin
        self.vkey = key.vkey(origin)

    def __call__(self, tip: Tip) -> tlog.Checkpoint:
        return self.key.sign(tlog.Checkpoint(self.origin, tip.size, tip.root), self.origin)


def witness_text(checkpoint: tlog.Checkpoint) -> str:
    """The chat message: a line for people, then the note itself (what ``verify`` reads)."""
    return f"🧾 Audit checkpoint: {checkpoint.size} events\n\n{checkpoint.text()}"


class AuditLog:
    """See the module docstring. ``guardian`` is set once the guardian runs."""

    def __init__(
        self, config: Config, store: Store, signer: LogSigner, now: Callable[[], float]
    ) -> None:
        self.store = store
        self.signer = signer
        self.now = now
        self.guardian: Guardian | None = None
        audit = config.audit
        self.every = audit.checkpoint_every
        self.interval = audit.checkpoint_minutes * 60
        self.to_chat = (audit.witness or "telegram") == "telegram"
        self.witness_file = audit.witness_file
        self.keep_days = config.store.keep_days
        self.latest: tlog.Checkpoint | None = None  # the newest checkpoint written
        self._posted: tlog.Checkpoint | None = None  # the newest one the chat has
        self._to_post = trio.Event()
        self._posting = trio.Lock()  # one post at a time: each newer than the last
        self._seen = store.appended  # events counted when the last checkpoint was written

    # -- checkpoints ----------------------------------------------------------------------

    async def checkpoint(self) -> tlog.Checkpoint | None:
        """Sign and keep a checkpoint of every event so far, and hand it to the witnesses;
        None when the latest checkpoint covers them all already."""
        self._seen = self.store.appended
        checkpoint = await self.store.write_checkpoint(self.signer, self.now())
        if checkpoint is not None:
            await self._to_file(checkpoint)
            self.latest = checkpoint
            if self.to_chat:
                self._to_post.set()
        return checkpoint

    async def _to_file(self, checkpoint: tlog.Checkpoint) -> None:
        if self.witness_file is None:
            return
        try:
            await trio.to_thread.run_sync(_append_note, self.witness_file, checkpoint.text())
        except OSError as exc:
            log.error("could not append the checkpoint to %s: %s", self.witness_file, exc)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Checkpoints on schedule, their chat posts and the retention, until cancelled."""
        async with trio.open_nursery() as nursery:
            if self.to_chat:
                nursery.start_soon(self._post_to_chat)
            if self.keep_days is not None:
                nursery.start_soon(self._retention, self.keep_days)
            task_status.started()
            while True:
                with trio.move_on_after(self.interval):
                    await self.store.wait_appended(self._seen + self.every)
                try:
                    await self.checkpoint()
                except StoreUnavailable as exc:  # the next one covers these events too
                    log.error("could not write an audit checkpoint: %s", exc.message)

    async def close(self) -> None:
        """At a clean stop: a last checkpoint, posted to the chat within a bounded wait."""
        try:
            await self.checkpoint()
        except StoreUnavailable as exc:
            log.error("could not write the last audit checkpoint: %s", exc.message)
            return
        if self.latest is not None and self.to_chat:
            with trio.move_on_after(FINAL_WAIT):
                await self._post(self.latest)

    async def _post_to_chat(self) -> None:
        while True:
            await self._to_post.wait()
            self._to_post = trio.Event()
            if self.latest is not None:
                with trio.move_on_after(WITNESS_WAIT):
                    await self._post(self.latest)
                await trio.sleep(WITNESS_GAP)  # the chat is for people: one a minute at most

    async def _post(self, checkpoint: tlog.Checkpoint) -> None:
        """Post ``checkpoint`` unless the chat has it, or a newer one, already."""
        guardian = self.guardian
        if guardian is None:
            return
        async with self._posting:
            if self._posted is not None and self._posted.size >= checkpoint.size:
                return
            try:
                await guardian.notify(witness_text(checkpoint), silent=True)
            except Exception:  # best effort, as any notice: the next checkpoint covers this one
                log.exception("could not post the audit checkpoint to the guardians")
            else:
                self._posted = checkpoint

    # -- retention --------------------------------------------------------------------------

    async def _retention(self, keep_days: float) -> None:
        while True:
            await self.compact(keep_days, by="agentgate ([store] keep_days)")
            await trio.sleep(RETENTION_EVERY)

    async def compact(self, keep_days: float, *, by: str) -> None:
        """Prune the events older than ``keep_days`` (audited and signed; witnessed)."""
        now = self.now()
        try:
            done = await self.store.compact(
                now - keep_days * 86400, sign=self.signer, at=now, by=by, keep_days=keep_days
            )
        except (CompactionRefused, StoreUnavailable) as exc:
            log.error("audit log compaction refused: %s", exc)
            return
        if done is None:
            return
        log.warning(
            "audit log compaction: %d event(s) older than %g day(s) pruned; the log begins at"
            " event %d",
            done.pruned,
            keep_days,
            done.cut,
        )
        if done.checkpoint is not None:
            await self._to_file(done.checkpoint)
            self.latest = done.checkpoint
            if self.to_chat:
                self._to_post.set()


def _append_note(path: Path, text: str) -> None:
    """Append a note and a blank line in one write, then fsync (a crash leaves it whole or
    absent); the file is made 0600 when created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, stat.S_IRUSR | stat.S_IWUSR)
    try:
        os.write(fd, (text + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def new_origin() -> str:
    """A log's name, made once with its first key: unique, no spaces, no ``+``."""
    return f"agentgate/{secrets.token_hex(8)}"


async def open_audit_log(
    config: Config, store: Store, now: Callable[[], float], *, source: str
) -> AuditLog:
    """The key checked against the log (see the module docstring); a new log's first key is
    made and recorded. :class:`~agentgate.config.ConfigError` (naming ``audit.key``) when the
    key file is missing, unreadable or not the log's key. ``source`` names gate.toml."""
    path = config.audit.key_path(config.store.path)
    named = await store.log_key()
    # The key file is read (or made) on the event loop: a few hundred bytes, once, before the
    # gateway serves anything; nothing waits on it yet.
    try:
        if named is None:
            key = _load_or_create(path)
            origin = new_origin()
            signer = LogSigner(key, origin)
            await store.append_event(
                "key", {"time": now(), "origin": origin, "vkey": signer.vkey, "reason": "new log"}
            )
            log.info(
                "audit log %s: checkpoints are signed with %s (%s); keep this line: agentgate"
                " audit key prints it again",
                origin,
                path,
                signer.vkey,
            )
        else:
            origin, vkey = named
            key = load_key(path)
            signer = LogSigner(key, origin)
            if signer.vkey != vkey:
                raise KeyFileError(
                    f"{path} is not the key this audit log is signed with ({vkey}); restore"
                    " that key file, or point [audit] key at it"
                )
    except KeyFileError as exc:
        message = str(exc)
        if named is not None and "no audit key file" in message:
            message += (
                f": this audit log is signed with {named[1]}; restore its key file from your"
                " backup, or point [audit] key at it"
            )
        raise ConfigError(f"{source}: audit.key: {message}") from exc
    return AuditLog(config, store, signer, now)


def _load_or_create(path: Path) -> AuditKey:
    try:
        return create_key(path)
    except FileExistsError:  # a key made for this store before its log began: use it
        return load_key(path)
