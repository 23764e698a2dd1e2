"""``agentgate audit verify`` and ``agentgate audit proof``: what the audit log proves, checked.

:func:`verify` reads the store read-only, in one pass over the events, and recomputes every
leaf hash, the chain and the Merkle tree; it checks every stored checkpoint's signature and root,
that ``audit_log`` (what ``agentgate audit`` shows) is exactly what the events say, and each
checkpoint given from outside (the guardians' chat, a witness file). It reports two things
separately:

- **integrity** — nothing in the log was changed: every event hashes to its leaf, chains to the
  one before, sits at its place; the tree matches every signed checkpoint; the checkpoints are
  signed by the log's key (or the ``--key`` given); the key file is that key; ``audit_log``
  matches the events.
- **completeness** — nothing was removed: the log holds at least the events each checkpoint
  covers. Against the store's own checkpoints this catches a careless truncation; against a
  checkpoint kept outside the box (the chat) it catches any truncation, and a store replaced by
  an older copy.

The first bad event is named when the hashes show it; when only a signed root shows a change
(someone recomputed every hash), the range between the last root that matched and the first
that did not is named instead.

:func:`proof` builds RFC 9162 inclusion proofs of a request's events against the latest
checkpoint, and checks them before they are printed.

Imports: eventlog, tlog, auditkey (signatures; only when a checkpoint is checked).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from agentgate import eventlog, tlog

__all__ = ["Given", "Proof", "Report", "proof", "verify"]

MAX_PROBLEMS = 20  # integrity problems listed; the first bad event is named whatever their number


@attrs.frozen
class Given:
    """A checkpoint from outside the store: its note (or why it is not one) and where from."""

    source: str
    note: tlog.Checkpoint | tlog.NoteError


@attrs.define
class Report:
    """What :func:`verify` found. ``integrity`` and ``completeness`` hold the problems (empty:
    it holds); ``notes`` what a reader should know besides."""

    store: str
    origin: str | None = None
    vkeys: list[str] = attrs.field(factory=list)
    first: int = 0  # the first event stored (a compaction pruned those before)
    size: int = 0  # events in the log (its tree size)
    root: bytes = tlog.EMPTY_ROOT
    checkpoints: int = 0  # stored checkpoints checked
    latest_checkpoint: int | None = None
    given: list[str] = attrs.field(factory=list)  # what each given checkpoint showed
    integrity: list[str] = attrs.field(factory=list)
    completeness: list[str] = attrs.field(factory=list)
    first_bad: str | None = None
    notes: list[str] = attrs.field(factory=list)
    rows: int = 0  # audit_log rows compared

    @property
    def ok(self) -> bool:
        return not self.integrity and not self.completeness

    def bad(self, what: str, event: int | str | None = None) -> None:
        if len(self.integrity) < MAX_PROBLEMS:
            self.integrity.append(what)
        elif len(self.integrity) == MAX_PROBLEMS:
            self.integrity.append("... and more (the first ones are listed)")
        if event is not None and self.first_bad is None:
            self.first_bad = str(event)

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["root"] = eventlog.b64(self.root)
        data["ok"] = self.ok
        return data

    def text(self) -> str:
        lines = [f"audit log: {self.store}"]
        if self.origin:
            lines.append(f"origin:       {self.origin}")
        for vkey in self.vkeys:
            lines.append(f"key:          {vkey}")
        span = f"{self.first}..{self.size - 1}" if self.size > self.first else "none"
        pruned = f" (events 0..{self.first - 1} pruned by a compaction)" if self.first else ""
        lines.append(f"events:       {span}, tree size {self.size}{pruned}")
        lines.append(f"root:         {eventlog.b64(self.root)}")
        latest = f", the latest covers {self.latest_checkpoint}" if self.latest_checkpoint else ""
        lines.append(f"checkpoints:  {self.checkpoints} stored{latest}")
        for given in self.given:
            lines.append(f"given:        {given}")
        if self.integrity:
            lines.append(f"integrity:    FAILED: {self.integrity[0]}")
            lines += [f"              {problem}" for problem in self.integrity[1:]]
        else:
            lines.append(
                f"integrity:    ok: every event, hash and signature checks; audit_log's"
                f" {self.rows} rows are what the events say"
            )
        if self.completeness:
            lines.append(f"completeness: FAILED: {self.completeness[0]}")
            lines += [f"              {problem}" for problem in self.completeness[1:]]
        elif any(g.startswith("ok") for g in self.given):
            lines.append("completeness: ok: the log holds every event the given checkpoints cover")
        else:
            lines.append(
                "completeness: ok against the store's own checkpoints only; a checkpoint kept"
                " outside this machine (the guardians' chat, a witness file) proves more:"
                " --checkpoint"
            )
        if self.first_bad is not None:
            lines.append(f"first bad event: {self.first_bad}")
        elif not self.ok:
            lines.append(
                "first bad event: none: every event hashes, chains and sits in its place;"
                " what failed is said above"
            )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


@attrs.define
class _Keys:
    """The keys checkpoints may be signed with: ``--key`` if given, else those the log names."""

    pinned: list[tuple[str, bytes]]
    named: list[tuple[int, str, bytes]] = attrs.field(factory=list)  # (seq, name, key)

    def accepted(self) -> list[tuple[str, bytes]]:
        if self.pinned:
            return self.pinned
        return [(name, key) for _, name, key in self.named]

    def check(self, checkpoint: tlog.Checkpoint) -> bool:
        """Whether one of ``checkpoint``'s signatures verifies with an accepted key (a
        compaction restates the key its pruned range named, so every key the log names is
        accepted for every size)."""
        from agentgate.auditkey import verify_signature

        keys = self.accepted()
        for signature in checkpoint.signatures:
            for name, key in keys:
                if (
                    signature.name == name
                    and signature.key_hash == tlog.key_id(name, key)
                    and verify_signature(key, checkpoint.body, signature.signature)
                ):
                    return True
        return False


def _row_digest(row: Sequence[Any]) -> int:
    """A row of ``audit_log`` (ROW_COLUMNS then seq) as a number, for a multiset sum."""
    values = [
        float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in row
    ]
    # A blob where agentgate writes text or numbers differs from every row events give.
    data = json.dumps(values, separators=(",", ":"), default=lambda b: {"blob": bytes(b).hex()})
    return int.from_bytes(hashlib.sha256(data.encode()).digest()[:16])


def _blob(value: Any) -> bytes | None:
    """A hash column as stored, or None when it holds anything but bytes (someone wrote it)."""
    return value if isinstance(value, bytes) else None


_COLUMNS = (*eventlog.ROW_COLUMNS, "seq")
_MASK = (1 << 128) - 1


def verify(
    conn: sqlite3.Connection,
    *,
    store: str,
    given: Sequence[Given] = (),
    pinned: Sequence[str] = (),
    key_file: Path | None = None,
) -> Report:
    """Check the store open on ``conn`` (read-only); see the module docstring. ``pinned``:
    verifier keys (``NAME+HASH+KEY``) checkpoints must be signed with; ``key_file``: the
    signing key that should be the log's (checked when it exists)."""
    report = Report(store)
    keys = _Keys([tlog.parse_vkey(v) for v in pinned])
    try:
        cut, chain, frontier = eventlog.base(conn)
    except (TypeError, ValueError) as exc:  # not what agentgate writes: check from event 0
        report.bad(f"the latest compaction record is damaged ({exc})", 0)
        cut, chain, frontier = 0, tlog.ZERO, []
    report.first = cut
    stored = _stored_checkpoints(conn, report)
    outside = [g for g in given if isinstance(g.note, tlog.Checkpoint)]
    for g in given:
        if isinstance(g.note, tlog.NoteError):
            report.completeness.append(f"{g.source}: not a checkpoint: {g.note}")
            report.given.append(f"{g.source}: unreadable: {g.note}")
    wanted: dict[int, bytes | None] = {}
    for size, _ in stored:
        wanted[size] = None
    for g in outside:
        assert isinstance(g.note, tlog.Checkpoint)
        wanted[g.note.size] = None
    if cut in wanted or cut == 0:
        wanted[cut] = tlog.root(frontier)
    compactions: list[dict[str, Any]] = []
    state = _Pass(report, keys, cut, chain, frontier, wanted, compactions)
    replayed = 0
    for row in eventlog.replay_rows(state.bodies(conn)):
        replayed = (replayed + _row_digest([row.get(k) for k in _COLUMNS])) & _MASK
    report.size, report.root = state.size, tlog.root(state.frontier)
    wanted[state.size] = report.root
    _check_rows(conn, report, replayed)
    _check_tip(conn, report, state)
    _check_compactions(conn, report, compactions, stored, cut)
    _check_stored(report, keys, stored, wanted, cut)
    _check_given(report, keys, outside, wanted, cut)
    if report.latest_checkpoint is not None and report.latest_checkpoint < report.size:
        report.notes.append(
            f"events {report.latest_checkpoint}..{report.size - 1} are newer than the latest"
            " checkpoint (the next one will cover them)"
        )
    if key_file is not None and report.origin is not None and report.vkeys:
        _check_key_file(report, key_file)
    if not pinned and report.vkeys:
        report.notes.append(
            "checkpoints were checked with the key the log itself names; --key NAME+HASH+KEY"
            " (as agentgate audit key printed it) pins the key you recorded"
        )
    return report


def _stored_checkpoints(
    conn: sqlite3.Connection, report: Report
) -> list[tuple[int, tlog.Checkpoint | tlog.NoteError]]:
    stored: list[tuple[int, tlog.Checkpoint | tlog.NoteError]] = []
    for size, root, note in conn.execute(
        "SELECT size, root, note FROM audit_checkpoints ORDER BY size, rowid"
    ):
        try:
            parsed: tlog.Checkpoint | tlog.NoteError = tlog.parse_note(str(note))
        except tlog.NoteError as exc:
            parsed = exc
        if not isinstance(size, int):
            report.bad(f"a stored checkpoint's size is not a number ({str(size)[:20]!r})")
            continue
        if isinstance(parsed, tlog.Checkpoint) and (
            parsed.size != size or parsed.root != _blob(root)
        ):
            parsed = tlog.NoteError("its columns differ from its note")
        stored.append((size, parsed))
    return stored


class _Pass:
    """The one pass over the events: hashes, chain, tree, roots at the sizes wanted."""

    def __init__(
        self,
        report: Report,
        keys: _Keys,
        cut: int,
        chain: bytes,
        frontier: list[bytes],
        wanted: dict[int, bytes | None],
        compactions: list[dict[str, Any]],
    ) -> None:
        self.report = report
        self.keys = keys
        self.size = cut
        self.chain = chain
        self.frontier = frontier
        self.wanted = wanted
        self.compactions = compactions
        self.gap = False  # an event is missing: later ones are numbered by their place
        self.stored_chain = chain  # the chain hash stored with the event before

    def bodies(self, conn: sqlite3.Connection) -> Iterator[dict[str, Any]]:
        report = self.report
        rows = conn.execute(
            "SELECT seq, type, request_id, body, leaf, chain FROM audit_events ORDER BY seq"
        )
        for seq, type_, request_id, text, leaf, stored_chain in rows:
            if seq < self.size:  # below a compaction's cut: left over by an interrupted prune
                continue
            if seq != self.size and not self.gap:
                what = f"events {self.size}..{seq - 1} are" if seq > self.size + 1 else "event"
                report.bad(
                    f"{what} {self.size} is missing" if seq == self.size + 1 else f"{what} missing",
                    self.size,
                )
                self.gap = True  # the tree goes on with the events there are
            data = str(text).encode("utf-8", "surrogatepass")
            computed = tlog.leaf_hash(data)
            leaf, stored_chain = _blob(leaf), _blob(stored_chain)
            self.chain = tlog.chain_hash(self.chain, computed)
            try:
                body = tlog.event_json(data)
            except ValueError:
                body = {}
            problem = None  # the most telling one, if any
            if not body:
                problem = f"event {seq} is not a JSON object"
            elif body.get("seq") != seq:
                problem = f"event {seq} is out of place (its bytes say event {body.get('seq')})"
            elif computed != leaf:
                problem = f"event {seq} was changed: its bytes do not hash to its leaf"
            elif tlog.chain_hash(self.stored_chain, computed) != stored_chain:
                problem = f"event {seq} does not chain to the event before it"
            elif body.get("type") != type_ or body.get("request_id") != request_id:
                problem = f"event {seq}'s columns differ from its bytes"
            if problem is not None:
                report.bad(problem, seq)
            # Each link checked on its own (one that is not a hash: against the recomputed one).
            self.stored_chain = self.chain if stored_chain is None else stored_chain
            self.frontier = tlog.append(self.frontier, self.size, computed)
            self.size += 1
            if self.size in self.wanted:
                self.wanted[self.size] = tlog.root(self.frontier)
            self._meta(seq, body)
            yield body

    def _meta(self, seq: int, body: dict[str, Any]) -> None:
        kind = body.get("type")
        if kind not in ("key", "compaction"):
            return
        if kind == "compaction":
            self.compactions.append(body)
        try:
            name, key = tlog.parse_vkey(str(body.get("vkey")))
        except tlog.NoteError as exc:
            self.report.bad(f"event {seq} names a key that is not one ({exc})", seq)
            return
        origin = str(body.get("origin"))
        if self.report.origin is not None and origin != self.report.origin:
            self.report.notes.append(f"event {seq} renames the log {origin}")
        self.report.origin = origin
        vkey = tlog.vkey(name, key)
        if vkey not in self.report.vkeys:
            if self.report.vkeys:
                self.report.notes.append(f"event {seq}: the log's key changes to {vkey}")
            self.report.vkeys.append(vkey)
        self.keys.named.append((seq, name, key))


def _check_rows(conn: sqlite3.Connection, report: Report, replayed: int) -> None:
    """``audit_log`` against the events: equal as multisets of rows (a sum of digests), and,
    when not, the first row that differs."""
    table = 0
    count = 0
    columns = ", ".join(_COLUMNS)
    kept = f"SELECT {columns} FROM audit_log WHERE seq IS NULL OR seq >= ?"
    for row in conn.execute(kept, (report.first,)):
        table = (table + _row_digest(tuple(row))) & _MASK
        count += 1
    report.rows = count
    if table == replayed:
        return
    expected: dict[Any, int] = {}
    for row in eventlog.replay_rows(_bodies(conn, report.first)):
        expected[row.get("id")] = _row_digest([row.get(k) for k in _COLUMNS])
    for row in conn.execute(kept + " ORDER BY id", (report.first,)):
        digest = expected.pop(row[0], None)
        if digest is None:
            report.bad(f"audit_log row {row[0]} was added: no event opened it", f"row {row[0]}")
            return
        if digest != _row_digest(tuple(row)):
            report.bad(
                f"audit_log row {row[0]} was changed: it is not what its events say",
                f"row {row[0]}",
            )
            return
    if expected:
        first = min(expected, key=lambda k: k if isinstance(k, int) else -1)
        report.bad(f"audit_log row {first} was deleted: its events are still there", f"row {first}")


def _bodies(conn: sqlite3.Connection, cut: int) -> Iterator[dict[str, Any]]:
    for (text,) in conn.execute(
        "SELECT body FROM audit_events WHERE seq >= ? ORDER BY seq", (cut,)
    ):
        try:
            yield tlog.event_json(str(text).encode("utf-8", "surrogatepass"))
        except ValueError:
            continue


def _check_tip(conn: sqlite3.Connection, report: Report, state: _Pass) -> None:
    row = conn.execute("SELECT size, chain, frontier FROM audit_tip WHERE id = 0").fetchone()
    if row is None:
        report.bad("the log has no tip record")
        return
    if (row[0], _blob(row[1]), _blob(row[2])) != (
        state.size,
        state.chain,
        tlog.pack(state.frontier),
    ):
        report.bad(
            f"the log's tip record (size {row[0]}) is not what its {state.size} events give:"
            " the next event would be appended to another log"
        )


def _check_compactions(
    conn: sqlite3.Connection,
    report: Report,
    events: list[dict[str, Any]],
    stored: list[tuple[int, tlog.Checkpoint | tlog.NoteError]],
    cut: int,
) -> None:
    recorded = {
        c: (_blob(ch), _blob(f))
        for c, ch, f in conn.execute("SELECT cut, chain, frontier FROM audit_compactions")
    }
    seen = set()
    for body in events:
        cut_at = body.get("cut")
        seq = body.get("seq")
        if not isinstance(cut_at, int) or not isinstance(seq, int):
            report.bad(f"event {seq} is a compaction without a cut", seq)
            continue
        seen.add(cut_at)
        record = recorded.get(cut_at)
        if record is not None:
            chain, frontier = record
            if (
                chain is None
                or frontier is None
                or eventlog.b64(chain) != body.get("chain")
                or _frontier_root(frontier) != body.get("root")
            ):
                report.bad(f"compaction record {cut_at} is not what event {seq} says", seq)
        signed = any(isinstance(note, tlog.Checkpoint) and size > seq for size, note in stored)
        if not signed:
            report.bad(
                f"event {seq} prunes events before {cut_at} but no signed checkpoint covers it",
                seq,
            )
        else:
            report.notes.append(
                f"event {seq}: events before {cut_at} were pruned ({body.get('pruned')} events,"
                f" keep_days {body.get('keep_days')}, by {body.get('by')})"
            )
    if cut and cut not in seen:
        report.bad(f"events 0..{cut - 1} are gone, and no compaction event of the log says why", 0)


def _frontier_root(frontier: bytes) -> str | None:
    try:
        return eventlog.b64(tlog.root(tlog.unpack(frontier)))
    except ValueError:  # not whole hashes
        return None


def _check_stored(
    report: Report,
    keys: _Keys,
    stored: list[tuple[int, tlog.Checkpoint | tlog.NoteError]],
    roots: dict[int, bytes | None],
    cut: int,
) -> None:
    matched = cut
    beyond = 0  # the largest signed size beyond the log's end
    for size, note in stored:
        report.checkpoints += 1
        if isinstance(note, tlog.NoteError):  # the checkpoint itself, not an event
            report.bad(f"stored checkpoint {size} is not a checkpoint: {note}")
            continue
        if not keys.check(note):
            report.bad(
                f"stored checkpoint {size} is not signed by the log's key (a key file replaced?)"
            )
            continue
        report.latest_checkpoint = max(report.latest_checkpoint or 0, size)
        if size > report.size:
            beyond = max(beyond, size)
            continue
        computed = roots.get(size)
        if computed is None:
            continue  # before the pruned range: only its signature tells
        if computed != note.root:
            report.bad(
                f"the first {size} events are not what checkpoint {size} signed: an event in"
                f" {matched}..{size - 1} was changed, removed or moved",
                f"in {matched}..{size - 1}",
            )
        else:
            matched = size
    if beyond:
        report.completeness.append(
            f"the store's own checkpoint covers {beyond} events, the log has {report.size}:"
            f" events {report.size}..{beyond - 1} were removed"
        )
        if report.first_bad is None:
            report.first_bad = f"{report.size} (missing)"


def _check_given(
    report: Report,
    keys: _Keys,
    given: list[Given],
    roots: dict[int, bytes | None],
    cut: int,
) -> None:
    # Smallest first: each root that matches moves up where a change can have begun.
    matched = cut
    for g in sorted(given, key=lambda g: g.note.size if isinstance(g.note, tlog.Checkpoint) else 0):
        note = g.note
        assert isinstance(note, tlog.Checkpoint)
        label = f"{g.source} ({note.size} events)"
        if report.origin is not None and note.origin != report.origin:
            report.bad(f"{label}: from another log ({note.origin}; this log is {report.origin})")
            report.given.append(f"{label}: another log")
            continue
        signed = keys.check(note)
        if not signed:
            # What the chat holds is no longer signed by the log's key: a new key, the log
            # rewritten with it. Its size and root still say what was removed or changed.
            report.bad(
                f"{label}: not signed by this log's key: the key was replaced (and the log"
                " rewritten with it), or the checkpoint was altered"
            )
        if note.size > report.size:
            report.completeness.append(
                f"{label}: the log has only {report.size} events: events {report.size}.."
                f"{note.size - 1} were removed (the tail truncated, or the store replaced by an"
                " older copy)"
            )
            report.given.append(
                f"{label}: {'' if signed else 'signature FAILED, '}the log has fewer events"
            )
            if report.first_bad is None:
                # Re-signed, the log may differ anywhere the chat's roots do not vouch for.
                missing = f"{report.size} (missing)"
                report.first_bad = missing if signed else f"in {matched}..{report.size}"
            continue
        computed = roots.get(note.size)
        if computed is None or note.size < cut:
            report.notes.append(f"{label}: before the pruned range: only its signature was checked")
            report.given.append(
                f"{label}: signature {'ok' if signed else 'FAILED'}, before the pruned range"
            )
            continue
        if computed != note.root:
            report.bad(
                f"{label}: the log's first {note.size} events are not what this checkpoint"
                f" holds: the log was rewritten (an event in {matched}..{note.size - 1})",
                f"in {matched}..{note.size - 1}",
            )
            report.given.append(f"{label}: {'' if signed else 'signature FAILED, '}root FAILED")
            continue
        matched = max(matched, note.size)
        if signed:
            report.given.append(f"ok: {label}: signature and root match")
        else:
            report.given.append(f"{label}: signature FAILED, root matches")


def _check_key_file(report: Report, path: Path) -> None:
    if not path.exists():
        report.notes.append(f"no key file at {path}: checked without it")
        return
    from agentgate.auditkey import KeyFileError, load_key

    try:
        key = load_key(path)
    except KeyFileError as exc:
        report.bad(f"the key file cannot be read: {exc}")
        return
    assert report.origin is not None
    if key.vkey(report.origin) != report.vkeys[-1]:
        report.bad(f"the key file {path} is not the key the log names (replaced?)")


# --------------------------------------------------------------------------- proofs


@attrs.frozen
class Proof:
    """One event's inclusion in the tree of ``checkpoint``: its bytes, leaf and audit path."""

    seq: int
    body: str
    leaf: bytes
    path: tuple[bytes, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "leaf_hash": eventlog.b64(self.leaf),
            "inclusion_path": [eventlog.b64(h) for h in self.path],
            "event": json.loads(self.body),
        }


def proof(
    conn: sqlite3.Connection, request_id: str
) -> tuple[tlog.Checkpoint | None, list[Proof], list[int]]:
    """The latest stored checkpoint, a checked proof for each of ``request_id``'s events it
    covers, and the numbers of those it does not cover yet."""
    row = conn.execute(
        "SELECT note FROM audit_checkpoints ORDER BY size DESC, rowid DESC LIMIT 1"
    ).fetchone()
    checkpoint = None if row is None else tlog.parse_note(str(row[0]))
    events = conn.execute(
        "SELECT seq, body, leaf FROM audit_events WHERE request_id = ? ORDER BY seq",
        (request_id,),
    ).fetchall()
    cut, _, frontier = eventlog.base(conn)
    pruned = dict(zip(tlog.frontier_ranges(cut), frontier, strict=True))

    def subtree(start: int, end: int) -> bytes:
        if (start, end) in pruned:
            return pruned[(start, end)]
        if start >= cut:
            leaves = conn.execute(
                "SELECT leaf FROM audit_events WHERE seq >= ? AND seq < ? ORDER BY seq",
                (start, end),
            )
            return tlog.subtree_root(bytes(leaf) for (leaf,) in leaves)
        k = 1 << ((end - start - 1).bit_length() - 1)
        return tlog.node_hash(subtree(start, start + k), subtree(start + k, end))

    proofs: list[Proof] = []
    later: list[int] = []
    for seq, body, leaf in events:
        if checkpoint is None or seq >= checkpoint.size:
            later.append(int(seq))
            continue
        if tlog.leaf_hash(str(body).encode("utf-8")) != bytes(leaf):
            raise ValueError(f"event {seq} was changed: run agentgate audit verify")
        path = tlog.inclusion_path(seq, checkpoint.size, subtree)
        if not tlog.check_inclusion(seq, checkpoint.size, bytes(leaf), path, checkpoint.root):
            raise ValueError(f"event {seq} does not prove into the checkpoint: run verify")
        proofs.append(Proof(int(seq), str(body), bytes(leaf), tuple(path)))
    return checkpoint, proofs, later
