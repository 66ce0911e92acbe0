"""Defence in depth for what the statement policy cannot see: branch statements run as
a least-privilege role without rights on the agent's schema, every branch starts from
the agent's own settings, connections a branch may have changed are reset, and the
agent checks its schema and roles at start (and moves older versions' tables)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import psycopg
import pytest

from coordinator.client import Statement
from participant.config import ParticipantConfig
from participant.schema import EPOCH_TABLE, MARKER_TABLE
from participant.store import ConfigurationError, Store
from twopc_common.ids import FORMAT_ID
from twopc_common.statements import AGENT_SCHEMA, LEGACY_TABLES
from twopc_harness.postgres import BRANCH_ROLE, PostgresCluster
from twopc_harness.system import LocalSystem


def _one(system: LocalSystem, sql: str) -> object:
    with system.client() as client:
        outcome = client.run({"shard1": [Statement(sql)]})
    assert outcome.committed, outcome
    assert outcome.results is not None
    return outcome.results["shard1"][0].rows[0][0]


def _markers(system: LocalSystem) -> int:
    with system.connect("shard1") as conn:
        row = conn.execute(f"SELECT count(*) FROM {MARKER_TABLE}").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def functions(system: LocalSystem) -> Iterator[None]:
    """Functions a careless schema could offer the application: the parser sees only
    their names, never what they do."""
    with system.connect("shard1") as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION wipe_markers() RETURNS int LANGUAGE sql AS "
            f"'DELETE FROM {MARKER_TABLE}; SELECT 1'"
        )
        conn.execute(
            "CREATE OR REPLACE FUNCTION leak_settings() RETURNS text LANGUAGE sql AS $$ "
            "SELECT set_config('lock_timeout', '0', false) || "
            "set_config('search_path', 'pg_catalog', false) $$"
        )
    yield
    with system.connect("shard1") as conn:
        conn.execute("DROP FUNCTION wipe_markers(), leak_settings()")


def test_branch_statements_run_as_the_branch_role(system: LocalSystem) -> None:
    assert _one(system, "SELECT current_user") == BRANCH_ROLE


def test_a_function_cannot_reach_the_agent_schema(system: LocalSystem, functions: None) -> None:
    _one(system, "SELECT 1")  # at least one marker
    before = _markers(system)
    with system.client() as client:
        outcome = client.run({"shard1": [Statement("SELECT wipe_markers()")]})
    assert not outcome.committed and "permission denied" in outcome.abort_reason
    assert _markers(system) >= before > 0


def test_session_settings_leaked_by_a_function_do_not_reach_later_branches(
    system: LocalSystem, functions: None
) -> None:
    default_path = _one(system, "SHOW search_path")
    lock_timeout = _one(system, "SHOW lock_timeout")
    assert lock_timeout != "0"
    for _ in range(3):
        _one(system, "SELECT leak_settings()")
        # Every connection of the pool in turn: none keeps what the function set.
        for _ in range(10):
            assert _one(system, "SHOW lock_timeout") == lock_timeout
            assert _one(system, "SHOW search_path") == default_path


@pytest.mark.parametrize("shards", [("shard1",), ("shard1", "shard2")], ids=["one", "two"])
def test_writing_branches_get_the_agents_role_and_settings_and_their_marker(
    system: LocalSystem, functions: None, shards: tuple[str, ...]
) -> None:
    """A branch that writes gets its settings in the statement that writes its marker
    first (one-phase and two-phase): its statements still run as the branch role with
    the agent's settings, cannot touch the marker, and the marker is there."""
    lock_timeout = _one(system, "SHOW lock_timeout")
    tag = f"contained-{len(shards)}"
    write = (
        "INSERT INTO ledger VALUES (%s, 'debit', 1, 1) "
        "RETURNING current_user, current_setting('lock_timeout')"
    )
    with system.client() as client:
        outcome = client.run(
            {s: [Statement(write, (f"{tag}-{s}",))] for s in shards}, wait_for_completion=True
        )
        assert outcome.committed and outcome.one_phase == (len(shards) == 1)
        assert outcome.results is not None
        for shard in shards:
            assert outcome.results[shard][0].rows == ((BRANCH_ROLE, lock_timeout),)
        before = _markers(system)
        # The function exists on shard1; the other shard's branch is a plain write.
        wipe = Statement("INSERT INTO ledger SELECT %s, 'credit', wipe_markers(), 1", (tag,))
        other = Statement("INSERT INTO ledger VALUES (%s, 'credit', 1, 1)", (tag,))
        wiped = client.run({s: [wipe if s == "shard1" else other] for s in shards})
    assert not wiped.committed and "permission denied" in wiped.abort_reason
    assert _markers(system) >= before
    for shard in shards:
        with system.connect(shard) as conn:
            row = conn.execute(
                f"SELECT count(*) FROM {MARKER_TABLE} WHERE transaction_id = %s",
                (outcome.transaction_id,),
            ).fetchone()
        assert row == (1,)


def _open_store(cluster: PostgresCluster, **config: str) -> None:
    async def go() -> None:
        store = Store(ParticipantConfig(id="containment", dsn=cluster.dsn, **config))  # type: ignore[arg-type]
        await store.open()
        await store.close()

    asyncio.run(go())


def test_agent_refuses_a_branch_role_that_contains_nothing(system: LocalSystem) -> None:
    cluster = system.cluster("shard3")
    with pytest.raises(ConfigurationError, match="superuser"):
        _open_store(cluster, branch_role="postgres")
    with pytest.raises(ConfigurationError, match="does not exist"):
        _open_store(cluster, branch_role="nobody_here")
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute(
            "DO $$ BEGIN CREATE ROLE too_wide NOLOGIN; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )
        conn.execute(f"GRANT USAGE ON SCHEMA {AGENT_SCHEMA} TO too_wide")
    try:
        with pytest.raises(ConfigurationError, match="privileges on schema"):
            _open_store(cluster, branch_role="too_wide")
    finally:
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            conn.execute(f"REVOKE ALL ON SCHEMA {AGENT_SCHEMA} FROM too_wide")
    _open_store(cluster, branch_role=BRANCH_ROLE)


def test_older_versions_tables_move_into_the_agent_schema(system: LocalSystem) -> None:
    cluster = system.cluster("shard3")
    legacy_markers, legacy_epochs = LEGACY_TABLES
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.{legacy_markers} (LIKE {MARKER_TABLE})")
        conn.execute(f"CREATE TABLE public.{legacy_epochs} (LIKE {EPOCH_TABLE})")
        conn.execute(
            f"INSERT INTO public.{legacy_markers} VALUES ('legacy-gid', 'old.1.1', "
            "'committed', now())"
        )
        conn.execute(f"INSERT INTO public.{legacy_epochs} VALUES ('legacycoord', 7, now())")
        # A prepared branch of ours may still write to the old tables: nothing moves.
        other = psycopg.connect(cluster.dsn)
        xid = other.xid(FORMAT_ID, "old.1.2", "containment")
        other.tpc_begin(xid)
        other.execute("SELECT 1")
        other.tpc_prepare()
        other.close()
        try:
            with pytest.raises(ConfigurationError, match="prepared branch"):
                _open_store(cluster)
        finally:
            conn.tpc_rollback(xid)
        _open_store(cluster)
        for legacy in LEGACY_TABLES:
            row = conn.execute("SELECT to_regclass(%s)", (f"public.{legacy}",)).fetchone()
            assert row == (None,)
        assert conn.execute(
            f"SELECT state FROM {MARKER_TABLE} WHERE gid = 'legacy-gid'"
        ).fetchone() == ("committed",)
        assert conn.execute(
            f"SELECT epoch FROM {EPOCH_TABLE} WHERE coordinator_id = 'legacycoord'"
        ).fetchone() == (7,)
        conn.execute(f"DELETE FROM {MARKER_TABLE} WHERE gid = 'legacy-gid'")
        conn.execute(f"DELETE FROM {EPOCH_TABLE} WHERE coordinator_id = 'legacycoord'")
