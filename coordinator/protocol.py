"""Presumed-abort two-phase commit as pure logic: states, transitions and the decision.

Theory of operation. A transaction is ACTIVE while it gathers work, PREPARING while
votes are collected, then COMMITTING or ABORTING while phase 2 is delivered, and ends
COMMITTED or ABORTED once every participant acknowledged. The decision is COMMIT only
if every participant voted YES (or READ_ONLY, or committed in one phase); any NO, any
missing vote (prepare timeout, unreachable participant) means ABORT. A COMMIT decision
must be durable before the transaction may enter COMMITTING; an ABORT needs no record,
because no record means abort.

The state machine is one table, `TRANSITIONS`, keyed by (state, event) as h11's is;
the engine says what happened (`TxEvent`) and `transition` answers the next state,
or raises IllegalTransition for an event the protocol does not allow there (a bug
of the engine, never a peer's fault), leaving the state unchanged.

Phase 2 decides on the participants' typed answers (`delivered`): a branch found in
the other final state is an answer, never an error code read as one.

This module imports no gRPC, SQLite or PostgreSQL: it is what the tests can drive
exhaustively.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from twopc_common.phase2_outcome import Phase2Outcome
from twopc_common.votes import Vote


class TxState(enum.Enum):
    ACTIVE = "active"
    PREPARING = "preparing"
    COMMITTING = "committing"
    ABORTING = "aborting"
    COMMITTED = "committed"
    ABORTED = "aborted"


class TxEvent(enum.Enum):
    """What happens to a transaction, as the engine tells `transition`."""

    PREPARE = "prepare"
    """Its work is all sent (one-shot) or its client asked to commit (interactive)."""
    COMMIT_LOGGED = "commit_logged"
    """Every vote YES or READ_ONLY, and the COMMIT record is durable: phase 2 begins."""
    COMMITTED_AT_ONCE = "committed_at_once"
    """Committed with nothing to deliver: one phase, every vote READ_ONLY, or no branch."""
    ABORT = "abort"
    """Any NO, a missing vote, a timeout, a deadlock, the client's Rollback, an error."""
    ACKNOWLEDGED = "acknowledged"
    """Every participant that must hear the decision acknowledged it (or, for an abort,
    was left to recovery)."""


TRANSITIONS: dict[tuple[TxState, TxEvent], TxState] = {
    (TxState.ACTIVE, TxEvent.PREPARE): TxState.PREPARING,
    (TxState.ACTIVE, TxEvent.ABORT): TxState.ABORTING,
    (TxState.ACTIVE, TxEvent.COMMITTED_AT_ONCE): TxState.COMMITTED,
    (TxState.PREPARING, TxEvent.COMMIT_LOGGED): TxState.COMMITTING,
    (TxState.PREPARING, TxEvent.ABORT): TxState.ABORTING,
    (TxState.PREPARING, TxEvent.COMMITTED_AT_ONCE): TxState.COMMITTED,
    # The point of no return: COMMITTING only goes forward.
    (TxState.COMMITTING, TxEvent.ACKNOWLEDGED): TxState.COMMITTED,
    (TxState.ABORTING, TxEvent.ACKNOWLEDGED): TxState.ABORTED,
}
"""The whole state machine: (state, event) -> next state. Anything else is illegal."""


class Reported(enum.Enum):
    """What GetTransaction answers (the proto says what each guarantees)."""

    COMMITTED = "committed"
    ABORTED = "aborted"
    IN_PROGRESS = "in_progress"
    UNKNOWN = "unknown"
    FORGOTTEN = "forgotten"


def reported(state: TxState) -> Reported:
    """A transaction's answer from its state: decided is decided, even mid phase 2."""
    if state in (TxState.COMMITTING, TxState.COMMITTED):
        return Reported.COMMITTED
    if state in (TxState.ABORTING, TxState.ABORTED):
        return Reported.ABORTED
    return Reported.IN_PROGRESS


def reported_without_record(epoch_started: float | None, pruned_before: float | None) -> Reported:
    """The answer for an id of ours that is neither in memory nor in the log, after
    recovery. Every transaction that can commit has a forced record first (two-phase:
    its COMMIT; one-phase: its intent), so no record means it never committed, unless
    the record may have been pruned: that is, the id's epoch began before the prune
    horizon (or when it began is not known) - then only FORGOTTEN is true."""
    if pruned_before is None:
        return Reported.UNKNOWN
    if epoch_started is None or epoch_started < pruned_before:
        return Reported.FORGOTTEN
    return Reported.UNKNOWN


class IllegalTransition(Exception):
    """The coordinator misused its own protocol (a bug, never a peer's fault)."""


def transition(current: TxState, event: TxEvent) -> TxState:
    """The state after `event`; IllegalTransition (the caller keeps its state) if
    `event` cannot happen in `current`."""
    new = TRANSITIONS.get((current, event))
    if new is None:
        raise IllegalTransition(f"{event.value} in state {current.value}")
    return new


class NoVote(enum.Enum):
    """A vote that never came: the prepare timeout expired, the participant could
    not be reached, or the call failed some other way (an answer too large, an
    internal error). The branch may be prepared (or, one-phase, committed): such a
    participant is sent the Abort, and a one-phase outcome is settled by the Abort
    fence."""

    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    LOST = "lost"


class AbortCause(enum.Enum):
    VOTE_NO = "vote_no"
    PREPARE_TIMEOUT = "prepare_timeout"
    PARTICIPANT_UNAVAILABLE = "participant_unavailable"
    CLIENT_ROLLBACK = "client_rollback"
    EXECUTE_FAILED = "execute_failed"
    COORDINATOR_RESTART = "coordinator_restart"
    IDLE_TIMEOUT = "idle_timeout"
    LIFETIME_EXCEEDED = "lifetime_exceeded"
    DEADLOCK = "deadlock"
    SERIALIZATION_FAILURE = "serialization_failure"
    LOCK_TIMEOUT = "lock_timeout"


# PostgreSQL errors that say a branch lost a conflict rather than that its work is
# wrong: the transaction's cause names the conflict (and clients may retry it).
_CAUSE_OF_SQLSTATE = {
    "40001": AbortCause.SERIALIZATION_FAILURE,  # serialization_failure
    "40P01": AbortCause.DEADLOCK,  # deadlock_detected, on one shard
    "55P03": AbortCause.LOCK_TIMEOUT,  # lock_not_available (lock_timeout)
}


def cause_of_failure(sqlstate: str, otherwise: AbortCause) -> AbortCause:
    """Why a branch failed, from the SQLSTATE of the PostgreSQL error that failed it."""
    return _CAUSE_OF_SQLSTATE.get(sqlstate, otherwise)


_CAUSE_OF_NO_VOTE = {
    NoVote.TIMEOUT: AbortCause.PREPARE_TIMEOUT,
    NoVote.UNAVAILABLE: AbortCause.PARTICIPANT_UNAVAILABLE,
    NoVote.LOST: AbortCause.PARTICIPANT_UNAVAILABLE,
}


@dataclass(frozen=True, slots=True)
class Ballot:
    vote: Vote | NoVote
    reason: str = ""
    sqlstate: str = ""
    """For a NO caused by a PostgreSQL error: its SQLSTATE."""


@dataclass(frozen=True, slots=True)
class Decision:
    commit: bool
    phase2: tuple[str, ...]
    """Participants that must hear the decision: YES voters for a commit; for an abort,
    everyone who may hold a prepared branch (YES voters and those who never answered)."""
    cause: AbortCause | None = None
    culprit: str = ""
    reason: str = ""


def one_phase_committed(vote: Vote | NoVote) -> bool | None:
    """What the reply to a one-phase Prepare proves: True committed (or wrote nothing),
    False rolled back, None unknown: only the Abort fence can tell, and it also makes
    sure that a commit still in flight never lands."""
    if vote in (Vote.COMMITTED_ONE_PHASE, Vote.READ_ONLY):
        return True
    if vote is Vote.NO:
        return False
    return None


def delivered(commit: bool, outcome: Phase2Outcome) -> bool:
    """Whether a participant's answer to a Commit (`commit`) or an Abort acknowledges
    it: the branch is in the decided state, put there by this call or an earlier one.
    Otherwise it is in the other final state, which in two-phase commit only an
    operator's heuristic decision brings about (answering a Commit: a branch rolled
    back by hand, or with no trace left at all): retrying cannot change it, and
    phase 2 reports a heuristic hazard."""
    match outcome:
        case Phase2Outcome.COMMITTED | Phase2Outcome.ALREADY_COMMITTED:
            return commit
        case (
            Phase2Outcome.ROLLED_BACK
            | Phase2Outcome.ALREADY_ROLLED_BACK
            | Phase2Outcome.NOT_PREPARED
        ):
            return not commit


def fence_found_commit(outcome: Phase2Outcome) -> bool:
    """What the Abort fence of a one-phase branch whose vote was lost proves: True if
    the branch had committed (the Abort is not acknowledged), False if it is rolled
    back, or fenced so that its commit can never land."""
    return not delivered(False, outcome)


def abort_cause(vote: Vote | NoVote) -> AbortCause:
    """Why a transaction aborted, from the vote of the participant that made it."""
    return _CAUSE_OF_NO_VOTE[vote] if isinstance(vote, NoVote) else AbortCause.VOTE_NO


def decide(
    participants: tuple[str, ...],
    ballots: Mapping[str, Ballot],
    interrupted: tuple[AbortCause, str, str] | None = None,
) -> Decision:
    """The decision for `participants` given the ballots that arrived (missing = TIMEOUT).

    A NO is reported in preference to a missing vote: it says why more precisely.
    `interrupted` (cause, culprit, reason): the vote collection was cut short (a
    deadlock victim); unless every vote was in by then, that is the abort's cause.
    """
    votes = {
        p: ballots.get(p, Ballot(NoVote.TIMEOUT, "no vote before the prepare timeout"))
        for p in participants
    }
    no = [p for p in participants if votes[p].vote is Vote.NO]
    missing = [p for p in participants if isinstance(votes[p].vote, NoVote)]
    if not no and not missing:
        return Decision(
            commit=True, phase2=tuple(p for p in participants if votes[p].vote is Vote.YES)
        )
    phase2 = tuple(p for p in participants if votes[p].vote is Vote.YES or p in missing)
    if interrupted is not None:
        cause, culprit, reason = interrupted
        return Decision(False, phase2, cause, culprit, reason)
    # A NO whose work failed outweighs one that lost a conflict (a serialization
    # failure, a deadlock): running the same work again would fail again, so the
    # transaction must not look retryable.
    no.sort(key=lambda p: votes[p].sqlstate in _CAUSE_OF_SQLSTATE)
    culprit = (no or missing)[0]
    if no:
        cause = cause_of_failure(votes[culprit].sqlstate, AbortCause.VOTE_NO)
    else:
        cause = abort_cause(votes[culprit].vote)
    return Decision(False, phase2, cause, culprit, votes[culprit].reason)


def bound_results(decision: Decision, sizes: Mapping[str, int], limit: int) -> Decision:
    """A COMMIT whose answer (every branch's results, `sizes` in bytes) would be larger
    than `limit` becomes an ABORT blamed on the largest branch: work whose answer
    cannot reach the client is never committed."""
    total = sum(sizes.values())
    if not decision.commit or total <= limit:
        return decision
    culprit = max(sizes, key=lambda p: sizes[p])
    reason = (
        f"the transaction's results ({total} bytes) are larger than the "
        f"max_result_bytes limit ({limit} bytes): the answer could not be delivered"
    )
    return Decision(False, decision.phase2, AbortCause.VOTE_NO, culprit, reason)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff: the one retry policy of phase 2 and of the log
    writes that must happen after a decision."""

    initial: float
    cap: float

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (from 0)."""
        return float(min(self.cap, self.initial * 2.0 ** min(attempt, 30)))
