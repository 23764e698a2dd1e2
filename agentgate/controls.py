"""The guardian's controls: decisions on cards, grants ("Allow 1 h", "Always allow"), Undo,
freeze, pending, status.

:class:`Controls` is the gateway's :class:`~agentgate.guardian.GuardianControl`: what the
Telegram guardian (or a scripted one, or the operator's ``agentgate grants`` and ``agentgate
undo`` through the control socket) may ask of the gateway. It also holds the two pieces of
state the pipeline consults on every request, the freeze and the active grants, and restores
both from the store at start-up. A grant, permanent or not, is a store row plus an audit row,
and so is its revocation.

Imports: broker (approvals it decides), store, tools (which calls a grant may cover),
guardian (the protocol), approvals, undo, errors. Never the pipeline or a front door.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections.abc import Callable
from typing import Any, Final

import trio

from agentgate import tools
from agentgate.approvals import UNDO_CONFIRM, Decision, UndoCheck
from agentgate.broker import Broker
from agentgate.errors import ExecutionFailed
from agentgate.guardian import (
    Action,
    GatewayStatus,
    Grant,
    PendingCard,
    PressAnswer,
    UndoItem,
)
from agentgate.store import AuditEntry, GrantRow, Store
from agentgate.undo import Undo, UndoOutcome, describe

__all__ = ["GRANT_SECONDS", "Controls"]

log = logging.getLogger(__name__)

GRANT_SECONDS: Final = 3600.0
UNDO_WAIT: Final = 10.0  # seconds an Undo waits for the approval it undoes to be recorded


class Controls:
    """See the module docstring; :meth:`load_state` before the first request."""

    def __init__(
        self,
        store: Store,
        *,
        connected: Callable[[], dict[str, int]],
        now: Callable[[], float],
    ) -> None:
        self.store = store
        self.broker: Broker | None = None  # set by open_gateway
        self.undos: Undo | None = None  # set by open_gateway (None: no service to undo on)
        self.frozen = False
        self._connected = connected
        self._now = now
        self._grants: dict[tuple[str, str], GrantRow] = {}

    async def load_state(self) -> None:
        """Restore what survives a restart: the freeze and the remembered grants."""
        self.frozen = (await self.store.get_setting("frozen")) == "1"
        for grant in await self.store.active_grants(self._now()):
            self._grants[(grant.agent, grant.signature)] = grant
        if self.frozen:
            log.warning("the gateway is FROZEN by the guardian: every request is denied")

    def _approvals(self) -> Broker:
        if self.broker is None:
            raise RuntimeError("Controls.broker is not set (see open_gateway)")
        return self.broker

    # -- grants -------------------------------------------------------------------------------

    def grant_for(
        self, agent: str, tool: str, args: dict[str, Any], signature: str, now: float
    ) -> GrantRow | None:
        """The grant that turns this ask into an allow, if any: the same agent and signature,
        unexpired, and a call a grant may cover at all (:func:`agentgate.tools.grantable`)."""
        grant = self._grants.get((agent, signature))
        if grant is None or grant.expires_at <= now or not tools.grantable(tool, args):
            return None
        return grant

    async def add_grant(
        self, agent: str, signature: str, by: str, permanent: bool = False
    ) -> float:
        """Remember an "Allow 1 h", or with ``permanent`` an "Always allow" (the broker calls
        this before it executes the call); return when it ends (unix time; inf: never). It
        replaces the grant the agent and signature had, if any (revoked in the store)."""
        now = self._now()
        until = math.inf if permanent else now + GRANT_SECONDS
        grant = GrantRow(str(uuid.uuid4())[:8], agent, signature, by, now, until)
        await self.store.replace_grant(grant, by=f"{by} (replaced by {grant.grant_id})")
        self._grants[(agent, signature)] = grant
        how = "always (until revoked)" if permanent else "for 1 h"
        await self._audit(by, "grant", f"{agent}: {signature} {how} ({grant.grant_id})")
        return grant.expires_at

    async def _audit(self, by: str, decision: str, what: str) -> None:
        await self.store.audit(AuditEntry.guardian(self._now(), decision, what, by))

    # -- GuardianControl ----------------------------------------------------------------------

    async def decide(
        self,
        request_id: str,
        action: Action,
        by: str,
        *,
        message_ref: str,
        voter: str | None = None,
    ) -> PressAnswer:
        broker = self._approvals()
        # Every press is a fact of the audit log, whatever it decides; it is committed before
        # anything it lets run (posted writes join the next commit, durable ones included).
        self.store.post_press(request_id, action.value, by=by, user=voter, at=self._now())
        if self.frozen:  # every approval was denied by the freeze; a late press decides nothing
            return PressAnswer("expired: the gateway is frozen (/unfreeze first)")
        await broker.card_known(request_id)
        if broker.misplaced(request_id, message_ref):
            what = f"button {action.value}:{request_id} pressed on {message_ref}"
            await self.refused(by, f"{what}, which is not that approval's card")
            return PressAnswer("expired: that button is not on this approval's card")
        return await broker.decide(request_id, action, by, voter=voter)

    async def undo(self, request_id: str, by: str, *, confirm: bool = False) -> PressAnswer:
        """An Undo press (or ``agentgate undo``): see :mod:`agentgate.undo`. When it needs a
        confirmation, the guardians get a message with an "Undo anyway" button."""
        done = await self.run_undo(request_id, by, confirm=confirm)
        if done.check in UNDO_CONFIRM and done.row is not None:
            broker = self._approvals()
            if broker.guardian is not None:
                row = done.row
                text = (
                    f"↩ Undo of {row.signature} (agent {row.agent}, request"
                    f" {row.request_id[:8]}) by {by}: {done.answer}.\n"
                    f"Undo anyway sets: {describe(row.before)}"
                )
                with contextlib.suppress(Exception):
                    await broker.guardian.notify(
                        text, [("↩ Undo anyway", f"undo!:{row.request_id}")]
                    )
        return PressAnswer(done.answer)

    async def run_undo(self, request_id: str, by: str, *, confirm: bool = False) -> UndoOutcome:
        """The Undo itself, for the guardians' controls and the control socket."""
        if self.undos is None:
            return UndoOutcome(UndoCheck.UNKNOWN)
        broker = self.broker
        if broker is not None and request_id in broker.approvals:
            # Its result may be out before its snapshot is stored: wait for the approval's end.
            with trio.move_on_after(UNDO_WAIT):
                await broker.finished(request_id)
        return await self.undos.undo(request_id, by, confirm=confirm)

    async def undoable(self) -> list[UndoItem]:
        return [] if self.undos is None else await self.undos.open()

    async def card_copied(self, request_id: str, message_ref: str) -> None:
        self._approvals().add_copy(request_id, message_ref)

    async def refused(self, user: str, what: str) -> None:
        log.warning("refused guardian action from %s: %s", user, what)
        with contextlib.suppress(ExecutionFailed):
            await self._audit(user, "refused", what)

    async def pending(self) -> list[PendingCard]:
        return self._approvals().pending_cards()

    async def reload_grants(self) -> None:
        """Read the active grants from the store again (after a change made outside)."""
        grants = await self.store.active_grants(self._now())
        self._grants = {(g.agent, g.signature): g for g in grants}

    async def grants(self) -> list[Grant]:
        now = self._now()
        return [
            Grant(g.grant_id, g.agent, g.signature, g.granted_by, g.expires_at)
            for g in self._grants.values()
            if g.expires_at > now
        ]

    async def revoke_grant(self, grant_id: str, by: str) -> bool:
        for key, grant in list(self._grants.items()):
            if grant.grant_id == grant_id:
                del self._grants[key]
                await self.store.revoke_grant(grant_id, by, self._now())
                await self._audit(by, "revoke", f"{grant.agent}: {grant.signature} ({grant_id})")
                return True
        return False

    async def set_frozen(self, frozen: bool, by: str) -> None:
        await self.store.set_setting("frozen", "1" if frozen else "0")
        self.frozen = frozen
        await self._audit(by, "freeze" if frozen else "unfreeze", "all agents")
        if frozen:
            count = self._approvals().resolve_all(Decision.FROZEN, by, "frozen by guardian")
            log.warning("frozen by %s: %d pending approval(s) denied", by, count)
        else:
            log.warning("unfrozen by %s", by)

    async def status(self) -> GatewayStatus:
        return GatewayStatus(
            agents_connected=self._connected(),
            pending=self._approvals().waiting(),
            frozen=self.frozen,
        )
