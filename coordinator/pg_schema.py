"""The PostgreSQL decision log's schema `twopc_coordinator`, created and migrated by
the daemon (`migrate`) under an advisory lock, so that processes starting together
do not race. A schema newer than this code is refused, never misread.

`fence()` is the log's own fencing: every batch of the writer
(`coordinator.pg_writer`) starts with it, and it fails with `FENCED_SQLSTATE` unless
the coordinator's lease row still names this process as holder at this epoch.
"""

from __future__ import annotations

from typing import Any

import psycopg

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
