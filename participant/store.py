"""Everything the agent does to PostgreSQL, in three parts on two connection pools:
branch work (`participant.branch_sql`: statements, PREPARE, the one-phase COMMIT) on
a pool of its own, so that open branches can never starve the decided ones; phase 2
(`participant.phase2_sql`) and the scans, epochs and pruning
(`participant.control_sql`) on the control pool. This module opens them: it checks
that the database can host branches and creates the agent's tables
(`participant.schema`) first.
"""

from __future__ import annotations

import asyncio

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from participant import containment
from participant.branch_sql import BranchSql
from participant.config import ParticipantConfig
from participant.control_sql import ControlSql
from participant.phase2_sql import Phase2Sql
from participant.schema import (
    CREATE_EPOCHS,
    CREATE_MARKER,
    EPOCH_TABLE,
    MARKER_TABLE,
    MOVED_TABLES,
    AsyncConn,
    ms,
)
from twopc_common import settings
from twopc_common.errors import TwoPCError
from twopc_common.statements import AGENT_SCHEMA


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


async def _set_up(conn: AsyncConn, branch_role: str) -> None:
    """Check that the database can host branches; create the agent's schema and tables."""
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
        raise ConfigurationError(_no_create_privilege(AGENT_SCHEMA, (role, database, ""))) from exc
    except containment.ContainmentError as exc:
        raise ConfigurationError(str(exc)) from exc
    # Looked up first: PostgreSQL checks CREATE on the schema even when the
    # table exists, and a role given ready-made tables needs no CREATE.
    for table, create in ((MARKER_TABLE, CREATE_MARKER), (EPOCH_TABLE, CREATE_EPOCHS)):
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
        await containment.migrate_legacy_tables(conn, MOVED_TABLES)
        if branch_role:
            await containment.check_branch_role(conn, branch_role)
    except containment.ContainmentError as exc:
        raise ConfigurationError(str(exc)) from exc


class Store:
    def __init__(self, config: ParticipantConfig) -> None:
        self._config = config
        options = " ".join(
            [
                f"-c lock_timeout={ms(config.lock_timeout)}",
                f"-c statement_timeout={ms(config.statement_timeout)}",
                # A safety net under the agent's own idle-branch timer.
                f"-c idle_in_transaction_session_timeout={ms(config.idle_branch_timeout * 2)}",
            ]
        )
        kwargs = {"options": options, "application_name": f"twopc-participant-{config.id}"}
        self.branches = BranchSql(config, kwargs, self._purge_broken)
        self.pool = self.branches.pool
        self.control_pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
            config.dsn,
            min_size=1,
            max_size=config.control_pool_size,
            timeout=config.pool_timeout,
            kwargs=kwargs,
            open=False,
            name=f"participant-{config.id}-control",
        )
        self.phase2 = Phase2Sql(self.control_pool, self._purge_broken)
        self.control = ControlSql(self.control_pool, config.marker_retention)
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
            await _set_up(conn, self._config.branch_role)
        try:
            await self.pool.open(wait=True, timeout=self._config.pool_timeout)
            await self.control_pool.open(wait=True, timeout=self._config.pool_timeout)
        except PoolTimeout as exc:
            raise ConfigurationError(
                f"could not open {self._config.pool_min_size} connections to {where} "
                f"within {self._config.pool_timeout:g}s ({exc}): check the database's "
                "max_connections and the role's connection limit, or lower --pool-min-size"
            ) from exc

    async def close(self) -> None:
        await self.pool.close()
        await self.control_pool.close()

    def _purge_broken(self) -> None:
        """One connection broke (database restarted, network cut): its idle siblings
        probably did too. Have the pool test them now rather than hand each to a
        branch that would fail on it."""
        if self._purge is None or self._purge.done():
            self._purge = asyncio.create_task(self._check_pools())

    async def _check_pools(self) -> None:
        await self.pool.check()
        await self.control_pool.check()
