"""Phase 2 of the coordinator's engine: announcing a decision and delivering it.

Guarantees:
- a COMMIT is delivered to every one of its participants until each answered
  (`coordinator.delivery`: acknowledged, or a heuristic hazard, reported); only then
  is it marked complete in the log and the transaction forgotten;
- an ABORT is delivered best effort, `abort_attempts` times at most: under presumed
  abort the participants' own recovery and the in-doubt scan end what it does not;
- every log write that must happen after a decision is retried until it does, and
  waits between attempts as every delivery does: the one retry policy
  `config.phase2_retry`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import replace

from coordinator.delivery import Delivery
from coordinator.memory import BranchResults, Memory, Outcome, Part, Tx
from coordinator.protocol import AbortCause, TxEvent, transition
from twopc_common import failpoints


class Phase2(Part):
    """Decisions announced, and each transaction's phase 2 to its completion."""

    def __init__(self, memory: Memory) -> None:
        super().__init__(memory)
        self.delivery = Delivery(memory)

    def commit_decided(self, tx: Tx, outcome: Outcome) -> None:
        """Announce a durable COMMIT and start phase 2."""
        tx.outcome.set_result(outcome)
        self.memory.spawn(self.deliver(tx, tx.phase2, commit=True))
        self.counters["committed_two_phase"] += 1
        self.log.debug(
            "decided", txid=tx.id, key=tx.key, decision="commit", participants=",".join(tx.phase2)
        )

    async def complete_without_phase2(self, tx: Tx, outcome: Outcome, logged: bool = False) -> None:
        """Committed with nothing left to deliver: every branch read-only, none at all,
        or (`logged`) a one-phase commit whose record is resolved already."""
        if not logged and tx.key is not None:
            # The key's record is durable before the answer, for a retry to find.
            await self.decision_log.record_commit(
                tx.id,
                tuple(tx.participants),
                tx.created,
                outcome.to_json(),
                tx.key,
                tx.request_hash,
                completed=True,
                owner=tx.owner,
            )
            logged = True
        tx.state = transition(tx.state, TxEvent.COMMITTED_AT_ONCE)
        tx.outcome.set_result(replace(outcome, completed=True))
        tx.completed.set()
        if logged:
            self.memory.forget(tx)
        else:
            self.memory.spawn(self._record_read_only(tx, outcome))

    async def _record_read_only(self, tx: Tx, outcome: Outcome) -> None:
        """So that GetTransaction keeps saying committed once it left memory. Not
        forced: nothing was applied anywhere, so if a crash loses the record, the
        answer it falls back to (UNKNOWN: applied nowhere) is still true."""
        await self.retry(
            lambda _: self.decision_log.record_commit(
                tx.id,
                tuple(tx.participants),
                tx.created,
                outcome.to_json(),
                completed=True,
                forced=False,
                owner=tx.owner,
            ),
            tx,
            "record_read_only",
        )
        self.memory.forget(tx)

    def abort(
        self,
        tx: Tx,
        cause: AbortCause,
        culprit: str,
        reason: str,
        phase2: tuple[str, ...],
        results: BranchResults = (),
    ) -> Outcome:
        """Decide ABORT (no record needed) and start telling `phase2`. A one-shot deadlock
        victim with retries left gets a successor first, which takes over its key."""
        tx.state = transition(tx.state, TxEvent.ABORT)
        if cause is AbortCause.DEADLOCK and tx.retries_left > 0 and self.memory.stopped is None:
            tx.successor = self.memory.successor(tx)
            self.counters["deadlock_retries"] += 1
        outcome = Outcome(tx.id, False, cause, culprit, reason, results)
        tx.outcome.set_result(outcome)
        self.counters[f"aborted_{cause.value}"] += 1
        self.log.info(
            "decided",
            txid=tx.id,
            key=tx.key,
            decision="abort",
            cause=cause.value,
            culprit=culprit,
            reason=reason,
        )
        self.memory.spawn(self.deliver(tx, phase2, commit=False))
        return outcome

    async def deliver(self, tx: Tx, participants: tuple[str, ...], commit: bool) -> None:
        """The decision to every one of `participants`, then the transaction completes:
        a commit marked complete in the log, and the transaction forgotten."""
        tx.pending = set(participants)
        deliver_one = self.delivery.commit if commit else self.delivery.abort
        await asyncio.gather(*(deliver_one(tx, p) for p in participants))
        if commit:
            await self.retry(self._mark_complete, tx, "mark_complete")
        tx.state = transition(tx.state, TxEvent.ACKNOWLEDGED)
        tx.completed.set()
        self.memory.forget(tx)
        self.log.debug("completed", txid=tx.id, outcome="committed" if commit else "aborted")

    async def _mark_complete(self, tx: Tx) -> None:
        await failpoints.hit("coordinator.before_mark_complete")
        await self.decision_log.mark_complete(tx.id)

    async def retry(self, step: Callable[[Tx], Awaitable[None]], tx: Tx, what: str) -> None:
        """Run a step that must happen (a log write after the decision) until it does."""
        for attempt in itertools.count():
            try:
                await step(tx)
                return
            except Exception as exc:
                self.log.error("retrying", txid=tx.id, step=what, error=repr(exc))
                await self.clock.sleep(self.config.phase2_retry.delay(attempt))
