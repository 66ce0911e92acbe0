"""What the daemons say, checked on real processes: start-up lines that name the
database, the log and the peers; an unreachable agent reported as what it is
(connection refused) rather than "Deadline Exceeded"; a missing --coordinator or a
mismatched --participant name reported at start-up; in-doubt warnings that say which
flag to add, once per interval; a role without CREATE told which GRANT fixes it."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from coordinator.client import CoordinatorClient, Statement
from tests.fix_cli import assert_one_line_error, cli
from twopc_harness.daemons import (
    CoordinatorDaemon,
    ParticipantDaemon,
    coordinator_daemon,
    participant_daemon,
    wait_until,
)
from twopc_harness.postgres import PostgresCluster, free_port
from twopc_harness.system import LocalSystem
from twopc_pb import participant_pb2 as ppb
from twopc_pb import participant_pb2_grpc as pgrpc
from twopc_pb import types_pb2 as tpb

TIMESTAMP = re.compile(r"^ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


def lines(logfile: Path, event: str) -> list[str]:
    if not logfile.exists():
        return []
    return [line for line in logfile.read_text().splitlines() if f" event={event} " in f"{line} "]


def test_start_up_lines_name_the_database_the_log_and_the_peers(
    shared_system: LocalSystem,
) -> None:
    system = shared_system
    assert system.coordinator is not None
    (coordinator,) = lines(system.coordinator.logfile, "starting")[:1]
    assert TIMESTAMP.match(coordinator), coordinator
    assert f"log={system.workdir / 'decisions.sqlite'}" in coordinator
    assert f"listen={system.coordinator.address}" in coordinator
    for name, agent in system.participants.items():
        assert f"{name}=" in coordinator
        (started,) = lines(agent.logfile, "starting")[:1]
        assert TIMESTAMP.match(started), started
        cluster = system.cluster(name)
        assert f'database="host=127.0.0.1 port={cluster.port} dbname=postgres user=postgres"' in (
            started
        )
        assert 'coordinators="shared=127.0.0.1:' in started
        assert "password" not in agent.logfile.read_text()


@pytest.fixture
def daemons() -> Iterator[list[CoordinatorDaemon | ParticipantDaemon]]:
    started: list[CoordinatorDaemon | ParticipantDaemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def test_an_agent_that_refuses_connections_is_reported_as_connection_refused(
    tmp_path: Path, daemons: list[CoordinatorDaemon | ParticipantDaemon]
) -> None:
    gone = {"shard1": f"127.0.0.1:{free_port()}", "shard2": f"127.0.0.1:{free_port()}"}
    coordinator = coordinator_daemon(
        "refused",
        f"127.0.0.1:{free_port()}",
        tmp_path / "decisions.sqlite",
        gone,
        tmp_path / "coordinator.log",
        ["--prepare-timeout", "2", "--recovery-interval", "0.5"],
    )
    daemons.append(coordinator)
    coordinator.start()
    work = {s: [Statement("SELECT 1")] for s in gone}
    with CoordinatorClient(coordinator.address) as client:
        outcome = client.run(work)
    assert not outcome.committed
    assert outcome.abort_cause == "PARTICIPANT_UNAVAILABLE", outcome
    assert f"connection refused at {gone[outcome.abort_participant]}" in outcome.abort_reason
    wait_until(
        lambda: any(
            "connection refused at" in line
            for line in lines(coordinator.logfile, "in_doubt_scan_failed")
        ),
        30,
        "the in-doubt scan to say the connection was refused",
    )
    log = coordinator.logfile.read_text()
    assert "Deadline Exceeded" not in log


def test_a_participant_name_the_agent_does_not_answer_to_is_reported_at_start_up(
    clusters: list[PostgresCluster],
    tmp_path: Path,
    daemons: list[CoordinatorDaemon | ParticipantDaemon],
) -> None:
    # Both --insecure: with TLS the coordinator verifies the agent's certificate by the
    # name it was given, so a wrong name already fails the handshake.
    named = participant_daemon(
        "named1", f"127.0.0.1:{free_port()}", clusters[0].dsn, {}, tmp_path / "named1.log"
    )
    daemons.append(named)
    named.start()
    agent = named.address
    coordinator = coordinator_daemon(
        "mismatch",
        f"127.0.0.1:{free_port()}",
        tmp_path / "decisions.sqlite",
        {"shard9": agent},
        tmp_path / "coordinator.log",
    )
    daemons.append(coordinator)
    coordinator.start()
    wait_until(
        lambda: bool(lines(coordinator.logfile, "participant_id_mismatch")),
        30,
        "the coordinator to report the wrong participant name",
    )
    (line,) = lines(coordinator.logfile, "participant_id_mismatch")
    assert "participant=shard9" in line and "answers_as=named1" in line
    assert f"--participant named1={agent}" in line


def test_an_agent_without_coordinator_warns_and_says_which_flag_once_per_interval(
    clusters: list[PostgresCluster],
    tmp_path: Path,
    daemons: list[CoordinatorDaemon | ParticipantDaemon],
) -> None:
    cluster = clusters[0]
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS lonely_rows (tag text)")
    agent = participant_daemon(
        "lonely",
        f"127.0.0.1:{free_port()}",
        cluster.dsn,
        {},
        tmp_path / "lonely.log",
        ["--recovery-interval", "0.1", "--recovery-grace", "0"],
    )
    daemons.append(agent)
    agent.start()
    (warning,) = lines(agent.logfile, "no_coordinator")
    assert "level=warning" in warning and "--coordinator NAME=HOST:PORT" in warning
    txid = "nobody.1.1"
    insert = tpb.Statement(sql="INSERT INTO lonely_rows VALUES ('x')")
    with grpc.insecure_channel(agent.address) as channel:
        stub = pgrpc.ParticipantStub(channel)
        assert stub.Prepare(ppb.PrepareRequest(transaction_id=txid, statements=[insert])).vote == (
            ppb.YES
        )
        try:
            wait_until(
                lambda: bool(lines(agent.logfile, "in_doubt_unknown_coordinator")),
                30,
                "the in-doubt warning",
            )
            first = time.monotonic()
            # A window of about 20 recovery scans, to see that the warning is not
            # repeated at every scan.
            while time.monotonic() - first < 2.0:
                time.sleep(0.1)
            found = lines(agent.logfile, "in_doubt_unknown_coordinator")
            assert len(found) == 1, found
            assert f"txid={txid}" in found[0]
            assert "--coordinator nobody=HOST:PORT" in found[0]
        finally:
            stub.Abort(ppb.BranchRef(transaction_id=txid))


def test_a_role_without_create_is_told_which_grant_fixes_it(
    clusters: list[PostgresCluster],
) -> None:
    cluster = clusters[0]
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'twopc_nocreate'").fetchone():
            conn.execute("CREATE ROLE twopc_nocreate LOGIN")
        conn.execute("DROP DATABASE IF EXISTS twopc_nocreate_db")
        conn.execute("CREATE DATABASE twopc_nocreate_db")
    dsn = f"host=127.0.0.1 port={cluster.port} dbname=twopc_nocreate_db user=twopc_nocreate"
    try:
        with psycopg.connect(
            f"host=127.0.0.1 port={cluster.port} dbname=twopc_nocreate_db user=postgres",
            autocommit=True,
        ) as conn:
            conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        done = cli("twopc-participant", "--id", "p1", "--dsn", dsn, "--insecure")
        # The agent's tables live in its own schema: it needs that schema, or the
        # right to create it.
        assert_one_line_error(
            done,
            "twopc-participant",
            'run "CREATE SCHEMA twopc AUTHORIZATION twopc_nocreate;"',
            1,
        )
    finally:
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS twopc_nocreate_db")
