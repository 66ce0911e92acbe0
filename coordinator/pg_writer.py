"""The PostgreSQL decision log's writer thread, on one connection: each batch is one
transaction, pipelined (one round trip and one commit for the batch), that starts
with `twopc_coordinator.fence()` (`coordinator.pg_schema`); a batch without a forced
record commits with `synchronous_commit=off`. `coordinator.log_writer` has the
batching and fail-stop both logs share.

Guarantees, besides those:
- a fenced batch (another process took over this coordinator's lease) makes nothing
  durable, and fails every later write (`Fenced`);
- a lost connection is reconnected and the batch sent again until its fate is
  known (`_resend`); meanwhile, after `reconnect_timeout`, new records are refused
  (`stalled`), but the batch is never given up while its fate is unknown.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from coordinator.lease import Lease
from coordinator.log_records import LogFailed
from coordinator.log_writer import GroupCommit, Queued, one_by_one, settle
from coordinator.pg_schema import FENCED_SQLSTATE, SCHEMA


class Fenced(LogFailed):
    """Another process of this coordinator id took over: this one may write nothing.
    `durable`: ids of records of the fenced batch that an earlier attempt (before a
    lost connection) had made durable after all."""

    def __init__(self, message: str, durable: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        self.durable = durable


@dataclass(frozen=True, slots=True)
class PgWrite:
    sql: str
    params: tuple[Any, ...]
    inserts: str | None = None
    """The transaction id this statement inserts (to tell, after a lost connection,
    whether an earlier attempt made it durable)."""


class FencedBatches(GroupCommit[psycopg.Connection[Any], PgWrite]):
    """How one batch is sent: one fenced transaction, sent again across lost connections."""

    dsn: str
    coordinator_id: str
    epoch: int
    lease: Lease

    def __init__(self, batch_max: int, reconnect_timeout: float) -> None:
        super().__init__(batch_max)
        self._reconnect_timeout = reconnect_timeout
        self._writer_conn: psycopg.Connection[Any] | None = None
        self.stalled: str | None = None
        """Why new records are refused for now: the log database has been away for
        longer than `reconnect_timeout` while a batch waits to learn its fate."""

    def _connect(self, purpose: str, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.dsn,
            application_name=f"twopc-coordinator {purpose} {self.lease.holder}",
            **kwargs,
        )

    def _commit(self, writes: Sequence[PgWrite], forced: bool) -> None:
        """One transaction: the fence first, then the writes. A lost connection is
        reconnected and the batch sent again (`_resend`)."""
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

    def _send(self, conn: psycopg.Connection[Any], writes: Sequence[PgWrite], forced: bool) -> None:
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

    def _resend(self, writes: Sequence[PgWrite], forced: bool, cause: Exception) -> None:
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


class PostgresWriter(FencedBatches):
    """The writer thread: each batch through `FencedBatches`, fail-stop when fenced."""

    def __init__(self, batch_max: int, reconnect_timeout: float) -> None:
        super().__init__(batch_max, reconnect_timeout)
        self._fenced = False
        self.on_fenced: Callable[[str], None] = lambda why: None
        """Called (from a log thread) once, when this process finds it was deposed."""

    def _write_batch(self, conn: psycopg.Connection[Any], batch: list[Queued[PgWrite]]) -> bool:
        """Always True: a failed writer goes on failing each batch (fail-stop)."""
        if self.failure is not None:
            self._fail(self.failure, batch)
            return True
        forced = any(item.forced for item in batch)
        started = time.perf_counter()
        try:
            self._commit([item.write for item in batch], forced)
        except psycopg.errors.UniqueViolation:
            one_by_one(
                batch,
                lambda item: self._commit([item.write], item.forced),
                (psycopg.errors.UniqueViolation, LogFailed),
            )
        except LogFailed as exc:
            durable = exc.durable if isinstance(exc, Fenced) else frozenset()
            for item in batch:
                if item.write.inserts in durable:
                    settle(item.done)
            self._fail(str(exc), batch, fenced=isinstance(exc, Fenced))
        except psycopg.Error as exc:  # a statement the database refused: a bug
            self._fail(f"cannot write the decision log: {exc}", batch)
        else:
            self._committed(batch, forced, started)
        return True

    def _close_writer(self, conn: psycopg.Connection[Any]) -> None:
        with contextlib.suppress(Exception):
            (self._writer_conn or conn).close()

    def _fail(self, why: str, batch: Sequence[Queued[PgWrite]] = (), fenced: bool = False) -> None:
        """Fail-stop; `fenced`: because another process took over (`on_fenced`)."""
        if self.failure is None:
            self.failure, self._fenced = why, fenced
            if fenced:
                self.on_fenced(why)
        super()._fail(why, batch)

    def _failed(self) -> LogFailed:
        why = self.failure or "decision log closed"
        return Fenced(why) if self._fenced else LogFailed(why)

    def _check_writable(self) -> None:
        super()._check_writable()
        if self.stalled is not None:
            raise LogFailed(self.stalled)
