"""The agent's other queries on the control pool: the scan for prepared branches
(recovery's, and the in-doubt list for the coordinators), lock waits (the deadlock
detector's view), the coordinator epochs (`participant.epochs`) and marker pruning."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from participant.schema import EPOCH_TABLE, MARKER_TABLE, AsyncConn
from twopc_common import ids
from twopc_common.errors import TwoPCError, Unavailable


@dataclass(frozen=True, slots=True)
class PreparedBranch:
    transaction_id: str
    gid: str
    prepared_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class ForeignPrepared:
    """A prepared transaction in this database that is not a branch of this participant."""

    gid: str
    prepared_at: dt.datetime | None
    owner: str
    database: str
    locks: int
    why: str


@dataclass(frozen=True, slots=True)
class PreparedScan:
    ours: tuple[PreparedBranch, ...]
    foreign: tuple[ForeignPrepared, ...]


@dataclass(frozen=True, slots=True)
class LockWait:
    """A backend of this agent waiting for a lock, and one backend it waits for: pid 0
    is a prepared transaction, `holder_gid` says which (for a row lock's wait)."""

    waiter_pid: int
    holder_pid: int
    wait_started: dt.datetime | None
    holder_gid: str | None


# Lock waits of the given backends, with every backend each one waits for. A prepared
# transaction holds its locks with no backend (pid 0); a row lock's waiter waits for
# the holder's transaction id, which names the prepared transaction.
_WAITS_QUERY = """
SELECT w.pid, h.holder, w.waitstart, px.gid
  FROM (SELECT pid, min(waitstart) AS waitstart, max(transactionid::text) AS xid
          FROM pg_locks WHERE NOT granted AND pid = ANY(%s) GROUP BY pid) w
 CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS h(holder)
  LEFT JOIN pg_prepared_xacts px ON h.holder = 0 AND px.transaction::text = w.xid
"""


# Prepared transactions of this database, with the locks each holds: a prepared
# transaction's locks have no pid and share the virtual transaction of its own
# transaction-id lock.
_PREPARED_QUERY = """
SELECT p.gid, p.prepared, p.owner, p.database,
       (SELECT count(*) FROM pg_locks l
         WHERE l.pid IS NULL AND l.virtualtransaction = (
               SELECT x.virtualtransaction FROM pg_locks x
                WHERE x.locktype = 'transactionid' AND x.transactionid = p.transaction
                  AND x.pid IS NULL LIMIT 1)) AS locks
  FROM pg_prepared_xacts p
 WHERE p.database = current_database()
"""


def _not_ours(xid: psycopg.Xid, participant_id: str) -> str | None:
    """Why a prepared transaction is not a branch of this participant (None if it is)."""
    if xid.format_id != ids.FORMAT_ID or xid.bqual is None:
        return "not a twopc branch"
    if xid.bqual != participant_id:
        return f"a twopc branch of participant {xid.bqual!r}"
    try:
        ids.TransactionId.parse(xid.gtrid)
    except TwoPCError:
        return f"a gid in twopc's format with a malformed transaction id {xid.gtrid!r}"
    return None


class ControlSql:
    """Scans, epochs and pruning, each on a connection of the control pool."""

    def __init__(self, pool: AsyncConnectionPool[AsyncConn], marker_retention: float) -> None:
        self._pool = pool
        self._marker_retention = marker_retention

    async def prepared_branches(self, participant_id: str) -> PreparedScan:
        """This participant's prepared branches in this database, and every other
        prepared transaction there (foreign: another application's, another
        participant's, or a gid in our format that does not parse). A malformed gid
        is reported, never an error that stops recovery of the rest."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(_PREPARED_QUERY)
            rows = await cur.fetchall()
            await conn.rollback()
        ours: list[PreparedBranch] = []
        foreign: list[ForeignPrepared] = []
        for gid, prepared, owner, database, locks in rows:
            at = prepared if isinstance(prepared, dt.datetime) else None
            xid = psycopg.Xid.from_string(str(gid))
            why = _not_ours(xid, participant_id)
            if why is None:
                ours.append(PreparedBranch(xid.gtrid, str(gid), at))
            else:
                foreign.append(
                    ForeignPrepared(str(gid), at, str(owner), str(database), int(str(locks)), why)
                )
        return PreparedScan(tuple(ours), tuple(foreign))

    async def lock_waits(self, pids: Sequence[int]) -> list[LockWait]:
        """Which of `pids` wait for a lock, and for whom (the deadlock detector's view)."""
        if not pids:
            return []
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(_WAITS_QUERY, (list(pids),))
                rows = await cur.fetchall()
                await conn.rollback()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise Unavailable(f"database unavailable: {exc}") from exc
        return [
            LockWait(
                int(str(w)),
                int(str(h)),
                at if isinstance(at, dt.datetime) else None,
                None if gid is None else str(gid),
            )
            for w, h, at, gid in rows
        ]

    async def load_epochs(self) -> dict[str, int]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(f"SELECT coordinator_id, epoch FROM {EPOCH_TABLE}")
            rows = await cur.fetchall()
            await conn.rollback()
        return {str(c): int(str(e)) for c, e in rows}

    async def raise_epoch(self, coordinator_id: str, epoch: int) -> None:
        try:
            async with self._pool.connection() as conn:
                await conn.execute(
                    f"INSERT INTO {EPOCH_TABLE} AS t (coordinator_id, epoch) VALUES (%s, %s) "
                    "ON CONFLICT (coordinator_id) DO UPDATE "
                    "SET epoch = greatest(t.epoch, excluded.epoch), updated_at = now()",
                    (coordinator_id, epoch),
                )
                await conn.commit()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise Unavailable(f"database unavailable: {exc}") from exc

    async def prune_markers(self) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"DELETE FROM {MARKER_TABLE} WHERE created_at < now() - make_interval(secs => %s)",
                (self._marker_retention,),
            )
            await conn.commit()
            return cur.rowcount
