"""The Participant service's one mapping between protobuf and the domain types both of
its ends share (`twopc_common.votes.Vote`, `twopc_common.phase2_outcome.Phase2Outcome`):
the agent's servicer (`participant.service`) writes them into replies, the
coordinator's client (`coordinator.participants`) reads them back.

Each table is written once, domain -> protobuf, and read in both directions, so a
value cannot be mapped one way and forgotten the other. Reading, a value this end
does not know (a newer peer's) is None: the caller says what that means.
"""

from __future__ import annotations

from twopc_common.grpc_errors import status_for
from twopc_common.phase2_outcome import Phase2Outcome, finished
from twopc_common.votes import Vote
from twopc_pb import participant_pb2 as pb

_VOTES: dict[Vote, pb.Vote] = {
    Vote.YES: pb.YES,
    Vote.NO: pb.NO,
    Vote.READ_ONLY: pb.READ_ONLY,
    Vote.COMMITTED_ONE_PHASE: pb.COMMITTED_ONE_PHASE,
}
_VOTES_FROM_PB: dict[int, Vote] = {value: vote for vote, value in _VOTES.items()}

_OUTCOMES: dict[Phase2Outcome, pb.Phase2Outcome] = {
    Phase2Outcome.COMMITTED: pb.PHASE2_COMMITTED,
    Phase2Outcome.ALREADY_COMMITTED: pb.PHASE2_ALREADY_COMMITTED,
    Phase2Outcome.ROLLED_BACK: pb.PHASE2_ROLLED_BACK,
    Phase2Outcome.ALREADY_ROLLED_BACK: pb.PHASE2_ALREADY_ROLLED_BACK,
    Phase2Outcome.NOT_PREPARED: pb.PHASE2_NOT_PREPARED,
}
_OUTCOMES_FROM_PB: dict[int, Phase2Outcome] = {
    value: outcome for outcome, value in _OUTCOMES.items()
}


def vote_to_pb(vote: Vote) -> pb.Vote:
    return _VOTES[vote]


def vote_from_pb(value: int) -> Vote | None:
    return _VOTES_FROM_PB.get(value)


def ack_to_pb(outcome: Phase2Outcome) -> pb.Ack:
    return pb.Ack(outcome=_OUTCOMES[outcome], changed=outcome.changed)


def finished_to_pb(answer: Phase2Outcome | Exception) -> pb.Finished:
    """One decision's answer in a FinishResponse: its outcome, or its error's status."""
    if isinstance(answer, Exception):
        return pb.Finished(code=status_for(answer).value[0], message=str(answer))
    return pb.Finished(outcome=_OUTCOMES[answer], changed=answer.changed)


def outcome_from_pb(value: int, changed: bool, commit: bool) -> Phase2Outcome | None:
    """A phase-2 answer with status OK (an Ack, or a Finished with code 0) to a Commit
    (`commit`) or an Abort. An agent older than the outcome field answers only
    `changed`: it said the other final state with FAILED_PRECONDITION, which is an
    error to the coordinator (retried), so its OK answers are the asked state."""
    if value == pb.PHASE2_OUTCOME_UNSPECIFIED:
        if changed:
            return finished(commit)
        return Phase2Outcome.ALREADY_COMMITTED if commit else Phase2Outcome.ALREADY_ROLLED_BACK
    return _OUTCOMES_FROM_PB.get(value)
