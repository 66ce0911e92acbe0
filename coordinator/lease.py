"""Which process of a coordinator id is the active one: a lease row in the log database.

Several coordinator processes of one id share one PostgreSQL decision log; exactly one
is active. The lease is the row `twopc_coordinator.coordinators` of that id: its holder
(a random token per process), the holder's gRPC address (standbys hand it to clients)
and an expiry on the database's clock (one clock for every process: no skew between
the coordinators' machines matters). Beside it, the holder keeps a session advisory
lock on a dedicated connection.

How the lease changes hands:
- a process that gets the advisory lock knows the previous holder's lease session is
  gone; if none of the holder's sessions is left either (they carry its token in
  their application_name), the holder died (or its machine did and PostgreSQL
  noticed): it takes the lease at once. This makes a crash cost about one poll
  period. (If the holder's other sessions live, or the standby itself just
  reconnected, the log database more likely failed over: the holder gets its lease
  to reconnect and renew.);
- a paused or partitioned holder keeps its session and the lock, so a lock alone
  could never be taken from it (a SIGSTOPped process's TCP connection stays open).
  Once its lease expired (it renews every `renew_interval`), a standby terminates
  the holder's backends (they carry its token in their application_name), which
  releases the lock and rolls back anything it had in flight, and then takes over;
- taking the lease is a compare-and-set on the row; the new holder then bumps the
  epoch (`PostgresDecisionLog.begin_epoch`).

Fencing does not rest on the lease's timing: a lease alone is not fencing (a paused
holder wakes up believing it still holds it). Every record the log writes is checked
in its own transaction against the row's holder and epoch (`twopc_coordinator.fence`,
under a share lock that a takeover's update waits for), so a deposed process can make
nothing durable; participants refuse branches of an epoch older than one they have
seen of that coordinator id; and a deposed process that notices (a renewal finds
another holder, or a write is fenced) stops deciding and steps down.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from twopc_common import settings
from twopc_common.errors import InvalidArgument

SCHEMA = "twopc_coordinator"


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    duration: float = 3.0
    """Seconds a lease lasts without renewal; a paused active is taken over after it."""
    renew_interval: float = 0.5
    """Seconds between the active's renewals (well under `duration`)."""
    poll_interval: float = 0.2
    """Seconds between a standby's attempts to take over; a crashed active is replaced
    within about this, plus the new active's start-up recovery."""
    takeover_lock_timeout: float = 2.0
    """How long a takeover waits for a batch of the old holder still in flight before
    terminating its sessions."""

    def __post_init__(self) -> None:
        for name in ("duration", "renew_interval", "poll_interval", "takeover_lock_timeout"):
            settings.seconds(name, getattr(self, name))
        if self.renew_interval * 2 > self.duration:
            raise InvalidArgument(
                f"lease renew interval {self.renew_interval}s must be at most half its "
                f"duration {self.duration}s, or a busy active loses it"
            )


def _lock_key(coordinator_id: str) -> str:
    return f"twopc-coordinator:{coordinator_id}"


class _LeaseSession:
    """The lease's own session (and its advisory lock), and what is known of the holder."""

    def __init__(self, dsn: str, coordinator_id: str, address: str, config: LeaseSettings) -> None:
        self._dsn = dsn
        self.coordinator_id = coordinator_id
        self.address = address
        self.config = config
        self.holder = secrets.token_hex(8)
        """This process's token (in the row while it holds the lease, and in the
        application_name of every connection it opens, so a successor can end them)."""
        self._info = f"{socket.gethostname()} pid {os.getpid()}"
        self._conn: psycopg.Connection[Any] | None = None
        self._locked = False
        self._connected = False
        self._reconnected_at: float | None = None
        """When the lease session was last replaced by a new one (after a loss)."""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.active_address: str | None = None
        """The active process's address as last read (None: none seen yet)."""
        self.holder_info: str | None = None
        self.on_lost: Callable[[str], None] = lambda why: None
        """Called (from the renewal thread) once this process lost the lease."""
        self.lost: str | None = None
        self.lost_event = threading.Event()

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self._dsn,
            autocommit=True,
            application_name=f"twopc-coordinator lease {self.holder}",
        )

    def _lease_conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._connected:
                self._reconnected_at = time.monotonic()
            self._conn = self._connect()
            self._connected = True
            self._locked = False
        return self._conn

    def _try_lock(self, conn: psycopg.Connection[Any]) -> bool:
        """Take the advisory lock on this session (once: it is counted)."""
        if not self._locked:
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                (_lock_key(self.coordinator_id),),
            ).fetchone()
            self._locked = bool(row and row[0])
        return self._locked


class _Takeover(_LeaseSession):
    """A standby's side: wait for the lease, take it once its holder is gone."""

    def take(self, go_on: Callable[[], bool]) -> bool:
        """Poll until this process holds the lease (True) or `go_on()` says stop."""
        while True:
            try:
                if self._try_take():
                    return True
            except psycopg.OperationalError:
                self._conn = None  # the log database is away: keep polling
            if not go_on():
                return False
            time.sleep(self.config.poll_interval)

    def _try_take(self) -> bool:
        conn = self._lease_conn()
        locked = self._try_lock(conn)
        row = conn.execute(
            f"SELECT holder, holder_address, holder_info, "
            f"lease_expires IS NULL OR lease_expires < clock_timestamp() "
            f"FROM {SCHEMA}.coordinators WHERE coordinator_id = %s",
            (self.coordinator_id,),
        ).fetchone()
        assert row is not None, "the coordinator's row is made before the lease is taken"
        holder, address, info, expired = row
        if not locked:
            self.active_address, self.holder_info = address, info
            if holder is not None and expired:
                # Alive (it has the lock) but silent past its lease: paused or cut off.
                # End its sessions: that frees the lock for the next poll and rolls
                # back whatever it had in flight.
                self._terminate(conn, holder)
            return False
        if holder is not None and holder != self.holder and not expired:
            # We hold the lock, so the holder's lease session is gone; but if its other
            # sessions live, or we ourselves just reconnected, this is more likely
            # the log database failing over than the holder dying: give it its lease
            # to reconnect and renew (a dead holder is then taken over at once).
            if self._alive(conn, holder):
                return False
            recent = self._reconnected_at
            if recent is not None and time.monotonic() - recent < self.config.duration:
                return False
        # The previous holder is gone (or silent past its lease).
        if not self._take_row(conn, holder):
            return False
        self.active_address, self.holder_info = self.address, self._info
        return True

    def _take_row(self, conn: psycopg.Connection[Any], holder: str | None) -> bool:
        """Name this process in the row, waiting a bounded time for a batch of the old
        holder still in flight (whose sessions are ended if it does not finish)."""
        try:
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('lock_timeout', %s, true)",
                    (f"{int(self.config.takeover_lock_timeout * 1000)}ms",),
                )
                conn.execute(
                    f"UPDATE {SCHEMA}.coordinators SET holder = %s, holder_address = %s, "
                    "holder_info = %s, lease_expires = clock_timestamp() + %s::interval "
                    "WHERE coordinator_id = %s",
                    (
                        self.holder,
                        self.address,
                        self._info,
                        _interval(self.config.duration),
                        self.coordinator_id,
                    ),
                )
        except psycopg.errors.LockNotAvailable:
            if holder is not None:
                self._terminate(conn, holder)
            return False
        return True

    @staticmethod
    def _alive(conn: psycopg.Connection[Any], holder: str) -> bool:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s",
            (f"twopc-coordinator % {holder}",),
        ).fetchone()
        return bool(row and row[0])

    @staticmethod
    def _terminate(conn: psycopg.Connection[Any], holder: str) -> None:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
            (f"twopc-coordinator % {holder}",),
        )


class Lease(_Takeover):
    """The lease of coordinator `coordinator_id` in the log database at `dsn`: `take`
    it (a standby waits), then renew it while active (`start_renewing`) until `stop`
    and `release`."""

    def start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.config.renew_interval):
            try:
                why = self._renew()
            except psycopg.Error:
                self._conn = None  # reconnect next time; the log's fence stays exact
                continue
            if why is not None:
                self.lost = why
                self.lost_event.set()
                self.on_lost(why)
                return

    def _renew(self) -> str | None:
        """Extend the lease; why it is lost, if another process took it."""
        conn = self._lease_conn()
        row = conn.execute(
            f"UPDATE {SCHEMA}.coordinators SET lease_expires = clock_timestamp() + %s::interval "
            "WHERE coordinator_id = %s AND holder = %s RETURNING holder",
            (_interval(self.config.duration), self.coordinator_id, self.holder),
        ).fetchone()
        if row is None:
            taken = conn.execute(
                f"SELECT holder_address, holder_info FROM {SCHEMA}.coordinators "
                "WHERE coordinator_id = %s",
                (self.coordinator_id,),
            ).fetchone()
            address, info = taken if taken else (None, None)
            self.active_address, self.holder_info = address, info
            return (
                f"coordinator {self.coordinator_id}: another process ({info} at {address}) "
                "took over the lease; this one is fenced and steps down"
            )
        # Our lease session may be new (reconnected): hold the lock again if it is free.
        self._try_lock(conn)
        return None

    def stop(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None

    def release(self) -> None:
        """Give the lease up (a clean stop): a standby takes over at its next poll."""
        if self._conn is None:
            return
        with contextlib.suppress(psycopg.Error):
            if self.lost is None:
                self._conn.execute(
                    f"UPDATE {SCHEMA}.coordinators SET lease_expires = NULL "
                    "WHERE coordinator_id = %s AND holder = %s",
                    (self.coordinator_id, self.holder),
                )
            self._conn.close()
        self._conn = None


def _interval(seconds: float) -> str:
    return f"{seconds} seconds"
