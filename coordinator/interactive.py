"""Interactive transactions: Begin, Execute, Commit, Rollback, and the reaper of
idle and overlived ones.

Guarantees:
- a transaction's branch is bound to the agent incarnation that opened it: a restart
  of the agent between two Executes aborts the transaction;
- a failed Execute aborts the whole transaction, and says why;
- Commit and Rollback after the transaction ended answer its outcome, not NOT_FOUND;
- no interactive transaction outlives `transaction_max_lifetime`, nor stays idle longer
  than `transaction_idle_timeout`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from coordinator.memory import Memory, Outcome, Part, Tx
from coordinator.phase2 import Phase2
from coordinator.protocol import AbortCause, TxState, cause_of_failure
from coordinator.running import Runner
from twopc_common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from twopc_common.ids import TransactionId
from twopc_common.isolation import Isolation
from twopc_common.values import Statement, StatementResult


class IdleReaper(Part):
    """No interactive transaction outlives `transaction_max_lifetime`, nor stays idle
    longer than `transaction_idle_timeout`: the reaper rolls it back."""

    phase2: Phase2

    async def reap_idle_transactions(self) -> None:
        """Roll back interactive transactions idle too long or alive too long."""
        period = min(1.0, self.config.transaction_idle_timeout / 4)
        while True:
            await self.clock.sleep(period)
            now = self.clock.monotonic()
            for tx in list(self.memory.live.values()):
                if tx.state is not TxState.ACTIVE:
                    continue
                if now - tx.started > self.config.transaction_max_lifetime:
                    self.phase2.abort(
                        tx,
                        AbortCause.LIFETIME_EXCEEDED,
                        "",
                        f"interactive transaction older than {self.config.transaction_max_lifetime}"
                        " s (--transaction-max-lifetime)",
                        tuple(tx.participants),
                    )
                elif not tx.busy and now - tx.last_used > self.config.transaction_idle_timeout:
                    self.phase2.abort(
                        tx,
                        AbortCause.IDLE_TIMEOUT,
                        "",
                        "interactive transaction idle",
                        tuple(tx.participants),
                    )


class Interactive(IdleReaper):
    """The interactive transactions' calls."""

    def __init__(self, memory: Memory, phase2: Phase2, runner: Runner) -> None:
        super().__init__(memory)
        self.phase2 = phase2
        self.runner = runner

    def begin(
        self, owner: str | None = None, isolation: Isolation = Isolation.READ_COMMITTED
    ) -> str:
        tx = self.memory.new_tx()
        tx.owner = owner
        tx.isolation = isolation
        return tx.id

    def _live_tx(self, txid: str) -> Tx:
        TransactionId.parse(txid)
        tx = self.memory.live.get(txid)
        if tx is None:
            raise NotFound(f"no live transaction {txid} (unknown, or already finished)")
        return tx

    async def execute(
        self, txid: str, participant: str, statements: Sequence[Statement]
    ) -> list[StatementResult]:
        if (recent := self.memory.recent.get(txid)) is not None:
            # Ended already (rolled back by a timeout, say): say so, not NOT_FOUND.
            if recent.committed:
                raise FailedPrecondition(f"transaction {txid} has committed")
            raise Aborted(f"transaction {txid} has aborted: {recent.reason}")
        tx = self._live_tx(txid)
        client = self.memory.client(participant)
        if not statements:
            raise InvalidArgument("Execute needs at least one statement")
        if tx.state is not TxState.ACTIVE:
            raise FailedPrecondition(f"transaction {txid} is {tx.state.value}")
        if (down := self.memory.down([participant])) is not None:
            self.phase2.abort(
                tx, AbortCause.PARTICIPANT_UNAVAILABLE, participant, down[1], tuple(tx.participants)
            )
            raise Aborted(f"transaction {txid} aborted: {down[1]}")
        if participant not in tx.participants:
            if len(tx.participants) >= self.config.limits.max_branches:
                raise InvalidArgument(f"the limit is {self.config.limits.max_branches} branches")
            tx.participants.append(participant)
        tx.busy += 1
        tx.work_started = self.clock.monotonic()
        try:
            results, incarnation = await client.execute(
                txid, statements, tx.incarnations.get(participant, ""), tx.isolation
            )
            opened = tx.incarnations.setdefault(participant, incarnation)
            if opened != incarnation:  # two first Executes, and a restart between them
                raise Aborted(
                    f"agent {participant} restarted during the transaction "
                    f"(incarnation {opened}, then {incarnation})"
                )
            return results
        except (Aborted, Unavailable, FailedPrecondition) as exc:
            if tx.outcome.done() and not tx.outcome.result().committed:
                # Aborted meanwhile (a deadlock victim, a timeout): that is the reason.
                ended = tx.outcome.result()
                raise Aborted(
                    f"transaction {txid} aborted: {ended.reason}",
                    cause=ended.cause.value if ended.cause else "",
                ) from exc
            cause = AbortCause.EXECUTE_FAILED
            if isinstance(exc, Unavailable):
                cause = AbortCause.PARTICIPANT_UNAVAILABLE
            elif isinstance(exc, Aborted):
                cause = cause_of_failure(exc.sqlstate, cause)
            if tx.state is TxState.ACTIVE:
                self.phase2.abort(tx, cause, participant, str(exc), tuple(tx.participants))
            raise Aborted(f"transaction {txid} aborted: {exc}", cause=cause.value) from exc
        finally:
            tx.busy -= 1
            tx.last_used = self.clock.monotonic()

    async def commit(self, txid: str, wait: bool, *, patience: float | None = None) -> Outcome:
        if (answered := await self._settled(txid, wait)) is not None:
            return answered
        async with self.runner.admission.slot(patience):
            # Asked again: another Commit, a Rollback or the reaper may have come while
            # this one waited for its turn.
            if (answered := await self._settled(txid, wait)) is not None:
                return answered
            tx = self._live_tx(txid)
            if tx.busy:
                raise FailedPrecondition(f"transaction {txid} has an Execute in progress")
            # A participant whose every Execute was refused before it ran holds no branch.
            enlisted = [p for p in tx.participants if p in tx.incarnations]
            if not enlisted:
                outcome = Outcome(tx.id, True, one_phase=True)
                await self.phase2.complete_without_phase2(tx, outcome)
                return await self.runner.answer(tx, wait)
            return await self.runner.finish(tx, {p: () for p in enlisted}, wait)

    async def _settled(self, txid: str, wait: bool) -> Outcome | None:
        """The answer to a Commit of a transaction no longer active (a repeated
        Commit, or after an abort); None while it is."""
        if (recent := self.memory.recent.get(txid)) is not None:
            return recent
        tx = self._live_tx(txid)
        if tx.state is not TxState.ACTIVE:
            return await self.runner.answer(tx, wait)
        return None

    async def rollback(self, txid: str) -> Outcome:
        if (recent := self.memory.recent.get(txid)) is not None:
            if recent.committed:
                raise FailedPrecondition(f"transaction {txid} has committed")
            return recent
        tx = self._live_tx(txid)
        if tx.state is TxState.ACTIVE:
            return self.phase2.abort(
                tx,
                AbortCause.CLIENT_ROLLBACK,
                "",
                "rolled back by the client",
                tuple(tx.participants),
            )
        outcome = await asyncio.shield(tx.outcome)
        if outcome.committed:
            raise FailedPrecondition(f"transaction {txid} has committed")
        return outcome
