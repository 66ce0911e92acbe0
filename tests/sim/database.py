"""A simulated PostgreSQL shard and the agent's store on it (`participant.ports.AgentStore`).

What it models is what the protocol depends on, with PostgreSQL's semantics:
- open transactions belong to a session; an agent crash ends its sessions and rolls
  their transactions back (releasing their row locks); prepared transactions have no
  session and survive, holding their locks, until COMMIT/ROLLBACK PREPARED;
- a statement that fails puts its transaction in the failed state, and PREPARE
  TRANSACTION on a failed transaction silently rolls it back (command tag ROLLBACK),
  which the store checks, as `participant.branch_sql` does;
- the branch marker is written inside the branch, so it exists exactly when the
  branch committed; an Abort that finds no prepared branch fences the gid ('aborted'
  marker), and a branch whose marker insert meets a fence fails (unique violation);
- a read-only branch (no writes) inserts no marker and commits at once;
- row locks: `sim:add` locks its account row; a second transaction waits, FIFO,
  until the holder ends or `lock_timeout` (SQLSTATE 55P03); a query cancel
  (`cancel_safe`) interrupts the wait (57014);
- a CHECK (balance >= 0): a debit that would overdraw fails (23514);
- the coordinator-epoch table, and marker pruning by age;
- a crash of PostgreSQL itself: every session ends, open transactions roll back,
  prepared ones stay; calls fail until it is back;
- optionally, a connection lost while the settling statement (PREPARE, the one-phase
  COMMIT) ran: it may or may not have happened (`OutcomeUnknown`).

Statements are the workload's own small language: `sim:add` (account, delta, op id),
`sim:read` (account), `sim:fail`. Every committed `sim:add` is kept with its op id and
transaction id, which is what the invariants are checked against.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from psycopg import Xid

from participant.branch_sql import BranchFailed, OutcomeUnknown
from participant.control_sql import LockWait, PreparedBranch, PreparedScan
from tests.sim.loop import Process, SimClock
from tests.sim.trace import Trace
from twopc_common import ids
from twopc_common.errors import Unavailable
from twopc_common.isolation import Isolation
from twopc_common.phase2_outcome import Phase2Outcome, finished
from twopc_common.values import Statement, StatementResult


class _SqlError(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate


@dataclass
class _Tx:
    xid: int
    pid: int
    writes: list[tuple[str, int, str]] = field(default_factory=list)
    """(account, delta, op id) in order."""
    locks: list[str] = field(default_factory=list)
    failed: bool = False
    marker: str | None = None
    gid: str = ""
    txid: str = ""
    prepared_at: float = 0.0


@dataclass
class _Wait:
    tx: _Tx
    future: asyncio.Future[None]
    started: float


class SimDatabase:
    """One shard: everything here survives an agent crash (it is the database)."""

    def __init__(
        self,
        name: str,
        balances: dict[str, int],
        trace: Trace,
        on_finish_prepared: Callable[[str, str, bool], None],
    ) -> None:
        self.name = name
        self.balances = dict(balances)
        self.applied: list[tuple[str, str]] = []
        """(op id, transaction id) of every committed write, in commit order."""
        self.prepared: dict[str, _Tx] = {}
        self.markers: dict[str, tuple[str, str, float]] = {}
        """gid -> (transaction id, 'committed' | 'aborted', created at)."""
        self.epochs: dict[str, int] = {}
        self.open: dict[int, _Tx] = {}
        """Open transactions by backend pid."""
        self._holders: dict[str, _Tx] = {}
        self._queues: dict[str, list[_Wait]] = {}
        self._xids = itertools.count(1)
        self.pids = itertools.count(100)
        self.owners: dict[int, Process] = {}
        """Backend pid -> the agent process whose session it is."""
        self.conns: list[SimConn] = []
        self.down_until = 0.0
        self._trace = trace
        self._on_finish_prepared = on_finish_prepared

    # -- transactions ---------------------------------------------------------------

    def begin(self, pid: int) -> _Tx:
        tx = self.open[pid] = _Tx(next(self._xids), pid)
        return tx

    def visible(self, tx: _Tx, account: str) -> int:
        return self.balances[account] + sum(d for a, d, _ in tx.writes if a == account)

    async def lock(self, tx: _Tx, account: str, timeout: float, conn: SimConn) -> None:
        holder = self._holders.get(account)
        if holder is None or holder is tx:
            self._grant(tx, account)
            return
        loop = asyncio.get_running_loop()
        wait = _Wait(tx, loop.create_future(), loop.time())
        self._queues.setdefault(account, []).append(wait)
        conn.waiting = wait
        try:
            await asyncio.wait_for(wait.future, timeout)
            # Python 3.11's wait_for can swallow the cancellation of a crash that
            # came as the lock was granted: a dead session takes no lock.
            if not conn.owner.alive:
                raise asyncio.CancelledError
        except TimeoutError:
            raise _SqlError("55P03", "canceling statement due to lock timeout") from None
        finally:
            conn.waiting = None
            queue = self._queues.get(account, [])
            if wait in queue:
                queue.remove(wait)

    def _grant(self, tx: _Tx, account: str) -> None:
        self._holders[account] = tx
        if account not in tx.locks:
            tx.locks.append(account)

    def _release(self, tx: _Tx) -> None:
        for account in tx.locks:
            if self._holders.get(account) is tx:
                del self._holders[account]
                queue = self._queues.get(account, [])
                while queue:
                    wait = queue.pop(0)
                    if not wait.future.done():
                        self._grant(wait.tx, account)
                        wait.future.set_result(None)
                        break
        tx.locks = []

    def end(self, tx: _Tx, commit: bool) -> None:
        """COMMIT or ROLLBACK of an open or prepared transaction."""
        self.open.pop(tx.pid, None)
        if tx.gid:
            self.prepared.pop(tx.gid, None)
        if commit:
            for account, delta, op in tx.writes:
                self.balances[account] += delta
                assert self.balances[account] >= 0, "CHECK (balance >= 0) bypassed"
                self.applied.append((op, tx.txid))
            if tx.marker is not None:
                self.markers[tx.marker] = (tx.txid, "committed", _now())
        self._release(tx)

    def pg_prepare(self, tx: _Tx, gid: str, txid: str) -> str:
        """PREPARE TRANSACTION: its command tag."""
        self.open.pop(tx.pid, None)
        if tx.failed:
            self._release(tx)
            return "ROLLBACK"
        tx.gid, tx.txid, tx.prepared_at = gid, txid, _now()
        self.prepared[gid] = tx
        return "PREPARE TRANSACTION"

    def finish_prepared(self, gid: str, commit: bool) -> None:
        tx = self.prepared[gid]
        self._on_finish_prepared(self.name, tx.txid, commit)
        self._trace.add(self.name, "COMMIT PREPARED" if commit else "ROLLBACK PREPARED", tx.txid)
        self.end(tx, commit)

    def crash(self, seconds: float) -> None:
        """PostgreSQL dies (`pg_ctl stop -m immediate`) and is back after `seconds`:
        every session ends and its open transaction rolls back; prepared ones stay."""
        for tx in list(self.open.values()):
            self.end(tx, False)
        for conn in self.conns:
            conn.broken = True
            if conn.waiting is not None and not conn.waiting.future.done():
                conn.waiting.future.set_exception(
                    _SqlError("57P01", "terminating connection due to immediate shutdown")
                )
        self.conns = []
        self.down_until = _now() + seconds

    @property
    def down(self) -> bool:
        return _now() < self.down_until

    def end_sessions(self, owner: Process) -> None:
        """The agent died: its backends end, their open transactions roll back."""
        for pid, tx in list(self.open.items()):
            if self.owners.get(pid) is owner:
                if tx.txid:
                    self._trace.add(self.name, "session lost: rolled back", tx.txid)
                self.end(tx, False)
        for queue in self._queues.values():
            for wait in queue:
                if self.owners.get(wait.tx.pid) is owner and not wait.future.done():
                    wait.future.cancel()

    def waits(self) -> list[tuple[_Tx, _Tx, float]]:
        """(waiter, holder, since) for every lock wait."""
        out = []
        for account, queue in self._queues.items():
            holder = self._holders.get(account)
            for wait in queue:
                if holder is not None and not wait.future.done():
                    out.append((wait.tx, holder, wait.started))
        return out


def _now() -> float:
    return asyncio.get_running_loop().time()


@dataclass
class _Info:
    backend_pid: int


class SimConn:
    """A session of one agent process on the simulated database."""

    def __init__(self, db: SimDatabase, owner: Process) -> None:
        self.db = db
        self.owner = owner
        pid = next(db.pids)
        self.info = _Info(pid)
        db.owners[pid] = owner
        db.conns.append(self)
        self.closed = False
        self.broken = False
        """Its session ended under it (the database crashed)."""
        self.waiting: _Wait | None = None

    @property
    def tx(self) -> _Tx | None:
        return self.db.open.get(self.info.backend_pid)

    async def cancel_safe(self, *, timeout: float = 30.0) -> None:
        if self.waiting is not None and not self.waiting.future.done():
            self.waiting.future.set_exception(_SqlError("57014", "canceling statement"))


@dataclass(frozen=True, slots=True)
class StoreFaults:
    max_delay: float = 0.003
    """Each database round trip takes up to this many seconds."""
    settle_loss: float = 0.0
    """Probability that the connection breaks while PREPARE or a one-phase COMMIT runs."""


class SimStore:
    """`participant.ports.AgentStore` on a `SimDatabase`, for one agent process: one
    object plays the three parts (`branches`, `phase2`, `control`) that
    `participant.store.Store` has as three."""

    def __init__(
        self,
        db: SimDatabase,
        owner: Process,
        clock: SimClock,
        rng: random.Random,
        lock_timeout: float,
        marker_retention: float,
        faults: StoreFaults,
    ) -> None:
        self._db = db
        self._owner = owner
        self._clock = clock
        self._rng = rng
        self._lock_timeout = lock_timeout
        self._marker_retention = marker_retention
        self._faults = faults

    @property
    def branches(self) -> SimStore:
        return self

    @property
    def phase2(self) -> SimStore:
        return self

    @property
    def control(self) -> SimStore:
        return self

    async def _round_trip(self) -> None:
        if not self._owner.alive:
            raise asyncio.CancelledError
        await asyncio.sleep(self._rng.uniform(0, self._faults.max_delay))
        if not self._owner.alive:
            raise asyncio.CancelledError

    def _wall(self, at: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock.time() - (_now() - at), dt.UTC)

    # -- branch work ----------------------------------------------------------------

    def _check_up(self, conn: SimConn | None = None) -> None:
        """Unavailable if the database is down or `conn`'s session ended."""
        if self._db.down or (conn is not None and conn.broken):
            raise Unavailable(f"database unavailable: {self._db.name} is down")

    async def connect_branch(self, isolation: Isolation) -> SimConn:
        # The model runs every branch serially per row (locks, no snapshots), so the
        # isolation level changes nothing in it; it is accepted as the store's is.
        await self._round_trip()
        if self._db.down:
            raise BranchFailed(f"no database connection: {self._db.name} is down")
        return SimConn(self._db, self._owner)

    async def release(self, conn: SimConn) -> None:
        await self.rollback(conn)
        conn.closed = True

    async def rollback(self, conn: SimConn) -> None:
        if conn.closed or conn.broken or not self._owner.alive:
            return
        tx = conn.tx
        if tx is not None:
            self._db.end(tx, False)

    def _tx(self, conn: SimConn) -> _Tx:
        """The session's open transaction, or a new one; never on a session that ended
        (a lock granted just before PostgreSQL crashed wakes its waiter afterwards)."""
        if conn.broken:
            raise BranchFailed("57P01: terminating connection due to immediate shutdown", "57P01")
        return conn.tx or self._db.begin(conn.info.backend_pid)

    async def _run(self, conn: SimConn, statements: Sequence[Statement]) -> list[StatementResult]:
        if not self._owner.alive:
            raise asyncio.CancelledError
        if conn.broken or self._db.down:
            raise BranchFailed("57P01: terminating connection due to immediate shutdown", "57P01")
        tx = self._tx(conn)
        if tx.failed:
            raise BranchFailed("25P02: current transaction is aborted", "25P02")
        results = []
        for i, st in enumerate(statements, 1):
            await self._round_trip()
            if conn.broken:
                raise BranchFailed("57P01: terminating connection due to immediate shutdown")
            try:
                result = await self._statement(conn, tx, st)
            except _SqlError as exc:
                tx.failed = True
                raise BranchFailed(str(exc), exc.sqlstate) from None
            if conn.broken:  # PostgreSQL crashed while the statement ran
                raise BranchFailed("57P01: terminating connection due to immediate shutdown")
            if st.expect is not None and (why := st.expect.violation(result.rows_affected)):
                tx.failed = True
                raise BranchFailed(f"statement {i}: {why}")
            results.append(result)
        return results

    async def _statement(self, conn: SimConn, tx: _Tx, st: Statement) -> StatementResult:
        if st.sql == "sim:add":
            account, delta, op = str(st.params[0]), int(str(st.params[1])), str(st.params[2])
            await self._db.lock(tx, account, self._lock_timeout, conn)
            if self._db.visible(tx, account) + delta < 0:
                raise _SqlError("23514", f"balance of {account} would be negative")
            tx.writes.append((account, delta, op))
            return StatementResult(1)
        if st.sql == "sim:read":
            account = str(st.params[0])
            return StatementResult(1, ("balance",), ((self._db.visible(tx, account),),))
        if st.sql == "sim:fail":
            raise _SqlError("P0001", "the workload asked this statement to fail")
        raise AssertionError(f"the simulated database does not know {st.sql!r}")

    async def execute(
        self, conn: SimConn, statements: Sequence[Statement]
    ) -> list[StatementResult]:
        return await self._run(conn, statements)

    def _settle_lost(self) -> bool:
        return self._faults.settle_loss > 0 and self._rng.random() < self._faults.settle_loss

    async def prepare(
        self,
        conn: SimConn,
        statements: Sequence[Statement],
        transaction_id: str,
        participant_id: str,
    ) -> tuple[list[StatementResult], bool]:
        if conn.tx is not None and conn.tx.failed:
            raise BranchFailed("branch transaction already failed")
        results = await self._run(conn, statements)
        tx = self._tx(conn)
        gid = str(ids.branch_xid(transaction_id, participant_id))
        await self._round_trip()
        if conn.broken:  # the database died with PREPARE on its way: nothing happened
            self._break(conn, transaction_id, "with PREPARE on its way")
        wrote = bool(tx.writes)
        if not wrote:  # no transaction id assigned: no marker; PREPARE, COMMIT PREPARED
            self._db.end(tx, True)
            return results, False
        if gid in self._db.markers:
            tx.failed = True  # the marker insert fails; PREPARE then rolls back
        else:
            tx.marker = gid
        lost = self._settle_lost()
        if lost and self._rng.random() < 0.5:
            self._db.end(tx, False)
            self._break(conn, transaction_id, "before PREPARE")
        tag = self._db.pg_prepare(tx, gid, transaction_id)
        if lost:
            self._break(conn, transaction_id, f"after PREPARE ({tag})")
        if tag != "PREPARE TRANSACTION":
            raise BranchFailed(
                f"PREPARE TRANSACTION answered {tag!r}: the branch had already failed "
                "and was rolled back (23505: duplicate key value violates unique "
                "constraint branch_marker_pkey)"
            )
        self._trace_add("PREPARE TRANSACTION", transaction_id)
        return results, True

    def _break(self, conn: SimConn, txid: str, when: str) -> None:
        self._trace_add(f"connection lost {when}", txid)
        conn.closed = True
        raise OutcomeUnknown(f"connection to the database lost while settling ({when})")

    def _trace_add(self, what: str, txid: str) -> None:
        self._db._trace.add(self._db.name, what, txid)

    async def commit_one_phase(
        self,
        conn: SimConn,
        statements: Sequence[Statement],
        transaction_id: str,
        participant_id: str,
    ) -> list[StatementResult]:
        if conn.tx is not None and conn.tx.failed:
            raise BranchFailed("branch transaction already failed")
        results = await self._run(conn, statements)
        tx = self._tx(conn)
        gid = str(ids.branch_xid(transaction_id, participant_id))
        if gid in self._db.markers:
            tx.failed = True
            raise BranchFailed("23505: duplicate key value violates unique constraint", "23505")
        tx.marker, tx.txid = gid, transaction_id
        await self._round_trip()
        if conn.broken:
            self._break(conn, transaction_id, "with COMMIT on its way")
        lost = self._settle_lost()
        if lost and self._rng.random() < 0.5:
            self._db.end(tx, False)
            self._break(conn, transaction_id, "before COMMIT")
        self._db.end(tx, True)
        self._trace_add("COMMIT (one phase)", transaction_id)
        if lost:
            self._break(conn, transaction_id, "after COMMIT")
        return results

    # -- phase 2 --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def phase2_connection(self) -> AsyncIterator[SimConn]:
        await self._round_trip()
        self._check_up()
        conn = SimConn(self._db, self._owner)
        try:
            yield conn
        finally:
            conn.closed = True

    async def finish_many(
        self, conn: SimConn, branches: Sequence[tuple[str, bool]], participant_id: str
    ) -> list[bool]:
        ran: list[bool] = []
        await self._round_trip()
        self._check_up(conn)
        for transaction_id, commit in branches:
            gid = str(ids.branch_xid(transaction_id, participant_id))
            if gid not in self._db.prepared:
                break  # PostgreSQL skips the rest of the pipeline
            self._db.finish_prepared(gid, commit)
            ran.append(True)
        return ran + [False] * (len(branches) - len(ran))

    async def finish_prepared(
        self, conn: SimConn, transaction_id: str, participant_id: str, commit: bool
    ) -> Phase2Outcome:
        gid = str(ids.branch_xid(transaction_id, participant_id))
        await self._round_trip()
        self._check_up(conn)
        if gid in self._db.prepared:
            self._db.finish_prepared(gid, commit)
            return finished(commit)
        if not commit and gid not in self._db.markers:
            self._db.markers[gid] = (transaction_id, "aborted", _now())
            self._trace_add("fence (aborted marker)", transaction_id)
        marker = self._db.markers.get(gid)
        if marker is None:
            return Phase2Outcome.NOT_PREPARED
        if marker[1] == "committed":
            return Phase2Outcome.ALREADY_COMMITTED
        return Phase2Outcome.ALREADY_ROLLED_BACK

    # -- recovery, deadlocks, epochs --------------------------------------------------

    async def prepared_branches(self, participant_id: str) -> PreparedScan:
        await self._round_trip()
        self._check_up()
        ours = tuple(
            PreparedBranch(tx.txid, gid, self._wall(tx.prepared_at))
            for gid, tx in self._db.prepared.items()
            if Xid.from_string(gid).bqual == participant_id
        )
        return PreparedScan(ours, ())

    async def lock_waits(self, pids: Sequence[int]) -> list[LockWait]:
        await self._round_trip()
        self._check_up()
        wanted = set(pids)
        return [
            LockWait(
                waiter.pid,
                0 if holder.gid else holder.pid,
                self._wall(since),
                holder.gid or None,
            )
            for waiter, holder, since in self._db.waits()
            if waiter.pid in wanted
        ]

    async def load_epochs(self) -> dict[str, int]:
        await self._round_trip()
        self._check_up()
        return dict(self._db.epochs)

    async def raise_epoch(self, coordinator_id: str, epoch: int) -> None:
        await self._round_trip()
        self._check_up()
        self._db.epochs[coordinator_id] = max(self._db.epochs.get(coordinator_id, 0), epoch)

    async def prune_markers(self) -> int:
        await self._round_trip()
        self._check_up()
        horizon = _now() - self._marker_retention
        old = [g for g, (_, _, at) in self._db.markers.items() if at < horizon]
        for gid in old:
            del self._db.markers[gid]
        return len(old)
