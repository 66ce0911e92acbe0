"""The SQLite decision log's writer thread: each batch in one SQLite transaction on
the writer connection, with `synchronous=FULL` (fsynced) when it holds a forced
record and `synchronous=NORMAL` otherwise (`coordinator.log_writer` has the
batching and fail-stop both logs share)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from coordinator.log_writer import GroupCommit, Queued, one_by_one

SqliteWrite = Callable[[sqlite3.Connection], object]
"""One write: statements run on the writer connection, inside the batch's transaction."""


class SqliteWriter(GroupCommit[sqlite3.Connection, SqliteWrite]):
    _path: str

    def __init__(self, batch_max: int) -> None:
        super().__init__(batch_max)
        self._synchronous = "FULL"
        """The writer connection's `synchronous` setting (`acquire` sets FULL)."""

    def _write_batch(self, conn: sqlite3.Connection, batch: list[Queued[SqliteWrite]]) -> bool:
        wanted = "FULL" if any(item.forced for item in batch) else "NORMAL"
        if wanted != self._synchronous:
            conn.execute(f"PRAGMA synchronous = {wanted}")
            self._synchronous = wanted
        started = time.perf_counter()
        try:
            self._commit(conn, [item.write for item in batch])
        except sqlite3.IntegrityError:
            one_by_one(
                batch, lambda item: self._commit(conn, [item.write]), (sqlite3.IntegrityError,)
            )
            return True
        except sqlite3.Error as exc:  # disk full, I/O error: nothing is durable now
            self._fail(f"cannot write {self._path}: {exc}", batch)
            return False
        self._committed(batch, wanted == "FULL", started)
        return True

    def _close_writer(self, conn: sqlite3.Connection) -> None:
        conn.close()

    @staticmethod
    def _commit(conn: sqlite3.Connection, writes: list[SqliteWrite]) -> None:
        try:
            conn.execute("BEGIN")
            for write in writes:
                write(conn)
            conn.execute("COMMIT")
        except Exception:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
