"""The decision log: SQLite in WAL mode, one row per decided transaction.

Guarantees:
- `record_commit` returns only after the COMMIT decision is fsynced
  (`synchronous=FULL`); only then may a Commit message leave the coordinator;
- concurrent writes share fsyncs: one writer thread takes every record queued while
  the previous batch was being synced and commits them in one SQLite transaction
  (group commit); a batch with no forced record is written with `synchronous=NORMAL`;
- the epoch (incarnation number) is bumped durably at open, so transaction ids of
  different incarnations never collide.

Rows: `committing` (decision durable, phase 2 under way), `committed` (every
participant acknowledged), `aborted` (written only for transactions with an
idempotency key, so a retry returns the same outcome), `one_phase` (a keyed
single-branch commit was sent and its outcome is not known yet: recovery asks the
participant). No row means abort.
Inspect it with `sqlite-utils rows LOG transactions` or `twopc-coordinator inspect`.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS transactions (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('one_phase', 'committing', 'committed', 'aborted')),
    participants TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT,
    outcome TEXT NOT NULL,
    created_at REAL NOT NULL,
    decided_at REAL NOT NULL,
    completed_at REAL
);
CREATE INDEX IF NOT EXISTS transactions_state ON transactions (state);
"""


@dataclass(frozen=True, slots=True)
class LogRecord:
    transaction_id: str
    state: str
    participants: tuple[str, ...]
    idempotency_key: str | None
    request_hash: str | None
    outcome: dict[str, Any]
    created_at: float
    decided_at: float
    completed_at: float | None


def _record(row: sqlite3.Row) -> LogRecord:
    return LogRecord(
        transaction_id=row["id"],
        state=row["state"],
        participants=tuple(json.loads(row["participants"])),
        idempotency_key=row["idempotency_key"],
        request_hash=row["request_hash"],
        outcome=json.loads(row["outcome"]),
        created_at=row["created_at"],
        decided_at=row["decided_at"],
        completed_at=row["completed_at"],
    )


_Write = Callable[[sqlite3.Connection], object]
_STOP = object()


class DecisionLog:
    def __init__(self, path: str, coordinator_id: str, batch_max: int = 512) -> None:
        self._path = path
        self.coordinator_id = coordinator_id
        self._batch_max = batch_max
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self.epoch = 0
        self.stats = {"log_batches": 0, "log_records": 0, "log_fsync_batches": 0}

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 10000")
        return conn

    def open(self) -> None:
        """Create the schema if needed, check the log is this coordinator's, bump the
        epoch durably, start the writer."""
        writer = self._connect()
        mode = writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise RuntimeError(f"decision log {self._path}: cannot enable WAL (got {mode})")
        writer.execute("PRAGMA synchronous = FULL")
        writer.executescript(_SCHEMA)
        writer.execute("BEGIN IMMEDIATE")
        owner = writer.execute("SELECT value FROM meta WHERE key = 'coordinator_id'").fetchone()
        if owner is not None and owner[0] != self.coordinator_id:
            writer.execute("ROLLBACK")
            writer.close()
            # Another coordinator's decisions would be misread as ours, and its
            # transaction ids could be reissued: refuse.
            raise ValueError(f"this decision log belongs to coordinator {owner[0]!r}")
        row = writer.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        self.epoch = (int(row[0]) if row else 0) + 1
        writer.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [("epoch", str(self.epoch)), ("coordinator_id", self.coordinator_id)],
        )
        writer.execute("COMMIT")
        self._reader = self._connect()
        self._writer = threading.Thread(
            target=self._write_loop, args=(writer,), name="decision-log", daemon=True
        )
        self._writer.start()

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # -- the writer thread (group commit) -------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        synchronous = "FULL"
        while True:
            first = self._queue.get()
            if first is _STOP:
                conn.close()
                return
            batch = [first]
            while len(batch) < self._batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(item)
            wanted = "FULL" if any(forced for _, forced, _ in batch) else "NORMAL"
            if wanted != synchronous:
                conn.execute(f"PRAGMA synchronous = {wanted}")
                synchronous = wanted
            try:
                self._commit(conn, [write for write, _, _ in batch])
            except Exception:
                # One bad record (say, a duplicate idempotency key) must not fail the
                # records it happened to share a batch with: write them one by one.
                for write, _, fut in batch:
                    try:
                        self._commit(conn, [write])
                    except Exception as exc:
                        fut.set_exception(exc)
                    else:
                        fut.set_result(None)
                continue
            self.stats["log_batches"] += 1
            self.stats["log_records"] += len(batch)
            self.stats["log_fsync_batches"] += wanted == "FULL"
            for _, _, fut in batch:
                fut.set_result(None)

    @staticmethod
    def _commit(conn: sqlite3.Connection, writes: list[_Write]) -> None:
        try:
            conn.execute("BEGIN")
            for write in writes:
                write(conn)
            conn.execute("COMMIT")
        except Exception:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def _write(self, write: _Write, forced: bool) -> None:
        fut: Future[None] = Future()
        self._queue.put((write, forced, fut))
        await asyncio.wrap_future(fut)

    # -- writes -----------------------------------------------------------------------

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
    ) -> None:
        """Force one new row to disk."""
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
        )
        self._check_open()
        await self._write(
            lambda c: c.execute(
                "INSERT INTO transactions (id, state, participants, idempotency_key, "
                "request_hash, outcome, created_at, decided_at, completed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            ),
            forced=True,
        )

    async def record_commit(
        self,
        transaction_id: str,
        participants: tuple[str, ...],
        created_at: float,
        outcome: dict[str, Any],
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        completed: bool = False,
    ) -> None:
        """Force a COMMIT decision to disk. `completed` for a transaction that needs no
        phase 2 (one-phase) and is logged only to remember its idempotency key."""
        state = "committed" if completed else "committing"
        await self._insert(
            transaction_id,
            state,
            participants,
            created_at,
            outcome,
            idempotency_key,
            request_hash,
            complete=completed,
        )

    async def record_abort(
        self,
        transaction_id: str,
        participants: tuple[str, ...],
        created_at: float,
        outcome: dict[str, Any],
        idempotency_key: str,
        request_hash: str,
    ) -> None:
        """Remember an aborted keyed transaction, so a retry gets the same answer."""
        await self._insert(
            transaction_id,
            "aborted",
            participants,
            created_at,
            outcome,
            idempotency_key,
            request_hash,
            complete=True,
        )

    async def record_one_phase_intent(
        self,
        transaction_id: str,
        participant: str,
        created_at: float,
        idempotency_key: str,
        request_hash: str,
    ) -> None:
        """Force the key of a single-branch transaction to disk before its one-phase
        commit is sent: a retry after a crash must find it, or it would run twice."""
        await self._insert(
            transaction_id,
            "one_phase",
            (participant,),
            created_at,
            {},
            idempotency_key,
            request_hash,
            complete=False,
        )

    async def resolve_one_phase(self, transaction_id: str, outcome: dict[str, Any]) -> None:
        """The one-phase outcome is known. Not forced: if lost, recovery asks the
        participant again and gets the same answer."""
        now = time.time()
        state = "committed" if outcome["committed"] else "aborted"
        self._check_open()
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
        self._check_open()
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
        await self._write(
            lambda c: c.execute(
                "DELETE FROM transactions WHERE state IN ('committed', 'aborted') "
                "AND decided_at < ?",
                (older_than,),
            ),
            forced=False,
        )

    def _check_open(self) -> None:
        if self._writer is None:
            raise RuntimeError("decision log is not open")

    # -- reads (a separate WAL reader connection, off the event loop) ---------------

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

    def incomplete_commits(self) -> list[LogRecord]:
        return self._query("SELECT * FROM transactions WHERE state = 'committing'")

    def unresolved_one_phase(self) -> list[LogRecord]:
        return self._query("SELECT * FROM transactions WHERE state = 'one_phase'")
