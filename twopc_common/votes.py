"""A participant's vote on Prepare: the one enum the agent answers with, the
coordinator reads, and the simulator passes between them.

The wire's `twopc.Vote` is mapped to it at each servicer and client; the
coordinator's record of a vote that never came is `coordinator.protocol.NoVote`,
not a vote, because no participant ever says it.
"""

from __future__ import annotations

from enum import Enum


class Vote(Enum):
    YES = "yes"
    """Prepared: the branch survives a crash and waits for phase 2."""
    NO = "no"
    """Rolled back: the transaction must abort."""
    READ_ONLY = "read_only"
    """Wrote nothing and is already finished: phase 2 skips it."""
    COMMITTED_ONE_PHASE = "committed_one_phase"
    """The only branch, committed at once (the one-phase optimisation)."""
