"""What the agent does besides the protocol's calls: the views the coordinators ask
for (this coordinator's prepared branches, the shard's lock waits between open
branches) and the idle-branch reaper.

A prepared branch is never touched here: the reaper rolls back only branches still
open (ACTIVE) whose coordinator went quiet before Prepare.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from psycopg import Xid

from participant.branch_state import BranchState
from participant.branches import BranchTable
from participant.config import ParticipantConfig
from participant.control_sql import PreparedBranch
from participant.ports import ControlStore
from twopc_common.ids import FORMAT_ID, TransactionId
from twopc_common.log import EventLogger
from twopc_common.ports import Clock


@dataclass(frozen=True, slots=True)
class WaitEdge:
    """An open branch waiting for a lock held by another branch of this agent
    (holder), a prepared transaction, or an outside session (holder_pid)."""

    waiter: str
    holder: str
    holder_prepared: bool
    holder_pid: int
    wait_started: float


class Housekeeping:
    def __init__(
        self,
        config: ParticipantConfig,
        table: BranchTable,
        store: ControlStore,
        clock: Clock,
        counters: collections.Counter[str],
        log: EventLogger,
    ) -> None:
        self._config = config
        self._table = table
        self._store = store
        self._clock = clock
        self._counters = counters
        self._log = log

    async def list_prepared(self, coordinator_id: str) -> list[PreparedBranch]:
        scan = await self._store.prepared_branches(self._config.id)
        return [
            b
            for b in scan.ours
            if TransactionId.parse(b.transaction_id).coordinator == coordinator_id
        ]

    async def waits_for(self) -> list[WaitEdge]:
        """This shard's piece of the global wait-for graph: open branches waiting for
        a lock, and who holds it."""
        pids = {
            b.conn.info.backend_pid: b.transaction_id
            for b in list(self._table.live.values())
            if b.conn is not None and not b.conn.closed
        }
        edges = []
        for wait in await self._store.lock_waits(list(pids)):
            waiter = pids.get(wait.waiter_pid)
            if waiter is None:
                continue  # finished meanwhile
            if wait.holder_pid == 0:
                # A prepared branch of ours still waits for its transaction's decision:
                # if that transaction waits for this one elsewhere, it is a deadlock.
                holder = self._prepared_branch(wait.holder_gid)
            else:
                holder = pids.get(wait.holder_pid, "")
            edges.append(
                WaitEdge(
                    waiter,
                    holder,
                    wait.holder_pid == 0,
                    wait.holder_pid,
                    wait.wait_started.timestamp() if wait.wait_started else 0.0,
                )
            )
        return edges

    def _prepared_branch(self, gid: str | None) -> str:
        """The transaction id of a prepared branch of this participant, or ""."""
        if gid is None:
            return ""
        xid = Xid.from_string(gid)
        if xid.format_id != FORMAT_ID or xid.bqual != self._config.id:
            return ""
        return xid.gtrid

    async def reap_idle_branches(self) -> None:
        """Roll back interactive branches whose coordinator went quiet before Prepare."""
        period = min(1.0, self._config.idle_branch_timeout / 4)
        while True:
            await self._clock.sleep(period)
            deadline = self._clock.monotonic() - self._config.idle_branch_timeout
            for branch in list(self._table.live.values()):
                if branch.last_used < deadline and not branch.lock.locked():
                    async with branch.lock:
                        if branch.state is BranchState.ACTIVE and branch.last_used < deadline:
                            await self._table.close(
                                branch, BranchState.ABORTED, "idle branch timeout"
                            )
                            self._counters["idle_branches_rolled_back"] += 1
                            self._log.info("idle_branch_rolled_back", txid=branch.transaction_id)
