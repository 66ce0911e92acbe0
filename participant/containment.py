"""Defence in depth around branch SQL, for what the statement policy cannot see
(function bodies, triggers, PL/pgSQL's EXECUTE).

Guarantees, given the documented roles (README "Database roles"):
- the agent's tables live in their own schema (`twopc`), owned by the agent's role; the
  agent refuses to start if someone else owns it;
- with a branch role configured, branch statements run as that role (`SET LOCAL ROLE`,
  a transaction-scoped setting), which the agent checks at start: it exists, is not a
  superuser, can be assumed by the agent, and has no privilege on the agent's schema;
  the agent's own marker insert and PREPARE run as the agent's role again;
- every branch starts from the settings the protocol relies on (lock_timeout,
  statement_timeout, role), set for that transaction in the same round trip as its
  first statements, whatever a previous branch left on the pooled connection; a
  branch whose statements come with its PREPARE (or one-phase COMMIT) gets them in
  the same statement as its marker (and switches back to the agent's role only
  before PREPARE, which must run as the agent's role);
- a connection whose branch ran statements that may change session state (anything
  calling a function, DDL, CALL, DO) is reset to its connection defaults before the
  pool hands it out again.
- tables of older versions in the default schema are moved into the agent's schema
  at start, once no prepared branch can still write to them.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from twopc_common import ids
from twopc_common.errors import TwoPCError
from twopc_common.statements import AGENT_SCHEMA

# What DISCARD ALL does, less what would break psycopg (DEALLOCATE ALL: its prepared
# statements) and what cannot run inside a transaction block.
RESET_SESSION = (
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; "
    "SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES"
)


def branch_setup(lock_timeout: str, statement_timeout: str, role: str) -> str:
    """The first statement of every branch, sent with its first statements: the
    settings the protocol relies on, for this transaction. Constants (the agent's
    configuration), so nothing is adapted per branch."""
    settings = {"lock_timeout": lock_timeout, "statement_timeout": statement_timeout, "role": role}
    calls = ", ".join(
        f"set_config({sql.Literal(name).as_string()}, {sql.Literal(value).as_string()}, true)"
        for name, value in settings.items()
    )
    return f"SELECT {calls}"


def marked_branch_setup(setup: str, marker_table: str) -> str:
    """`setup` and the branch's marker (parameters: gid, transaction id) in one
    statement, for a branch whose statements arrive with its PREPARE or one-phase
    COMMIT. The marker goes first, as the agent's role: PostgreSQL checks the INSERT's
    privileges when the statement starts, before the WITH query switches to the branch
    role, which can then neither see nor change it. This saves the setup statement
    (and, before a one-phase COMMIT, the switch back to the agent's role)."""
    return (
        f"WITH setup AS ({setup}) "
        f"INSERT INTO {marker_table} (gid, transaction_id) SELECT %s, %s FROM setup"
    )


# Before PREPARE (a prepared transaction belongs to the role that prepared it) and
# before a marker written at the end: back to the agent's role.
AGENT_ROLE_AGAIN = "SELECT set_config('role', 'none', true)"


class ContainmentError(TwoPCError):
    """The database's roles or schema do not give the containment the agent needs."""


async def create_schema(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    # Looked up first: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even
    # when the schema exists, and a role given its schema ready-made needs none.
    cur = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (AGENT_SCHEMA,))
    if await cur.fetchone() is None:
        await conn.execute(f"CREATE SCHEMA {AGENT_SCHEMA}")
    cur = await conn.execute(
        "SELECT pg_get_userbyid(nspowner), current_user FROM pg_namespace WHERE nspname = %s",
        (AGENT_SCHEMA,),
    )
    row = await cur.fetchone()
    if row is None or row[0] != row[1]:
        owner = row[0] if row else "?"
        raise ContainmentError(
            f"schema {AGENT_SCHEMA!r} is owned by {owner!r}, not by the agent's role "
            f"{row[1] if row else '?'!r}: the agent's tables must be its own "
            f"(ALTER SCHEMA {AGENT_SCHEMA} OWNER TO <agent role>)"
        )


async def migrate_legacy_tables(
    conn: psycopg.AsyncConnection[tuple[object, ...]], moves: dict[str, str]
) -> None:
    """Move the rows of older versions' tables (legacy name -> new table, same
    columns) and drop the old tables. A prepared branch of the old version may still
    insert its marker into the old table when it commits, so nothing moves while this
    database holds prepared branches of ours: the agent refuses to start and says why."""
    present = []
    for legacy in moves:
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"public.{legacy}",))
        row = await cur.fetchone()
        if row is not None and row[0]:
            present.append(legacy)
    if not present:
        return
    prepared = [x for x in await conn.tpc_recover() if ids.is_ours(x)]
    if prepared:
        raise ContainmentError(
            f"tables of an older version ({', '.join(present)}) are still in use by "
            f"{len(prepared)} prepared branch(es): let the older agent finish them "
            "(or resolve them), then start this one, which moves the tables into "
            f"schema {AGENT_SCHEMA!r}"
        )
    async with conn.transaction():
        for legacy in present:
            await conn.execute(
                f"INSERT INTO {moves[legacy]} SELECT * FROM public.{legacy} ON CONFLICT DO NOTHING"
            )
            await conn.execute(f"DROP TABLE public.{legacy}")


async def check_branch_role(conn: psycopg.AsyncConnection[tuple[object, ...]], role: str) -> None:
    """The branch role exists, is not a superuser, can be assumed by the agent, and
    has no privilege on the agent's schema."""
    cur = await conn.execute(
        "SELECT rolsuper, pg_has_role(current_user, oid, 'MEMBER'), "
        "has_schema_privilege(oid, %s, 'USAGE'), has_schema_privilege(oid, %s, 'CREATE') "
        "FROM pg_roles WHERE rolname = %s",
        (AGENT_SCHEMA, AGENT_SCHEMA, role),
    )
    row = await cur.fetchone()
    if row is None:
        raise ContainmentError(f"branch role {role!r} does not exist (CREATE ROLE {role})")
    superuser, member, usage, create = row
    if superuser:
        raise ContainmentError(f"branch role {role!r} is a superuser: it would contain nothing")
    if not member:
        raise ContainmentError(
            f"the agent's role cannot SET ROLE {role}: GRANT {role} TO <agent role>"
        )
    if usage or create:
        raise ContainmentError(
            f"branch role {role!r} has privileges on schema {AGENT_SCHEMA!r}: "
            f"REVOKE ALL ON SCHEMA {AGENT_SCHEMA} FROM {role} (and from PUBLIC)"
        )
