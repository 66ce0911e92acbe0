"""An interactive transaction's branches, opened and extended by Execute.

Guarantees:
- a participant joins the transaction with its first Execute, up to `max_branches`;
  an Execute on a participant marked down aborts the transaction;
- a transaction's branch is bound to the agent incarnation that opened it: a restart
  of the agent between two Executes aborts the transaction;
- a failed Execute aborts the whole transaction, and says why (the reason of an abort
  that came meanwhile, a deadlock or a timeout, if one did).
"""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.memory import Memory, Part, Tx
from coordinator.phase2 import Phase2
from coordinator.protocol import AbortCause, TxState, cause_of_failure
from twopc_common.errors import Aborted, FailedPrecondition, InvalidArgument, Unavailable
from twopc_common.values import Statement, StatementResult


class Branches(Part):
    """Execute on one branch of a live interactive transaction."""

    def __init__(self, memory: Memory, phase2: Phase2) -> None:
        super().__init__(memory)
        self.phase2 = phase2

    async def execute(
        self, tx: Tx, participant: str, statements: Sequence[Statement]
    ) -> list[StatementResult]:
        client = self.memory.client(participant)
        if not statements:
            raise InvalidArgument("Execute needs at least one statement")
        if tx.state is not TxState.ACTIVE:
            raise FailedPrecondition(f"transaction {tx.id} is {tx.state.value}")
        if (down := self.memory.down([participant])) is not None:
            self.phase2.abort(
                tx, AbortCause.PARTICIPANT_UNAVAILABLE, participant, down[1], tuple(tx.participants)
            )
            raise Aborted(f"transaction {tx.id} aborted: {down[1]}")
        if participant not in tx.participants:
            if len(tx.participants) >= self.config.limits.max_branches:
                raise InvalidArgument(f"the limit is {self.config.limits.max_branches} branches")
            tx.participants.append(participant)
        tx.busy += 1
        tx.work_started = self.clock.monotonic()
        try:
            results, incarnation = await client.execute(
                tx.id, statements, tx.incarnations.get(participant, ""), tx.isolation
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
                    f"transaction {tx.id} aborted: {ended.reason}",
                    cause=ended.cause.value if ended.cause else "",
                ) from exc
            cause = AbortCause.EXECUTE_FAILED
            if isinstance(exc, Unavailable):
                cause = AbortCause.PARTICIPANT_UNAVAILABLE
            elif isinstance(exc, Aborted):
                cause = cause_of_failure(exc.sqlstate, cause)
            if tx.state is TxState.ACTIVE:
                self.phase2.abort(tx, cause, participant, str(exc), tuple(tx.participants))
            raise Aborted(f"transaction {tx.id} aborted: {exc}", cause=cause.value) from exc
        finally:
            tx.busy -= 1
            tx.last_used = self.clock.monotonic()
