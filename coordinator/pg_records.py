"""The PostgreSQL decision log's records: the statements that write them (through
the writer thread, `coordinator.pg_writer`) and the queries that read them (on a
separate autocommit connection, off the event loop), each limited to this
coordinator's rows."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from coordinator.log_records import LogRecord, LogState, NewRecords
from coordinator.pg_schema import SCHEMA
from coordinator.pg_writer import PgWrite, PostgresWriter
from twopc_common.errors import Unavailable

_INSERT = (
    f"INSERT INTO {SCHEMA}.transactions (id, coordinator_id, state, participants, "
    "idempotency_key, request_hash, outcome, created_at, decided_at, completed_at, owner) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING"
)


def _record(row: dict[str, Any]) -> LogRecord:
    return LogRecord(
        transaction_id=row["id"],
        state=LogState(row["state"]),
        participants=tuple(row["participants"]),
        idempotency_key=row["idempotency_key"],
        request_hash=row["request_hash"],
        outcome=row["outcome"],
        created_at=row["created_at"],
        decided_at=row["decided_at"],
        completed_at=row["completed_at"],
        owner=row["owner"],
    )


class PostgresWrites(PostgresWriter, NewRecords):
    """Every write the engine makes, each one statement in the next batch."""

    pruned_before: float | None
    _prune_batch: int

    async def _insert(
        self,
        transaction_id: str,
        state: str,
        participants: tuple[str, ...],
        created_at: float,
        outcome: dict[str, Any],
        idempotency_key: str | None,
        request_hash: str | None,
        complete: bool,
        forced: bool = True,
        owner: str | None = None,
    ) -> None:
        now = time.time()
        params = (
            transaction_id,
            self.coordinator_id,
            state,
            Jsonb(list(participants)),
            idempotency_key,
            request_hash,
            Jsonb(outcome),
            created_at,
            now,
            now if complete else None,
            owner,
        )
        await self._write(PgWrite(_INSERT, params, inserts=transaction_id), forced)

    async def resolve_one_phase(self, transaction_id: str, outcome: dict[str, Any]) -> None:
        """The one-phase outcome is known. Not forced: recovery would ask again."""
        now = time.time()
        state = "committed" if outcome["committed"] else "aborted"
        sql = (
            f"UPDATE {SCHEMA}.transactions SET state = %s, outcome = %s, decided_at = %s, "
            "completed_at = %s WHERE id = %s AND state = 'one_phase'"
        )
        await self._write(PgWrite(sql, (state, Jsonb(outcome), now, now, transaction_id)), False)

    async def mark_complete(self, transaction_id: str) -> None:
        """Every participant acknowledged the commit. Not forced (phase 2 is idempotent)."""
        sql = (
            f"UPDATE {SCHEMA}.transactions SET state = 'committed', completed_at = %s "
            "WHERE id = %s AND state = 'committing'"
        )
        await self._write(PgWrite(sql, (time.time(), transaction_id)), False)

    async def prune(self, older_than: float) -> None:
        """Forget completed transactions (and their keys) past the retention period,
        a bounded number per call so the single writer is never held up for long."""
        horizon = max(older_than, self.pruned_before or older_than)
        # The horizon is raised first: an answer read meanwhile is at worst FORGOTTEN
        # for a record still there, never UNKNOWN for one gone.
        self.pruned_before = horizon
        await self._write(
            PgWrite(
                f"UPDATE {SCHEMA}.coordinators SET pruned_before = %s WHERE coordinator_id = %s",
                (horizon, self.coordinator_id),
            ),
            False,
        )
        await self._write(
            PgWrite(
                f"DELETE FROM {SCHEMA}.transactions WHERE id IN ("
                f" SELECT id FROM {SCHEMA}.transactions WHERE coordinator_id = %s"
                " AND state IN ('committed', 'aborted') AND decided_at < %s LIMIT %s)",
                (self.coordinator_id, horizon, self._prune_batch),
            ),
            False,
        )

    async def probe(self) -> None:
        """One tiny forced write through the writer, as a COMMIT record would go
        (fenced like one): it returns only if this process can make a record durable
        right now (health)."""
        await self._write(
            PgWrite(
                f"UPDATE {SCHEMA}.coordinators SET health_probe = %s WHERE coordinator_id = %s",
                (time.time(), self.coordinator_id),
            ),
            True,
        )


class PostgresReads:
    """Every read the engine makes, on the reader connection (one query at a time)."""

    coordinator_id: str
    _reader: psycopg.Connection[dict[str, Any]] | None
    _read_lock: threading.Lock

    def _connect(self, purpose: str, **kwargs: Any) -> psycopg.Connection[Any]:
        raise NotImplementedError

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        """Rows read on the reader connection, reconnected once if it was lost; a log
        database that cannot be reached is UNAVAILABLE (retrying may help)."""
        with self._read_lock:
            for attempt in (1, 2):
                try:
                    if self._reader is None or self._reader.closed or self._reader.broken:
                        self._reader = self._connect(
                            "reader", autocommit=True, row_factory=dict_row
                        )
                    rows: list[dict[str, Any]] = self._reader.execute(sql, args).fetchall()
                    return rows
                except psycopg.OperationalError as exc:
                    if attempt == 2:
                        raise Unavailable(f"cannot read the decision log: {exc}") from None
            raise AssertionError("unreachable")

    def _query(self, where: str, args: tuple[Any, ...]) -> list[LogRecord]:
        sql = f"SELECT * FROM {SCHEMA}.transactions WHERE coordinator_id = %s AND {where}"
        return [_record(r) for r in self._rows(sql, (self.coordinator_id, *args))]

    async def get(self, transaction_id: str) -> LogRecord | None:
        rows = await asyncio.to_thread(self._query, "id = %s", (transaction_id,))
        return rows[0] if rows else None

    async def by_key(self, key: str) -> LogRecord | None:
        rows = await asyncio.to_thread(self._query, "idempotency_key = %s", (key,))
        return rows[0] if rows else None

    async def epoch_started(self, epoch: int) -> float | None:
        """When `epoch` began."""
        rows = await asyncio.to_thread(
            self._rows,
            f"SELECT started_at FROM {SCHEMA}.epochs WHERE coordinator_id = %s AND epoch = %s",
            (self.coordinator_id, epoch),
        )
        return float(rows[0]["started_at"]) if rows else None

    def incomplete_commits(self) -> list[LogRecord]:
        return self._query("state = 'committing'", ())

    def unresolved_one_phase(self) -> list[LogRecord]:
        return self._query("state = 'one_phase'", ())
