"""Running a transaction to its outcome: one-shot Run, and the commit of any
transaction (the interactive ones' Commit ends here too).

Guarantees:
- admission control (`coordinator.admission`): at most `max_in_flight` transactions
  in flight at once; beyond it a new one waits its turn (a bounded queue, a bounded
  wait) before any of its work is done, or is refused with a hint of when to retry;
- idempotency keys: a retry of a keyed Run joins the live transaction or returns the
  logged outcome; the key is in memory until its record is durable;
- a one-shot deadlock victim is run again, up to `deadlock_retries` times, and its
  client gets the last run's outcome;
- an error before the decision aborts the transaction; an error after it only ever
  moves it forward.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import replace

from coordinator.admission import Admission
from coordinator.log_records import LogFailed, LogRecord, LogState
from coordinator.memory import Memory, Outcome, Part, Tx
from coordinator.phase2 import Phase2
from coordinator.protocol import AbortCause, TxEvent, TxState, transition
from coordinator.voting import Voting
from twopc_common import failpoints
from twopc_common.errors import AlreadyExists, InvalidArgument, Unavailable
from twopc_common.isolation import Isolation
from twopc_common.values import Statement


class Runner(Part):
    """One-shot transactions, and the prepare-to-answer path of every commit."""

    def __init__(self, memory: Memory, phase2: Phase2, voting: Voting) -> None:
        super().__init__(memory)
        self.phase2 = phase2
        self.voting = voting
        self.admission = Admission(memory)

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
            joined = await self._join(key, request_hash, owner, wait)
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

    async def _join(
        self, key: str, request_hash: str | None, owner: str | None, wait: bool
    ) -> Tx | Outcome:
        """A new transaction under `key`, or the outcome of the one that already ran
        under it (still in memory, or in the log)."""
        if len(key.encode()) > self.config.limits.max_idempotency_key_bytes:
            raise InvalidArgument(
                f"idempotency key longer than {self.config.limits.max_idempotency_key_bytes} bytes"
            )
        joined = self.memory.keys.get(key)
        if joined is not None:
            if joined.request_hash != request_hash:
                raise AlreadyExists(f"idempotency key {key!r} was used for another request")
            self.counters["idempotent_replays"] += 1
            return await self.answer(joined, wait)
        tx = self.memory.new_tx()
        tx.key, tx.request_hash, tx.owner = key, request_hash, owner
        self.memory.keys[key] = tx
        record = await self.decision_log.by_key(key)
        if record is None:
            return tx
        return _replay(self.memory, tx, key, request_hash, record)

    async def answer(self, tx: Tx, wait: bool, follow: bool = True) -> Outcome:
        """The outcome of `tx`: with `follow`, of the last of its deadlock retries."""
        outcome = await asyncio.shield(tx.outcome)
        while follow and tx.successor is not None:
            tx = tx.successor
            outcome = await asyncio.shield(tx.outcome)
        if wait and not outcome.completed:
            await tx.completed.wait()
            outcome = replace(outcome, completed=True)
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
            return await self.answer(tx, wait, follow=False)
        try:
            await failpoints.hit("coordinator.before_prepare")
            if len(participants) == 1:
                await self.voting.one_phase(tx, participants[0], work[participants[0]])
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
        return await self.answer(tx, wait, follow=False)


def _replay(
    memory: Memory, tx: Tx, key: str, request_hash: str | None, record: LogRecord
) -> Outcome:
    """The logged outcome of `key`'s transaction, for a retry that found it in the
    log. `tx`, registered under the key meanwhile (later retries may be waiting
    on it), is forgotten and answers the same."""
    memory.forget(tx)
    if record.request_hash != request_hash:
        error = AlreadyExists(f"idempotency key {key!r} was used for another request")
        tx.outcome.set_exception(error)
        tx.outcome.exception()  # retrieved: waiters re-raise it themselves
        raise error
    if record.state is LogState.ONE_PHASE:
        unresolved = Unavailable(
            f"the outcome of {record.transaction_id} (key {key!r}) is being "
            "resolved after a restart; retry"
        )
        tx.outcome.set_exception(unresolved)
        tx.outcome.exception()
        raise unresolved
    outcome = Outcome.from_record(record)
    tx.outcome.set_result(outcome)
    memory.counters["idempotent_replays"] += 1
    return outcome
