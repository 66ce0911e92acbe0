"""A branch's work on PostgreSQL: its pooled connection, its statements, PREPARE and
the one-phase COMMIT.

Branch transactions run on ordinary pooled connections and are prepared with an
explicit `PREPARE TRANSACTION` whose command tag is checked: PostgreSQL answers it on
an already-failed transaction with a silent `ROLLBACK`, and psycopg's `tpc_prepare()`
neither reports the tag nor lets the connection go back to the pool before phase 2.
Statements, settings, the marker and PREPARE go in one pipeline; a result too large to
deliver, or a broken expectation, fails the branch before it can prepare or commit.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from participant import containment
from participant.config import ParticipantConfig
from participant.schema import MARKER_TABLE, AsyncConn, Cursor, Query, ms, rollback_quietly
from twopc_common import ids
from twopc_common.errors import TwoPCError, Unavailable
from twopc_common.isolation import Isolation
from twopc_common.statements import session_safe, writes
from twopc_common.values import RESULT_OVERHEAD_BYTES, Statement, StatementResult, row_bytes

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
            kwargs=kwargs,
            open=False,
            name=f"participant-{config.id}",
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
        self._branch_setup: tuple[Query, tuple[object, ...] | None] = (setup, None)
        self._marked_setup = containment.marked_branch_setup(setup, MARKER_TABLE)
        self._as_agent: list[tuple[Query, tuple[object, ...] | None]] = (
            [(containment.AGENT_ROLE_AGAIN, None)] if config.branch_role else []
        )

    async def connect_branch(self, isolation: Isolation) -> AsyncConn:
        """A pooled connection whose next transaction begins at `isolation` (psycopg
        sends BEGIN ISOLATION LEVEL ... with the branch's first statements)."""
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
    ) -> list[tuple[Query, tuple[object, ...] | None]]:
        """What goes before the statements: the branch's settings if it starts now,
        with its marker (gid, transaction id) if given."""
        if not session_safe(statements):
            self._dirty.add(conn)
        if conn.info.transaction_status != TransactionStatus.IDLE:
            return []
        if marker is not None:
            return [(self._marked_setup, marker)]
        return [self._branch_setup]

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
        """Run statements in the branch, pipelined; a failure or broken expectation
        raises (the branch must then be rolled back)."""
        try:
            cursors, _ = await _pipelined(conn, self._head(conn, statements), statements, [])
            return await _results(statements, cursors, self._config.limits.max_result_bytes)
        except psycopg.Error as exc:
            raise BranchFailed(_describe(exc), exc.sqlstate or "") from exc

    async def prepare(
        self,
        conn: AsyncConn,
        statements: Sequence[Statement],
        transaction_id: str,
        participant_id: str,
    ) -> tuple[list[StatementResult], bool]:
        """Run the statements, write the branch marker and PREPARE, in one round trip.

        PostgreSQL skips everything after an error in a pipeline, so a failing statement
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
        tail: list[tuple[Query, tuple[object, ...] | None]] = [*self._as_agent]
        if not first:
            tail.append(
                (
                    f"INSERT INTO {MARKER_TABLE} (gid, transaction_id) SELECT %s, %s "
                    "WHERE pg_current_xact_id_if_assigned() IS NOT NULL",
                    (gid, transaction_id),
                )
            )
        tail.append((sql.SQL("PREPARE TRANSACTION {}").format(gid), None))
        head = self._head(conn, statements, (gid, transaction_id) if first else None)
        try:
            cursors, tails = await _settle(conn, _pipelined(conn, head, statements, tail))
            prepared = tails[-1]
            if prepared.statusmessage != "PREPARE TRANSACTION":
                raise BranchFailed(
                    f"PREPARE TRANSACTION answered {prepared.statusmessage!r}: "
                    "the branch had already failed and was rolled back"
                )
            try:
                results = await _results(statements, cursors, self._config.limits.max_result_bytes)
            except BranchFailed:
                await _settle(conn, conn.tpc_rollback(xid))
                raise
            if not first and tails[-2].rowcount == 0:
                await _settle(conn, conn.tpc_commit(xid))
                return results, False
        except psycopg.Error as exc:
            raise BranchFailed(_describe(exc), exc.sqlstate or "") from exc
        return results, True

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
        tail: list[tuple[Query, tuple[object, ...] | None]] = []
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
            cursors, _ = await _pipelined(conn, head, statements, tail)
            results = await _results(statements, cursors, self._config.limits.max_result_bytes)
            await _settle(conn, conn.commit())
        except psycopg.Error as exc:
            raise BranchFailed(_describe(exc), exc.sqlstate or "") from exc
        return results


async def _pipelined(
    conn: AsyncConn,
    head: Sequence[tuple[Query, tuple[object, ...] | None]],
    statements: Sequence[Statement],
    tail: Sequence[tuple[Query, tuple[object, ...] | None]],
) -> tuple[list[Cursor], list[Cursor]]:
    """Send `head`, the statements and then `tail` in one pipeline; one cursor each
    for the statements and for `tail`."""
    cursors: list[Cursor] = []
    tails: list[Cursor] = []
    async with conn.pipeline():
        for query, params in head:
            await conn.cursor().execute(query, params)  # type: ignore[arg-type]
        for st in statements:
            cur = conn.cursor()
            await cur.execute(st.sql.encode(), st.params or None)
            cursors.append(cur)
        for query, params in tail:
            cur = conn.cursor()
            await cur.execute(query, params)  # type: ignore[arg-type]
            tails.append(cur)
    return cursors, tails


async def _results(
    statements: Sequence[Statement], cursors: Sequence[Cursor], max_bytes: int
) -> list[StatementResult]:
    """The statements' results, read in chunks and counted as they are read: results
    larger than `max_bytes` (`Limits.max_result_bytes`) fail the branch before it can
    prepare or commit, because its answer could not be delivered."""
    results = []
    size = 0
    for i, (st, cur) in enumerate(zip(statements, cursors, strict=True), 1):
        if st.expect is not None and (why := st.expect.violation(cur.rowcount)):
            raise BranchFailed(f"statement {i}: {why}")
        if cur.description is None:
            results.append(StatementResult(cur.rowcount))
            size += RESULT_OVERHEAD_BYTES
            continue
        columns = tuple(c.name for c in cur.description)
        size += RESULT_OVERHEAD_BYTES + sum(len(c) + 2 for c in columns)
        rows: list[tuple[object, ...]] = []
        while chunk := await cur.fetchmany(_ROWS_PER_CHUNK):
            size += sum(row_bytes(row) for row in chunk)
            if size > max_bytes:
                raise BranchFailed(
                    f"statement {i}: results larger than {max_bytes} bytes (the "
                    "max_result_bytes limit): the answer could not be delivered"
                )
            rows.extend(chunk)
        results.append(StatementResult(cur.rowcount, columns, tuple(rows)))
    if size > max_bytes:
        raise BranchFailed(f"results larger than {max_bytes} bytes (the max_result_bytes limit)")
    return results


_ROWS_PER_CHUNK = 1000


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
