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
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
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


class LogInUse(Exception):
    """Another process holds this decision log."""


class LogFailed(Exception):
    """The decision log cannot write; the coordinator must stop deciding."""


class LogState(enum.StrEnum):
    """A record's state (the `state` column; see the module docstring)."""

    ONE_PHASE = "one_phase"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class LogRecord:
    transaction_id: str
    state: LogState
    participants: tuple[str, ...]
    idempotency_key: str | None
    request_hash: str | None
    outcome: dict[str, Any]
    created_at: float
    decided_at: float
    completed_at: float | None
    owner: str | None = None
    """The client identity that began the transaction (None: no client, or an old row)."""


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


def add_owner_column(conn: sqlite3.Connection) -> None:
    """Migrate a log written before rows named their owner (the column is NULL there)."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(transactions)")}
    if "owner" not in columns:
        conn.execute("ALTER TABLE transactions ADD COLUMN owner TEXT")


_Write = Callable[[sqlite3.Connection], object]
_STOP = object()


def settle(fut: Future[None], error: BaseException | None = None) -> None:
    """Answer a writer's caller exactly once, whatever happened to it meanwhile."""
    if fut.done():
        return
    with contextlib.suppress(InvalidStateError):
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


class NewRecords:
    """The records a transaction starts with, the same in every decision log: each is
    one new row written by the log's own `_insert` (SQLite here, PostgreSQL in
    coordinator.pg_log)."""

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
        raise NotImplementedError

    async def record_commit(
        self,
        transaction_id: str,
        participants: tuple[str, ...],
        created_at: float,
        outcome: dict[str, Any],
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        completed: bool = False,
        forced: bool = True,
        *,
        owner: str | None = None,
    ) -> None:
        """Make a COMMIT decision durable (forced). `completed` for a transaction that needs no
        phase 2 (read-only), logged to remember its key and its outcome; only such a
        record may go unforced. `owner`, on this and every other new record: the client
        identity that began the transaction."""
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
            forced=forced or not completed,
            owner=owner,
        )

    async def record_abort(
        self,
        transaction_id: str,
        participants: tuple[str, ...],
        created_at: float,
        outcome: dict[str, Any],
        idempotency_key: str,
        request_hash: str,
        *,
        owner: str | None = None,
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
            owner=owner,
        )

    async def record_one_phase_intent(
        self,
        transaction_id: str,
        participant: str,
        created_at: float,
        idempotency_key: str | None,
        request_hash: str | None,
        *,
        owner: str | None = None,
    ) -> None:
        """Force the intent of a single-branch transaction to disk before its one-phase
        commit is sent: after a crash, recovery settles it (a keyed retry must find
        it, or it would run twice) and GetTransaction never mistakes a commit whose
        answer was lost for one that never happened."""
        await self._insert(
            transaction_id,
            "one_phase",
            (participant,),
            created_at,
            {},
            idempotency_key,
            request_hash,
            complete=False,
            owner=owner,
        )


class DecisionLog(NewRecords):
    def __init__(
        self, path: str, coordinator_id: str, batch_max: int = 512, prune_batch: int = 5000
    ) -> None:
        self._path = path
        self._prune_batch = prune_batch
        self.coordinator_id = coordinator_id
        self._batch_max = batch_max
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self.epoch = 0
        self.last_epoch = 0
        """The epoch of the previous incarnation (read by `acquire`)."""
        self.pruned_before: float | None = None
        """Records decided before this time may have been pruned."""
        self.failure: str | None = None
        """Why the log cannot write, once it cannot (fail-stop)."""
        self._lock_fd: int | None = None
        self._writer_conn: sqlite3.Connection | None = None
        self.stats = {"log_batches": 0, "log_records": 0, "log_fsync_batches": 0}
        self.on_batch: Callable[[int, bool, float], None] = lambda records, forced, secs: None
        """Called by the writer thread after each batch it committed (metrics)."""

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
        self._lock()
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

    def _lock(self) -> None:
        fd = os.open(f"{self._path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LogInUse(
                f"decision log {self._path} is in use by another process (pid {holder}): "
                "two coordinators on one log would reuse transaction ids and abort each "
                "other's branches; stop the other one first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

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
        self._writer = threading.Thread(
            target=self._write_loop, args=(writer,), name="decision-log", daemon=True
        )
        self._writer.start()

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        elif self._writer_conn is not None:
            self._writer_conn.close()
        self._writer_conn = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the writer thread (group commit) -------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        try:
            self._write_batches(conn)
        except BaseException as exc:  # never die silently: callers would wait forever
            self._fail(f"the writer stopped: {exc!r}")
        finally:
            conn.close()

    def _write_batches(self, conn: sqlite3.Connection) -> None:
        synchronous = "FULL"
        while True:
            first = self._queue.get()
            if first is _STOP:
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
            started = time.perf_counter()
            try:
                self._commit(conn, [write for write, _, _ in batch])
            except sqlite3.IntegrityError:
                # One bad record (say, a duplicate idempotency key) must not fail the
                # records it happened to share a batch with: write them one by one.
                for write, _, fut in batch:
                    try:
                        self._commit(conn, [write])
                    except sqlite3.IntegrityError as exc:
                        settle(fut, exc)
                    else:
                        settle(fut)
                continue
            except sqlite3.Error as exc:  # disk full, I/O error: nothing is durable now
                self._fail(f"cannot write {self._path}: {exc}", batch)
                return
            self.stats["log_batches"] += 1
            self.stats["log_records"] += len(batch)
            self.stats["log_fsync_batches"] += wanted == "FULL"
            self.on_batch(len(batch), wanted == "FULL", time.perf_counter() - started)
            for _, _, fut in batch:
                settle(fut)

    def _fail(self, why: str, batch: Sequence[Any] = ()) -> None:
        """Fail-stop: remember why, fail this batch and everything still queued."""
        self.failure = why
        for _, _, fut in batch:
            settle(fut, LogFailed(why))
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                settle(item[2], LogFailed(self.failure or "decision log closed"))

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
        if self.failure is not None:
            raise LogFailed(self.failure)
        fut: Future[None] = Future()
        self._queue.put((write, forced, fut))
        if self.failure is not None:  # the writer failed meanwhile: nobody else answers
            self._drain()
        # Shielded: a cancelled caller must not cancel the write under the writer (the
        # record may be durable already; the caller's caller decides what that means).
        await asyncio.shield(asyncio.wrap_future(fut))

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
        self._check_open()
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
        self._check_open()
        now = str(time.time())
        await self._write(
            lambda c: c.execute(
                "INSERT INTO meta (key, value) VALUES ('health_probe', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (now,),
            ),
            forced=True,
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
