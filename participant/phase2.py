"""The agent's phase 2: Commit, Abort and Finish (a batch of decisions), each
answered on its own with the branch's `Phase2Outcome` or the error Commit or Abort
alone would have raised. Here the batch is classified (the pure
`participant.branch_state.plan_phase2`) and open branches are rolled back; prepared
branches are finished by `participant.phase2_prepared`.

Guarantees: a prepared branch is finished only through here (by the coordinator's
word, or by recovery asking it); an Abort of a branch still open interrupts the
statement it waits on and rolls it back; the other final state is an answer, not an
error, and changes nothing here.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any

from participant.branch_state import BranchState, plan_phase2
from participant.branches import Branch, BranchTable
from participant.phase2_prepared import PreparedPhase2
from participant.ports import Phase2Store
from twopc_common.errors import Unavailable
from twopc_common.log import EventLogger
from twopc_common.phase2_outcome import Phase2Outcome


def _unwrap(answer: Phase2Outcome | Exception) -> Phase2Outcome:
    if isinstance(answer, Exception):
        raise answer
    return answer


class Phase2:
    def __init__(
        self,
        participant_id: str,
        table: BranchTable,
        store: Phase2Store[Any],
        counters: collections.Counter[str],
        log: EventLogger,
    ) -> None:
        self._table = table
        self._store = store
        self._counters = counters
        self._log = log
        self._prepared = PreparedPhase2(participant_id, table, store, counters, log)
        self._finishing: dict[tuple[str, bool], asyncio.Future[Phase2Outcome | Exception]] = {}
        """Decisions on prepared branches being carried out: a repeated one (the
        coordinator retrying a Commit that has not answered yet) waits for the first
        instead of taking another connection. A branch stuck in COMMIT PREPARED
        would otherwise take one more at every retry, until the scans that recovery
        and operators rely on found the pool empty."""

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
        plan = plan_phase2(decisions, {t: b.state for t, b in self._table.live.items()})
        answers: dict[int, Phase2Outcome | Exception] = dict(plan.refused)
        still_open = [(i, self._table.live[decisions[i][0]]) for i in plan.still_open]
        prepared = list(plan.prepared)

        async def finish_prepared(indexes: list[int]) -> None:
            joined = {
                i: self._finishing[decisions[i]] for i in indexes if decisions[i] in self._finishing
            }
            mine = [i for i in indexes if i not in joined]
            if mine:
                await self._finish_prepared(decisions, mine, reason, answers)
            for i, first in joined.items():
                answers[i] = await asyncio.shield(first)

        async def abort_open(i: int, branch: Branch) -> None:
            try:
                outcome = await self._abort_open(branch, reason)
            except Exception as exc:
                self._log.error("abort_failed", txid=branch.transaction_id, error=repr(exc))
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

    async def _finish_prepared(
        self,
        decisions: Sequence[tuple[str, bool]],
        indexes: list[int],
        reason: str,
        answers: dict[int, Phase2Outcome | Exception],
    ) -> None:
        """Carry out these decisions on prepared branches, on one pooled connection,
        letting repeats of them wait for their answers (`_finishing`)."""
        loop = asyncio.get_running_loop()
        mine = {decisions[i]: loop.create_future() for i in indexes}
        self._finishing.update(mine)
        try:
            async with self._store.phase2_connection() as conn:
                batch = {i: decisions[i] for i in indexes}
                answers.update(await self._prepared.finish_on(conn, batch, reason))
        except Unavailable as exc:  # no (working) connection for the batch
            for i in indexes:
                answers.setdefault(i, exc)
        finally:
            for i in indexes:
                first = mine[decisions[i]]
                if not first.done():
                    first.set_result(
                        answers.get(i, Unavailable("the first of these decisions was interrupted"))
                    )
                self._finishing.pop(decisions[i], None)

    async def _abort_open(self, branch: Branch, reason: str) -> Phase2Outcome | None:
        """Roll back a branch that is still open; None if it is prepared by now."""
        branch.abort_reason = reason
        if branch.lock.locked() and branch.conn is not None:
            # Interrupt a statement waiting on a lock rather than wait behind it.
            await branch.conn.cancel_safe(timeout=2.0)
        async with branch.lock:
            if branch.state is not BranchState.ACTIVE:
                return None
            await self._table.close(branch, BranchState.ABORTED, reason)
        self._counters["aborted_active"] += 1
        self._log.info("aborted", txid=branch.transaction_id, prepared=False, reason=reason)
        return Phase2Outcome.ROLLED_BACK
