"""Running a transaction to its outcome: one-shot Run, and the commit of any
transaction (the interactive ones' Commit ends here too).

Guarantees:
- admission control (`coordinator.admission`): at most `max_in_flight` transactions
  in flight at once; beyond it a new one waits its turn (a bounded queue, a bounded
  wait) before any of its work is done, or is refused with a hint of when to retry;
- idempotency keys (`coordinator.idempotency`): a retry of a keyed Run joins the live
  transaction or returns the logged outcome;
- a one-shot deadlock victim is run again, up to `deadlock_retries` times, and its
  client gets the last run's outcome;
- a single branch commits in one phase (`coordinator.one_phase`), more than one in two
  (`coordinator.voting`);
- an error before the decision aborts the transaction; an error after it only ever
  moves it forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from coordinator.admission import Admission
from coordinator.idempotency import IdempotencyKeys
from coordinator.log_records import LogFailed
from coordinator.memory import Memory, Outcome, Part, Tx
from coordinator.one_phase import OnePhase
from coordinator.phase2 import Phase2
from coordinator.protocol import AbortCause, TxEvent, TxState, transition
from coordinator.voting import Voting
from twopc_common import failpoints
from twopc_common.errors import Unavailable
from twopc_common.isolation import Isolation
from twopc_common.values import Statement


class Runner(Part):
    """One-shot transactions, and the prepare-to-answer path of every commit."""

    def __init__(self, memory: Memory, phase2: Phase2, voting: Voting, one_phase: OnePhase) -> None:
        super().__init__(memory)
        self.phase2 = phase2
        self.voting = voting
        self.one_phase = one_phase
        self.admission = Admission(memory)
        self.keys = IdempotencyKeys(memory)

    async def run(
        self,
        branches: Sequence[tuple[str, Sequence[Statement]]],
        key: str | None = None,
        request_hash: str | None = None,
        wait: bool = False,
        owner: str | None = None,
        isolation: Isolation = Isolation.READ_COMMITTED,
        *,
        patience: float | None = None,
    ) -> Outcome:
        self.memory.check_branches(branches)
        async with self.admission.slot(patience):
            return await self._run_admitted(branches, key, request_hash, wait, owner, isolation)

    async def _run_admitted(
        self,
        branches: Sequence[tuple[str, Sequence[Statement]]],
        key: str | None,
        request_hash: str | None,
        wait: bool,
        owner: str | None,
        isolation: Isolation,
    ) -> Outcome:
        if key is None:
            tx = self.memory.new_tx()
            tx.owner = owner
        else:
            joined = await self.keys.join(key, request_hash, owner, wait)
            if isinstance(joined, Outcome):
                return joined
            tx = joined
        work = {p: tuple(s) for p, s in branches}
        tx.isolation = isolation
        # Only a two-phase victim is run again here: a one-phase branch's intent is
        # logged under its key before it runs, and PostgreSQL's own deadlock victim
        # (40P01) on a single shard is the client's to retry.
        tx.retries_left = self.config.deadlock_retries if len(work) > 1 else 0
        outcome = await self.finish(tx, work, wait)
        while tx.successor is not None:
            # A deadlock victim: its work is all here, so run it again as a new
            # transaction (after a short random pause, so that the survivors of the
            # cycle get ahead) rather than hand the client an abort to retry.
            tx = tx.successor
            await self.clock.sleep(self.memory.rng.uniform(0, self.config.deadlock_interval))
            outcome = await self.finish(tx, work, wait)
        return outcome

    async def finish(
        self, tx: Tx, work: Mapping[str, tuple[Statement, ...]], wait: bool
    ) -> Outcome:
        """Prepare, decide, log, start phase 2; answer once the decision is durable.
        The caller holds an admission slot (`Admission.slot`)."""
        participants = tuple(work)
        tx.participants = list(participants)
        tx.state = transition(tx.state, TxEvent.PREPARE)
        tx.work_started = self.clock.monotonic()
        if (down := self.memory.down(participants)) is not None:
            await self.voting.fail_fast(tx, *down)
            return await tx.answer(wait, follow=False)
        try:
            await failpoints.hit("coordinator.before_prepare")
            if len(participants) == 1:
                await self.one_phase.commit(tx, participants[0], work[participants[0]])
            else:
                await self.voting.two_phase(tx, work)
        except Exception as exc:
            if tx.outcome.done():
                # Decided (and, for a commit, durable) before the error: only forward.
                self.log.error("error_after_decision", txid=tx.id, error=repr(exc))
            elif tx.state is TxState.COMMITTING:
                self.log.error("error_after_decision", txid=tx.id, error=repr(exc))
                self.phase2.commit_decided(tx, Outcome(tx.id, True))
            else:
                # Nothing is decided unless the outcome is set: presumed abort covers it.
                self.phase2.abort(
                    tx,
                    AbortCause.COORDINATOR_RESTART,
                    "",
                    f"coordinator error: {exc!r}",
                    tuple(tx.participants),
                )
                if isinstance(exc, LogFailed):
                    raise Unavailable(f"transaction {tx.id} aborted: {exc}") from exc
                raise
        return await tx.answer(wait, follow=False)
