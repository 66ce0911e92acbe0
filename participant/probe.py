"""The agent's look at its database for health and metrics: one cheap query, every
health interval, on a dedicated connection (so that a pool busy with branches is
never mistaken for a database that is down).

The query lists the database's prepared transactions, which answers two questions
at once: is the database reachable (health), and how many of this participant's
branches are in doubt and since when (metrics, fresher than the recovery scan).
Foreign prepared transactions are the recovery scan's business (`Recovery.foreign`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
from dataclasses import dataclass

import psycopg
from psycopg import Xid

from twopc_common import ids


@dataclass(frozen=True, slots=True)
class ShardView:
    in_doubt: int = 0
    """Prepared branches of this participant."""
    oldest_in_doubt_seconds: float = 0.0
    """Age of the oldest of them."""


class DatabaseProbe:
    def __init__(self, dsn: str, participant_id: str, timeout: float) -> None:
        self._dsn = dsn
        self._participant = participant_id
        self._timeout = timeout
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self.up = False
        """Did the last probe get an answer."""
        self.view = ShardView()
        """What the last successful probe saw."""

    async def check(self) -> None:
        """Raises if the database does not answer within the timeout; the connection
        is then dropped and reopened at the next call (a cut link may leave it hanging
        with no error, forever)."""
        try:
            rows = await asyncio.wait_for(self._query_fresh_if_broken(), self._timeout)
        except BaseException:
            self.up = False
            await self.close()
            raise
        self.up = True
        self.view = self._summarise(rows)

    async def _query_fresh_if_broken(self) -> list[tuple[object, ...]]:
        # A connection that broke while idle (PostgreSQL restarted, a link was cut
        # and healed) says nothing about the database now: ask again on a new one.
        if self._conn is not None:
            try:
                return await self._query()
            except psycopg.OperationalError:
                await self.close()
        return await self._query()

    async def _query(self) -> list[tuple[object, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=max(1, math.ceil(self._timeout)),
                application_name=f"twopc-participant-{self._participant}-probe",
            )
        cur = await self._conn.execute(
            "SELECT gid, prepared, now() FROM pg_prepared_xacts WHERE database = current_database()"
        )
        return await cur.fetchall()

    def _summarise(self, rows: list[tuple[object, ...]]) -> ShardView:
        ages = []
        for gid, prepared, now in rows:
            assert isinstance(prepared, dt.datetime) and isinstance(now, dt.datetime)
            xid = Xid.from_string(str(gid))
            if ids.is_ours(xid) and xid.bqual == self._participant:
                ages.append(max(0.0, (now - prepared).total_seconds()))
        return ShardView(in_doubt=len(ages), oldest_in_doubt_seconds=max(ages, default=0.0))

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            # Already broken: nothing is left to close cleanly.
            with contextlib.suppress(Exception):
                await conn.close()
