"""The agent's Execute: statements run in the branch of an interactive transaction, one
call at a time, until its Prepare (`participant.prepare_path`) finishes the work.

Guarantees: a branch at work gives way to an Abort that came first (`abort_reason`);
a branch whose statement failed is rolled back and its Execute answers ABORTED (with
the SQLSTATE); an Execute naming an incarnation of the agent that no longer holds the
branch answers ABORTED instead of starting the branch over (`BranchLost`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from participant.branch_sql import BranchFailed
from participant.branch_state import BranchState
from participant.branches import BranchLost, BranchTable
from participant.config import ParticipantConfig
from participant.epochs import EpochFence
from participant.ports import BranchStore
from twopc_common.errors import Aborted, FailedPrecondition, InvalidArgument
from twopc_common.ids import TransactionId
from twopc_common.isolation import Isolation
from twopc_common.log import EventLogger
from twopc_common.ports import Clock
from twopc_common.values import Statement, StatementResult


class ExecutePath:
    def __init__(
        self,
        config: ParticipantConfig,
        table: BranchTable,
        store: BranchStore[Any],
        epochs: EpochFence,
        clock: Clock,
        log: EventLogger,
    ) -> None:
        self._config = config
        self._table = table
        self._store = store
        self._epochs = epochs
        self._clock = clock
        self._log = log

    async def execute(
        self,
        txid: str,
        statements: Sequence[Statement],
        incarnation: str = "",
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> list[StatementResult]:
        if not statements:
            raise InvalidArgument("Execute needs at least one statement")
        if not incarnation:
            await self._epochs.admit(TransactionId.parse(txid))
        try:
            branch = self._table.open(txid, incarnation, interactive=True, isolation=isolation)
        except BranchLost as exc:
            raise Aborted(str(exc)) from exc
        async with branch.lock:
            if branch.state is not BranchState.ACTIVE:
                raise FailedPrecondition(f"branch of {txid} is {branch.state.value}")
            try:
                conn = await self._table.connection(branch)
                if branch.abort_reason:
                    raise BranchFailed(f"aborted while waiting: {branch.abort_reason}")
                results = await self._store.execute(conn, statements)
            except BranchFailed as exc:
                await self._table.close(branch, BranchState.ABORTED, exc.reason)
                self._log.info("branch_failed", txid=txid, reason=exc.reason)
                raise Aborted(
                    f"branch on {self._config.id} failed: {exc.reason}", sqlstate=exc.sqlstate
                ) from exc
            branch.last_used = self._clock.monotonic()
            return results
