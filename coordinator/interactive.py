"""Interactive transactions: Begin, Execute, Commit, Rollback, and the reaper of
idle and overlived ones.

Guarantees:
- an Execute runs on a branch of the transaction (`coordinator.branches`: bound to
  the agent incarnation that opened it; a failed Execute aborts the transaction);
- Commit and Rollback after the transaction ended answer its outcome, not NOT_FOUND;
- no interactive transaction outlives `transaction_max_lifetime`, nor stays idle longer
  than `transaction_idle_timeout`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from coordinator.branches import Branches
from coordinator.memory import Memory, Outcome, Part, Tx
from coordinator.phase2 import Phase2
from coordinator.protocol import AbortCause, TxState
from coordinator.running import Runner
from twopc_common.errors import Aborted, FailedPrecondition, NotFound
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
        self.branches = Branches(memory, phase2)

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
        if (decided := self._decided(txid)) is not None:
            # Ended (rolled back by a timeout, say), or its decision still being
            # delivered: say so, not NOT_FOUND or FAILED_PRECONDITION.
            if decided.committed:
                raise FailedPrecondition(f"transaction {txid} has committed")
            raise Aborted(
                f"transaction {txid} has aborted: {decided.reason}",
                cause=decided.cause.value if decided.cause else "",
            )
        return await self.branches.execute(self._live_tx(txid), participant, statements)

    def _decided(self, txid: str) -> Outcome | None:
        """The outcome of a transaction decided already: ended (`recent`), or still in
        memory while phase 2 is delivered; None while it is undecided or unknown."""
        if (recent := self.memory.recent.get(txid)) is not None:
            return recent
        tx = self.memory.live.get(txid)
        return tx.outcome.result() if tx is not None and tx.outcome.done() else None

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
                return await tx.answer(wait)
            return await self.runner.finish(tx, {p: () for p in enlisted}, wait)

    async def _settled(self, txid: str, wait: bool) -> Outcome | None:
        """The answer to a Commit of a transaction no longer active (a repeated
        Commit, or after an abort); None while it is."""
        if (recent := self.memory.recent.get(txid)) is not None:
            return recent
        tx = self._live_tx(txid)
        if tx.state is not TxState.ACTIVE:
            return await tx.answer(wait)
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
