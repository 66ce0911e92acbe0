"""Phase 2 on PostgreSQL: COMMIT or ROLLBACK PREPARED, and what the branch's marker
says when there is nothing (left) to finish.

Phase 2 works on any idle connection of the control pool, which is also what works
after a restart: a batch of decisions goes as pipelined `COMMIT/ROLLBACK PREPARED`
statements in one round trip, and whatever that did not settle (a repeat, a branch
gone) goes through psycopg's two-phase API (`Xid`, `tpc_commit`, `tpc_rollback`) and
the marker check. Every answer is a `Phase2Outcome`, the other final state included;
only a database that cannot be reached raises (`Unavailable`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from participant.schema import MARKER_TABLE, AsyncConn, Cursor, rollback_quietly
from twopc_common import ids
from twopc_common.errors import Unavailable
from twopc_common.phase2_outcome import Phase2Outcome, finished

_FINISH = {True: sql.SQL("COMMIT PREPARED {}"), False: sql.SQL("ROLLBACK PREPARED {}")}
# What a Commit or Abort that found no prepared branch answers, by its marker row (an
# Abort has fenced it first, so for an Abort there is always one).
_NOT_PREPARED = {
    "committed": Phase2Outcome.ALREADY_COMMITTED,
    "aborted": Phase2Outcome.ALREADY_ROLLED_BACK,
    None: Phase2Outcome.NOT_PREPARED,
}
_FINISHED = {True: "COMMIT PREPARED", False: "ROLLBACK PREPARED"}


class Phase2Sql:
    """Phase-2 statements on the control pool's connections."""

    def __init__(self, pool: AsyncConnectionPool[AsyncConn], purge: Callable[[], None]) -> None:
        self._pool = pool
        self._purge = purge

    @contextlib.asynccontextmanager
    async def phase2_connection(self) -> AsyncIterator[AsyncConn]:
        """One pooled connection for a batch of phase-2 calls (`finish_prepared`)."""
        try:
            async with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            self._purge()
            raise Unavailable(f"database unavailable: {exc}") from exc

    async def finish_many(
        self, conn: AsyncConn, branches: Sequence[tuple[str, bool]], participant_id: str
    ) -> list[bool]:
        """COMMIT or ROLLBACK PREPARED for many (transaction id, commit) branches in one
        round trip: each is a transaction statement of its own, so each commits on its
        own even in a pipeline. Returns which ran. After a failure (a branch that is
        not prepared any more, a repeat) PostgreSQL skips the rest of the pipeline:
        those, and the one that failed, are left to `finish_prepared`, whose marker
        check tells a repeat from a branch in the other state."""
        cursors: list[Cursor] = []
        try:
            await conn.set_autocommit(True)  # no BEGIN: they cannot run inside one
            try:
                async with conn.pipeline():
                    for transaction_id, commit in branches:
                        gid = str(ids.branch_xid(transaction_id, participant_id))
                        cur = conn.cursor()
                        await cur.execute(_FINISH[commit].format(gid))
                        cursors.append(cur)
            except psycopg.OperationalError:
                if conn.broken:
                    raise
            except psycopg.Error:
                pass  # see above: left to finish_prepared
            finally:
                if not conn.broken:
                    await conn.set_autocommit(False)
        except psycopg.OperationalError as exc:
            self._purge()
            raise Unavailable(f"database unavailable: {exc}") from exc
        ran = [
            cur.statusmessage == _FINISHED[commit]
            for cur, (_, commit) in zip(cursors, branches, strict=False)
        ]
        return ran + [False] * (len(branches) - len(ran))

    async def finish_prepared(
        self, conn: AsyncConn, transaction_id: str, participant_id: str, commit: bool
    ) -> Phase2Outcome:
        """COMMIT or ROLLBACK PREPARED on `conn` (idle, from `phase2_connection`); if
        the branch is not prepared (any more), the marker says what happened to it."""
        xid = ids.branch_xid(transaction_id, participant_id)
        try:
            try:
                if commit:
                    await conn.tpc_commit(xid)
                else:
                    await conn.tpc_rollback(xid)
                return finished(commit)
            except psycopg.errors.UndefinedObject:
                # An abort first fences the gid, so that the answer cannot change later.
                if not commit:
                    await self._fence(conn, str(xid), transaction_id)
                marker = await self._marker_state(conn, str(xid))
        except psycopg.OperationalError as exc:
            self._purge()
            raise Unavailable(f"database unavailable: {exc}") from exc
        return _NOT_PREPARED[marker]

    @staticmethod
    async def _fence(conn: AsyncConn, gid: str, transaction_id: str) -> None:
        # ON CONFLICT waits for an uncommitted marker of the same gid to be decided.
        await conn.execute(
            f"INSERT INTO {MARKER_TABLE} (gid, transaction_id, state) "
            "VALUES (%s, %s, 'aborted') ON CONFLICT (gid) DO NOTHING",
            (gid, transaction_id),
        )
        await conn.commit()

    @staticmethod
    async def _marker_state(conn: AsyncConn, gid: str) -> str | None:
        cur = await conn.execute(f"SELECT state FROM {MARKER_TABLE} WHERE gid = %s", (gid,))
        row = await cur.fetchone()
        await conn.rollback()
        return None if row is None else str(row[0])

    @staticmethod
    async def rollback(conn: AsyncConn) -> None:
        await rollback_quietly(conn)
