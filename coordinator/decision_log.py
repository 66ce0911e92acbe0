"""The decision log: SQLite in WAL mode, one row per decided transaction.

Guarantees:
- `record_commit` returns only after the COMMIT decision is fsynced
  (`synchronous=FULL`); only then may a Commit message leave the coordinator;
- concurrent writes share fsyncs: one writer thread takes every record queued while
  the previous batch was being synced and commits them in one SQLite transaction
  (group commit); a batch with no forced record is written with `synchronous=NORMAL`;
- the epoch (incarnation number) is bumped durably at open, so transaction ids of
  different incarnations never collide; when each epoch began is kept, and so is the
  prune horizon, so that the absence of a record can be read exactly (see
  `coordinator.protocol.reported_without_record`);
- one process at a time: `acquire` takes an exclusive lock (flock on PATH.lock) and a
  second coordinator on the same log refuses to start;
- fail-stop: if the log cannot write (disk full, I/O error, the writer thread died),
  `failure` says why, every later write fails at once, and the coordinator accepts
  no new transactions; no caller ever waits forever.

Rows: `committing` (decision durable, phase 2 under way), `committed` (every
participant acknowledged), `aborted` (written only for transactions with an
idempotency key, so a retry returns the same outcome), `one_phase` (a keyed
single-branch commit was sent and its outcome is not known yet: recovery asks the
participant). No row means abort.
Inspect it with `sqlite-utils rows LOG transactions` or `twopc-coordinator inspect`.

This module opens and closes the log (lock, schema, epoch); the writer thread is
`coordinator.sqlite_writer` over `coordinator.log_writer` (group commit and
fail-stop, shared with the PostgreSQL log), the statements and queries are
`coordinator.sqlite_records`.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time

from coordinator.log_records import LogFailed, LogInUse, LogRecord, LogState
from coordinator.sqlite_records import SqliteReads, SqliteWrites

# The records' types are shared with the PostgreSQL log (`coordinator.log_records`);
# they are this module's too, where the engine has always found them.
__all__ = ["DecisionLog", "LogFailed", "LogInUse", "LogRecord", "LogState", "add_owner_column"]

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
    completed_at REAL,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS transactions_state ON transactions (state);
-- Pruning reads finished rows by age; without this it scans the whole log inside the
-- single writer, holding up forced commits.
CREATE INDEX IF NOT EXISTS transactions_finished_age ON transactions (decided_at)
    WHERE state IN ('committed', 'aborted');
CREATE TABLE IF NOT EXISTS epochs (
    epoch INTEGER PRIMARY KEY,
    started_at REAL NOT NULL
);
"""


def add_owner_column(conn: sqlite3.Connection) -> None:
    """Migrate a log written before rows named their owner (the column is NULL there)."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(transactions)")}
    if "owner" not in columns:
        conn.execute("ALTER TABLE transactions ADD COLUMN owner TEXT")


def _lock(path: str) -> int:
    """Take PATH.lock (flock) for this process, which writes its pid there; the fd."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LogInUse(
            f"decision log {path} is in use by another process (pid {holder}): "
            "two coordinators on one log would reuse transaction ids and abort each "
            "other's branches; stop the other one first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class DecisionLog(SqliteWrites, SqliteReads):
    """The SQLite decision log at `path`, of coordinator `coordinator_id`."""

    def __init__(
        self, path: str, coordinator_id: str, batch_max: int = 512, prune_batch: int = 5000
    ) -> None:
        super().__init__(batch_max)
        self._path = path
        self._prune_batch = prune_batch
        self.coordinator_id = coordinator_id
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self.epoch = 0
        self.last_epoch = 0
        """The epoch of the previous incarnation (read by `acquire`)."""
        self.pruned_before: float | None = None
        """Records decided before this time may have been pruned."""
        self._lock_fd: int | None = None
        self._writer_conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 10000")
        return conn

    def open(self) -> None:
        """`acquire` then `begin_epoch`: the log ready to write."""
        self.acquire()
        self.begin_epoch()

    def acquire(self) -> None:
        """Take the log for this process, create the schema if needed, check the log is
        this coordinator's, read the previous epoch. Nothing is written yet: the
        caller may still refuse to go on (a log older than the participants)."""
        self._lock_fd = _lock(self._path)
        writer = self._connect()
        mode = writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise RuntimeError(f"decision log {self._path}: cannot enable WAL (got {mode})")
        writer.execute("PRAGMA synchronous = FULL")
        writer.executescript(_SCHEMA)
        add_owner_column(writer)
        meta = dict(writer.execute("SELECT key, value FROM meta").fetchall())
        owner = meta.get("coordinator_id")
        if owner is not None and owner != self.coordinator_id:
            writer.close()
            # Another coordinator's decisions would be misread as ours, and its
            # transaction ids could be reissued: refuse.
            raise ValueError(f"this decision log belongs to coordinator {owner!r}")
        self.last_epoch = int(meta.get("epoch", 0))
        self.pruned_before = float(meta["pruned_before"]) if "pruned_before" in meta else None
        self._writer_conn = writer

    def begin_epoch(self) -> None:
        """Bump the epoch durably and start the writer."""
        writer = self._writer_conn
        assert writer is not None, "acquire() first"
        self.epoch = self.last_epoch + 1
        writer.execute("BEGIN IMMEDIATE")
        writer.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [("epoch", str(self.epoch)), ("coordinator_id", self.coordinator_id)],
        )
        writer.execute(
            "INSERT OR REPLACE INTO epochs (epoch, started_at) VALUES (?, ?)",
            (self.epoch, time.time()),
        )
        writer.execute("COMMIT")
        self._reader = self._connect()
        self._start_writer(writer)

    def close(self) -> None:
        if not self._stop_writer() and self._writer_conn is not None:
            self._writer_conn.close()
        self._writer_conn = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
