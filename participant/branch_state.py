"""A branch's life on one participant, as a pure transition table.

    ACTIVE --prepare--> PREPARED --commit--> COMMITTED
       |                   |
       +--one-phase--> COMMITTED
       +----abort----> ABORTED <--abort--+
       +--connection lost while settling--> IN_DOUBT --(the database says)--> either

A prepared branch only ever leaves PREPARED on the coordinator's word (or recovery
asking the coordinator): nothing here times it out. An illegal transition raises and
leaves the state unchanged.
"""

from __future__ import annotations

import enum

from twopc_common.errors import FailedPrecondition


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
