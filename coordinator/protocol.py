"""Presumed-abort two-phase commit as pure logic: states, transitions and the decision.

Theory of operation. A transaction is ACTIVE while it gathers work, PREPARING while
votes are collected, then COMMITTING or ABORTING while phase 2 is delivered, and ends
COMMITTED or ABORTED once every participant acknowledged. The decision is COMMIT only
if every participant voted YES (or READ_ONLY, or committed in one phase); any NO, any
missing vote (prepare timeout, unreachable participant) means ABORT. A COMMIT decision
must be durable before the transaction may enter COMMITTING; an ABORT needs no record,
because no record means abort.

This module imports no gRPC, SQLite or PostgreSQL: it is what the tests can drive
exhaustively. An illegal transition raises and leaves the state unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class TxState(enum.Enum):
    ACTIVE = "active"
    PREPARING = "preparing"
    COMMITTING = "committing"
    ABORTING = "aborting"
    COMMITTED = "committed"
    ABORTED = "aborted"


_ALLOWED: dict[TxState, frozenset[TxState]] = {
    TxState.ACTIVE: frozenset({TxState.PREPARING, TxState.ABORTING, TxState.COMMITTED}),
    # PREPARING -> COMMITTED: one-phase commit, or every vote READ_ONLY.
    TxState.PREPARING: frozenset({TxState.COMMITTING, TxState.ABORTING, TxState.COMMITTED}),
    TxState.COMMITTING: frozenset({TxState.COMMITTED}),
    TxState.ABORTING: frozenset({TxState.ABORTED}),
    TxState.COMMITTED: frozenset(),
    TxState.ABORTED: frozenset(),
}

FINAL = frozenset({TxState.COMMITTED, TxState.ABORTED})


class IllegalTransition(Exception):
    """The coordinator misused its own protocol (a bug, never a peer's fault)."""


def transition(current: TxState, new: TxState) -> TxState:
    if new not in _ALLOWED[current]:
        raise IllegalTransition(f"{current.value} -> {new.value}")
    return new


class Vote(enum.Enum):
    YES = "yes"
    NO = "no"
    READ_ONLY = "read_only"
    COMMITTED_ONE_PHASE = "committed_one_phase"
    # No vote: the prepare timeout expired or the participant could not be reached.
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"


class AbortCause(enum.Enum):
    VOTE_NO = "vote_no"
    PREPARE_TIMEOUT = "prepare_timeout"
    PARTICIPANT_UNAVAILABLE = "participant_unavailable"
    CLIENT_ROLLBACK = "client_rollback"
    EXECUTE_FAILED = "execute_failed"
    COORDINATOR_RESTART = "coordinator_restart"
    IDLE_TIMEOUT = "idle_timeout"


_CAUSE_OF_MISSING_VOTE = {
    Vote.TIMEOUT: AbortCause.PREPARE_TIMEOUT,
    Vote.UNAVAILABLE: AbortCause.PARTICIPANT_UNAVAILABLE,
}


@dataclass(frozen=True, slots=True)
class Ballot:
    vote: Vote
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    commit: bool
    phase2: tuple[str, ...]
    """Participants that must hear the decision: YES voters for a commit; for an abort,
    everyone who may hold a prepared branch (YES voters and those who never answered)."""
    cause: AbortCause | None = None
    culprit: str = ""
    reason: str = ""


def decide(participants: tuple[str, ...], ballots: Mapping[str, Ballot]) -> Decision:
    """The decision for `participants` given the ballots that arrived (missing = TIMEOUT).

    A NO is reported in preference to a missing vote: it says why more precisely.
    """
    votes = {
        p: ballots.get(p, Ballot(Vote.TIMEOUT, "no vote before the prepare timeout"))
        for p in participants
    }
    no = [p for p in participants if votes[p].vote is Vote.NO]
    missing = [p for p in participants if votes[p].vote in _CAUSE_OF_MISSING_VOTE]
    if not no and not missing:
        return Decision(
            commit=True, phase2=tuple(p for p in participants if votes[p].vote is Vote.YES)
        )
    phase2 = tuple(p for p in participants if votes[p].vote in (Vote.YES, *_CAUSE_OF_MISSING_VOTE))
    culprit = (no or missing)[0]
    cause = AbortCause.VOTE_NO if no else _CAUSE_OF_MISSING_VOTE[votes[culprit].vote]
    return Decision(False, phase2, cause, culprit, votes[culprit].reason)


def backoff(attempt: int, initial: float, cap: float) -> float:
    """Capped exponential backoff before retry number `attempt` (from 0)."""
    return float(min(cap, initial * 2.0 ** min(attempt, 30)))
