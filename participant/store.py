"""Everything the agent does to PostgreSQL: the pool, branch work, prepare, phase 2,
markers and the scan for prepared branches.

Branch transactions run on ordinary pooled connections and are prepared with an
explicit `PREPARE TRANSACTION` whose command tag is checked: PostgreSQL answers it on
an already-failed transaction with a silent `ROLLBACK`, and psycopg's `tpc_prepare()`
neither reports the tag nor lets the connection go back to the pool before phase 2.
Phase 2 works on any idle connection, which is also what works after a restart: a
batch of decisions goes as pipelined `COMMIT/ROLLBACK PREPARED` statements in one round
trip, and whatever that did not settle (a repeat, a branch gone) goes through psycopg's
two-phase API (`Xid`, `tpc_commit`, `tpc_rollback`) and the marker check; recovery
lists branches with `tpc_recover`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import weakref
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from participant import containment
from participant.config import ParticipantConfig
from twopc_common import ids, settings
from twopc_common.errors import TwoPCError, Unavailable
from twopc_common.isolation import Isolation
from twopc_common.phase2_outcome import Phase2Outcome, finished
from twopc_common.statements import AGENT_SCHEMA, LEGACY_TABLES, session_safe, writes
from twopc_common.values import RESULT_OVERHEAD_BYTES, Statement, StatementResult, row_bytes

MARKER_TABLE = f"{AGENT_SCHEMA}.branch_marker"

# One row per settled branch gid. 'committed' rows are written inside the branch
# itself (so they exist exactly when it committed); 'aborted' rows are fences written
# by an Abort that found no prepared branch, so that a branch still in flight (an
# orphaned backend, bytes delayed in the network) can never commit afterwards: its own
# marker insert hits the primary key.
_CREATE_MARKER = f"""
CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (
    gid text PRIMARY KEY,
    transaction_id text NOT NULL,
    state text NOT NULL DEFAULT 'committed' CHECK (state IN ('committed', 'aborted')),
    created_at timestamptz NOT NULL DEFAULT now()
)"""

EPOCH_TABLE = f"{AGENT_SCHEMA}.coordinator_epoch"
# Older versions kept these tables in the default schema; they are moved at start.
_LEGACY_TABLES = dict(zip(LEGACY_TABLES, (MARKER_TABLE, EPOCH_TABLE), strict=True))

# The highest epoch of each coordinator id this agent has opened a branch for (see
# participant/epochs.py). One row per coordinator id, written once per its start.
_CREATE_EPOCHS = f"""
CREATE TABLE IF NOT EXISTS {EPOCH_TABLE} (
    coordinator_id text PRIMARY KEY,
    epoch bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)"""

AsyncConn = psycopg.AsyncConnection[tuple[object, ...]]


class BranchFailed(TwoPCError):
    """The branch's work failed; the branch is rolled back and votes NO."""

    def __init__(self, reason: str, sqlstate: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.sqlstate = sqlstate


class OutcomeUnknown(Unavailable):
    """The connection broke while PostgreSQL ran the statement that settles a branch
    (PREPARE TRANSACTION, or the COMMIT of a one-phase branch): it may or may not have
    happened. Voting NO here would be a lie if it did; only a later look at the
    database (pg_prepared_xacts, the marker row) can tell, which is what an Abort does."""


class ConfigurationError(TwoPCError):
    """The database cannot host branches (for example max_prepared_transactions = 0)."""


async def _role_and_schema(conn: AsyncConn) -> tuple[str, str, str]:
    cur = await conn.execute("SELECT current_user, current_database(), current_schema()")
    row = await cur.fetchone()
    return (str(row[0]), str(row[1]), str(row[2] or "public")) if row else ("?", "?", "public")


def _no_create_privilege(what: str, where: tuple[str, str, str]) -> str:
    """What to GRANT when the agent's role may not create its schema (`where` has no
    schema) or a table in it."""
    role, database, schema = where
    if not schema:
        return (
            f"role {role} may not create the agent's schema {what} in database {database}: "
            f'as a superuser run "CREATE SCHEMA {what} AUTHORIZATION {role};" (or '
            f'"GRANT CREATE ON DATABASE {database} TO {role};")'
        )
    return (
        f"role {role} may not create the agent's {what} table in schema {schema} "
        f"of database {database}: as its owner or a superuser run "
        f'"GRANT CREATE ON SCHEMA {schema} TO {role};" (or create the table once as '
        f"another role and grant {role} SELECT, INSERT, UPDATE, DELETE on it)"
    )


@dataclass(frozen=True, slots=True)
class PreparedBranch:
    transaction_id: str
    gid: str
    prepared_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class ForeignPrepared:
    """A prepared transaction in this database that is not a branch of this participant."""

    gid: str
    prepared_at: dt.datetime | None
    owner: str
    database: str
    locks: int
    why: str


@dataclass(frozen=True, slots=True)
class PreparedScan:
    ours: tuple[PreparedBranch, ...]
    foreign: tuple[ForeignPrepared, ...]


@dataclass(frozen=True, slots=True)
class LockWait:
    """A backend of this agent waiting for a lock, and one backend it waits for: pid 0
    is a prepared transaction, `holder_gid` says which (for a row lock's wait)."""

    waiter_pid: int
    holder_pid: int
    wait_started: dt.datetime | None
    holder_gid: str | None


# Lock waits of the given backends, with every backend each one waits for. A prepared
# transaction holds its locks with no backend (pid 0); a row lock's waiter waits for
# the holder's transaction id, which names the prepared transaction.
_WAITS_QUERY = """
SELECT w.pid, h.holder, w.waitstart, px.gid
  FROM (SELECT pid, min(waitstart) AS waitstart, max(transactionid::text) AS xid
          FROM pg_locks WHERE NOT granted AND pid = ANY(%s) GROUP BY pid) w
 CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS h(holder)
  LEFT JOIN pg_prepared_xacts px ON h.holder = 0 AND px.transaction::text = w.xid
"""


# Prepared transactions of this database, with the locks each holds: a prepared
# transaction's locks have no pid and share the virtual transaction of its own
# transaction-id lock.
_PREPARED_QUERY = """
SELECT p.gid, p.prepared, p.owner, p.database,
       (SELECT count(*) FROM pg_locks l
         WHERE l.pid IS NULL AND l.virtualtransaction = (
               SELECT x.virtualtransaction FROM pg_locks x
                WHERE x.locktype = 'transactionid' AND x.transactionid = p.transaction
                  AND x.pid IS NULL LIMIT 1)) AS locks
  FROM pg_prepared_xacts p
 WHERE p.database = current_database()
"""


def _not_ours(xid: psycopg.Xid, participant_id: str) -> str | None:
    """Why a prepared transaction is not a branch of this participant (None if it is)."""
    if xid.format_id != ids.FORMAT_ID or xid.bqual is None:
        return "not a twopc branch"
    if xid.bqual != participant_id:
        return f"a twopc branch of participant {xid.bqual!r}"
    try:
        ids.TransactionId.parse(xid.gtrid)
    except TwoPCError:
        return f"a gid in twopc's format with a malformed transaction id {xid.gtrid!r}"
    return None


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class Store:
    def __init__(self, config: ParticipantConfig) -> None:
        self._config = config
        options = " ".join(
            [
                f"-c lock_timeout={_ms(config.lock_timeout)}",
                f"-c statement_timeout={_ms(config.statement_timeout)}",
                # A safety net under the agent's own idle-branch timer.
                f"-c idle_in_transaction_session_timeout={_ms(config.idle_branch_timeout * 2)}",
            ]
        )
        kwargs = {"options": options, "application_name": f"twopc-participant-{config.id}"}
        # Branch work (open branches hold a connection each, for as long as they are
        # open) and everything else - phase 2, fences, recovery scans, pruning - in
        # separate pools, so that open branches can never starve the decided ones.
        self.pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
            config.dsn,
            min_size=config.pool_min_size,
            max_size=config.pool_max_size,
            timeout=config.pool_timeout,
            kwargs=kwargs,
            open=False,
            name=f"participant-{config.id}",
            reset=self._reset_session,
        )
        # Connections whose branch may have changed session state (see
        # participant.containment); reset before the pool hands them out again.
        self._dirty: weakref.WeakSet[AsyncConn] = weakref.WeakSet()
        setup = containment.branch_setup(
            f"{_ms(config.lock_timeout)}ms",
            f"{_ms(config.statement_timeout)}ms",
            config.branch_role or "none",
        )
        self._branch_setup: tuple[Query, tuple[object, ...] | None] = (setup, None)
        self._marked_setup = containment.marked_branch_setup(setup, MARKER_TABLE)
        self._as_agent: list[tuple[Query, tuple[object, ...] | None]] = (
            [(containment.AGENT_ROLE_AGAIN, None)] if config.branch_role else []
        )
        self.control: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
            config.dsn,
            min_size=1,
            max_size=config.control_pool_size,
            timeout=config.pool_timeout,
            kwargs=kwargs,
            open=False,
            name=f"participant-{config.id}-control",
        )
        self._purge: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Check the database can host branches, create the marker table, open the pool."""
        where = settings.describe_dsn(self._config.dsn)
        try:
            conn = await psycopg.AsyncConnection.connect(self._config.dsn, autocommit=True)
        except psycopg.OperationalError as exc:
            reason = settings.redact(str(exc).strip())
            raise ConfigurationError(f"cannot connect to {where}: {reason}") from exc
        async with conn:
            cur = await conn.execute("SHOW max_prepared_transactions")
            row = await cur.fetchone()
            if row is None or int(str(row[0])) == 0:
                raise ConfigurationError(
                    "max_prepared_transactions is 0 on this database, so it cannot "
                    "prepare branches: set max_prepared_transactions (for example 100) "
                    "in postgresql.conf and restart PostgreSQL"
                )
            try:
                await containment.create_schema(conn)
            except psycopg.errors.InsufficientPrivilege as exc:
                role, database, _ = await _role_and_schema(conn)
                raise ConfigurationError(
                    _no_create_privilege(AGENT_SCHEMA, (role, database, ""))
                ) from exc
            except containment.ContainmentError as exc:
                raise ConfigurationError(str(exc)) from exc
            # Looked up first: PostgreSQL checks CREATE on the schema even when the
            # table exists, and a role given ready-made tables needs no CREATE.
            for table, create in ((MARKER_TABLE, _CREATE_MARKER), (EPOCH_TABLE, _CREATE_EPOCHS)):
                cur = await conn.execute("SELECT to_regclass(%s)", (table,))
                found = await cur.fetchone()
                if found is not None and found[0] is not None:
                    continue
                try:
                    await conn.execute(create)
                except psycopg.errors.InsufficientPrivilege as exc:
                    role_schema = await _role_and_schema(conn)
                    raise ConfigurationError(_no_create_privilege(table, role_schema)) from exc
            try:
                await containment.migrate_legacy_tables(conn, _LEGACY_TABLES)
                if self._config.branch_role:
                    await containment.check_branch_role(conn, self._config.branch_role)
            except containment.ContainmentError as exc:
                raise ConfigurationError(str(exc)) from exc
        try:
            await self.pool.open(wait=True, timeout=self._config.pool_timeout)
            await self.control.open(wait=True, timeout=self._config.pool_timeout)
        except PoolTimeout as exc:
            raise ConfigurationError(
                f"could not open {self._config.pool_min_size} connections to {where} "
                f"within {self._config.pool_timeout:g}s ({exc}): check the database's "
                "max_connections and the role's connection limit, or lower --pool-min-size"
            ) from exc

    async def close(self) -> None:
        await self.pool.close()
        await self.control.close()

    # -- branch work ----------------------------------------------------------------

    async def connect_branch(self, isolation: Isolation) -> AsyncConn:
        """A pooled connection whose next transaction begins at `isolation` (psycopg
        sends BEGIN ISOLATION LEVEL ... with the branch's first statements)."""
        try:
            conn = await self.pool.getconn()
        except Exception as exc:
            raise BranchFailed(f"no database connection: {exc}") from exc
        if conn.isolation_level is not isolation.psycopg:
            await conn.set_isolation_level(isolation.psycopg)
        return conn

    async def _reset_session(self, conn: AsyncConn) -> None:
        if conn in self._dirty:
            self._dirty.discard(conn)
            await conn.execute(containment.RESET_SESSION)
            await conn.commit()

    def _head(
        self,
        conn: AsyncConn,
        statements: Sequence[Statement],
        marker: tuple[str, str] | None = None,
    ) -> list[tuple[Query, tuple[object, ...] | None]]:
        """What goes before the statements: the branch's settings if it starts now,
        with its marker (gid, transaction id) if given."""
        if not session_safe(statements):
            self._dirty.add(conn)
        if conn.info.transaction_status != TransactionStatus.IDLE:
            return []
        if marker is not None:
            return [(self._marked_setup, marker)]
        return [self._branch_setup]

    async def release(self, conn: AsyncConn) -> None:
        broken = conn.broken
        await self.pool.putconn(conn)
        if broken:
            self._purge_broken()

    def _purge_broken(self) -> None:
        """One connection broke (database restarted, network cut): its idle siblings
        probably did too. Have the pool test them now rather than hand each to a
        branch that would fail on it."""
        if self._purge is None or self._purge.done():
            self._purge = asyncio.create_task(self._check_pools())

    async def _check_pools(self) -> None:
        await self.pool.check()
        await self.control.check()

    async def execute(
        self, conn: AsyncConn, statements: Sequence[Statement]
    ) -> list[StatementResult]:
        """Run statements in the branch, pipelined; a failure or broken expectation
        raises (the branch must then be rolled back)."""
        try:
            cursors, _ = await _pipelined(conn, self._head(conn, statements), statements, [])
            return await _results(statements, cursors, self._config.limits.max_result_bytes)
        except psycopg.Error as exc:
            raise BranchFailed(_describe(exc), exc.sqlstate or "") from exc

    @staticmethod
    async def rollback(conn: AsyncConn) -> None:
        if conn.closed:
            return
        # A broken connection has no transaction left to roll back; the pool
        # discards it on return.
        with contextlib.suppress(psycopg.Error):
            await conn.rollback()

    async def prepare(
        self,
        conn: AsyncConn,
        statements: Sequence[Statement],
        transaction_id: str,
        participant_id: str,
    ) -> tuple[list[StatementResult], bool]:
        """Run the statements, write the branch marker and PREPARE, in one round trip.

        PostgreSQL skips everything after an error in a pipeline, so a failing statement
        leaves nothing prepared. A broken expectation is only seen once the results are
        in, when the branch is already prepared: it is rolled back with ROLLBACK
        PREPARED (the rare NO pays a round trip, the common YES saves several).
        Returns the results and False if the branch wrote nothing (READ_ONLY: it was
        committed at once and needs no phase 2).

        A branch that starts here with a statement meant to write (`statements.writes`:
        DML, DDL, ...) gets its marker first, in one statement with its settings
        (`containment.marked_branch_setup`); otherwise the marker comes last, only if
        the branch wrote (a transaction id is assigned), after the switch back to the
        agent's role. The first saves a statement per branch; it votes YES (not
        READ_ONLY) for a branch whose writes happened to change no row."""
        state = conn.info.transaction_status
        if state == TransactionStatus.INERROR:
            raise BranchFailed("branch transaction already failed")
        xid = ids.branch_xid(transaction_id, participant_id)
        gid = str(xid)
        first = state == TransactionStatus.IDLE and writes(statements)
        # PREPARE runs as the agent's role: a prepared transaction belongs to the
        # role that prepared it, and only that role (or a superuser) may finish it.
        tail: list[tuple[Query, tuple[object, ...] | None]] = [*self._as_agent]
        if not first:
            tail.append(
                (
                    f"INSERT INTO {MARKER_TABLE} (gid, transaction_id) SELECT %s, %s "
                    "WHERE pg_current_xact_id_if_assigned() IS NOT NULL",
                    (gid, transaction_id),
                )
            )
        tail.append((sql.SQL("PREPARE TRANSACTION {}").format(gid), None))
        head = self._head(conn, statements, (gid, transaction_id) if first else None)
        try:
            cursors, tails = await _settle(conn, _pipelined(conn, head, statements, tail))
            prepared = tails[-1]
            if prepared.statusmessage != "PREPARE TRANSACTION":
                raise BranchFailed(
                    f"PREPARE TRANSACTION answered {prepared.statusmessage!r}: "
                    "the branch had already failed and was rolled back"
                )
            try:
                results = await _results(statements, cursors, self._config.limits.max_result_bytes)
            except BranchFailed:
                await _settle(conn, conn.tpc_rollback(xid))
                raise
            if not first and tails[-2].rowcount == 0:
                await _settle(conn, conn.tpc_commit(xid))
                return results, False
        except psycopg.Error as exc:
            raise BranchFailed(_describe(exc), exc.sqlstate or "") from exc
        return results, True

    async def commit_one_phase(
        self,
        conn: AsyncConn,
        statements: Sequence[Statement],
        transaction_id: str,
        participant_id: str,
    ) -> list[StatementResult]:
        """Run the statements and the marker (so that a later Abort can tell the branch
        committed) in one round trip, check the expectations, then COMMIT. A branch that
        starts here gets its marker first, with its settings (as in `prepare`)."""
        state = conn.info.transaction_status
        if state == TransactionStatus.INERROR:
            raise BranchFailed("branch transaction already failed")
        gid = str(ids.branch_xid(transaction_id, participant_id))
        first = state == TransactionStatus.IDLE
        tail: list[tuple[Query, tuple[object, ...] | None]] = []
        if not first:
            tail += [
                *self._as_agent,
                (
                    f"INSERT INTO {MARKER_TABLE} (gid, transaction_id) VALUES (%s, %s)",
                    (gid, transaction_id),
                ),
            ]
        head = self._head(conn, statements, (gid, transaction_id) if first else None)
        try:
            cursors, _ = await _pipelined(conn, head, statements, tail)
            results = await _results(statements, cursors, self._config.limits.max_result_bytes)
            await _settle(conn, conn.commit())
        except psycopg.Error as exc:
            raise BranchFailed(_describe(exc), exc.sqlstate or "") from exc
        return results

    # -- phase 2 --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def phase2_connection(self) -> AsyncIterator[AsyncConn]:
        """One pooled connection for a batch of phase-2 calls (`finish_prepared`)."""
        try:
            async with self.control.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            self._purge_broken()
            raise Unavailable(f"database unavailable: {exc}") from exc

    async def finish_many(
        self, conn: AsyncConn, branches: Sequence[tuple[str, bool]], participant_id: str
    ) -> list[bool]:
        """COMMIT or ROLLBACK PREPARED for many (transaction id, commit) branches in one
        round trip: each is a transaction statement of its own, so each commits on its
        own even in a pipeline. Returns which ran. After a failure (a branch that is
        not prepared any more, a repeat) PostgreSQL skips the rest of the pipeline:
        those, and the one that failed, are left to `finish_prepared`, whose marker
        check tells a repeat from a branch in the other state."""
        cursors: list[Cursor] = []
        try:
            await conn.set_autocommit(True)  # no BEGIN: they cannot run inside one
            try:
                async with conn.pipeline():
                    for transaction_id, commit in branches:
                        gid = str(ids.branch_xid(transaction_id, participant_id))
                        cur = conn.cursor()
                        await cur.execute(_FINISH[commit].format(gid))
                        cursors.append(cur)
            except psycopg.OperationalError:
                if conn.broken:
                    raise
            except psycopg.Error:
                pass  # see above: left to finish_prepared
            finally:
                if not conn.broken:
                    await conn.set_autocommit(False)
        except psycopg.OperationalError as exc:
            self._purge_broken()
            raise Unavailable(f"database unavailable: {exc}") from exc
        ran = [
            cur.statusmessage == _FINISHED[commit]
            for cur, (_, commit) in zip(cursors, branches, strict=False)
        ]
        return ran + [False] * (len(branches) - len(ran))

    async def finish_prepared(
        self, conn: AsyncConn, transaction_id: str, participant_id: str, commit: bool
    ) -> Phase2Outcome:
        """COMMIT or ROLLBACK PREPARED on `conn` (idle, from `phase2_connection`); if
        the branch is not prepared (any more), the marker says what happened to it."""
        xid = ids.branch_xid(transaction_id, participant_id)
        try:
            try:
                if commit:
                    await conn.tpc_commit(xid)
                else:
                    await conn.tpc_rollback(xid)
                return finished(commit)
            except psycopg.errors.UndefinedObject:
                # An abort first fences the gid, so that the answer cannot change later.
                if not commit:
                    await self._fence(conn, str(xid), transaction_id)
                marker = await self._marker_state(conn, str(xid))
        except psycopg.OperationalError as exc:
            self._purge_broken()
            raise Unavailable(f"database unavailable: {exc}") from exc
        return _NOT_PREPARED[marker]

    @staticmethod
    async def _fence(conn: AsyncConn, gid: str, transaction_id: str) -> None:
        # ON CONFLICT waits for an uncommitted marker of the same gid to be decided.
        await conn.execute(
            f"INSERT INTO {MARKER_TABLE} (gid, transaction_id, state) "
            "VALUES (%s, %s, 'aborted') ON CONFLICT (gid) DO NOTHING",
            (gid, transaction_id),
        )
        await conn.commit()

    @staticmethod
    async def _marker_state(conn: AsyncConn, gid: str) -> str | None:
        cur = await conn.execute(f"SELECT state FROM {MARKER_TABLE} WHERE gid = %s", (gid,))
        row = await cur.fetchone()
        await conn.rollback()
        return None if row is None else str(row[0])

    # -- recovery -------------------------------------------------------------------

    async def prepared_branches(self, participant_id: str) -> PreparedScan:
        """This participant's prepared branches in this database, and every other
        prepared transaction there (foreign: another application's, another
        participant's, or a gid in our format that does not parse). A malformed gid
        is reported, never an error that stops recovery of the rest."""
        async with self.control.connection() as conn:
            cur = await conn.execute(_PREPARED_QUERY)
            rows = await cur.fetchall()
            await conn.rollback()
        ours: list[PreparedBranch] = []
        foreign: list[ForeignPrepared] = []
        for gid, prepared, owner, database, locks in rows:
            at = prepared if isinstance(prepared, dt.datetime) else None
            xid = psycopg.Xid.from_string(str(gid))
            why = _not_ours(xid, participant_id)
            if why is None:
                ours.append(PreparedBranch(xid.gtrid, str(gid), at))
            else:
                foreign.append(
                    ForeignPrepared(str(gid), at, str(owner), str(database), int(str(locks)), why)
                )
        return PreparedScan(tuple(ours), tuple(foreign))

    async def lock_waits(self, pids: Sequence[int]) -> list[LockWait]:
        """Which of `pids` wait for a lock, and for whom (the deadlock detector's view)."""
        if not pids:
            return []
        try:
            async with self.control.connection() as conn:
                cur = await conn.execute(_WAITS_QUERY, (list(pids),))
                rows = await cur.fetchall()
                await conn.rollback()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise Unavailable(f"database unavailable: {exc}") from exc
        return [
            LockWait(
                int(str(w)),
                int(str(h)),
                at if isinstance(at, dt.datetime) else None,
                None if gid is None else str(gid),
            )
            for w, h, at, gid in rows
        ]

    async def load_epochs(self) -> dict[str, int]:
        async with self.control.connection() as conn:
            cur = await conn.execute(f"SELECT coordinator_id, epoch FROM {EPOCH_TABLE}")
            rows = await cur.fetchall()
            await conn.rollback()
        return {str(c): int(str(e)) for c, e in rows}

    async def raise_epoch(self, coordinator_id: str, epoch: int) -> None:
        try:
            async with self.control.connection() as conn:
                await conn.execute(
                    f"INSERT INTO {EPOCH_TABLE} AS t (coordinator_id, epoch) VALUES (%s, %s) "
                    "ON CONFLICT (coordinator_id) DO UPDATE "
                    "SET epoch = greatest(t.epoch, excluded.epoch), updated_at = now()",
                    (coordinator_id, epoch),
                )
                await conn.commit()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise Unavailable(f"database unavailable: {exc}") from exc

    async def prune_markers(self) -> int:
        async with self.control.connection() as conn:
            cur = await conn.execute(
                f"DELETE FROM {MARKER_TABLE} WHERE created_at < now() - make_interval(secs => %s)",
                (self._config.marker_retention,),
            )
            await conn.commit()
            return cur.rowcount


_FINISH = {True: sql.SQL("COMMIT PREPARED {}"), False: sql.SQL("ROLLBACK PREPARED {}")}
# What a Commit or Abort that found no prepared branch answers, by its marker row (an
# Abort has fenced it first, so for an Abort there is always one).
_NOT_PREPARED = {
    "committed": Phase2Outcome.ALREADY_COMMITTED,
    "aborted": Phase2Outcome.ALREADY_ROLLED_BACK,
    None: Phase2Outcome.NOT_PREPARED,
}
_FINISHED = {True: "COMMIT PREPARED", False: "ROLLBACK PREPARED"}

T = TypeVar("T")
Query = str | sql.Composable
Cursor = psycopg.AsyncCursor[tuple[object, ...]]


async def _pipelined(
    conn: AsyncConn,
    head: Sequence[tuple[Query, tuple[object, ...] | None]],
    statements: Sequence[Statement],
    tail: Sequence[tuple[Query, tuple[object, ...] | None]],
) -> tuple[list[Cursor], list[Cursor]]:
    """Send `head`, the statements and then `tail` in one pipeline; one cursor each
    for the statements and for `tail`."""
    cursors: list[Cursor] = []
    tails: list[Cursor] = []
    async with conn.pipeline():
        for query, params in head:
            await conn.cursor().execute(query, params)  # type: ignore[arg-type]
        for st in statements:
            cur = conn.cursor()
            await cur.execute(st.sql.encode(), st.params or None)
            cursors.append(cur)
        for query, params in tail:
            cur = conn.cursor()
            await cur.execute(query, params)  # type: ignore[arg-type]
            tails.append(cur)
    return cursors, tails


async def _results(
    statements: Sequence[Statement], cursors: Sequence[Cursor], max_bytes: int
) -> list[StatementResult]:
    """The statements' results, read in chunks and counted as they are read: results
    larger than `max_bytes` (`Limits.max_result_bytes`) fail the branch before it can
    prepare or commit, because its answer could not be delivered."""
    results = []
    size = 0
    for i, (st, cur) in enumerate(zip(statements, cursors, strict=True), 1):
        if st.expect is not None and (why := st.expect.violation(cur.rowcount)):
            raise BranchFailed(f"statement {i}: {why}")
        if cur.description is None:
            results.append(StatementResult(cur.rowcount))
            size += RESULT_OVERHEAD_BYTES
            continue
        columns = tuple(c.name for c in cur.description)
        size += RESULT_OVERHEAD_BYTES + sum(len(c) + 2 for c in columns)
        rows: list[tuple[object, ...]] = []
        while chunk := await cur.fetchmany(_ROWS_PER_CHUNK):
            size += sum(row_bytes(row) for row in chunk)
            if size > max_bytes:
                raise BranchFailed(
                    f"statement {i}: results larger than {max_bytes} bytes (the "
                    "max_result_bytes limit): the answer could not be delivered"
                )
            rows.extend(chunk)
        results.append(StatementResult(cur.rowcount, columns, tuple(rows)))
    if size > max_bytes:
        raise BranchFailed(f"results larger than {max_bytes} bytes (the max_result_bytes limit)")
    return results


_ROWS_PER_CHUNK = 1000


async def _settle(conn: AsyncConn, step: Awaitable[T]) -> T:
    """Run the step that settles a branch (PREPARE, COMMIT); a lost connection makes
    its outcome unknown rather than failed."""
    try:
        return await step
    except psycopg.OperationalError as exc:
        if conn.broken:
            raise OutcomeUnknown(f"connection to the database lost while settling: {exc}") from exc
        raise


def _describe(exc: psycopg.Error) -> str:
    diag = exc.diag
    message = diag.message_primary or str(exc).strip()
    if diag.constraint_name:
        message += f" (constraint {diag.constraint_name})"
    return f"{exc.sqlstate or 'error'}: {message}" if exc.sqlstate else message
