"""Status of the coordinator's transactions: GetTransaction, who owns one, what
is in flight.

Guarantees:
- the answer never contradicts the shards: a live transaction reports its state, a
  logged one its record, and one neither live nor logged is reported only once
  recovery has finished (presumed abort), and never for a later incarnation's id.
"""

from __future__ import annotations

from coordinator.log_records import LogState
from coordinator.memory import Part, TransactionInfo, Tx
from coordinator.protocol import Reported, TxState, reported, reported_without_record
from twopc_common.errors import NotFound, Unavailable
from twopc_common.ids import TransactionId


class Status(Part):
    """Queries about transactions."""

    async def get(self, txid: str) -> TransactionInfo:
        parsed = TransactionId.parse(txid)
        tx = self.memory.live.get(txid)
        if tx is not None:
            return self._info(tx, self.clock.time())
        record = await self.decision_log.get(txid)
        if record is None and (recent := self.memory.recent.get(txid)) is not None:
            # Finished and not logged: an abort (every commit has a record).
            answer = Reported.COMMITTED if recent.committed else Reported.ABORTED
            state = TxState.COMMITTED if recent.committed else TxState.ABORTED
            return TransactionInfo(txid, answer, state)
        if record is not None:
            age = self.clock.time() - record.created_at
            if record.state is LogState.ONE_PHASE:
                return TransactionInfo(
                    txid, Reported.IN_PROGRESS, TxState.PREPARING, record.participants, age
                )
            state = TxState(record.state)
            return TransactionInfo(
                txid, reported(state), state, record.participants, age, owner=record.owner
            )
        if parsed.coordinator != self.id:
            raise NotFound(f"transaction {txid} belongs to coordinator {parsed.coordinator}")
        if not self.memory.recovered:
            raise Unavailable("recovery has not finished; ask again")
        if parsed.epoch > self.decision_log.epoch:
            # A later incarnation issued it: with a shared log that is another process
            # of this id that took over from this one, and only it may answer (an
            # UNKNOWN from here would have the participant roll back its branch).
            raise Unavailable(
                f"transaction {txid} is of epoch {parsed.epoch}, later than this "
                f"process's {self.decision_log.epoch}: ask the active coordinator {self.id}"
            )
        answer = reported_without_record(
            await self.decision_log.epoch_started(parsed.epoch), self.decision_log.pruned_before
        )
        return TransactionInfo(txid, answer, None)

    def _info(self, tx: Tx, now: float) -> TransactionInfo:
        return TransactionInfo(
            tx.id,
            reported(tx.state),
            tx.state,
            tuple(tx.participants),
            now - tx.created,
            tuple(sorted(tx.pending)),
            tx.owner,
        )

    async def owner_of(self, txid: str) -> str | None:
        """The client that began `txid`, if known: live, or named by its log record."""
        tx = self.memory.live.get(txid)
        if tx is not None:
            return tx.owner
        record = await self.decision_log.get(txid)
        return record.owner if record is not None else None

    def in_flight(self) -> list[TransactionInfo]:
        now = self.clock.time()
        return [self._info(tx, now) for tx in self.memory.live.values()]
