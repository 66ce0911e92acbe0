"""The agent: open branches, votes, phase 2 and the idle-branch reaper, in parts that
share one table of branches (`participant.branches`): Execute
(`participant.execute_path`), the prepare path (`participant.prepare_path`), phase 2
(`participant.phase2`) and housekeeping (`participant.housekeeping`). `Agent`
assembles them and is what the servicer, recovery and the simulator call.

Guarantees:
- one branch per transaction id at a time; its operations are serialised by its lock;
- an Abort interrupts a branch at work (query cancel) and wins over a later Prepare:
  finished branches are remembered (tombstones), so a Prepare or Execute that arrives
  after the Abort is refused instead of opening a new branch;
- a branch is never silently started over: the agent has an incarnation id, fresh at
  every start, that its Execute replies carry; an Execute or Prepare that names the
  incarnation (and so a branch opened earlier) fails unless this incarnation still
  holds that branch. A restart rolls open branches back, and the transaction aborts;
- a branch runs at one isolation level, applied before its first statement; a later
  Execute or Prepare naming another level is refused (InvalidArgument) and changes
  nothing;
- a YES vote is only given for a branch PostgreSQL confirmed as prepared;
- once prepared, the branch is only finished by Commit or Abort (or by recovery
  asking the coordinator), never by a timer.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from participant.branches import BranchTable
from participant.config import ParticipantConfig
from participant.control_sql import PreparedBranch
from participant.epochs import EpochFence
from participant.execute_path import ExecutePath
from participant.housekeeping import Housekeeping, WaitEdge
from participant.phase2 import Phase2
from participant.ports import AgentStore
from participant.prepare_path import PreparePath, VoteResult
from twopc_common.isolation import Isolation
from twopc_common.log import EventLogger
from twopc_common.phase2_outcome import Phase2Outcome
from twopc_common.ports import SYSTEM_CLOCK, Clock, Random, system_random
from twopc_common.values import Statement, StatementResult


class Agent:
    def __init__(
        self,
        config: ParticipantConfig,
        store: AgentStore[Any],
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: Random | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.log = EventLogger("participant", config.id)
        self.counters: collections.Counter[str] = collections.Counter()
        self.epochs = EpochFence(store.control)
        self.incarnation = f"{(rng or system_random()).getrandbits(64):016x}"
        """Fresh at every start: names the branches this process opened."""
        table = BranchTable(config, store.branches, clock, self.counters, self.incarnation)
        self._table = table
        self._execute = ExecutePath(config, table, store.branches, self.epochs, clock, self.log)
        self._prepare = PreparePath(
            config, table, store.branches, self.epochs, self.counters, self.log
        )
        self._phase2 = Phase2(config.id, table, store.phase2, self.counters, self.log)
        self._housekeeping = Housekeeping(
            config, table, store.control, clock, self.counters, self.log
        )

    async def execute(
        self,
        txid: str,
        statements: Sequence[Statement],
        incarnation: str = "",
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> list[StatementResult]:
        return await self._execute.execute(txid, statements, incarnation, isolation)

    async def prepare(
        self,
        txid: str,
        statements: Sequence[Statement],
        one_phase: bool,
        incarnation: str = "",
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> VoteResult:
        return await self._prepare.prepare(txid, statements, one_phase, incarnation, isolation)

    async def commit(self, txid: str) -> Phase2Outcome:
        return await self._phase2.commit(txid)

    async def abort(self, txid: str, reason: str = "coordinator abort") -> Phase2Outcome:
        return await self._phase2.abort(txid, reason)

    async def finish(
        self, decisions: Sequence[tuple[str, bool]], reason: str = "coordinator abort"
    ) -> list[Phase2Outcome | Exception]:
        """See `participant.phase2.Phase2.finish`."""
        return await self._phase2.finish(decisions, reason)

    async def list_prepared(self, coordinator_id: str) -> list[PreparedBranch]:
        return await self._housekeeping.list_prepared(coordinator_id)

    async def waits_for(self) -> list[WaitEdge]:
        return await self._housekeeping.waits_for()

    @property
    def open_branches(self) -> int:
        return len(self._table.live)

    async def reap_idle_branches(self) -> None:
        await self._housekeeping.reap_idle_branches()

    async def close(self) -> None:
        await self._table.roll_back_all()
