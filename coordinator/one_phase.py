"""A single branch, committed in one phase (no PREPARE), and its Abort fence.

Guarantees:
- the intent is forced to the log before the branch is sent, so that no transaction
  commits without a record (GetTransaction never has to guess, and a keyed retry
  after a crash finds it);
- an answer that is lost, here or with a previous incarnation (`coordinator.recovery`),
  is settled by an Abort fence, retried until it answers: rolled back means the branch
  did not commit and never will, ALREADY_COMMITTED that it had committed
  (`coordinator.protocol.fence_found_commit`);
- the intent is resolved in the log before the transaction leaves memory.
"""

from __future__ import annotations

import itertools

from coordinator.memory import Memory, Outcome, Part, Tx
from coordinator.participants import PrepareReply
from coordinator.phase2 import Phase2
from coordinator.protocol import (
    Ballot,
    NoVote,
    abort_cause,
    cause_of_failure,
    fence_found_commit,
    one_phase_committed,
)
from twopc_common import failpoints
from twopc_common.values import Statement


class OnePhase(Part):
    """The one-phase commit of a single branch, its fence, and its resolution."""

    def __init__(self, memory: Memory, phase2: Phase2) -> None:
        super().__init__(memory)
        self.phase2 = phase2

    async def commit(self, tx: Tx, participant: str, statements: tuple[Statement, ...]) -> None:
        """Log the intent, send the branch with its commit, settle a lost answer."""
        await self.decision_log.record_one_phase_intent(
            tx.id, participant, tx.created, tx.key, tx.request_hash, owner=tx.owner
        )
        try:
            reply = await self.clients[participant].prepare(
                tx.id,
                statements,
                True,
                self.config.prepare_timeout,
                tx.incarnations.get(participant, ""),
                tx.isolation,
            )
        except Exception as exc:  # it was sent: it may have committed
            reply = PrepareReply(Ballot(NoVote.LOST, f"coordinator error: {exc!r}"))
        try:
            await failpoints.hit("coordinator.after_one_phase_reply")
        except Exception as exc:  # the answer stands: only forward
            self.log.error("error_after_one_phase_reply", txid=tx.id, error=repr(exc))
        ballot = reply.ballot
        results = ((participant, reply.results),) if reply.results else ()
        committed = one_phase_committed(ballot.vote)
        if committed is None:
            committed = await self.fence(tx, participant)
        cause = cause_of_failure(ballot.sqlstate, abort_cause(ballot.vote))
        outcome = (
            Outcome(tx.id, True, results=results, one_phase=True)
            if committed
            else Outcome(tx.id, False, cause, participant, ballot.reason, results, one_phase=True)
        )
        # Resolved before the transaction leaves memory, so that a retry or a
        # GetTransaction finds either the live transaction or its outcome.
        await self.resolve(tx, outcome)
        if committed:
            self.counters["committed_one_phase"] += 1
            self.log.debug("committed_one_phase", txid=tx.id, key=tx.key, participant=participant)
            await self.phase2.complete_without_phase2(tx, outcome, logged=True)
        else:
            self.phase2.abort(tx, cause, participant, ballot.reason, (), results)

    async def fence(self, tx: Tx, participant: str) -> bool:
        """The Abort fence of a one-phase branch: True if it had committed."""
        for attempt in itertools.count():
            try:
                return fence_found_commit(await self.clients[participant].abort(tx.id))
            except Exception as exc:
                self.log.warning(
                    "one_phase_fence_retry", txid=tx.id, participant=participant, error=str(exc)
                )
                await self.clock.sleep(self.config.phase2_retry.delay(attempt))
        raise AssertionError("unreachable")

    async def resolve(self, tx: Tx, outcome: Outcome) -> None:
        """The intent's outcome in the log, retried until it is written."""
        await self.phase2.retry(
            lambda _: self.decision_log.resolve_one_phase(tx.id, outcome.to_json()),
            tx,
            "resolve_one_phase",
        )
