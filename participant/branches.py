"""The branches open on one agent, and tombstones of the ones it finished: the state
the agent's parts (`participant.execute_path`, `participant.prepare_path`,
`participant.phase2`, `participant.phase2_prepared`, `participant.housekeeping`) share.

Guarantees: one live branch per transaction id; a finished branch is remembered
(within `tombstones`), so that a late Prepare or Execute is refused instead of
opening it again; a branch opened by an earlier incarnation of the agent is never
silently started over (`BranchLost`). Every change is atomic in the event loop (no
await between the check and the change).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

from participant.branch_state import BranchState, check_transition
from participant.config import ParticipantConfig
from participant.ports import BranchConn, BranchStore
from twopc_common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from twopc_common.ids import TransactionId
from twopc_common.isolation import Isolation
from twopc_common.ports import Clock


class BranchLost(Exception):
    """An Execute or Prepare names a branch this incarnation of the agent does not hold."""


@dataclass
class Branch:
    transaction_id: str
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    conn: BranchConn | None = None
    state: BranchState = BranchState.ACTIVE
    abort_reason: str = ""
    interactive: bool = False
    """Opened by Execute: it may hold its connection between calls."""
    isolation: Isolation = Isolation.READ_COMMITTED


@dataclass(frozen=True, slots=True)
class Tombstone:
    state: BranchState
    reason: str = ""


class BranchTable:
    def __init__(
        self,
        config: ParticipantConfig,
        store: BranchStore[Any],
        clock: Clock,
        counters: collections.Counter[str],
        incarnation: str,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._counters = counters
        self._incarnation = incarnation
        self.live: dict[str, Branch] = {}
        """The open branches, by transaction id."""
        self._finished: collections.OrderedDict[str, Tombstone] = collections.OrderedDict()

    def remember(self, txid: str, state: BranchState, reason: str = "") -> None:
        self._finished[txid] = Tombstone(state, reason)
        self._finished.move_to_end(txid)
        while len(self._finished) > self._config.tombstones:
            self._finished.popitem(last=False)

    def tombstone(self, txid: str) -> Tombstone | None:
        return self._finished.get(txid)

    def open(
        self,
        txid: str,
        incarnation: str = "",
        interactive: bool = False,
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> Branch:
        """The live branch of txid, opened if new and `incarnation` is empty; with an
        incarnation, only the branch this incarnation opened then (BranchLost if it
        is gone). InvalidArgument if the branch runs at another isolation level;
        FailedPrecondition if it is finished (see `tombstone`). No await: atomic in
        the event loop."""
        TransactionId.parse(txid)
        if incarnation and incarnation != self._incarnation:
            raise BranchLost(
                f"agent {self._config.id} restarted since the branch of {txid} was opened "
                f"(incarnation {incarnation}, now {self._incarnation}): its work was rolled back"
            )
        branch = self.live.get(txid)
        if branch is not None:
            if branch.isolation is not isolation:
                raise InvalidArgument(
                    f"the branch of {txid} runs at isolation level {branch.isolation.value}, "
                    f"not {isolation.value}: a transaction has one level for all its work"
                )
            return branch
        gone = self._finished.get(txid)
        if gone is not None:
            why = f": {gone.reason}" if gone.reason else ""
            raise FailedPrecondition(f"branch of {txid} is already {gone.state.value}{why}")
        if incarnation:
            raise BranchLost(
                f"agent {self._config.id} no longer holds the branch of {txid} "
                "(its database connection was lost): its work was rolled back"
            )
        if interactive:
            self._check_interactive_limit()
        branch = self.live[txid] = Branch(
            txid, last_used=self._clock.monotonic(), interactive=interactive, isolation=isolation
        )
        self._counters["branches_opened"] += 1
        return branch

    def _check_interactive_limit(self) -> None:
        held = sum(1 for b in self.live.values() if b.interactive)
        if held >= self._config.max_interactive_branches:
            self._counters["interactive_branches_refused"] += 1
            raise ResourceExhausted(
                f"agent {self._config.id} holds {held} open interactive branches, its "
                f"limit (--pool-max-size {self._config.pool_max_size} less "
                f"--interactive-reserve {self._config.interactive_reserve}): "
                "finish some transactions first"
            )

    async def connection(self, branch: Branch) -> BranchConn:
        if branch.conn is None:
            branch.conn = await self._store.connect_branch(branch.isolation)
        return branch.conn

    async def close(self, branch: Branch, state: BranchState, reason: str = "") -> None:
        """Roll back (unless prepared or committed), release the connection, forget."""
        branch.state = check_transition(branch.state, state, branch.transaction_id)
        if branch.conn is not None:
            if state is BranchState.ABORTED:
                await self._store.rollback(branch.conn)
            await self._store.release(branch.conn)
            branch.conn = None
        self.live.pop(branch.transaction_id, None)
        self.remember(branch.transaction_id, state, reason)

    async def discard(self, branch: Branch) -> None:
        """Forget a branch whose fate only the database knows (its connection broke).
        Its tombstone says so: a repeated Prepare must not open it again (and vote NO
        on the marker of a branch that committed)."""
        branch.state = check_transition(branch.state, BranchState.IN_DOUBT, branch.transaction_id)
        if branch.conn is not None:
            await self._store.release(branch.conn)
            branch.conn = None
        self.live.pop(branch.transaction_id, None)
        self.remember(branch.transaction_id, BranchState.IN_DOUBT)

    async def roll_back_all(self) -> None:
        """At shutdown: every open branch rolled back, its connection released."""
        for branch in list(self.live.values()):
            if branch.conn is not None:
                await self._store.rollback(branch.conn)
                await self._store.release(branch.conn)
                branch.conn = None
        self.live.clear()
