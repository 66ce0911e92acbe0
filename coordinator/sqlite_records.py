"""The SQLite decision log's records: the statements that write them (through the
writer thread, `coordinator.sqlite_writer`) and the queries that read them (on a
separate WAL reader connection, off the event loop). Rows are as
`coordinator.decision_log` describes them."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from typing import Any

from coordinator.log_records import LogRecord, LogState, NewRecords
from coordinator.sqlite_writer import SqliteWriter


def _record(row: sqlite3.Row) -> LogRecord:
    return LogRecord(
        transaction_id=row["id"],
        state=LogState(row["state"]),
        participants=tuple(json.loads(row["participants"])),
        idempotency_key=row["idempotency_key"],
        request_hash=row["request_hash"],
        outcome=json.loads(row["outcome"]),
        created_at=row["created_at"],
        decided_at=row["decided_at"],
        completed_at=row["completed_at"],
        # A log opened read-only (`inspect`) may predate the column.
        owner=row["owner"] if "owner" in row.keys() else None,  # noqa: SIM118 (Row: values)
    )


class SqliteWrites(SqliteWriter, NewRecords):
    """Every write the engine makes, each one statement (or two) in the next batch."""

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
        """Write one new row (to disk, fsynced, unless not `forced`)."""
        now = time.time()
        row = (
            transaction_id,
            state,
            json.dumps(participants),
            idempotency_key,
            request_hash,
            json.dumps(outcome),
            created_at,
            now,
            now if complete else None,
            owner,
        )
        await self._write(
            lambda c: c.execute(
                "INSERT INTO transactions (id, state, participants, idempotency_key, "
                "request_hash, outcome, created_at, decided_at, completed_at, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            ),
            forced=forced,
        )

    async def resolve_one_phase(self, transaction_id: str, outcome: dict[str, Any]) -> None:
        """The one-phase outcome is known. Not forced: if lost, recovery asks the
        participant again and gets the same answer."""
        now = time.time()
        state = "committed" if outcome["committed"] else "aborted"
        await self._write(
            lambda c: c.execute(
                "UPDATE transactions SET state = ?, outcome = ?, decided_at = ?, "
                "completed_at = ? WHERE id = ? AND state = 'one_phase'",
                (state, json.dumps(outcome), now, now, transaction_id),
            ),
            forced=False,
        )

    async def mark_complete(self, transaction_id: str) -> None:
        """Every participant acknowledged the commit. Not forced: losing it only means
        phase 2 is delivered once more after a crash, which is idempotent."""
        now = time.time()
        await self._write(
            lambda c: c.execute(
                "UPDATE transactions SET state = 'committed', completed_at = ? "
                "WHERE id = ? AND state = 'committing'",
                (now, transaction_id),
            ),
            forced=False,
        )

    async def prune(self, older_than: float) -> None:
        """Forget completed transactions (and their keys) past the retention period."""
        self._check_open()
        horizon = max(older_than, self.pruned_before or older_than)

        def prune(c: sqlite3.Connection) -> None:
            # By age through the partial index (SQLite would otherwise pick the state
            # index and read every finished row), a bounded number per call so that
            # the single writer is never held up for long.
            c.execute(
                "DELETE FROM transactions WHERE rowid IN ("
                " SELECT rowid FROM transactions INDEXED BY transactions_finished_age"
                " WHERE state IN ('committed', 'aborted') AND decided_at < ? LIMIT ?)",
                (horizon, self._prune_batch),
            )
            c.execute(
                "INSERT INTO meta (key, value) VALUES ('pruned_before', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (repr(horizon),),
            )

        # The horizon is raised before the rows go: an answer read meanwhile is at
        # worst FORGOTTEN for a record still there, never UNKNOWN for one gone.
        self.pruned_before = horizon
        await self._write(prune, forced=False)

    async def probe(self) -> None:
        """Force one tiny write through the writer, as a COMMIT record would go: it
        returns only if the log can make a record durable right now (health)."""
        now = str(time.time())
        await self._write(
            lambda c: c.execute(
                "INSERT INTO meta (key, value) VALUES ('health_probe', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (now,),
            ),
            forced=True,
        )


class SqliteReads:
    """Every read the engine makes, on the reader connection (one query at a time)."""

    _reader: sqlite3.Connection | None
    _read_lock: threading.Lock

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[LogRecord]:
        assert self._reader is not None, "decision log is not open"
        with self._read_lock:
            return [_record(r) for r in self._reader.execute(sql, args).fetchall()]

    async def get(self, transaction_id: str) -> LogRecord | None:
        rows = await asyncio.to_thread(
            self._query, "SELECT * FROM transactions WHERE id = ?", (transaction_id,)
        )
        return rows[0] if rows else None

    async def by_key(self, key: str) -> LogRecord | None:
        rows = await asyncio.to_thread(
            self._query, "SELECT * FROM transactions WHERE idempotency_key = ?", (key,)
        )
        return rows[0] if rows else None

    async def epoch_started(self, epoch: int) -> float | None:
        """When `epoch` began, if this log knows (logs older than this table do not)."""

        def read() -> float | None:
            assert self._reader is not None, "decision log is not open"
            with self._read_lock:
                row = self._reader.execute(
                    "SELECT started_at FROM epochs WHERE epoch = ?", (epoch,)
                ).fetchone()
            return None if row is None else float(row[0])

        return await asyncio.to_thread(read)

    def incomplete_commits(self) -> list[LogRecord]:
        return self._query("SELECT * FROM transactions WHERE state = 'committing'")

    def unresolved_one_phase(self) -> list[LogRecord]:
        return self._query("SELECT * FROM transactions WHERE state = 'one_phase'")
