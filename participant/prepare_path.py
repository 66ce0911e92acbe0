"""The agent's prepare path: Prepare finishes a branch's work (the statements riding
along, after what Execute, `participant.execute_path`, ran) and votes, by the one-phase
path (the work and COMMIT at once) or the two-phase one (PREPARE TRANSACTION); a
Prepare repeated after its branch was settled is answered by `_repeated_vote`.

Guarantees: a YES vote only for a branch PostgreSQL confirmed as prepared; a branch
at work gives way to an Abort that came first (`abort_reason`); a repeated Prepare of
a settled branch answers what the first one did, where that is known; a Prepare whose
settling statement may or may not have run gives no vote at all (OutcomeUnknown).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from participant.branch_sql import BranchFailed, OutcomeUnknown
from participant.branch_state import BranchState
from participant.branches import Branch, BranchLost, BranchTable
from participant.config import ParticipantConfig
from participant.epochs import EpochFence
from participant.ports import BranchConn, BranchStore
from twopc_common import failpoints
from twopc_common.errors import FailedPrecondition
from twopc_common.ids import TransactionId
from twopc_common.isolation import Isolation
from twopc_common.log import EventLogger
from twopc_common.values import Statement, StatementResult
from twopc_common.votes import Vote


@dataclass(frozen=True, slots=True)
class VoteResult:
    vote: Vote
    reason: str = ""
    sqlstate: str = ""
    results: tuple[StatementResult, ...] = ()


def _repeated_vote(state: BranchState, one_phase: bool, txid: str) -> VoteResult | None:
    """The vote of a Prepare repeated after its branch was settled (a duplicated
    message): what the first one answered, where that is known; no vote at all
    (OutcomeUnknown) if only the database knows. A NO for a branch that committed in
    one phase, or whose settling statement may have run, would have the coordinator
    tell its client ABORTED for a committed transaction (the simulator, tests/sim,
    found both with duplicated Prepares)."""
    if state is BranchState.PREPARED and not one_phase:
        return VoteResult(Vote.YES)
    if state is BranchState.COMMITTED and one_phase:
        return VoteResult(Vote.COMMITTED_ONE_PHASE)
    if state is BranchState.IN_DOUBT:
        raise OutcomeUnknown(
            f"the branch of {txid} lost its database connection while it was being "
            "settled: only the database can tell what happened"
        )
    return None


class PreparePath:
    def __init__(
        self,
        config: ParticipantConfig,
        table: BranchTable,
        store: BranchStore[Any],
        epochs: EpochFence,
        counters: collections.Counter[str],
        log: EventLogger,
    ) -> None:
        self._config = config
        self._table = table
        self._store = store
        self._epochs = epochs
        self._counters = counters
        self._log = log

    async def prepare(
        self,
        txid: str,
        statements: Sequence[Statement],
        one_phase: bool,
        incarnation: str = "",
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> VoteResult:
        if not incarnation:
            try:
                await self._epochs.admit(TransactionId.parse(txid))
            except FailedPrecondition as exc:
                self._counters["votes_no_stale_epoch"] += 1
                self._log.warning("vote", txid=txid, vote="no", reason=str(exc))
                return VoteResult(Vote.NO, str(exc))
        try:
            branch = self._table.open(txid, incarnation, isolation=isolation)
        except BranchLost as exc:
            self._counters["votes_no_branch_lost"] += 1
            self._log.info("vote", txid=txid, vote="no", reason=str(exc))
            return VoteResult(Vote.NO, str(exc))
        except FailedPrecondition as exc:
            gone = self._table.tombstone(txid)
            repeat = _repeated_vote(gone.state, one_phase, txid) if gone is not None else None
            return repeat or VoteResult(Vote.NO, str(exc))
        async with branch.lock:
            return await self._vote(branch, statements, one_phase)

    async def _vote(
        self, branch: Branch, statements: Sequence[Statement], one_phase: bool
    ) -> VoteResult:
        """Finish the work of an open branch (its lock held), and vote."""
        txid = branch.transaction_id
        if branch.state is not BranchState.ACTIVE:  # settled while this one waited
            repeat = _repeated_vote(branch.state, one_phase, txid)
            return repeat or VoteResult(Vote.NO, f"branch of {txid} is {branch.state.value}")
        try:
            conn = await self._table.connection(branch)
            if branch.abort_reason:
                raise BranchFailed(f"aborted while waiting: {branch.abort_reason}")
            # With statements riding along, the branch's work goes to PostgreSQL in
            # the same round trip as its PREPARE: this is the last point before.
            await failpoints.hit("participant.before_prepare")
            if one_phase:
                return await self._commit_one_phase(branch, conn, statements)
            outcome = await self._store.prepare(conn, statements, txid, self._config.id)
            results, wrote = tuple(outcome[0]), outcome[1]
        except BranchFailed as exc:
            await self._table.close(branch, BranchState.ABORTED, exc.reason)
            self._counters["votes_no"] += 1
            self._log.info("vote", txid=txid, vote="no", reason=exc.reason)
            return VoteResult(Vote.NO, exc.reason, exc.sqlstate)
        except OutcomeUnknown as exc:
            # No vote, and no tombstone: the coordinator's Abort will look at the
            # database itself (prepared branch, marker row) and answer truthfully.
            await self._table.discard(branch)
            self._counters["outcome_unknown"] += 1
            self._log.warning("outcome_unknown", txid=txid, error=str(exc))
            raise
        return await self._prepared_vote(branch, results, wrote)

    async def _commit_one_phase(
        self, branch: Branch, conn: BranchConn, statements: Sequence[Statement]
    ) -> VoteResult:
        """The one-phase path: the branch's work and its COMMIT in one go. A failure
        is `_vote`'s to handle, as for PREPARE."""
        txid = branch.transaction_id
        results = tuple(await self._store.commit_one_phase(conn, statements, txid, self._config.id))
        await self._table.close(branch, BranchState.COMMITTED)
        self._counters["committed_one_phase"] += 1
        self._log.debug("committed_one_phase", txid=txid)
        return VoteResult(Vote.COMMITTED_ONE_PHASE, results=results)

    async def _prepared_vote(
        self, branch: Branch, results: tuple[StatementResult, ...], wrote: bool
    ) -> VoteResult:
        """The two-phase path once the store's prepare succeeded: YES for a prepared
        branch, READ_ONLY for one that wrote nothing (committed at once, no phase 2)."""
        txid = branch.transaction_id
        if not wrote:
            await self._table.close(branch, BranchState.COMMITTED)
            self._counters["votes_read_only"] += 1
            self._log.debug("vote", txid=txid, vote="read_only")
            return VoteResult(Vote.READ_ONLY, results=results)
        await self._table.close(branch, BranchState.PREPARED)
        self._counters["votes_yes"] += 1
        self._log.debug("vote", txid=txid, vote="yes")
        await failpoints.hit("participant.after_prepare_before_vote")
        return VoteResult(Vote.YES, results=results)
