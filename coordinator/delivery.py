"""A decision delivered to one participant: the part of phase 2 that talks to an agent.

Guarantees:
- a COMMIT is sent until the participant answers (an error is retried): acknowledged,
  or the other final state that an operator's heuristic decision put the branch in
  (`coordinator.protocol.delivered`), which is reported as a heuristic hazard;
- an ABORT is sent `abort_attempts` times at most, then left to recovery;
- every wait between attempts follows the one retry policy `config.phase2_retry`.

The transaction's own completion (every participant answered, the log marked, the
transaction forgotten) is `coordinator.phase2`'s.
"""

from __future__ import annotations

import contextlib
import itertools

from coordinator.memory import Part, Tx
from coordinator.protocol import delivered
from twopc_common import failpoints
from twopc_common.phase2_outcome import Phase2Outcome


class Delivery(Part):
    """Commit and Abort to one participant, retried as the decision requires."""

    async def commit(self, tx: Tx, participant: str) -> None:
        """Retried until acknowledged, whatever fails: the COMMIT is durable."""
        client = self.clients[participant]
        for attempt in itertools.count():
            try:
                # Batched with the agent's other commits: COMMIT PREPARED never
                # waits for a lock, so one batch cannot hold up the next.
                outcome = await client.finish(tx.id, True)
            except Exception as exc:
                await self._retry_wait(tx, participant, attempt, exc)
                continue
            if not delivered(True, outcome):
                self._heuristic_hazard(tx, participant, outcome)
            break
        tx.pending.discard(participant)
        if tx.pending:
            with contextlib.suppress(Exception):  # a test hook; an error changes nothing
                await failpoints.hit("coordinator.after_some_commits")

    async def abort(self, tx: Tx, participant: str) -> None:
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
                    await self._retry_wait(tx, participant, attempt, exc)
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

    async def _retry_wait(self, tx: Tx, participant: str, attempt: int, exc: Exception) -> None:
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
