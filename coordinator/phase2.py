"""Phase 2 of the coordinator's engine: announcing a decision and delivering it.

Guarantees:
- a COMMIT is delivered to each of its participants until it answers (an error is
  retried): acknowledged, or the other final state that an operator's heuristic
  decision put the branch in (`coordinator.protocol.delivered`: a heuristic hazard,
  reported); only then is it marked complete in the log and the transaction forgotten;
- an ABORT is delivered best effort, `abort_attempts` times at most: under presumed
  abort the participants' own recovery and the in-doubt scan end what it does not;
- every wait between attempts, and every log write that must happen after a decision,
  follows the one retry policy `config.phase2_retry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import replace

from coordinator.memory import BranchResults, Outcome, Part, Tx
from coordinator.protocol import AbortCause, TxEvent, delivered, fence_found_commit, transition
from twopc_common import failpoints
from twopc_common.phase2_outcome import Phase2Outcome


class Phase2(Part):
    """Decisions announced, and delivered until they are acknowledged."""

    def commit_decided(self, tx: Tx, outcome: Outcome) -> None:
        """Announce a durable COMMIT and start phase 2."""
        tx.outcome.set_result(outcome)
        self.memory.spawn(self.deliver(tx, tx.phase2, commit=True))
        self.counters["committed_two_phase"] += 1
        self.log.debug(
            "decided", txid=tx.id, key=tx.key, decision="commit", participants=",".join(tx.phase2)
        )

    async def fence_one_phase(self, tx: Tx, participant: str) -> bool:
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
            successor = tx.successor = self.memory.new_tx()
            successor.retries_left = tx.retries_left - 1
            successor.key, successor.request_hash = tx.key, tx.request_hash
            successor.isolation = tx.isolation
            successor.owner = tx.owner
            if tx.key is not None:
                self.memory.keys[tx.key] = successor
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
        tx.pending = set(participants)
        deliver_one = self._deliver_commit if commit else self._deliver_abort
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

    async def _deliver_commit(self, tx: Tx, participant: str) -> None:
        """Retried until acknowledged, whatever fails: the COMMIT is durable."""
        client = self.clients[participant]
        for attempt in itertools.count():
            try:
                # Batched with the agent's other commits: COMMIT PREPARED never
                # waits for a lock, so one batch cannot hold up the next.
                outcome = await client.finish(tx.id, True)
            except Exception as exc:
                await self._phase2_retry_wait(tx, participant, attempt, exc)
                continue
            if not delivered(True, outcome):
                self._heuristic_hazard(tx, participant, outcome)
            break
        tx.pending.discard(participant)
        if tx.pending:
            with contextlib.suppress(Exception):  # a test hook; an error changes nothing
                await failpoints.hit("coordinator.after_some_commits")

    async def _deliver_abort(self, tx: Tx, participant: str) -> None:
        """Best effort, a bounded number of attempts. Under presumed abort an Abort only
        releases locks early: a participant that cannot be reached rolls its branch back
        when its own recovery asks (no record: aborted), and so does this coordinator's
        in-doubt scan once the transaction has left memory. So an unreachable agent
        costs a few attempts per transaction, not a retry loop that never ends."""
        client = self.clients[participant]
        for attempt in range(self.config.abort_attempts):
            try:
                # Alone: the branch may still be open and waiting on a lock, and the
                # agent must interrupt it first.
                outcome = await client.abort(tx.id)
            except Exception as exc:
                if attempt + 1 < self.config.abort_attempts:
                    await self._phase2_retry_wait(tx, participant, attempt, exc)
                    continue
                self.counters["aborts_left_to_recovery"] += 1
                self.log.warning(
                    "abort_left_to_recovery", txid=tx.id, participant=participant, error=str(exc)
                )
                break
            if not delivered(False, outcome):
                self._heuristic_hazard(tx, participant, outcome)
            break
        tx.pending.discard(participant)

    def _heuristic_hazard(self, tx: Tx, participant: str, outcome: Phase2Outcome) -> None:
        """The branch is in the other final state: only an operator's heuristic decision
        can do that, and retrying cannot undo it."""
        self.counters["heuristic_hazards"] += 1
        self.log.error(
            "heuristic_hazard", txid=tx.id, participant=participant, outcome=outcome.value
        )

    async def _phase2_retry_wait(
        self, tx: Tx, participant: str, attempt: int, exc: Exception
    ) -> None:
        self.counters["phase2_retries"] += 1
        if attempt % 10 == 0:
            self.log.warning(
                "phase2_retry",
                txid=tx.id,
                participant=participant,
                attempt=attempt,
                error=str(exc),
            )
        await self.clock.sleep(self.config.phase2_retry.delay(attempt))

    async def retry(self, step: Callable[[Tx], Awaitable[None]], tx: Tx, what: str) -> None:
        """Run a step that must happen (a log write after the decision) until it does."""
        for attempt in itertools.count():
            try:
                await step(tx)
                return
            except Exception as exc:
                self.log.error("retrying", txid=tx.id, step=what, error=repr(exc))
                await self.clock.sleep(self.config.phase2_retry.delay(attempt))
