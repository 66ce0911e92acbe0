"""Phase 1 of the coordinator's engine: prepare and decide.

Guarantees:
- prepare goes to every participant in parallel and the decision is taken when every
  vote is in, on the first NO, or when the prepare timeout expires (or a deadlock or a
  participant marked down interrupts it), whichever is first;
- a COMMIT decision is durable in the decision log before any Commit is sent, and
  after it is logged no error turns it into an abort;
- a keyed abort is durable before its outcome is announced.

A single branch commits in one phase instead: `coordinator.one_phase`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from coordinator.memory import BranchResults, Memory, Outcome, Part, Tx
from coordinator.participants import PrepareReply
from coordinator.phase2 import Phase2
from coordinator.protocol import AbortCause, Ballot, TxEvent, bound_results, decide, transition
from twopc_common import failpoints
from twopc_common.values import Statement, StatementResult, result_bytes
from twopc_common.votes import Vote


class Voting(Part):
    """Votes collected, the decision taken and logged, phase 2 started."""

    def __init__(self, memory: Memory, phase2: Phase2) -> None:
        super().__init__(memory)
        self.phase2 = phase2

    async def fail_fast(self, tx: Tx, culprit: str, reason: str) -> None:
        """Abort before anything is sent: a participant is down."""
        if tx.key is not None:
            aborted = Outcome(tx.id, False, AbortCause.PARTICIPANT_UNAVAILABLE, culprit, reason)
            await self.decision_log.record_abort(
                tx.id,
                tuple(tx.participants),
                tx.created,
                aborted.to_json(),
                tx.key,
                tx.request_hash or "",
                owner=tx.owner,
            )
        opened = tuple(p for p in tx.participants if p in tx.incarnations)  # interactive
        self.phase2.abort(tx, AbortCause.PARTICIPANT_UNAVAILABLE, culprit, reason, opened)

    async def two_phase(self, tx: Tx, work: Mapping[str, tuple[Statement, ...]]) -> None:
        participants = tuple(work)
        ballots, results = await self._collect_votes(tx, work)
        sizes = {p: sum(map(result_bytes, r)) for p, r in results}
        limit = self.config.limits.max_result_bytes
        decision = bound_results(decide(participants, ballots, tx.interruption), sizes, limit)
        if sum(sizes.values()) > limit:
            results = ()  # an abort's answer must be deliverable too
        await failpoints.hit("coordinator.after_votes_before_decision")
        if not decision.commit:
            assert decision.cause is not None
            if tx.key is not None and not (
                decision.cause is AbortCause.DEADLOCK and tx.retries_left > 0
            ):
                # Durable before the outcome is announced: once the aborts are
                # delivered the key leaves memory, and a retry must then find it here.
                # (A deadlock victim about to be retried hands its key on instead.)
                aborted = Outcome(tx.id, False, decision.cause, decision.culprit, decision.reason)
                await self.decision_log.record_abort(
                    tx.id,
                    participants,
                    tx.created,
                    aborted.to_json(),
                    tx.key,
                    tx.request_hash or "",
                    owner=tx.owner,
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

    async def _collect_votes(
        self, tx: Tx, work: Mapping[str, tuple[Statement, ...]]
    ) -> tuple[dict[str, Ballot], BranchResults]:
        timeout = self.config.prepare_timeout
        calls = {
            asyncio.create_task(
                self.clients[p].prepare(
                    tx.id, work[p], False, timeout, tx.incarnations.get(p, ""), tx.isolation
                )
            ): p
            for p in work
        }
        ballots: dict[str, Ballot] = {}
        results: dict[str, tuple[StatementResult, ...]] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending: set[asyncio.Task[PrepareReply]] = set(calls)
        interrupted: asyncio.Future[bool] = asyncio.ensure_future(tx.interrupted.wait())
        try:
            while pending and (remaining := deadline - loop.time()) > 0:
                tx.awaiting = frozenset(calls[t] for t in pending)
                waiting: set[asyncio.Future[Any]] = {*pending, interrupted}
                done, _ = await asyncio.wait(
                    waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in pending & done:
                    reply = task.result()
                    ballots[calls[task]] = reply.ballot
                    results[calls[task]] = reply.results
                pending -= done
                if interrupted.done():
                    break  # a deadlock victim, or a participant went down
                if any(b.vote is Vote.NO for b in ballots.values()):
                    break  # the outcome is known: do not wait for the slow ones
                if pending and ballots:
                    await failpoints.hit("coordinator.after_some_votes")
        finally:
            tx.awaiting = frozenset()
            interrupted.cancel()
            for task in pending:
                task.cancel()
                # A vote missing because the agent cannot be reached says why.
                missing = self.clients[calls[task]].missing_vote()
                if missing is not None:
                    ballots[calls[task]] = missing
        return ballots, tuple((p, results[p]) for p in work if p in results)
