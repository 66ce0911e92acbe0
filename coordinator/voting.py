"""Phase 1 of the coordinator's engine: prepare and decide.

Guarantees:
- the decision is taken on the votes `coordinator.vote_collection` gathered (every
  vote in, the first NO, the prepare timeout, or an interruption), by
  `coordinator.protocol.decide`, and a COMMIT whose answer would exceed
  `max_result_bytes` becomes an ABORT (`coordinator.protocol.bound_results`);
- a COMMIT decision is durable in the decision log before any Commit is sent, and
  after it is logged no error turns it into an abort;
- a keyed abort is durable before its outcome is announced.

A single branch commits in one phase instead: `coordinator.one_phase`.
"""

from __future__ import annotations

from collections.abc import Mapping

from coordinator.memory import BranchResults, Memory, Outcome, Part, Tx
from coordinator.phase2 import Phase2
from coordinator.protocol import (
    AbortCause,
    Decision,
    TxEvent,
    bound_results,
    decide,
    transition,
)
from coordinator.vote_collection import VoteCollector
from twopc_common import failpoints
from twopc_common.values import Statement, result_bytes


class Voting(Part):
    """Votes collected, the decision taken and logged, phase 2 started."""

    def __init__(self, memory: Memory, phase2: Phase2) -> None:
        super().__init__(memory)
        self.phase2 = phase2
        self.collector = VoteCollector(memory)

    async def fail_fast(self, tx: Tx, culprit: str, reason: str) -> None:
        """Abort before anything is sent: a participant is down."""
        if tx.key is not None:
            await self._record_keyed_abort(
                tx, tuple(tx.participants), AbortCause.PARTICIPANT_UNAVAILABLE, culprit, reason
            )
        opened = tuple(p for p in tx.participants if p in tx.incarnations)  # interactive
        self.phase2.abort(tx, AbortCause.PARTICIPANT_UNAVAILABLE, culprit, reason, opened)

    async def two_phase(self, tx: Tx, work: Mapping[str, tuple[Statement, ...]]) -> None:
        participants = tuple(work)
        decision, results = await self._decide(tx, work)
        await failpoints.hit("coordinator.after_votes_before_decision")
        if not decision.commit:
            assert decision.cause is not None
            if tx.key is not None and not (
                decision.cause is AbortCause.DEADLOCK and tx.retries_left > 0
            ):
                # Durable before the outcome is announced: once the aborts are
                # delivered the key leaves memory, and a retry must then find it here.
                # (A deadlock victim about to be retried hands its key on instead.)
                await self._record_keyed_abort(
                    tx, participants, decision.cause, decision.culprit, decision.reason
                )
            self.phase2.abort(
                tx, decision.cause, decision.culprit, decision.reason, decision.phase2, results
            )
            return
        outcome = Outcome(tx.id, True, results=results)
        if not decision.phase2:  # every vote READ_ONLY: nothing to commit anywhere
            self.counters["committed_read_only"] += 1
            await self.phase2.complete_without_phase2(tx, outcome)
            return
        await self.decision_log.record_commit(
            tx.id,
            decision.phase2,
            tx.created,
            outcome.to_json(),
            tx.key,
            tx.request_hash,
            owner=tx.owner,
        )
        # The point of no return: from here on the only way is forward. No error or
        # cancellation may turn a durable COMMIT into an abort (see
        # `coordinator.running.Runner.finish`).
        tx.state = transition(tx.state, TxEvent.COMMIT_LOGGED)
        tx.phase2 = decision.phase2
        try:
            await failpoints.hit("coordinator.after_decision_logged")
        except Exception as exc:
            self.log.error("error_after_decision", txid=tx.id, error=repr(exc))
        self.phase2.commit_decided(tx, outcome)

    async def _decide(
        self, tx: Tx, work: Mapping[str, tuple[Statement, ...]]
    ) -> tuple[Decision, BranchResults]:
        """The decision on the votes, and the read results the answer carries."""
        ballots, results = await self.collector.collect(tx, work)
        sizes = {p: sum(map(result_bytes, r)) for p, r in results}
        limit = self.config.limits.max_result_bytes
        decision = bound_results(decide(tuple(work), ballots, tx.interruption), sizes, limit)
        if sum(sizes.values()) > limit:
            results = ()  # an abort's answer must be deliverable too
        return decision, results

    async def _record_keyed_abort(
        self, tx: Tx, participants: tuple[str, ...], cause: AbortCause, culprit: str, reason: str
    ) -> None:
        """For a retry of the key to find once the transaction has left memory."""
        assert tx.key is not None
        aborted = Outcome(tx.id, False, cause, culprit, reason)
        await self.decision_log.record_abort(
            tx.id,
            participants,
            tx.created,
            aborted.to_json(),
            tx.key,
            tx.request_hash or "",
            owner=tx.owner,
        )
