"""A branch's life on one participant, as a pure transition table.

    ACTIVE --prepare--> PREPARED --commit--> COMMITTED
       |                   |
       +--one-phase--> COMMITTED
       +----abort----> ABORTED <--abort--+
       +--connection lost while settling--> IN_DOUBT --(the database says)--> either

A prepared branch only ever leaves PREPARED on the coordinator's word (or recovery
asking the coordinator): nothing here times it out. An illegal transition raises and
leaves the state unchanged. `plan_phase2` is the pure classification of a batch of
phase-2 decisions that `participant.phase2.Phase2.finish` then carries out.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from twopc_common.errors import FailedPrecondition, TwoPCError
from twopc_common.ids import TransactionId


class BranchState(enum.Enum):
    ACTIVE = "active"
    PREPARED = "prepared"
    COMMITTED = "committed"
    ABORTED = "aborted"
    # The connection broke during PREPARE TRANSACTION or a one-phase COMMIT: only the
    # database knows whether it happened.
    IN_DOUBT = "in_doubt"


_ALLOWED: dict[BranchState, frozenset[BranchState]] = {
    BranchState.ACTIVE: frozenset(
        {BranchState.PREPARED, BranchState.COMMITTED, BranchState.ABORTED, BranchState.IN_DOUBT}
    ),
    BranchState.IN_DOUBT: frozenset({BranchState.COMMITTED, BranchState.ABORTED}),
    BranchState.PREPARED: frozenset({BranchState.COMMITTED, BranchState.ABORTED}),
    BranchState.COMMITTED: frozenset(),
    BranchState.ABORTED: frozenset(),
}


def check_transition(current: BranchState, new: BranchState, transaction_id: str) -> BranchState:
    if new == current or new in _ALLOWED[current]:
        return new
    raise FailedPrecondition(
        f"branch of {transaction_id} is {current.value}, cannot become {new.value}"
    )


@dataclass(frozen=True, slots=True)
class Phase2Plan:
    """Where each decision of a phase-2 batch goes (indexes into the batch)."""

    refused: dict[int, TwoPCError]
    """Answered at once: a malformed id, or a Commit of a branch that is still open."""
    prepared: tuple[int, ...]
    """Not open here: COMMIT/ROLLBACK PREPARED, or the marker says what happened."""
    still_open: tuple[int, ...]
    """Aborts of branches still open on this agent: rolled back (interrupted first)."""


def plan_phase2(
    decisions: Sequence[tuple[str, bool]], open_branches: Mapping[str, BranchState]
) -> Phase2Plan:
    """The pure half of the agent's phase 2: classify (txid, commit) decisions given
    the branches open here. A Commit can only finish a prepared branch, so one for a
    branch still open is refused; an Abort of an open branch rolls it back."""
    refused: dict[int, TwoPCError] = {}
    prepared: list[int] = []
    still_open: list[int] = []
    for i, (txid, commit) in enumerate(decisions):
        try:
            TransactionId.parse(txid)
        except TwoPCError as exc:
            refused[i] = exc
            continue
        state = open_branches.get(txid)
        if state is None:
            prepared.append(i)
        elif commit:
            refused[i] = FailedPrecondition(f"branch of {txid} is {state.value}, not prepared")
        else:
            still_open.append(i)
    return Phase2Plan(refused, tuple(prepared), tuple(still_open))
