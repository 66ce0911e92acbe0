"""The coordinator's decision logic and transition table, as pure functions."""

from __future__ import annotations

import itertools

import pytest

from coordinator.protocol import (
    AbortCause,
    Ballot,
    IllegalTransition,
    NoVote,
    RetryPolicy,
    TxEvent,
    TxState,
    decide,
    delivered,
    fence_found_commit,
    transition,
)
from participant.branch_state import BranchState, check_transition, plan_phase2
from twopc_common.errors import FailedPrecondition
from twopc_common.phase2_outcome import Phase2Outcome
from twopc_common.votes import Vote

P = ("a", "b", "c")


def test_all_yes_commits_and_tells_every_yes_voter() -> None:
    decision = decide(P, {p: Ballot(Vote.YES) for p in P})
    assert decision.commit and decision.phase2 == P


def test_read_only_voters_are_left_out_of_phase_two() -> None:
    ballots = {"a": Ballot(Vote.YES), "b": Ballot(Vote.READ_ONLY), "c": Ballot(Vote.YES)}
    assert decide(P, ballots).phase2 == ("a", "c")


def test_missing_vote_aborts_and_the_silent_one_still_hears_abort() -> None:
    decision = decide(P, {"a": Ballot(Vote.YES), "b": Ballot(Vote.YES)})
    assert not decision.commit
    assert decision.cause is AbortCause.PREPARE_TIMEOUT and decision.culprit == "c"
    assert decision.phase2 == P  # "c" may have prepared after all


def test_a_no_is_reported_before_a_missing_vote() -> None:
    ballots = {"a": Ballot(NoVote.UNAVAILABLE, "down"), "b": Ballot(Vote.NO, "not enough money")}
    decision = decide(P, ballots)
    assert decision.cause is AbortCause.VOTE_NO and decision.culprit == "b"
    assert decision.reason == "not enough money"
    assert "b" not in decision.phase2  # a NO voter already rolled back


def test_decision_is_commit_exactly_when_no_vote_is_no_or_missing() -> None:
    """Exhaustively over every combination of votes for three participants."""
    options = [None, *Vote, *NoVote]
    for combo in itertools.product(options, repeat=3):
        ballots = {p: Ballot(v) for p, v in zip(P, combo, strict=True) if v is not None}
        decision = decide(P, ballots)
        expect_commit = all(
            v in (Vote.YES, Vote.READ_ONLY, Vote.COMMITTED_ONE_PHASE) for v in combo
        )
        assert decision.commit == expect_commit, combo
        if decision.commit:
            assert set(decision.phase2) == {
                p for p, v in zip(P, combo, strict=True) if v is Vote.YES
            }
        else:
            # Everyone who might hold a prepared branch is told to abort.
            might_be_prepared = {
                p
                for p, v in zip(P, combo, strict=True)
                if v in (None, Vote.YES, NoVote.TIMEOUT, NoVote.UNAVAILABLE, NoVote.LOST)
            }
            assert set(decision.phase2) == might_be_prepared


def test_transition_table_allows_only_the_protocol() -> None:
    legal = {
        (TxState.ACTIVE, TxEvent.PREPARE): TxState.PREPARING,
        (TxState.ACTIVE, TxEvent.ABORT): TxState.ABORTING,
        (TxState.ACTIVE, TxEvent.COMMITTED_AT_ONCE): TxState.COMMITTED,
        (TxState.PREPARING, TxEvent.COMMIT_LOGGED): TxState.COMMITTING,
        (TxState.PREPARING, TxEvent.ABORT): TxState.ABORTING,
        (TxState.PREPARING, TxEvent.COMMITTED_AT_ONCE): TxState.COMMITTED,
        (TxState.COMMITTING, TxEvent.ACKNOWLEDGED): TxState.COMMITTED,
        (TxState.ABORTING, TxEvent.ACKNOWLEDGED): TxState.ABORTED,
    }
    for state, event in itertools.product(TxState, TxEvent):
        if (state, event) in legal:
            assert transition(state, event) is legal[state, event]
        else:
            with pytest.raises(IllegalTransition, match=f"{event.value} in state {state.value}"):
                transition(state, event)


def test_a_committing_transaction_can_never_abort() -> None:
    for state in (TxState.COMMITTING, TxState.COMMITTED):
        with pytest.raises(IllegalTransition):
            transition(state, TxEvent.ABORT)


def test_final_states_take_no_event() -> None:
    for state, event in itertools.product((TxState.COMMITTED, TxState.ABORTED), TxEvent):
        with pytest.raises(IllegalTransition):
            transition(state, event)


def test_prepared_branch_only_leaves_on_commit_or_abort() -> None:
    assert (
        check_transition(BranchState.PREPARED, BranchState.COMMITTED, "t") is BranchState.COMMITTED
    )
    with pytest.raises(FailedPrecondition):
        check_transition(BranchState.COMMITTED, BranchState.ABORTED, "t")
    with pytest.raises(FailedPrecondition):
        check_transition(BranchState.PREPARED, BranchState.ACTIVE, "t")


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(0.05, 5.0)
    delays = [policy.delay(i) for i in range(20)]
    assert delays[0] == 0.05 and delays[1] == 0.1
    assert delays == sorted(delays) and max(delays) == 5.0
    assert policy.delay(10_000) == 5.0


def test_phase2_plan_refuses_commits_of_open_branches_and_routes_the_rest() -> None:
    decisions = [
        ("c.1.1", True),  # not open here: COMMIT PREPARED
        ("c.1.2", True),  # still open: a Commit cannot finish it
        ("c.1.3", False),  # still open: rolled back
        ("not an id", False),
        ("c.1.4", False),  # not open here: ROLLBACK PREPARED (or the fence)
    ]
    plan = plan_phase2(decisions, {"c.1.2": BranchState.ACTIVE, "c.1.3": BranchState.ACTIVE})
    assert plan.prepared == (0, 4)
    assert plan.still_open == (2,)
    assert set(plan.refused) == {1, 3}
    assert isinstance(plan.refused[1], FailedPrecondition)
    assert "not prepared" in str(plan.refused[1])
    assert "malformed transaction id" in str(plan.refused[3])


def test_phase2_takes_only_the_decided_state_for_delivered() -> None:
    """The other final state is an answer, and never an acknowledgement: a Commit that
    finds its branch rolled back (or without a trace) is a heuristic hazard, an Abort
    that finds it committed likewise."""
    acknowledges = {
        (commit, outcome): delivered(commit, outcome)
        for commit, outcome in itertools.product((True, False), Phase2Outcome)
    }
    assert {k for k, ok in acknowledges.items() if ok} == {
        (True, Phase2Outcome.COMMITTED),
        (True, Phase2Outcome.ALREADY_COMMITTED),
        (False, Phase2Outcome.ROLLED_BACK),
        (False, Phase2Outcome.ALREADY_ROLLED_BACK),
        (False, Phase2Outcome.NOT_PREPARED),
    }
    assert fence_found_commit(Phase2Outcome.ALREADY_COMMITTED)
    assert not fence_found_commit(Phase2Outcome.ALREADY_ROLLED_BACK)
    assert not fence_found_commit(Phase2Outcome.ROLLED_BACK)
