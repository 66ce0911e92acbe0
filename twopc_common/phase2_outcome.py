"""What a phase-2 Commit or Abort answers: the final state it found or left the branch
in, and whether this call put it there.

One enum for both ends: the agent's store finds the outcome in the database, the agent
and its servicer pass it on (participant.proto's `Phase2Outcome`), and the
coordinator's phase 2 decides on it (`coordinator.protocol.delivered`). The other final
state is an answer like any other; errors (a malformed id, a Commit of a branch still
open, an unreachable database) are exceptions, never one of these.
"""

from __future__ import annotations

import enum


class Phase2Outcome(enum.Enum):
    COMMITTED = "committed"
    """A Commit ran COMMIT PREPARED."""
    ALREADY_COMMITTED = "already_committed"
    """Nothing was prepared and the branch's marker says it committed: a repeated
    Commit; for an Abort, the other final state (a one-phase branch that committed, an
    operator's heuristic commit)."""
    ROLLED_BACK = "rolled_back"
    """An Abort ran ROLLBACK PREPARED, or rolled back a branch still open."""
    ALREADY_ROLLED_BACK = "already_rolled_back"
    """Nothing was prepared and the gid is fenced (by this Abort or an earlier one), so
    the branch can never commit: a repeated Abort, an Abort of a branch never prepared;
    for a Commit, the other final state."""
    NOT_PREPARED = "not_prepared"
    """A Commit found nothing prepared, no commit and no fence: never prepared here,
    rolled back without a fence (a heuristic rollback, an Abort not repeated), or a
    marker older than the retention. It cannot commit."""

    @property
    def committed(self) -> bool:
        """The branch's final state as this answer reports it."""
        return self in (Phase2Outcome.COMMITTED, Phase2Outcome.ALREADY_COMMITTED)

    @property
    def changed(self) -> bool:
        """Whether this call finished the branch (rather than found it finished)."""
        return self in (Phase2Outcome.COMMITTED, Phase2Outcome.ROLLED_BACK)


def finished(commit: bool) -> Phase2Outcome:
    """The answer of a COMMIT or ROLLBACK PREPARED that ran."""
    return Phase2Outcome.COMMITTED if commit else Phase2Outcome.ROLLED_BACK
