"""Undo: put back what an executed Home Assistant service call changed.

Before an undoable call runs (:func:`targets` says which are), the gateway reads the states of
the entities it names (:meth:`Undo.before`); once it has run, the states before and after it
are kept in the store for ``[guardian] undo_window`` seconds (:meth:`Undo.remember`). An Undo
(a card's ↩ button, ``/undo`` in Telegram, ``agentgate undo``) then restores the "before"
states with the inverse service calls below, built from the recorded attributes::

    press ── snapshot? ── already undone / running / failed? ── window passed? ── changed since?
                 │                     (told; final)            (told: confirm)   (told: confirm)
                 └── AVAILABLE → UNDOING (store gate + audit row, one fsync'd commit)
                        └── the restore calls, once ── UNDONE or FAILED ── card edited

An Undo is its own audit row (``kind = undo``, the original ``request_id``, the calls it made
in ``args``), runs at most once (:data:`agentgate.approvals.UNDO_TRANSITIONS`), and is never
retried: a restore that failed, or whose outcome is unknown, is reported and stays failed.

========================= ============================================= ======================
domain                    services that can be undone                   restored with
========================= ============================================= ======================
light                     turn_on, turn_off, toggle                     turn_on (brightness,
                                                                        colour) / turn_off
switch, input_boolean,    turn_on, turn_off, toggle                     turn_on / turn_off
siren
fan                       turn_on, turn_off, toggle, set_percentage,    turn_on (percentage) /
                          increase_speed, decrease_speed                turn_off
humidifier                turn_on, turn_off, toggle, set_humidity       turn_on, set_humidity /
                                                                        turn_off
cover                     open_cover, close_cover, set_cover_position,  set_cover_position, or
                          stop_cover, toggle                            open/close_cover
valve                     open_valve, close_valve, set_valve_position,  set_valve_position, or
                          stop_valve, toggle                            open/close_valve
climate                   set_temperature, set_hvac_mode, turn_on,      set_temperature (with
                          turn_off, toggle                              hvac_mode) /
                                                                        set_hvac_mode
water_heater              set_temperature, set_operation_mode           set_temperature (with
                                                                        operation_mode)
input_number, number      set_value (input_number: increment,           set_value
                          decrement)
input_select, select      select_option, select_next, select_previous,  select_option
                          select_first, select_last
input_text, text          set_value                                     set_value
media_player              volume_set, volume_up, volume_down,           volume_set, volume_mute
                          volume_mute
========================= ============================================= ======================

Never offered: locks, alarm panels, buttons, scenes, scripts, automations, ``homeassistant.*``
and every other service without a safe inverse; a call that names an entity of another domain
than its own, or more than :data:`MAX_ENTITIES`; an entity whose state before the call cannot
be set again (``unavailable``, a cover that was ``opening``).

Imports: approvals (the undo states and answers), store, guardian (cards, notices), tools
(which entities a call names), errors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import attrs
import trio
from attrs import frozen

from agentgate import tools
from agentgate.approvals import UNDO_ANSWERS, Outcome, UndoCheck, UndoState
from agentgate.errors import AgentgateError, ExecutionFailed, OutcomeUnknown
from agentgate.guardian import ApprovalCard, CardUpdate, Guardian, Status, UndoItem
from agentgate.guardian.card import utc
from agentgate.store import AuditEntry, PendingRow, Store, UndoRow

__all__ = [
    "MAX_ENTITIES",
    "UNDOABLE",
    "Snapshot",
    "Undo",
    "UndoOutcome",
    "restore_calls",
    "targets",
]

log = logging.getLogger(__name__)

MAX_ENTITIES: Final = 20  # entities one undoable call may name
SUMMARY_LIMIT: Final = 300


class NotRestorable(Exception):
    """A state the inverse calls cannot set again (``unavailable``, ``opening``, ...)."""


Call = dict[str, Any]  # the arguments of one ha_call_service


def _call(domain: str, service: str, entity_id: str, **data: Any) -> Call:
    return {"domain": domain, "service": service, "entity_id": entity_id, **data}


def _on_off(domain: str, state: str, entity_id: str, on: Call | None = None) -> list[Call]:
    if state == "off":
        return [_call(domain, "turn_off", entity_id)]
    if state == "on":
        return [on or _call(domain, "turn_on", entity_id)]
    raise NotRestorable(state)


_LIGHT_COLOURS: Final = {
    "color_temp": "color_temp_kelvin",
    "hs": "hs_color",
    "rgb": "rgb_color",
    "rgbw": "rgbw_color",
    "rgbww": "rgbww_color",
    "xy": "xy_color",
}


def _light(entity_id: str, state: str, a: Mapping[str, Any]) -> list[Call]:
    data: dict[str, Any] = {}
    if a.get("brightness") is not None:
        data["brightness"] = a["brightness"]
    colour = _LIGHT_COLOURS.get(str(a.get("color_mode")))
    if colour is not None and a.get(colour) is not None:
        data[colour] = a[colour]
    return _on_off("light", state, entity_id, _call("light", "turn_on", entity_id, **data))


def _simple(domain: str) -> Callable[[str, str, Mapping[str, Any]], list[Call]]:
    return lambda entity_id, state, a: _on_off(domain, state, entity_id)


def _fan(entity_id: str, state: str, a: Mapping[str, Any]) -> list[Call]:
    pct = a.get("percentage")
    on = _call("fan", "turn_on", entity_id, **({"percentage": pct} if pct is not None else {}))
    return _on_off("fan", state, entity_id, on)


def _humidifier(entity_id: str, state: str, a: Mapping[str, Any]) -> list[Call]:
    calls = _on_off("humidifier", state, entity_id)
    if state == "on" and a.get("humidity") is not None:
        calls.append(_call("humidifier", "set_humidity", entity_id, humidity=a["humidity"]))
    return calls


def _positioned(domain: str, noun: str) -> Callable[[str, str, Mapping[str, Any]], list[Call]]:
    def restore(entity_id: str, state: str, a: Mapping[str, Any]) -> list[Call]:
        if a.get("current_position") is not None:
            position = a["current_position"]
            return [_call(domain, f"set_{noun}_position", entity_id, position=position)]
        if state in ("open", "closed"):
            verb = "open" if state == "open" else "close"
            return [_call(domain, f"{verb}_{noun}", entity_id)]
        raise NotRestorable(state)

    return restore


def _climate(entity_id: str, state: str, a: Mapping[str, Any]) -> list[Call]:
    if state in ("unavailable", "unknown"):
        raise NotRestorable(state)
    temperatures = {
        key: a[key]
        for key in ("temperature", "target_temp_low", "target_temp_high")
        if a.get(key) is not None
    }
    if temperatures and state != "off":
        return [_call("climate", "set_temperature", entity_id, hvac_mode=state, **temperatures)]
    return [_call("climate", "set_hvac_mode", entity_id, hvac_mode=state)]


def _water_heater(entity_id: str, state: str, a: Mapping[str, Any]) -> list[Call]:
    if a.get("temperature") is None or state in ("unavailable", "unknown"):
        raise NotRestorable(state)
    return [
        _call(
            "water_heater",
            "set_temperature",
            entity_id,
            temperature=a["temperature"],
            operation_mode=state,
        )
    ]


def _value(domain: str, number: bool) -> Callable[[str, str, Mapping[str, Any]], list[Call]]:
    def restore(entity_id: str, state: str, a: Mapping[str, Any]) -> list[Call]:
        if state in ("unavailable", "unknown"):
            raise NotRestorable(state)
        value: Any = state
        if number:
            try:
                value = float(state)
            except ValueError:
                raise NotRestorable(state) from None
            if not math.isfinite(value):
                raise NotRestorable(state)
        return [_call(domain, "set_value", entity_id, value=value)]

    return restore


def _option(domain: str) -> Callable[[str, str, Mapping[str, Any]], list[Call]]:
    def restore(entity_id: str, state: str, a: Mapping[str, Any]) -> list[Call]:
        if state in ("unavailable", "unknown"):
            raise NotRestorable(state)
        return [_call(domain, "select_option", entity_id, option=state)]

    return restore


def _volume(entity_id: str, state: str, a: Mapping[str, Any]) -> list[Call]:
    calls = []
    if a.get("volume_level") is not None:
        calls.append(_call("media_player", "volume_set", entity_id, volume_level=a["volume_level"]))
    if a.get("is_volume_muted") is not None:
        muted = bool(a["is_volume_muted"])
        calls.append(_call("media_player", "volume_mute", entity_id, is_volume_muted=muted))
    if not calls:
        raise NotRestorable(state)
    return calls


@frozen
class Restorer:
    """How one domain is undone: which of its services, what to record, how to restore."""

    services: frozenset[str]
    attributes: tuple[str, ...]  # recorded, compared ("changed since?") and restored
    restore: Callable[[str, str, Mapping[str, Any]], list[Call]]


_ON_OFF: Final = frozenset({"turn_on", "turn_off", "toggle"})
_SELECT: Final = frozenset(
    {"select_option", "select_next", "select_previous", "select_first", "select_last"}
)

UNDOABLE: Final[Mapping[str, Restorer]] = {
    "light": Restorer(_ON_OFF, ("brightness", "color_mode", *_LIGHT_COLOURS.values()), _light),
    "switch": Restorer(_ON_OFF, (), _simple("switch")),
    "input_boolean": Restorer(_ON_OFF, (), _simple("input_boolean")),
    "siren": Restorer(_ON_OFF, (), _simple("siren")),
    "fan": Restorer(
        _ON_OFF | {"set_percentage", "increase_speed", "decrease_speed"}, ("percentage",), _fan
    ),
    "humidifier": Restorer(_ON_OFF | {"set_humidity"}, ("humidity",), _humidifier),
    "cover": Restorer(
        frozenset({"open_cover", "close_cover", "set_cover_position", "stop_cover", "toggle"}),
        ("current_position",),
        _positioned("cover", "cover"),
    ),
    "valve": Restorer(
        frozenset({"open_valve", "close_valve", "set_valve_position", "stop_valve", "toggle"}),
        ("current_position",),
        _positioned("valve", "valve"),
    ),
    "climate": Restorer(
        frozenset({"set_temperature", "set_hvac_mode", "turn_on", "turn_off", "toggle"}),
        ("temperature", "target_temp_low", "target_temp_high"),
        _climate,
    ),
    "water_heater": Restorer(
        frozenset({"set_temperature", "set_operation_mode"}), ("temperature",), _water_heater
    ),
    "input_number": Restorer(
        frozenset({"set_value", "increment", "decrement"}), (), _value("input_number", True)
    ),
    "number": Restorer(frozenset({"set_value"}), (), _value("number", True)),
    "input_select": Restorer(_SELECT, (), _option("input_select")),
    "select": Restorer(_SELECT, (), _option("select")),
    "input_text": Restorer(frozenset({"set_value"}), (), _value("input_text", False)),
    "text": Restorer(frozenset({"set_value"}), (), _value("text", False)),
    "media_player": Restorer(
        frozenset({"volume_set", "volume_up", "volume_down", "volume_mute"}),
        ("volume_level", "is_volume_muted"),
        _volume,
    ),
}
"""Every domain Undo is offered for (the table in the module docstring)."""


def targets(tool: str, args: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The entities to snapshot if this (validated) call can be undone, else None."""
    if tool != "ha_call_service":
        return None
    domain, service = args.get("domain"), args.get("service")
    restorer = UNDOABLE.get(str(domain))
    if restorer is None or service not in restorer.services:
        return None
    try:
        entities = tuple(dict.fromkeys(ref.entity_id for ref in tools.references(tool, args)))
    except Exception:  # not validated: never offered
        return None
    if not entities or len(entities) > MAX_ENTITIES:
        return None
    if any(entity.split(".", 1)[0] != domain for entity in entities):
        return None
    return entities


def _recorded(domain: str, state: Any) -> dict[str, Any] | None:
    """The part of a state object Undo keeps: the state and the domain's attributes."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), str):
        return None
    attributes = state.get("attributes")
    attributes = attributes if isinstance(attributes, dict) else {}
    keep = UNDOABLE[domain].attributes
    return {"state": state["state"], "attributes": {k: attributes.get(k) for k in keep}}


def restore_calls(before: Mapping[str, Any]) -> list[Call]:
    """The service calls that set every entity back to its recorded state (NotRestorable if
    one cannot be)."""
    calls: list[Call] = []
    for entity_id, recorded in before.items():
        domain = entity_id.split(".", 1)[0]
        calls += UNDOABLE[domain].restore(
            entity_id, str(recorded["state"]), recorded.get("attributes") or {}
        )
    return calls


def describe(states: Mapping[str, Any]) -> str:
    """``light.kitchen: on (brightness 120), switch.x: off`` for cards and listings."""
    parts = []
    for entity_id, recorded in states.items():
        attributes = {
            k: v
            for k, v in (recorded.get("attributes") or {}).items()
            if v is not None and k not in ("color_mode",) and recorded.get("state") != "off"
        }
        extra = ", ".join(f"{k} {v}" for k, v in attributes.items())
        parts.append(f"{entity_id}: {recorded.get('state')}" + (f" ({extra})" if extra else ""))
    text = ", ".join(parts)
    return text if len(text) <= SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 1] + "…"


@frozen
class Snapshot:
    """The states an undoable call's entities had before it ran."""

    before: dict[str, dict[str, Any]]

    def after(self, result: Any) -> dict[str, dict[str, Any]]:
        """The states the call left, from its answer (Home Assistant lists what changed; an
        entity it does not list did not change)."""
        after = dict(self.before)
        if isinstance(result, list):
            for state in result:
                entity_id = state.get("entity_id") if isinstance(state, dict) else None
                if entity_id in after:
                    recorded = _recorded(entity_id.split(".", 1)[0], state)
                    if recorded is not None:
                        after[entity_id] = recorded
        return after


@frozen
class UndoOutcome:
    """What an Undo press found or did, and its answer (:data:`UNDO_ANSWERS`)."""

    check: UndoCheck
    detail: str = ""
    row: UndoRow | None = None

    @property
    def answer(self) -> str:
        return UNDO_ANSWERS[self.check].format(detail=self.detail)


ReadState = Callable[[str], Awaitable[Any]]
Execute = Callable[[str, dict[str, Any]], Awaitable[Any]]
Describe = Callable[[str, dict[str, Any]], Awaitable[str | None]]


class Undo:
    """Snapshots before undoable calls, and the Undo itself; see the module docstring.

    ``read_state(entity_id)`` is the service's state object; ``execute(tool, args)`` runs a
    call on the service (the restore calls are the guardian's, not an agent's: no policy
    applies, and every one is in the Undo's audit row). ``window`` 0 turns Undo off.
    """

    def __init__(
        self,
        store: Store,
        *,
        read_state: ReadState,
        execute: Execute,
        now: Callable[[], float],
        window: float,
        guardian: Guardian | None = None,
        describe: Describe | None = None,
    ) -> None:
        self.store = store
        self.guardian = guardian
        self.window = window
        self._read_state = read_state
        self._execute = execute
        self._describe = describe
        self._now = now
        self.restores = 0  # restore calls sent (tests)

    # -- before and after a call -------------------------------------------------------------

    async def before(self, tool: str, args: dict[str, Any]) -> Snapshot | None:
        """The states an undoable call is about to change, or None (not undoable, Undo off, or
        a state that cannot be read or set again: the call runs all the same)."""
        if self.window <= 0:
            return None
        entities = targets(tool, args)
        if entities is None:
            return None
        before: dict[str, dict[str, Any]] = {}
        for entity_id in entities:
            try:
                state = await self._read_state(entity_id)
            except AgentgateError as exc:  # the call itself reports what is wrong
                log.debug("no undo for %s: its state could not be read (%s)", entity_id, exc)
                return None
            recorded = _recorded(entity_id.split(".", 1)[0], state)
            if recorded is None:
                return None
            before[entity_id] = recorded
        try:
            restore_calls(before)
        except NotRestorable:
            return None
        return Snapshot(before)

    def record(
        self,
        snapshot: Snapshot,
        result: Any,
        *,
        request_id: str,
        agent: str,
        tool: str,
        args: dict[str, Any],
        signature: str,
        decided_by: str | None,
        message_refs: tuple[str, ...] = (),
    ) -> UndoRow:
        """The undo row of a call that ran (store it with :meth:`Store.add_undo` or post it)."""
        now = self._now()
        return UndoRow(
            request_id=request_id,
            agent=agent,
            tool=tool,
            args=args,
            signature=signature,
            decided_by=decided_by,
            created_at=now,
            expires_at=now + self.window,
            before=snapshot.before,
            after=snapshot.after(result),
        )

    # -- the Undo -----------------------------------------------------------------------------

    async def undo(self, request_id: str, by: str, *, confirm: bool = False) -> UndoOutcome:
        """Put back what ``request_id`` changed, at most once; see the module docstring."""
        row = await self.store.undo_row(request_id)
        if row is None:
            return UndoOutcome(UndoCheck.UNKNOWN)
        final = self._final(row)
        if final is not None:
            return final
        if not confirm:
            if self._now() >= row.expires_at:
                minutes = max(1, round((row.expires_at - row.created_at) / 60))
                return UndoOutcome(UndoCheck.LATE, f" ({minutes} min after the call)", row)
            changed = await self._changed(row)
            if changed:
                return UndoOutcome(UndoCheck.CHANGED, changed, row)
        calls = restore_calls(row.before)
        now = self._now()
        entry = AuditEntry(
            time=now,
            kind="undo",
            agent=row.agent,
            request_id=row.request_id,
            tool=row.tool,
            args={"restore": calls},
            signature=row.signature,
            decision="undo",
            matched=f"undo by {by}" + (" (confirmed)" if confirm else ""),
        )
        if not await self.store.begin_undo(request_id, by=by, at=now, entry=entry):
            again = await self.store.undo_row(request_id)
            found = self._final(again) if again is not None else None
            return found or UndoOutcome(UndoCheck.UNKNOWN)
        done = UndoOutcome(UndoCheck.FAILED, ": cancelled", row)
        with trio.CancelScope(shield=True):  # begun: it finishes and says so
            done = await self._restore(row, calls, by)
        return done

    def _final(self, row: UndoRow) -> UndoOutcome | None:
        """The answer for an undo that is not available any more, or None."""
        when = f" by {row.undone_by} at {utc(row.undone_at)}" if row.undone_at else ""
        if row.state is UndoState.UNDOING:
            return UndoOutcome(UndoCheck.RUNNING, "", row)
        if row.state is UndoState.UNDONE:
            return UndoOutcome(UndoCheck.DONE, when, row)
        if row.state is UndoState.FAILED:
            return UndoOutcome(UndoCheck.BROKEN, f" ({row.detail})" if row.detail else "", row)
        return None

    async def _changed(self, row: UndoRow) -> str:
        """What changed since the call (``light.kitchen (now: off)``), or "" if nothing did."""
        changed = []
        for entity_id, after in row.after.items():
            try:
                state = await self._read_state(entity_id)
            except AgentgateError as exc:
                changed.append(f"{entity_id} (its state cannot be read: {exc.message})")
                continue
            now = _recorded(entity_id.split(".", 1)[0], state)
            if now != after:
                shown = now["state"] if now is not None else "unreadable"
                changed.append(f"{entity_id} (now: {shown})")
        return ", ".join(changed)

    async def _restore(self, row: UndoRow, calls: list[Call], by: str) -> UndoOutcome:
        states: dict[str, Any] = {}
        error: str | None = None
        outcome = Outcome.EXECUTED
        for args in calls:
            try:
                self.restores += 1
                result = await self._execute("ha_call_service", args)
            except AgentgateError as exc:  # failed, or sent without an answer: never retried
                error = exc.message
                outcome = Outcome.UNKNOWN if isinstance(exc, OutcomeUnknown) else Outcome.FAILED
                break
            except Exception as exc:
                log.exception("undo of %s failed unexpectedly", row.request_id)
                error, outcome = f"undo failed: {exc!r}", Outcome.FAILED
                break
            if isinstance(result, list):
                for state in result:
                    if isinstance(state, dict) and "entity_id" in state:
                        states[str(state["entity_id"])] = state.get("state")
        now = self._now()
        summary = ", ".join(f"{e}: {s}" for e, s in states.items()) or describe(row.before)
        if error is None:
            done = UndoOutcome(UndoCheck.UNDONE, f": {summary}", row)
            state, detail = UndoState.UNDONE, summary
        else:
            done = UndoOutcome(UndoCheck.FAILED, f": {error}", row)
            state, detail = UndoState.FAILED, error
        try:
            await self.store.resolve_audit(
                row.request_id,
                outcome,
                resolved_by=by,
                resolved_at=now,
                result=states or None,
                error=error,
                kind="undo",
            )
            await self.store.move_undo(row.request_id, state, detail=detail)
        except ExecutionFailed:
            log.exception("could not record the undo of %s", row.request_id)
        log.log(
            logging.WARNING if error else logging.INFO,
            "undo of %s (%s) by %s: %s",
            row.request_id,
            row.signature,
            by,
            error or summary,
        )
        await self._show(row, done, by, now)
        return done

    async def _show(self, row: UndoRow, done: UndoOutcome, by: str, at: float) -> None:
        """Edit the call's card (if it had one), else tell the guardians in a message."""
        if self.guardian is None:
            return
        status = Status.UNDONE if done.check is UndoCheck.UNDONE else Status.UNDO_FAILED
        detail = done.detail.removeprefix(": ")
        pending = await self._pending(row)
        with trio.move_on_after(10):
            if pending is not None and pending.message_ref is not None:
                card = card_of(pending)
                if self._describe is not None and card.target is not None:
                    card = attrs.evolve(
                        card, target=await self._describe(card.tool, card.args) or card.target
                    )
                update = CardUpdate(status=status, detail=detail, by=by, at=at)
                for ref in (pending.message_ref, *row.message_refs):
                    try:
                        await self.guardian.update_card(card, ref, update)
                    except Exception:
                        log.exception("could not update the card of %s", row.request_id)
                return
            what = "↩ Undone" if status is Status.UNDONE else "⚠ Undo failed"
            text = f"{what} by {by} at {utc(at)}: {row.signature} (agent {row.agent})\n{detail}"
            try:
                await self.guardian.notify(text)
            except Exception:
                log.exception("could not tell the guardians about the undo of %s", row.request_id)

    async def _pending(self, row: UndoRow) -> PendingRow | None:
        try:
            return await self.store.pending_row(row.request_id)
        except ExecutionFailed:
            return None

    # -- listing ------------------------------------------------------------------------------

    async def open(self) -> list[UndoItem]:
        """What an Undo can put back now, newest first."""
        rows = await self.store.open_undos(self._now())
        return [
            UndoItem(
                request_id=row.request_id,
                agent=row.agent,
                signature=row.signature,
                executed_at=row.created_at,
                until=row.expires_at,
                decided_by=row.decided_by,
                restores=describe(row.before),
            )
            for row in rows
        ]

    async def resume(self) -> None:
        """At start-up: an Undo a stop cut short is failed (never run twice)."""
        for request_id in await self.store.interrupted_undos():
            log.warning("the undo of %s was interrupted by a stop: not run again", request_id)


def card_of(row: PendingRow) -> ApprovalCard:
    """The approval card of a stored approval (to edit it long after it was decided)."""
    return ApprovalCard(
        request_id=row.request_id,
        agent=row.agent,
        tool=row.tool,
        args=row.args,
        signature=row.signature,
        matched=row.matched,
        expires_at=row.expires_at,
        target=row.target,
        via=row.via,
        quorum=row.quorum,
        quota=row.quota,
    )
