"""The agent's branch logic: open branches, votes, phase 2 and the idle-branch reaper.

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

import asyncio
import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from psycopg import Xid

from participant.branch_state import BranchState, check_transition, plan_phase2
from participant.config import ParticipantConfig
from participant.epochs import EpochFence
from participant.ports import AgentStore, BranchConn
from participant.store import BranchFailed, OutcomeUnknown, PreparedBranch
from twopc_common import failpoints
from twopc_common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    TwoPCError,
    Unavailable,
)
from twopc_common.ids import FORMAT_ID, TransactionId
from twopc_common.isolation import Isolation
from twopc_common.log import EventLogger
from twopc_common.phase2_outcome import Phase2Outcome, finished
from twopc_common.ports import SYSTEM_CLOCK, Clock, Random, system_random
from twopc_common.values import Statement, StatementResult


@dataclass(frozen=True, slots=True)
class WaitEdge:
    """An open branch waiting for a lock held by another branch of this agent
    (holder), a prepared transaction, or an outside session (holder_pid)."""

    waiter: str
    holder: str
    holder_prepared: bool
    holder_pid: int
    wait_started: float


class BranchLost(Exception):
    """An Execute or Prepare names a branch this incarnation of the agent does not hold."""


class Vote(Enum):
    YES = "yes"
    NO = "no"
    READ_ONLY = "read_only"
    COMMITTED_ONE_PHASE = "committed_one_phase"


@dataclass(frozen=True, slots=True)
class VoteResult:
    vote: Vote
    reason: str = ""
    sqlstate: str = ""
    results: tuple[StatementResult, ...] = ()


@dataclass
class _Branch:
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
class _Tombstone:
    state: BranchState
    reason: str = ""


_PHASE2_FAILPOINTS = {
    True: ("participant.before_commit_prepared", "participant.after_commit_prepared"),
    False: ("participant.before_rollback_prepared", "participant.after_rollback_prepared"),
}


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


def _unwrap(answer: Phase2Outcome | Exception) -> Phase2Outcome:
    if isinstance(answer, Exception):
        raise answer
    return answer


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
        self.epochs = EpochFence(store)
        self.incarnation = f"{(rng or system_random()).getrandbits(64):016x}"
        """Fresh at every start: names the branches this process opened."""
        self._branches: dict[str, _Branch] = {}
        self._finished: collections.OrderedDict[str, _Tombstone] = collections.OrderedDict()

    # -- bookkeeping ----------------------------------------------------------------

    def _remember(self, txid: str, state: BranchState, reason: str = "") -> None:
        self._finished[txid] = _Tombstone(state, reason)
        self._finished.move_to_end(txid)
        while len(self._finished) > self.config.tombstones:
            self._finished.popitem(last=False)

    def _open(
        self,
        txid: str,
        incarnation: str = "",
        interactive: bool = False,
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> _Branch:
        """The live branch of txid, opened if new and `incarnation` is empty; with an
        incarnation, only the branch this incarnation opened then (BranchLost if it
        is gone). InvalidArgument if the branch runs at another isolation level. No
        await: atomic in the event loop."""
        TransactionId.parse(txid)
        if incarnation and incarnation != self.incarnation:
            raise BranchLost(
                f"agent {self.config.id} restarted since the branch of {txid} was opened "
                f"(incarnation {incarnation}, now {self.incarnation}): its work was rolled back"
            )
        branch = self._branches.get(txid)
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
                f"agent {self.config.id} no longer holds the branch of {txid} "
                "(its database connection was lost): its work was rolled back"
            )
        if interactive:
            held = sum(1 for b in self._branches.values() if b.interactive)
            if held >= self.config.max_interactive_branches:
                self.counters["interactive_branches_refused"] += 1
                raise ResourceExhausted(
                    f"agent {self.config.id} holds {held} open interactive branches, its "
                    f"limit (--pool-max-size {self.config.pool_max_size} less "
                    f"--interactive-reserve {self.config.interactive_reserve}): "
                    "finish some transactions first"
                )
        branch = self._branches[txid] = _Branch(
            txid, last_used=self.clock.monotonic(), interactive=interactive, isolation=isolation
        )
        self.counters["branches_opened"] += 1
        return branch

    async def _connection(self, branch: _Branch) -> BranchConn:
        if branch.conn is None:
            branch.conn = await self.store.connect_branch(branch.isolation)
        return branch.conn

    async def _close(self, branch: _Branch, state: BranchState, reason: str = "") -> None:
        """Roll back (unless prepared or committed), release the connection, forget."""
        branch.state = check_transition(branch.state, state, branch.transaction_id)
        if branch.conn is not None:
            if state is BranchState.ABORTED:
                await self.store.rollback(branch.conn)
            await self.store.release(branch.conn)
            branch.conn = None
        self._branches.pop(branch.transaction_id, None)
        self._remember(branch.transaction_id, state, reason)

    async def _discard(self, branch: _Branch) -> None:
        """Forget a branch whose fate only the database knows (its connection broke).
        Its tombstone says so: a repeated Prepare must not open it again (and vote NO
        on the marker of a branch that committed)."""
        branch.state = check_transition(branch.state, BranchState.IN_DOUBT, branch.transaction_id)
        if branch.conn is not None:
            await self.store.release(branch.conn)
            branch.conn = None
        self._branches.pop(branch.transaction_id, None)
        self._remember(branch.transaction_id, BranchState.IN_DOUBT)

    # -- the protocol ---------------------------------------------------------------

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
            await self.epochs.admit(TransactionId.parse(txid))
        try:
            branch = self._open(txid, incarnation, interactive=True, isolation=isolation)
        except BranchLost as exc:
            raise Aborted(str(exc)) from exc
        async with branch.lock:
            if branch.state is not BranchState.ACTIVE:
                raise FailedPrecondition(f"branch of {txid} is {branch.state.value}")
            try:
                conn = await self._connection(branch)
                if branch.abort_reason:
                    raise BranchFailed(f"aborted while waiting: {branch.abort_reason}")
                results = await self.store.execute(conn, statements)
            except BranchFailed as exc:
                await self._close(branch, BranchState.ABORTED, exc.reason)
                self.log.info("branch_failed", txid=txid, reason=exc.reason)
                raise Aborted(
                    f"branch on {self.config.id} failed: {exc.reason}", sqlstate=exc.sqlstate
                ) from exc
            branch.last_used = self.clock.monotonic()
            return results

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
                await self.epochs.admit(TransactionId.parse(txid))
            except FailedPrecondition as exc:
                self.counters["votes_no_stale_epoch"] += 1
                self.log.warning("vote", txid=txid, vote="no", reason=str(exc))
                return VoteResult(Vote.NO, str(exc))
        try:
            branch = self._open(txid, incarnation, isolation=isolation)
        except BranchLost as exc:
            self.counters["votes_no_branch_lost"] += 1
            self.log.info("vote", txid=txid, vote="no", reason=str(exc))
            return VoteResult(Vote.NO, str(exc))
        except FailedPrecondition as exc:
            gone = self._finished.get(txid)
            repeat = _repeated_vote(gone.state, one_phase, txid) if gone is not None else None
            return repeat or VoteResult(Vote.NO, str(exc))
        async with branch.lock:
            if branch.state is not BranchState.ACTIVE:  # settled while this one waited
                repeat = _repeated_vote(branch.state, one_phase, txid)
                return repeat or VoteResult(Vote.NO, f"branch of {txid} is {branch.state.value}")
            try:
                conn = await self._connection(branch)
                if branch.abort_reason:
                    raise BranchFailed(f"aborted while waiting: {branch.abort_reason}")
                # With statements riding along, the branch's work goes to PostgreSQL in
                # the same round trip as its PREPARE: this is the last point before.
                await failpoints.hit("participant.before_prepare")
                if one_phase:
                    results = tuple(
                        await self.store.commit_one_phase(conn, statements, txid, self.config.id)
                    )
                    await self._close(branch, BranchState.COMMITTED)
                    self.counters["committed_one_phase"] += 1
                    self.log.debug("committed_one_phase", txid=txid)
                    return VoteResult(Vote.COMMITTED_ONE_PHASE, results=results)
                outcome = await self.store.prepare(conn, statements, txid, self.config.id)
                results, wrote = tuple(outcome[0]), outcome[1]
            except BranchFailed as exc:
                await self._close(branch, BranchState.ABORTED, exc.reason)
                self.counters["votes_no"] += 1
                self.log.info("vote", txid=txid, vote="no", reason=exc.reason)
                return VoteResult(Vote.NO, exc.reason, exc.sqlstate)
            except OutcomeUnknown as exc:
                # No vote, and no tombstone: the coordinator's Abort will look at the
                # database itself (prepared branch, marker row) and answer truthfully.
                await self._discard(branch)
                self.counters["outcome_unknown"] += 1
                self.log.warning("outcome_unknown", txid=txid, error=str(exc))
                raise
            if not wrote:
                await self._close(branch, BranchState.COMMITTED)
                self.counters["votes_read_only"] += 1
                self.log.debug("vote", txid=txid, vote="read_only")
                return VoteResult(Vote.READ_ONLY, results=results)
            await self._close(branch, BranchState.PREPARED)
            self.counters["votes_yes"] += 1
            self.log.debug("vote", txid=txid, vote="yes")
            await failpoints.hit("participant.after_prepare_before_vote")
            return VoteResult(Vote.YES, results=results)

    async def commit(self, txid: str) -> Phase2Outcome:
        return _unwrap((await self.finish([(txid, True)]))[0])

    async def abort(self, txid: str, reason: str = "coordinator abort") -> Phase2Outcome:
        return _unwrap((await self.finish([(txid, False)], reason))[0])

    async def finish(
        self, decisions: Sequence[tuple[str, bool]], reason: str = "coordinator abort"
    ) -> list[Phase2Outcome | Exception]:
        """Phase 2 for a batch of (txid, commit) decisions, each answered on its own:
        the branch's outcome (the other final state included), or the error Commit or
        Abort alone would have raised. Prepared branches are finished together, in
        one round trip on a single pooled connection, taken only if one needs it (an
        Abort of open branches must not wait for a connection they may all be
        holding); open branches are rolled back meanwhile, each on its own (one may
        first have to interrupt a statement waiting on a lock)."""
        plan = plan_phase2(decisions, {t: b.state for t, b in self._branches.items()})
        answers: dict[int, Phase2Outcome | Exception] = dict(plan.refused)
        still_open = [(i, self._branches[decisions[i][0]]) for i in plan.still_open]
        prepared = list(plan.prepared)

        async def finish_prepared(indexes: list[int]) -> None:
            try:
                async with self.store.phase2_connection() as conn:
                    batch = {i: decisions[i] for i in indexes}
                    answers.update(await self._finish_on(conn, batch, reason))
            except Unavailable as exc:  # no (working) connection for the batch
                for i in indexes:
                    answers.setdefault(i, exc)

        async def abort_open(i: int, branch: _Branch) -> None:
            try:
                outcome = await self._abort_open(branch, reason)
            except Exception as exc:
                self.log.error("abort_failed", txid=branch.transaction_id, error=repr(exc))
                answers[i] = exc
                return
            if outcome is None:  # it got prepared while the Abort waited
                await finish_prepared([i])
            else:
                answers[i] = outcome

        await asyncio.gather(
            *([finish_prepared(prepared)] if prepared else []),
            *(abort_open(i, branch) for i, branch in still_open),
        )
        return [answers[i] for i in range(len(decisions))]

    async def _abort_open(self, branch: _Branch, reason: str) -> Phase2Outcome | None:
        """Roll back a branch that is still open; None if it is prepared by now."""
        branch.abort_reason = reason
        if branch.lock.locked() and branch.conn is not None:
            # Interrupt a statement waiting on a lock rather than wait behind it.
            await branch.conn.cancel_safe(timeout=2.0)
        async with branch.lock:
            if branch.state is not BranchState.ACTIVE:
                return None
            await self._close(branch, BranchState.ABORTED, reason)
        self.counters["aborted_active"] += 1
        self.log.info("aborted", txid=branch.transaction_id, prepared=False, reason=reason)
        return Phase2Outcome.ROLLED_BACK

    async def _finish_on(
        self, conn: BranchConn, batch: dict[int, tuple[str, bool]], reason: str
    ) -> dict[int, Phase2Outcome | Exception]:
        """Prepared branches: all in one round trip; what PostgreSQL skipped after a
        failure goes again one by one. Unavailable if the connection breaks."""
        answers: dict[int, Phase2Outcome | Exception] = {}
        ready: dict[int, tuple[str, bool]] = {}
        for i, (txid, commit) in batch.items():
            try:
                await failpoints.hit(_PHASE2_FAILPOINTS[commit][0])
            except TwoPCError as exc:
                answers[i] = exc
                continue
            ready[i] = (txid, commit)
        ran = await self.store.finish_many(conn, list(ready.values()), self.config.id)
        for (i, (txid, commit)), done in zip(ready.items(), ran, strict=True):
            try:
                outcome = (
                    finished(commit)
                    if done
                    else await self.store.finish_prepared(conn, txid, self.config.id, commit)
                )
                if outcome.committed is not commit:
                    # The other final state (or, for a Commit, nothing to commit): the
                    # answer, and nothing for this agent to remember or count.
                    self.log.info(
                        "phase2_other_state", txid=txid, commit=commit, outcome=outcome.value
                    )
                    answers[i] = outcome
                    continue
                await failpoints.hit(_PHASE2_FAILPOINTS[commit][1])
            except TwoPCError as exc:
                answers[i] = exc
                continue
            except Exception as exc:
                self.log.error("phase2_failed", txid=txid, commit=commit, error=repr(exc))
                await self.store.rollback(conn)  # leave the connection usable for the rest
                answers[i] = exc
                continue
            answers[i] = outcome
            if commit:
                self._remember(txid, BranchState.COMMITTED)
                self.counters["committed" if outcome.changed else "commit_repeats"] += 1
                self.log.debug("committed", txid=txid, changed=outcome.changed)
            else:
                self._remember(txid, BranchState.ABORTED, reason)
                self.counters["aborted" if outcome.changed else "abort_repeats"] += 1
                self.log.info("aborted", txid=txid, prepared=outcome.changed, reason=reason)
        return answers

    async def list_prepared(self, coordinator_id: str) -> list[PreparedBranch]:
        scan = await self.store.prepared_branches(self.config.id)
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
            for b in list(self._branches.values())
            if b.conn is not None and not b.conn.closed
        }
        edges = []
        for wait in await self.store.lock_waits(list(pids)):
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
        if xid.format_id != FORMAT_ID or xid.bqual != self.config.id:
            return ""
        return xid.gtrid

    @property
    def open_branches(self) -> int:
        return len(self._branches)

    # -- housekeeping ---------------------------------------------------------------

    async def reap_idle_branches(self) -> None:
        """Roll back interactive branches whose coordinator went quiet before Prepare."""
        period = min(1.0, self.config.idle_branch_timeout / 4)
        while True:
            await self.clock.sleep(period)
            deadline = self.clock.monotonic() - self.config.idle_branch_timeout
            for branch in list(self._branches.values()):
                if branch.last_used < deadline and not branch.lock.locked():
                    async with branch.lock:
                        if branch.state is BranchState.ACTIVE and branch.last_used < deadline:
                            await self._close(branch, BranchState.ABORTED, "idle branch timeout")
                            self.counters["idle_branches_rolled_back"] += 1
                            self.log.info("idle_branch_rolled_back", txid=branch.transaction_id)

    async def close(self) -> None:
        for branch in list(self._branches.values()):
            if branch.conn is not None:
                await self.store.rollback(branch.conn)
                await self.store.release(branch.conn)
                branch.conn = None
        self._branches.clear()
