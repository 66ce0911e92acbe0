"""The decision log on PostgreSQL: the same records and guarantees as the SQLite log
(`coordinator.decision_log`), on a database that can be replicated, shared by every
coordinator process of one id, of which exactly one is active.

Guarantees (the engine cannot tell the two logs apart):
- `record_commit` returns only after the COMMIT decision is committed in the log
  database (with `synchronous_commit=on` and a synchronous standby: replicated);
  only then may a Commit message leave the coordinator;
- group commit: one writer thread on one connection takes every record queued while
  the previous batch was in flight and sends them, pipelined, in one transaction with
  one commit; a batch without a forced record commits with `synchronous_commit=off`;
- fencing in the log itself: every batch starts with `twopc_coordinator.fence()`,
  which takes a share lock on this coordinator's lease row and fails unless the row
  still names this process as holder at this epoch. A takeover updates that row, so
  it waits for a batch in flight, and every later batch of the deposed process fails.
  A deposed process can therefore make no record durable, whatever it believes about
  its lease (see `coordinator.lease` for how the lease changes hands);
- the epoch is bumped durably by the active process when it takes over (`begin_epoch`),
  and when each epoch began is kept, and so is the prune horizon;
- a lost connection (the log database restarted, or its standby was promoted) is
  reconnected within `reconnect_timeout` and the batch sent again: inserts are
  idempotent (`ON CONFLICT (id) DO NOTHING`), updates are, and a record whose first
  attempt's fate is unknown is found or not found exactly (see `_resend`);
- fail-stop: when the log cannot write, or this process was fenced, `failure` says
  why, every later write fails at once and the coordinator accepts no new work.

The schema `twopc_coordinator` is created and migrated by the daemon (`migrate`),
under an advisory lock so that processes starting together do not race.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from coordinator.decision_log import LogFailed, LogInUse, LogRecord, LogState, NewRecords, settle
from coordinator.lease import Lease, LeaseSettings
from twopc_common.errors import Unavailable
from twopc_common.settings import describe_dsn

SCHEMA = "twopc_coordinator"
FENCED_SQLSTATE = "TPC01"
"""Raised by `twopc_coordinator.fence()`: this process is no longer the active one."""

_MIGRATION_LOCK = 0x7470_635F_6C6F_6721  # pg_advisory_xact_lock key for `migrate`

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema.
    f"""
    CREATE TABLE {SCHEMA}.coordinators (
        coordinator_id text PRIMARY KEY,
        epoch bigint NOT NULL DEFAULT 0,
        holder text,
        holder_address text,
        holder_info text,
        lease_expires timestamptz,
        pruned_before double precision,
        health_probe double precision
    );
    CREATE TABLE {SCHEMA}.epochs (
        coordinator_id text NOT NULL,
        epoch bigint NOT NULL,
        started_at double precision NOT NULL,
        PRIMARY KEY (coordinator_id, epoch)
    );
    CREATE TABLE {SCHEMA}.transactions (
        id text PRIMARY KEY,
        coordinator_id text NOT NULL,
        state text NOT NULL
            CHECK (state IN ('one_phase', 'committing', 'committed', 'aborted')),
        participants jsonb NOT NULL,
        idempotency_key text,
        request_hash text,
        outcome jsonb NOT NULL,
        created_at double precision NOT NULL,
        decided_at double precision NOT NULL,
        completed_at double precision,
        UNIQUE (coordinator_id, idempotency_key)
    );
    -- What recovery reads at every takeover: only the few unfinished rows.
    CREATE INDEX transactions_unfinished ON {SCHEMA}.transactions (coordinator_id, state)
        WHERE state IN ('committing', 'one_phase');
    -- Pruning reads finished rows by age.
    CREATE INDEX transactions_finished_age ON {SCHEMA}.transactions (coordinator_id, decided_at)
        WHERE state IN ('committed', 'aborted');
    CREATE FUNCTION {SCHEMA}.fence(cid text, expected_epoch bigint, expected_holder text)
    RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM 1 FROM {SCHEMA}.coordinators
         WHERE coordinator_id = cid AND epoch = expected_epoch AND holder = expected_holder
           FOR SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'coordinator % epoch % is no longer the active one '
                '(another process took over its lease)', cid, expected_epoch
                USING ERRCODE = '{FENCED_SQLSTATE}';
        END IF;
    END $$;
    """,
    # 2: the client identity that began each transaction (`LogRecord.owner`).
    f"ALTER TABLE {SCHEMA}.transactions ADD COLUMN owner text",
)


class Fenced(LogFailed):
    """Another process of this coordinator id took over: this one may write nothing.
    `durable`: ids of records of the fenced batch that an earlier attempt (before a
    lost connection) had made durable after all."""

    def __init__(self, message: str, durable: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        self.durable = durable


def is_postgres_log(target: str) -> bool:
    """Whether a `--log` value names a PostgreSQL database rather than a SQLite file."""
    return target.startswith(("postgresql://", "postgres://"))


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Create or upgrade the log's schema; the version it is at. Refuses a schema
    newer than this code knows (a downgrade would misread it)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (version integer NOT NULL)"
        )
        row = conn.execute(f"SELECT max(version) FROM {SCHEMA}.schema_version").fetchone()
        version = int(row[0]) if row and row[0] is not None else 0
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"the decision log's schema is at version {version}, newer than this "
                f"coordinator knows ({len(MIGRATIONS)}): run the newer coordinator"
            )
        for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.execute(sql)
            conn.execute(f"INSERT INTO {SCHEMA}.schema_version VALUES (%s)", (number,))
    return len(MIGRATIONS)


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


@dataclass(frozen=True, slots=True)
class _Write:
    sql: str
    params: tuple[Any, ...]
    inserts: str | None = None
    """The transaction id this statement inserts (to tell, after a lost connection,
    whether an earlier attempt made it durable)."""


_STOP = object()
_INSERT = (
    f"INSERT INTO {SCHEMA}.transactions (id, coordinator_id, state, participants, "
    "idempotency_key, request_hash, outcome, created_at, decided_at, completed_at, owner) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING"
)


class PostgresDecisionLog(NewRecords):
    """The decision log of coordinator `coordinator_id` in the database at `dsn`."""

    def __init__(
        self,
        dsn: str,
        coordinator_id: str,
        batch_max: int = 512,
        prune_batch: int = 5000,
        lease: LeaseSettings | None = None,
        address: str = "",
        reconnect_timeout: float = 30.0,
    ) -> None:
        self.dsn = dsn
        """Where the log is (it may carry a password: show it with `describe_dsn`)."""
        self.coordinator_id = coordinator_id
        self._batch_max = batch_max
        self._prune_batch = prune_batch
        self._reconnect_timeout = reconnect_timeout
        self.lease = Lease(dsn, coordinator_id, address, lease or LeaseSettings())
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_conn: psycopg.Connection[Any] | None = None
        self._read_lock = threading.Lock()
        self._reader: psycopg.Connection[dict[str, Any]] | None = None
        self.epoch = 0
        self.last_epoch = 0
        """The epoch of the previous active process (read by `acquire`)."""
        self.pruned_before: float | None = None
        """Records decided before this time may have been pruned."""
        self.failure: str | None = None
        """Why the log cannot write, once it cannot (fail-stop)."""
        self._fenced = False
        self.stalled: str | None = None
        """Why new records are refused for now: the log database has been away for
        longer than `reconnect_timeout` while a batch waits to learn its fate."""
        self.stats = {"log_batches": 0, "log_records": 0, "log_fsync_batches": 0}
        self.on_batch: Callable[[int, bool, float], None] = lambda records, forced, secs: None
        """Called by the writer thread after each batch it committed (metrics)."""
        self.on_fenced: Callable[[str], None] = lambda why: None
        """Called (from a log thread) once, when this process finds it was deposed."""
        self.lease.on_lost = self._lost

    def __repr__(self) -> str:
        return f"PostgresDecisionLog({describe_dsn(self.dsn)!r}, {self.coordinator_id!r})"

    @property
    def active_address(self) -> str | None:
        """The address of the active process, as last seen (for standbys' hints)."""
        return self.lease.active_address

    def _connect(self, purpose: str, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.dsn,
            application_name=f"twopc-coordinator {purpose} {self.lease.holder}",
            **kwargs,
        )

    # -- opening: wait for the lease, then bump the epoch ----------------------------

    def open(self) -> None:
        """`acquire` then `begin_epoch`: the log ready to write."""
        self.acquire()
        self.begin_epoch()

    def acquire(self, wait: Callable[[], bool] | None = None) -> None:
        """Create or migrate the schema, then take the lease of this coordinator id:
        at once if no live process holds it, else as a standby, polling until the
        holder is gone or its lease expired (a paused holder's sessions are then
        terminated). `wait` says whether to go on waiting (False: give up with
        LogInUse; default: wait for ever). Reads the previous epoch; writes none."""
        with self._connect("migrate", autocommit=True) as conn:
            migrate(conn)
            conn.execute(
                f"INSERT INTO {SCHEMA}.coordinators (coordinator_id) VALUES (%s) "
                "ON CONFLICT DO NOTHING",
                (self.coordinator_id,),
            )
        if not self.lease.take(wait or (lambda: True)):
            raise LogInUse(
                f"coordinator {self.coordinator_id}'s decision log is held by another "
                f"process ({self.lease.holder_info or 'unknown'} at "
                f"{self.lease.active_address or 'unknown address'})"
            )
        self._writer_conn = self._connect("writer")
        row = self._writer_conn.execute(
            f"SELECT epoch, pruned_before FROM {SCHEMA}.coordinators WHERE coordinator_id = %s",
            (self.coordinator_id,),
        ).fetchone()
        self._writer_conn.commit()
        assert row is not None
        self.last_epoch = int(row[0])
        self.pruned_before = None if row[1] is None else float(row[1])
        # Renewed from now on: the caller's checks before `begin_epoch` (the
        # participants' epochs) may take longer than a lease.
        self.lease.start_renewing()

    def begin_epoch(self) -> None:
        """Bump the epoch durably (fenced by the lease: a process that lost it meanwhile
        bumps nothing), then start the writer."""
        conn = self._writer_conn
        assert conn is not None, "acquire() first"
        if self.failure is not None:
            raise self._failed()
        with conn.transaction():
            row = conn.execute(
                f"UPDATE {SCHEMA}.coordinators SET epoch = epoch + 1 "
                "WHERE coordinator_id = %s AND holder = %s AND epoch = %s RETURNING epoch",
                (self.coordinator_id, self.lease.holder, self.last_epoch),
            ).fetchone()
            if row is None:
                raise Fenced(f"coordinator {self.coordinator_id}: lost the lease before starting")
            self.epoch = int(row[0])
            conn.execute(
                f"INSERT INTO {SCHEMA}.epochs (coordinator_id, epoch, started_at) "
                "VALUES (%s, %s, %s)",
                (self.coordinator_id, self.epoch, time.time()),
            )
        self._reader = self._connect("reader", autocommit=True, row_factory=dict_row)
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="decision-log", daemon=True
        )
        self._writer.start()

    def close(self) -> None:
        self.lease.stop()
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
        self.lease.release()

    def _lost(self, why: str) -> None:
        self._fail(why, fenced=True)

    # -- the writer thread (group commit) -------------------------------------------

    def _write_loop(self, conn: psycopg.Connection[Any]) -> None:
        try:
            self._write_batches(conn)
        except BaseException as exc:  # never die silently: callers would wait forever
            self._fail(f"the writer stopped: {exc!r}")
        finally:
            with contextlib.suppress(Exception):
                (self._writer_conn or conn).close()

    def _write_batches(self, conn: psycopg.Connection[Any]) -> None:
        self._writer_conn = conn
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
            if self.failure is not None:
                self._fail(self.failure, batch)
                continue
            forced = any(f for _, f, _ in batch)
            started = time.perf_counter()
            try:
                self._commit([w for w, _, _ in batch], forced)
            except psycopg.errors.UniqueViolation:
                # One bad record (a duplicate idempotency key) must not fail the
                # records it happened to share a batch with: write them one by one.
                for write, one_forced, fut in batch:
                    try:
                        self._commit([write], one_forced)
                    except psycopg.errors.UniqueViolation as exc:
                        settle(fut, exc)
                    except LogFailed as exc:
                        settle(fut, exc)
                    else:
                        settle(fut)
                continue
            except LogFailed as exc:
                durable = exc.durable if isinstance(exc, Fenced) else frozenset()
                for write, _, fut in batch:
                    if write.inserts in durable:
                        settle(fut)
                self._fail(str(exc), batch, fenced=isinstance(exc, Fenced))
                continue
            except psycopg.Error as exc:  # a statement the database refused: a bug
                self._fail(f"cannot write the decision log: {exc}", batch)
                continue
            self.stats["log_batches"] += 1
            self.stats["log_records"] += len(batch)
            self.stats["log_fsync_batches"] += forced
            self.on_batch(len(batch), forced, time.perf_counter() - started)
            for _, _, fut in batch:
                settle(fut)

    def _commit(self, writes: Sequence[_Write], forced: bool) -> None:
        """One transaction, pipelined (one round trip and one commit for the batch):
        the fence first, then the writes. A lost connection is reconnected and the
        batch sent again (`_resend`)."""
        conn = self._writer_conn
        assert conn is not None
        try:
            self._send(conn, writes, forced)
        except psycopg.Error as exc:
            if exc.sqlstate == FENCED_SQLSTATE:
                raise Fenced(str(exc).splitlines()[0]) from None
            if conn.closed or conn.broken:
                self._resend(writes, forced, exc)
                return
            raise

    def _send(self, conn: psycopg.Connection[Any], writes: Sequence[_Write], forced: bool) -> None:
        try:
            with conn.pipeline():
                if not forced:
                    conn.execute("SET LOCAL synchronous_commit = off")
                conn.execute(
                    f"SELECT {SCHEMA}.fence(%s, %s, %s)",
                    (self.coordinator_id, self.epoch, self.lease.holder),
                )
                for write in writes:
                    conn.execute(write.sql, write.params)
                conn.commit()
        except BaseException:
            if not conn.closed and not conn.broken:
                with contextlib.suppress(psycopg.Error):
                    conn.rollback()
            raise

    def _resend(self, writes: Sequence[_Write], forced: bool, cause: Exception) -> None:
        """The connection died with the batch's fate unknown. Reconnect (to the
        promoted standby, with a multi-host DSN) and send it again, until its fate is
        known: an insert whose first attempt committed finds its row (ON CONFLICT DO
        NOTHING), and one still in flight on a dying session makes ours wait for it.
        If the resend is fenced, the takeover that fenced it waited for (or
        terminated) the first attempt, so reading the rows now says exactly which
        records are durable (`Fenced.durable`). The batch is never given up while its
        fate is unknown (a caller told "failed" would abort a durable commit); after
        `reconnect_timeout`, new records are refused meanwhile (`stalled`)."""
        started = time.monotonic()
        while True:
            try:
                conn = self._writer_conn = self._connect("writer")
                try:
                    self._send(conn, writes, forced)
                except psycopg.Error as exc:
                    if exc.sqlstate != FENCED_SQLSTATE:
                        raise
                    ids = [w.inserts for w in writes if w.inserts]
                    rows = conn.execute(
                        f"SELECT id FROM {SCHEMA}.transactions WHERE id = ANY(%s)", (ids,)
                    ).fetchall()
                    conn.rollback()
                    raise Fenced(
                        str(exc).splitlines()[0], durable=frozenset(r[0] for r in rows)
                    ) from None
                self.stalled = None
                return
            except psycopg.OperationalError as exc:
                if not (
                    self._writer_conn is None
                    or self._writer_conn.broken
                    or self._writer_conn.closed
                ):
                    raise
                if self.stalled is None and time.monotonic() - started > self._reconnect_timeout:
                    self.stalled = (
                        f"lost the log database ({cause}) and could not write again within "
                        f"{self._reconnect_timeout:.0f}s: {exc}"
                    )
                    self._drain(LogFailed(self.stalled))
                time.sleep(0.2)

    def _fail(self, why: str, batch: Sequence[Any] = (), fenced: bool = False) -> None:
        """Fail-stop: remember why, fail this batch and everything still queued."""
        if self.failure is None:
            self.failure, self._fenced = why, fenced
            if fenced:
                self.on_fenced(why)
        for _, _, fut in batch:
            settle(fut, self._failed())
        self._drain()

    def _failed(self) -> LogFailed:
        why = self.failure or "decision log closed"
        return Fenced(why) if self._fenced else LogFailed(why)

    def _drain(self, error: LogFailed | None = None) -> None:
        """Fail every record still queued (none of them was sent)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                self._queue.put(_STOP)
                return
            settle(item[2], error or self._failed())

    async def _write(self, write: _Write, forced: bool) -> None:
        if self._writer is None:
            raise RuntimeError("decision log is not open")
        if self.failure is not None:
            raise self._failed()
        if self.stalled is not None:
            raise LogFailed(self.stalled)
        fut: Future[None] = Future()
        self._queue.put((write, forced, fut))
        if self.failure is not None:  # the writer failed meanwhile: nobody else answers
            self._drain()
        # Shielded: a cancelled caller must not cancel the write under the writer.
        await asyncio.shield(asyncio.wrap_future(fut))

    # -- writes (the same methods as the SQLite log) ----------------------------------

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
        await self._write(_Write(_INSERT, params, inserts=transaction_id), forced)

    async def resolve_one_phase(self, transaction_id: str, outcome: dict[str, Any]) -> None:
        """The one-phase outcome is known. Not forced: recovery would ask again."""
        now = time.time()
        state = "committed" if outcome["committed"] else "aborted"
        sql = (
            f"UPDATE {SCHEMA}.transactions SET state = %s, outcome = %s, decided_at = %s, "
            "completed_at = %s WHERE id = %s AND state = 'one_phase'"
        )
        await self._write(_Write(sql, (state, Jsonb(outcome), now, now, transaction_id)), False)

    async def mark_complete(self, transaction_id: str) -> None:
        """Every participant acknowledged the commit. Not forced (phase 2 is idempotent)."""
        sql = (
            f"UPDATE {SCHEMA}.transactions SET state = 'committed', completed_at = %s "
            "WHERE id = %s AND state = 'committing'"
        )
        await self._write(_Write(sql, (time.time(), transaction_id)), False)

    async def prune(self, older_than: float) -> None:
        """Forget completed transactions (and their keys) past the retention period,
        a bounded number per call so the single writer is never held up for long."""
        horizon = max(older_than, self.pruned_before or older_than)
        # The horizon is raised first: an answer read meanwhile is at worst FORGOTTEN
        # for a record still there, never UNKNOWN for one gone.
        self.pruned_before = horizon
        await self._write(
            _Write(
                f"UPDATE {SCHEMA}.coordinators SET pruned_before = %s WHERE coordinator_id = %s",
                (horizon, self.coordinator_id),
            ),
            False,
        )
        await self._write(
            _Write(
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
            _Write(
                f"UPDATE {SCHEMA}.coordinators SET health_probe = %s WHERE coordinator_id = %s",
                (time.time(), self.coordinator_id),
            ),
            True,
        )

    # -- reads (a separate autocommit connection, off the event loop) ---------------

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
