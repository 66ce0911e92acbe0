"""The Coordinator service's one mapping between protobuf and domain types, both
sides of the wire: what the servicer (`coordinator.service`) reads from requests and
writes into replies, in the engine's types (`coordinator.protocol`,
`coordinator.memory`), and what the client library (`coordinator.client`) writes
into requests and reads from replies, in its own (`coordinator.answers`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from coordinator import answers
from coordinator.protocol import AbortCause, Reported, TxState
from twopc_common.isolation import Isolation, isolation_to_pb
from twopc_common.limits import Limits
from twopc_common.values import (
    Statement,
    result_from_pb,
    results_to_pb,
    statement_to_pb,
    statements_from_pb,
)
from twopc_pb import coordinator_pb2 as pb
from twopc_pb import types_pb2

if TYPE_CHECKING:
    # Types of annotations only: the client library, which imports this module,
    # need not load the engine's memory (and, through it, the engine's modules).
    from coordinator.memory import Outcome, TransactionInfo

_CAUSES = {
    AbortCause.VOTE_NO: pb.VOTE_NO,
    AbortCause.PREPARE_TIMEOUT: pb.PREPARE_TIMEOUT,
    AbortCause.PARTICIPANT_UNAVAILABLE: pb.PARTICIPANT_UNAVAILABLE,
    AbortCause.CLIENT_ROLLBACK: pb.CLIENT_ROLLBACK,
    AbortCause.EXECUTE_FAILED: pb.EXECUTE_FAILED,
    AbortCause.COORDINATOR_RESTART: pb.COORDINATOR_RESTART,
    AbortCause.IDLE_TIMEOUT: pb.TRANSACTION_TIMEOUT,
    AbortCause.LIFETIME_EXCEEDED: pb.TRANSACTION_TIMEOUT,
    AbortCause.DEADLOCK: pb.DEADLOCK,
    AbortCause.SERIALIZATION_FAILURE: pb.SERIALIZATION_FAILURE,
    AbortCause.LOCK_TIMEOUT: pb.LOCK_TIMEOUT,
}
_OUTCOMES = {
    Reported.COMMITTED: pb.COMMITTED,
    Reported.ABORTED: pb.ABORTED,
    Reported.IN_PROGRESS: pb.IN_PROGRESS,
    Reported.UNKNOWN: pb.UNKNOWN,
    Reported.FORGOTTEN: pb.FORGOTTEN,
}
_STATES = {
    TxState.ACTIVE: pb.ACTIVE,
    TxState.PREPARING: pb.PREPARING,
    TxState.COMMITTING: pb.COMMITTING,
    TxState.ABORTING: pb.ABORTING,
    TxState.COMMITTED: pb.STATE_COMMITTED,
    TxState.ABORTED: pb.STATE_ABORTED,
}


def outcome_to_pb(outcome: Outcome) -> pb.TransactionOutcome:
    return pb.TransactionOutcome(
        transaction_id=outcome.transaction_id,
        outcome=pb.COMMITTED if outcome.committed else pb.ABORTED,
        abort_cause=_CAUSES[outcome.cause] if outcome.cause else pb.ABORT_CAUSE_UNSPECIFIED,
        abort_participant=outcome.culprit,
        abort_reason=outcome.reason,
        results=[
            types_pb2.BranchResults(participant=p, results=results_to_pb(r))
            for p, r in outcome.results
        ],
        one_phase=outcome.one_phase,
        completed=outcome.completed,
    )


def info_to_pb(info: TransactionInfo) -> pb.TransactionStatus:
    return pb.TransactionStatus(
        transaction_id=info.transaction_id,
        outcome=_OUTCOMES[info.outcome],
        state=_STATES[info.state] if info.state else pb.STATE_UNKNOWN,
        participants=info.participants,
        age_seconds=info.age_seconds,
        pending_acks=info.pending_acks,
    )


def cause_name(cause: str) -> str:
    """An abort cause (`AbortCause` value, or "" for none) by its protobuf name."""
    return pb.AbortCause.Name(_CAUSES[AbortCause(cause)]) if cause else ""


def branches_from_pb(
    request: pb.RunRequest, limits: Limits
) -> list[tuple[str, Sequence[Statement]]]:
    """A Run's branches: (participant, its statements), each checked against `limits`."""
    return [
        (
            b.participant,
            statements_from_pb(b.statements, limits, f"branch {b.participant!r}"),
        )
        for b in request.branches
    ]


def run_request_hash(request: pb.RunRequest, isolation: Isolation) -> str:
    """What a keyed Run's retry must repeat: its branches and its isolation level. The
    same work at another level is another request; READ COMMITTED hashes as the field
    left out, as requests from before the field existed did."""
    canonical = pb.RunRequest(branches=request.branches)
    if isolation is not Isolation.READ_COMMITTED:
        canonical.isolation = request.isolation
    return hashlib.sha256(canonical.SerializeToString(deterministic=True)).hexdigest()


# -- the client library's side -------------------------------------------------------


def run_request_to_pb(
    branches: Mapping[str, Sequence[Statement]],
    key: str | None,
    wait: bool,
    isolation: Isolation,
) -> pb.RunRequest:
    return pb.RunRequest(
        branches=[
            pb.Branch(participant=p, statements=[statement_to_pb(s) for s in stmts])
            for p, stmts in branches.items()
        ],
        idempotency_key=key or "",
        wait_for_completion=wait,
        isolation=isolation_to_pb(isolation),
    )


def outcome_from_pb(msg: pb.TransactionOutcome) -> answers.Outcome:
    return answers.Outcome(
        transaction_id=msg.transaction_id,
        committed=msg.outcome == pb.COMMITTED,
        abort_cause=pb.AbortCause.Name(msg.abort_cause) if msg.abort_cause else "",
        abort_participant=msg.abort_participant,
        abort_reason=msg.abort_reason,
        results={b.participant: tuple(result_from_pb(r) for r in b.results) for b in msg.results},
        one_phase=msg.one_phase,
        completed=msg.completed,
    )


def status_from_pb(msg: pb.TransactionStatus) -> answers.TransactionStatus:
    return answers.TransactionStatus(
        transaction_id=msg.transaction_id,
        outcome=pb.Outcome.Name(msg.outcome).lower(),
        state=pb.TransactionState.Name(msg.state).removeprefix("STATE_").lower(),
        participants=tuple(msg.participants),
        age_seconds=msg.age_seconds,
        pending_acks=tuple(msg.pending_acks),
    )
