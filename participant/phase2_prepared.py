"""Phase 2 of prepared branches: COMMIT/ROLLBACK PREPARED for a batch of decisions on
one connection, all in one round trip (`Phase2Store.finish_many`); what PostgreSQL
skipped after a failure goes again one by one.

Guarantees: each decision is answered on its own, with the branch's `Phase2Outcome` or
the error Commit or Abort alone would have raised; the other final state is an answer
and changes nothing here; only a branch finished as decided is remembered (its
tombstone) and counted; a statement that failed is rolled back, so the connection
stays usable for the rest of the batch.
"""

from __future__ import annotations

import collections
from typing import Any

from participant.branch_state import BranchState
from participant.branches import BranchTable
from participant.ports import BranchConn, Phase2Store
from twopc_common import failpoints
from twopc_common.errors import TwoPCError
from twopc_common.log import EventLogger
from twopc_common.phase2_outcome import Phase2Outcome, finished

_PHASE2_FAILPOINTS = {
    True: ("participant.before_commit_prepared", "participant.after_commit_prepared"),
    False: ("participant.before_rollback_prepared", "participant.after_rollback_prepared"),
}


class PreparedPhase2:
    def __init__(
        self,
        participant_id: str,
        table: BranchTable,
        store: Phase2Store[Any],
        counters: collections.Counter[str],
        log: EventLogger,
    ) -> None:
        self._id = participant_id
        self._table = table
        self._store = store
        self._counters = counters
        self._log = log

    async def finish_on(
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
        ran = await self._store.finish_many(conn, list(ready.values()), self._id)
        for (i, (txid, commit)), done in zip(ready.items(), ran, strict=True):
            try:
                outcome = (
                    finished(commit)
                    if done
                    else await self._store.finish_prepared(conn, txid, self._id, commit)
                )
                if outcome.committed is not commit:
                    # The other final state (or, for a Commit, nothing to commit): the
                    # answer, and nothing for this agent to remember or count.
                    self._log.info(
                        "phase2_other_state", txid=txid, commit=commit, outcome=outcome.value
                    )
                    answers[i] = outcome
                    continue
                await failpoints.hit(_PHASE2_FAILPOINTS[commit][1])
            except TwoPCError as exc:
                answers[i] = exc
                continue
            except Exception as exc:
                self._log.error("phase2_failed", txid=txid, commit=commit, error=repr(exc))
                await self._store.rollback(conn)  # leave the connection usable for the rest
                answers[i] = exc
                continue
            answers[i] = outcome
            self._remember(txid, commit, outcome, reason)
        return answers

    def _remember(self, txid: str, commit: bool, outcome: Phase2Outcome, reason: str) -> None:
        """A branch finished as the coordinator decided: its tombstone, counter and log."""
        if commit:
            self._table.remember(txid, BranchState.COMMITTED)
            self._counters["committed" if outcome.changed else "commit_repeats"] += 1
            self._log.debug("committed", txid=txid, changed=outcome.changed)
        else:
            self._table.remember(txid, BranchState.ABORTED, reason)
            self._counters["aborted" if outcome.changed else "abort_repeats"] += 1
            self._log.info("aborted", txid=txid, prepared=outcome.changed, reason=reason)
