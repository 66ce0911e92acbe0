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

This module takes the lease and opens and closes the log; the schema is
`coordinator.pg_schema`, the writer thread `coordinator.pg_writer` over
`coordinator.log_writer` (shared with the SQLite log), the statements and queries
`coordinator.pg_records`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row

from coordinator.lease import Lease, LeaseSettings
from coordinator.log_records import LogInUse
from coordinator.pg_records import PostgresReads, PostgresWrites
from coordinator.pg_schema import SCHEMA, migrate
from coordinator.pg_writer import Fenced
from twopc_common.settings import describe_dsn

# `Fenced` is what this log's writes raise once another process took over.
__all__ = ["Fenced", "PostgresDecisionLog", "is_postgres_log"]


def is_postgres_log(target: str) -> bool:
    """Whether a `--log` value names a PostgreSQL database rather than a SQLite file."""
    return target.startswith(("postgresql://", "postgres://"))


class PostgresDecisionLog(PostgresWrites, PostgresReads):
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
        super().__init__(batch_max, reconnect_timeout)
        self.dsn = dsn
        """Where the log is (it may carry a password: show it with `describe_dsn`)."""
        self.coordinator_id = coordinator_id
        self._prune_batch = prune_batch
        self.lease = Lease(dsn, coordinator_id, address, lease or LeaseSettings())
        self._read_lock = threading.Lock()
        self._reader: psycopg.Connection[dict[str, Any]] | None = None
        self.epoch = 0
        self.last_epoch = 0
        """The epoch of the previous active process (read by `acquire`)."""
        self.pruned_before: float | None = None
        """Records decided before this time may have been pruned."""
        self.lease.on_lost = self._lost

    def __repr__(self) -> str:
        return f"PostgresDecisionLog({describe_dsn(self.dsn)!r}, {self.coordinator_id!r})"

    @property
    def active_address(self) -> str | None:
        """The address of the active process, as last seen (for standbys' hints)."""
        return self.lease.active_address

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
        self._start_writer(conn)

    def close(self) -> None:
        self.lease.stop()
        if not self._stop_writer() and self._writer_conn is not None:
            self._writer_conn.close()
        self._writer_conn = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.lease.release()

    def _lost(self, why: str) -> None:
        self._fail(why, fenced=True)
