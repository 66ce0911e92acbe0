"""What the client library (`coordinator.client`) answers with: a transaction's
`Outcome` and its `TransactionStatus`, and the abort causes after which the same work
may commit if run again (`RETRYABLE_CAUSES`).

They live apart from the client so that the Coordinator service's one protobuf
mapping, `coordinator.wire`, builds them without importing the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from twopc_common.values import StatementResult

# Abort causes after which running the same work again can succeed: the transaction
# lost a conflict with another one, nothing of it was applied, and the conflict is
# over once the other transaction finished. The one list the library consults.
RETRYABLE_CAUSES: frozenset[str] = frozenset(
    {
        # PostgreSQL found that the branch could not be serialized with a concurrent
        # transaction (40001, REPEATABLE READ or SERIALIZABLE): its documented remedy
        # is to run the transaction again.
        "SERIALIZATION_FAILURE",
        # A victim of a deadlock: cross-shard (the coordinator's detector chose it;
        # one-shot Runs are already run again by the coordinator a few times) or on
        # one shard (PostgreSQL's 40P01). The survivor has gone ahead.
        "DEADLOCK",
        # A statement waited the agent's lock timeout for a row lock: contention (or
        # a deadlock the detector could not see, e.g. through an outside session).
        # Retried with backoff, bounded: a lock held for good makes every attempt fail.
        "LOCK_TIMEOUT",
    }
)
# Not retryable: VOTE_NO and EXECUTE_FAILED (the work itself failed: an error, a
# broken expectation such as too little money; the same work fails again),
# CLIENT_ROLLBACK, TRANSACTION_TIMEOUT (the client was too slow), PREPARE_TIMEOUT and
# PARTICIPANT_UNAVAILABLE (a shard slow, down or cut off: the application decides
# whether to wait, rather than a loop adding load to a struggling shard), and
# COORDINATOR_RESTART (also the cause of internal errors).


@dataclass(frozen=True, slots=True)
class Outcome:
    transaction_id: str
    committed: bool
    abort_cause: str = ""
    abort_participant: str = ""
    abort_reason: str = ""
    results: Mapping[str, tuple[StatementResult, ...]] | None = None
    one_phase: bool = False
    completed: bool = False

    @property
    def retryable(self) -> bool:
        """Aborted because it lost a conflict (`RETRYABLE_CAUSES`): the same work may
        commit if run again. Never true of a committed outcome."""
        return not self.committed and self.abort_cause in RETRYABLE_CAUSES


@dataclass(frozen=True, slots=True)
class TransactionStatus:
    transaction_id: str
    outcome: str  # committed | aborted | in_progress | unknown
    state: str
    participants: tuple[str, ...]
    age_seconds: float
    pending_acks: tuple[str, ...]
