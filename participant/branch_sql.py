"""A branch's work on PostgreSQL: its pooled connection, its statements, PREPARE and
the one-phase COMMIT.

Branch transactions run on ordinary pooled connections (autocommit: the branch's own
BEGIN goes with its first statements) and are prepared with an explicit `PREPARE
TRANSACTION` whose command tag is checked: PostgreSQL answers it on an already-failed
transaction with a silent `ROLLBACK`, and psycopg's `tpc_prepare()` neither reports
the tag nor lets the connection go back to the pool before phase 2. BEGIN, settings,
statements, the marker and PREPARE go in one query string (`participant.branch_batch`);
a result too large to deliver, or a broken expectation, fails the branch before it can
prepare or commit.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from participant import branch_batch, containment
from participant.branch_batch import Part
from participant.config import ParticipantConfig
from participant.schema import MARKER_TABLE, AsyncConn, ms, rollback_quietly
from twopc_common import ids
from twopc_common.errors import TwoPCError, Unavailable
from twopc_common.isolation import Isolation
from twopc_common.statements import session_safe, writes
from twopc_common.values import Statement, StatementResult

T = TypeVar("T")


class BranchFailed(TwoPCError):
    """The branch's work failed; the branch is rolled back and votes NO."""

    def __init__(self, reason: str, sqlstate: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.sqlstate = sqlstate


class OutcomeUnknown(Unavailable):
    """The connection broke while PostgreSQL ran the statement that settles a branch
    (PREPARE TRANSACTION, or the COMMIT of a one-phase branch): it may or may not have
    happened. Voting NO here would be a lie if it did; only a later look at the
    database (pg_prepared_xacts, the marker row) can tell, which is what an Abort does."""


class BranchConnections:
    """Open branches' connections: a pool of their own (an open branch holds one for
    as long as it is open), each connection's session set up when its branch starts
    and reset after a branch that may have changed it."""

    def __init__(
        self, config: ParticipantConfig, kwargs: dict[str, str], purge: Callable[[], None]
    ) -> None:
        self._config = config
        self._purge = purge
        self.pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
            config.dsn,
            min_size=config.pool_min_size,
            max_size=config.pool_max_size,
            timeout=config.pool_timeout,
            kwargs={**kwargs, "autocommit": True},
            open=False,
            name=f"participant-{config.id}",
            configure=branch_batch.configure,
            reset=self._reset_session,
        )
        # Connections whose branch may have changed session state (see
        # participant.containment); reset before the pool hands them out again.
        self._dirty: weakref.WeakSet[AsyncConn] = weakref.WeakSet()
        setup = containment.branch_setup(
            f"{ms(config.lock_timeout)}ms",
            f"{ms(config.statement_timeout)}ms",
            config.branch_role or "none",
        )
        self._branch_setup: Part = (setup, None)
        self._marked_setup = containment.marked_branch_setup(setup, MARKER_TABLE)
        self._as_agent: list[Part] = (
            [(containment.AGENT_ROLE_AGAIN, None)] if config.branch_role else []
        )

    async def connect_branch(self, isolation: Isolation) -> AsyncConn:
        """A pooled connection whose next transaction begins at `isolation` (its BEGIN
        ISOLATION LEVEL ... goes with the branch's first statements)."""
        try:
            conn = await self.pool.getconn()
        except Exception as exc:
            raise BranchFailed(f"no database connection: {exc}") from exc
        if conn.isolation_level is not isolation.psycopg:
            await conn.set_isolation_level(isolation.psycopg)
        return conn

    async def _reset_session(self, conn: AsyncConn) -> None:
        if conn in self._dirty:
            self._dirty.discard(conn)
            await conn.execute(containment.RESET_SESSION)
            await conn.commit()

    def _head(
        self,
        conn: AsyncConn,
        statements: Sequence[Statement],
        marker: tuple[str, str] | None = None,
    ) -> list[Part]:
        """What goes before the statements: BEGIN and the branch's settings if it
        starts now, with its marker (gid, transaction id) if given."""
        if not session_safe(statements):
            self._dirty.add(conn)
        if conn.info.transaction_status != TransactionStatus.IDLE:
            return []
        if marker is not None:
            return [branch_batch.begin(conn), (self._marked_setup, marker)]
        return [branch_batch.begin(conn), self._branch_setup]

    async def release(self, conn: AsyncConn) -> None:
        broken = conn.broken
        await self.pool.putconn(conn)
        if broken:
            self._purge()

    @staticmethod
    async def rollback(conn: AsyncConn) -> None:
        await rollback_quietly(conn)


class BranchSql(BranchConnections):
    """What runs in a branch: its statements, then PREPARE or the one-phase COMMIT."""

    async def execute(
        self, conn: AsyncConn, statements: Sequence[Statement]
    ) -> list[StatementResult]:
        """Run statements in the branch, in one round trip; a failure or broken
        expectation raises (the branch must then be rolled back)."""
        try:
            done = await self._run(conn, self._head(conn, statements), statements, [])
        except psycopg.Error as exc:
            raise BranchFailed(_describe(exc), exc.sqlstate or "") from exc
        if done.broken:
            raise BranchFailed(done.broken)
        return done.statements

    async def _run(
        self, conn: AsyncConn, head: list[Part], statements: Sequence[Statement], tail: list[Part]
    ) -> branch_batch.Results:
        cur = await branch_batch.send(
            conn, [*head, *((st.sql, st.params or None) for st in statements), *tail]
        )
        limit = self._config.limits.max_result_bytes
        return await branch_batch.Results(cur, len(head)).read(statements, limit, len(tail))

    async def prepare(
        self,
        conn: AsyncConn,
        statements: Sequence[Statement],
        transaction_id: str,
        participant_id: str,
    ) -> tuple[list[StatementResult], bool]:
        """Run the statements, write the branch marker and PREPARE, in one round trip.

        PostgreSQL stops at the first error in the string, so a failing statement
        leaves nothing prepared. A broken expectation is only seen once the results are
        in, when the branch is already prepared: it is rolled back with ROLLBACK
        PREPARED (the rare NO pays a round trip, the common YES saves several).
        Returns the results and False if the branch wrote nothing (READ_ONLY: it was
        committed at once and needs no phase 2).

        A branch that starts here with a statement meant to write (`statements.writes`:
        DML, DDL, ...) gets its marker first, in one statement with its settings
        (`containment.marked_branch_setup`); otherwise the marker comes last, only if
        the branch wrote (a transaction id is assigned), after the switch back to the
        agent's role. The first saves a statement per branch; it votes YES (not
        READ_ONLY) for a branch whose writes happened to change no row."""
        state = conn.info.transaction_status
        if state == TransactionStatus.INERROR:
            raise BranchFailed("branch transaction already failed")
        xid = ids.branch_xid(transaction_id, participant_id)
        gid = str(xid)
        first = state == TransactionStatus.IDLE and writes(statements)
        # PREPARE runs as the agent's role: a prepared transaction belongs to the
        # role that prepared it, and only that role (or a superuser) may finish it.
        tail: list[Part] = [*self._as_agent]
        if not first:
            tail.append(
                (
                    f"INSERT INTO {MARKER_TABLE} (gid, transaction_id) SELECT %s, %s "
                    "WHERE pg_current_xact_id_if_assigned() IS NOT NULL",
                    (gid, transaction_id),
                )
            )
        tail.append(("PREPARE TRANSACTION %s", (gid,)))
        head = self._head(conn, statements, (gid, transaction_id) if first else None)
        try:
            done = await _settle(conn, self._run(conn, head, statements, tail))
            tag = done.tails[-1][0]
            if tag is None:
                raise BranchFailed(f"not prepared: {done.broken}")
            if tag != "PREPARE TRANSACTION":
                raise BranchFailed(
                    f"PREPARE TRANSACTION answered {tag!r}: "
                    "the branch had already failed and was rolled back"
                )
            if done.broken:
                await _settle(conn, conn.tpc_rollback(xid))
                raise BranchFailed(done.broken)
            if not first and done.tails[-2][1] == 0:
                await _settle(conn, conn.tpc_commit(xid))
                return done.statements, False
        except psycopg.Error as exc:
            raise BranchFailed(_describe(exc), exc.sqlstate or "") from exc
        return done.statements, True

    async def commit_one_phase(
        self,
        conn: AsyncConn,
        statements: Sequence[Statement],
        transaction_id: str,
        participant_id: str,
    ) -> list[StatementResult]:
        """Run the statements and the marker (so that a later Abort can tell the branch
        committed) in one round trip, check the expectations, then COMMIT. A branch that
        starts here gets its marker first, with its settings (as in `prepare`)."""
        state = conn.info.transaction_status
        if state == TransactionStatus.INERROR:
            raise BranchFailed("branch transaction already failed")
        gid = str(ids.branch_xid(transaction_id, participant_id))
        first = state == TransactionStatus.IDLE
        tail: list[Part] = []
        if not first:
            tail += [
                *self._as_agent,
                (
                    f"INSERT INTO {MARKER_TABLE} (gid, transaction_id) VALUES (%s, %s)",
                    (gid, transaction_id),
                ),
            ]
        head = self._head(conn, statements, (gid, transaction_id) if first else None)
        try:
            done = await self._run(conn, head, statements, tail)
            if done.broken:
                raise BranchFailed(done.broken)
            await _settle(conn, conn.commit())
        except psycopg.Error as exc:
            raise BranchFailed(_describe(exc), exc.sqlstate or "") from exc
        return done.statements


async def _settle(conn: AsyncConn, step: Awaitable[T]) -> T:
    """Run the step that settles a branch (PREPARE, COMMIT); a lost connection makes
    its outcome unknown rather than failed."""
    try:
        return await step
    except psycopg.OperationalError as exc:
        if conn.broken:
            raise OutcomeUnknown(f"connection to the database lost while settling: {exc}") from exc
        raise


def _describe(exc: psycopg.Error) -> str:
    diag = exc.diag
    message = diag.message_primary or str(exc).strip()
    if diag.constraint_name:
        message += f" (constraint {diag.constraint_name})"
    return f"{exc.sqlstate or 'error'}: {message}" if exc.sqlstate else message
