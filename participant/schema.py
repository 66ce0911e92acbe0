"""The agent's own tables in each shard (branch markers and fences, coordinator
epochs), and the psycopg types and small helpers the store's parts share
(`participant.store` assembles them)."""

from __future__ import annotations

import contextlib

import psycopg
from psycopg import sql

from twopc_common.statements import AGENT_SCHEMA, LEGACY_TABLES

MARKER_TABLE = f"{AGENT_SCHEMA}.branch_marker"

# One row per settled branch gid. 'committed' rows are written inside the branch
# itself (so they exist exactly when it committed); 'aborted' rows are fences written
# by an Abort that found no prepared branch, so that a branch still in flight (an
# orphaned backend, bytes delayed in the network) can never commit afterwards: its own
# marker insert hits the primary key.
CREATE_MARKER = f"""
CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (
    gid text PRIMARY KEY,
    transaction_id text NOT NULL,
    state text NOT NULL DEFAULT 'committed' CHECK (state IN ('committed', 'aborted')),
    created_at timestamptz NOT NULL DEFAULT now()
)"""

EPOCH_TABLE = f"{AGENT_SCHEMA}.coordinator_epoch"
# Older versions kept these tables in the default schema; they are moved at start.
MOVED_TABLES = dict(zip(LEGACY_TABLES, (MARKER_TABLE, EPOCH_TABLE), strict=True))

# The highest epoch of each coordinator id this agent has opened a branch for (see
# participant/epochs.py). One row per coordinator id, written once per its start.
CREATE_EPOCHS = f"""
CREATE TABLE IF NOT EXISTS {EPOCH_TABLE} (
    coordinator_id text PRIMARY KEY,
    epoch bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)"""

AsyncConn = psycopg.AsyncConnection[tuple[object, ...]]
Cursor = psycopg.AsyncCursor[tuple[object, ...]]
Query = str | sql.Composable


def ms(seconds: float) -> int:
    """A duration as PostgreSQL settings take it: whole milliseconds, at least 1."""
    return max(1, int(seconds * 1000))


async def rollback_quietly(conn: AsyncConn) -> None:
    """Roll back whatever `conn` has open, if it still can."""
    if conn.closed:
        return
    # A broken connection has no transaction left to roll back; the pool
    # discards it on return.
    with contextlib.suppress(psycopg.Error):
        await conn.rollback()
