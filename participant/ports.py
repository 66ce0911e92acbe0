"""The agent's ports: what `participant.agent.Agent` and `participant.recovery.Recovery`
need from the database and from the coordinators, as `typing.Protocol`s.

In the daemon they are `participant.store.Store` (psycopg, PostgreSQL; its three
parts `branches`, `phase2` and `control`) and `participant.recovery.GrpcCoordinators`;
in the simulator (`tests/sim`) a model of PostgreSQL's open and prepared transactions,
markers, fences, epochs and row locks, and a seeded network to the simulated
coordinators.

The contracts the agent relies on, beyond the signatures (see `participant.branch_sql`
and `participant.phase2_sql`):
- `prepare` votes YES only for a branch the database confirmed prepared: a failed
  branch (the silent ROLLBACK of PREPARE TRANSACTION), a broken expectation, a lock
  timeout, a marker or fence already there raise `BranchFailed`; a connection lost
  while the settling statement ran raises `OutcomeUnknown`;
- `finish_many` answers which of its COMMIT/ROLLBACK PREPARED ran; `finish_prepared`
  answers the branch's `Phase2Outcome`, the other final state included (it raises only
  for errors: `Unavailable`); an abort of a branch that is not prepared first fences
  its gid, so that it can never commit afterwards;
- an agent restart loses every open transaction and keeps prepared ones, committed
  rows, markers, fences and epochs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol, TypeVar

from participant.control_sql import LockWait, PreparedScan
from twopc_common.isolation import Isolation
from twopc_common.phase2_outcome import Phase2Outcome
from twopc_common.values import Statement, StatementResult


class ConnectionInfo(Protocol):
    @property
    def backend_pid(self) -> int: ...


class BranchConn(Protocol):
    """A branch's database connection, as the agent sees it."""

    @property
    def closed(self) -> bool: ...

    @property
    def info(self) -> ConnectionInfo: ...

    async def cancel_safe(self, *, timeout: float = ...) -> None:
        """Interrupt the statement running on it (a lock wait)."""
        ...


Conn = TypeVar("Conn", bound=BranchConn)


class BranchStore(Protocol[Conn]):
    """Open branches: their connections and what runs in them."""

    async def connect_branch(self, isolation: Isolation) -> Conn: ...

    async def release(self, conn: Conn) -> None: ...

    async def rollback(self, conn: Conn) -> None: ...

    async def execute(
        self, conn: Conn, statements: Sequence[Statement]
    ) -> list[StatementResult]: ...

    async def prepare(
        self,
        conn: Conn,
        statements: Sequence[Statement],
        transaction_id: str,
        participant_id: str,
    ) -> tuple[list[StatementResult], bool]: ...

    async def commit_one_phase(
        self,
        conn: Conn,
        statements: Sequence[Statement],
        transaction_id: str,
        participant_id: str,
    ) -> list[StatementResult]: ...


class Phase2Store(Protocol[Conn]):
    """Prepared (or settled) branches: COMMIT/ROLLBACK PREPARED and the marker check."""

    def phase2_connection(self) -> contextlib.AbstractAsyncContextManager[Conn]: ...

    async def rollback(self, conn: Conn) -> None: ...

    async def finish_many(
        self, conn: Conn, branches: Sequence[tuple[str, bool]], participant_id: str
    ) -> list[bool]: ...

    async def finish_prepared(
        self, conn: Conn, transaction_id: str, participant_id: str, commit: bool
    ) -> Phase2Outcome: ...


class ControlStore(Protocol):
    """Scans, lock waits, coordinator epochs and marker pruning."""

    async def prepared_branches(self, participant_id: str) -> PreparedScan: ...

    async def lock_waits(self, pids: Sequence[int]) -> list[LockWait]: ...

    async def load_epochs(self) -> dict[str, int]: ...

    async def raise_epoch(self, coordinator_id: str, epoch: int) -> None: ...

    async def prune_markers(self) -> int: ...


class AgentStore(Protocol[Conn]):
    """The database, in the three parts the agent's own parts use."""

    @property
    def branches(self) -> BranchStore[Conn]: ...

    @property
    def phase2(self) -> Phase2Store[Conn]: ...

    @property
    def control(self) -> ControlStore: ...


class CoordinatorUnreachable(Exception):
    """A coordinator did not answer (the branch keeps waiting); `code` says how."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class Coordinators(Protocol):
    """Recovery's view of the coordinators: the outcome of a transaction."""

    def knows(self, coordinator_id: str) -> bool:
        """Whether this agent is configured to ask `coordinator_id`."""
        ...

    def address(self, coordinator_id: str) -> str: ...

    async def outcome(self, coordinator_id: str, transaction_id: str) -> bool | None:
        """True committed; False aborted, or unknown after the coordinator's recovery
        (presumed abort); None still undecided (keep waiting). Raises
        CoordinatorUnreachable."""
        ...
