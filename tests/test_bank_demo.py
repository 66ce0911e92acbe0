"""The bank demo: a short run with faults passes every invariant, its report agrees
with the checker, the checker catches doctored shards, schedules replay by seed, and
bad options end in one clear line."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bank_demo import bank
from bank_demo.faults import make_schedule
from tests.conftest import dsns, tls_args
from tests.fix_cli import assert_one_line_error
from twopc_common.ids import branch_xid
from twopc_harness.postgres import PostgresCluster, free_port, start_clusters, stop_clusters
from twopc_harness.system import LocalSystem


def demo(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bank_demo", *args], capture_output=True, text=True, timeout=timeout
    )


def shard_args(system: LocalSystem) -> list[str]:
    return [f"--shard={shard}={dsn}" for shard, dsn in dsns(system).items()]


def test_short_run_with_faults_passes_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = demo(
        "run",
        "--duration",
        "15",
        "--accounts",
        "40",
        "--concurrency",
        "8",
        "--seed",
        "11",
        "--out",
        str(out),
        "--quiet",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["seed"] == 11
    assert [c["ok"] for c in report["checks"]] == [True] * 6
    kinds = {event["kind"] for event in report["schedule"]}
    assert {"partition", "kill_coordinator", "kill_agent", "crash_postgres"} <= kinds
    figures = report["figures"]
    assert figures["committed_two_phase"] > 0 and figures["committed_one_phase"] > 0
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "logs" / "coordinator.log").exists()
    assert "PASS  no prepared transaction left" in done.stdout


def test_report_figures_agree_with_the_checker_on_an_existing_deployment(
    system: LocalSystem, tmp_path: Path
) -> None:
    out = tmp_path / "external"
    done = demo(
        "run",
        "--coordinator",
        system.client_address,
        *shard_args(system),
        *tls_args(system, "app"),
        "--faults",
        "none",
        "--duration",
        "4",
        "--accounts",
        "20",
        "--seed",
        "3",
        "--out",
        str(out),
        "--quiet",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    transfers = [json.loads(line) for line in (out / "transfers.jsonl").read_text().splitlines()]
    snap = bank.snapshot(dsns(system))
    applied = sum(1 for legs in snap.legs.values() if legs == bank.BOTH_LEGS)
    assert report["figures"]["committed"] == applied
    assert report["figures"]["transfers"] == len(transfers)
    checked = demo("check", *shard_args(system), "--transfers", str(out / "transfers.jsonl"))
    assert checked.returncode == 0, checked.stdout
    assert checked.stdout.count("PASS") == len(report["checks"]) == 6


LOWEST = "(SELECT min(id) FROM accounts)"
HIGHEST = "(SELECT max(id) FROM accounts)"


def doctor(system: LocalSystem, shard: str, *statements: str) -> None:
    with system.connect(shard) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.mark.parametrize(
    ("damage", "check", "offender"),
    [
        (
            ["INSERT INTO ledger VALUES ('half-1', 'debit', 1, 5)"],
            "every transfer has both legs or neither",
            "half-1",
        ),
        (
            [
                "ALTER TABLE accounts DROP CONSTRAINT accounts_balance_check",
                # Money moved, none created: only the negative balance is wrong.
                f"UPDATE accounts SET balance = balance - 107 WHERE id = {LOWEST}",
                f"UPDATE accounts SET balance = balance + 107 WHERE id = {HIGHEST}",
            ],
            "no negative balance",
            "{min_id}",
        ),
        (
            ["UPDATE accounts SET balance = balance + 5 WHERE id = (SELECT min(id) FROM accounts)"],
            "total money unchanged",
            "",
        ),
    ],
    ids=["one-leg", "negative", "total"],
)
def test_checker_reports_doctored_shards(
    system: LocalSystem, damage: list[str], check: str, offender: str
) -> None:
    with system.connect("shard2") as conn:
        row = conn.execute("SELECT min(id) FROM accounts").fetchone()
    assert row is not None
    doctor(system, "shard2", *damage)
    done = demo("check", *shard_args(system))
    assert done.returncode == 1
    failed = [line for line in done.stdout.splitlines() if line.strip().startswith("FAIL")]
    assert len(failed) == 1 and check in failed[0], done.stdout
    assert offender.format(min_id=row[0]) in failed[0]
    bank.create_schema(dsns(system))  # leave no damage behind


def test_checker_reports_a_leftover_prepared_transaction(system: LocalSystem) -> None:
    xid = branch_xid("ghost.1.1", "shard3")
    conn = psycopg.connect(system.dsn("shard3"))
    conn.tpc_begin(xid)
    conn.execute("INSERT INTO ledger VALUES ('ghost', 'debit', 1, 1)")
    conn.tpc_prepare()
    conn.close()
    try:
        done = demo("check", *shard_args(system))
        assert done.returncode == 1
        assert f"FAIL  no prepared transaction left: shard3:{xid}" in done.stdout
    finally:
        with psycopg.connect(system.dsn("shard3"), autocommit=True) as conn:
            conn.tpc_rollback(xid)


def test_checker_compares_with_what_the_client_was_told(
    system: LocalSystem, tmp_path: Path
) -> None:
    doctor(system, "shard1", "INSERT INTO ledger VALUES ('told-aborted', 'debit', 1, 5)")
    doctor(system, "shard2", "INSERT INTO ledger VALUES ('told-aborted', 'credit', 2, 5)")
    record = tmp_path / "transfers.jsonl"
    record.write_text(
        json.dumps({"id": "told-aborted", "outcome": "aborted"})
        + "\n"
        + json.dumps({"id": "told-committed", "outcome": "committed"})
        + "\n"
    )
    done = demo("check", *shard_args(system), "--transfers", str(record))
    assert done.returncode == 1
    assert "FAIL  every committed transfer applied (1 recorded committed): told-committed" in (
        done.stdout
    )
    assert "FAIL  no aborted transfer applied (1 recorded aborted): told-aborted" in done.stdout
    bank.create_schema(dsns(system))


def test_same_seed_plays_the_same_fault_schedule() -> None:
    shards, proxies = ["shard1", "shard2", "shard3"], ["coordinator_shard1", "shard2_postgres"]
    first = make_schedule("mixed", 42, 30, shards, proxies)
    assert first == make_schedule("mixed", 42, 30, shards, proxies)
    assert first != make_schedule("mixed", 43, 30, shards, proxies)
    assert [e.at for e in first] == sorted(e.at for e in first)
    assert all(e.at > 0 and e.at + e.duration < 30 for e in first)


def test_ha_run_kills_the_active_coordinator_and_passes_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "ha"
    done = demo(
        "run",
        "--ha",
        "--faults",
        "network",
        "--duration",
        "15",
        "--accounts",
        "40",
        "--concurrency",
        "8",
        "--seed",
        "12",
        "--out",
        str(out),
        "--quiet",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["deployment"] == "local-ha"
    kills = [e for e in report["schedule"] if e["kind"] == "kill_coordinator"]
    assert len(kills) == 2
    assert report["figures"]["committed_two_phase"] > 0
    # Both coordinator processes served at some point: the standby took over.
    logs = [out / "logs" / "coordinator.log", out / "logs" / "coordinator-standby1.log"]
    assert all("event=serving" in p.read_text() for p in logs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--accounts", "1"], "--accounts must be at least 2"),
        (["--balance", "-5"], "--balance cannot be negative"),
        (["--shards", "0"], "--shards must be at least 1"),
        (["--faults", "chaos-monkey"], "--faults 'chaos-monkey' is neither a preset"),
        (["--shard", "shard1=host=127.0.0.1"], "go with --coordinator"),
        (["--reset"], "--reset goes with --coordinator"),
        (["--coordinator", "localhost", "--shard", "s1=host=x"], "expected HOST:PORT"),
        (["--coordinator", "127.0.0.1:1", "--shard", "s1=host=x junk"], "libpq connection"),
        (["--coordinator", "127.0.0.1:1", "--shard", "s1=host=x", "--faults", "mixed"], "local"),
        (["--ha", "--coordinator", "127.0.0.1:1", "--shard", "s1=host=x"], "--ha starts its own"),
        (["--ha", "--faults", "none"], "--ha kills the active coordinator"),
    ],
)
def test_bad_options_end_with_one_clear_line(args: list[str], message: str) -> None:
    done = demo("run", *args, "--duration", "1", timeout=60)
    assert_one_line_error(done, "bank-demo", message, 2)
    assert "starting" not in done.stderr, "the demo started things before checking its options"


def test_unreachable_deployment_ends_with_one_clear_line() -> None:
    port = free_port()
    done = demo(
        "run",
        "--coordinator",
        f"127.0.0.1:{free_port()}",
        "--shard",
        f"shard1=host=127.0.0.1 port={port} user=postgres connect_timeout=2",
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().startswith("bank-demo: shard shard1 does not answer")
    assert len(done.stderr.strip().splitlines()) == 1


def test_shard_without_prepared_transactions_is_refused() -> None:
    clusters = start_clusters(1, None, {"max_prepared_transactions": "0"}, "plain")
    try:
        done = demo("check", f"--shard=shard1={clusters[0].dsn}", timeout=60)
    finally:
        stop_clusters(clusters)
    assert done.returncode == 1
    assert "max_prepared_transactions = 0" in done.stderr


@pytest.mark.soak
def test_three_minute_run_with_faults_passes_every_invariant(tmp_path: Path) -> None:
    """The soak run (`make soak`): longer, busier, more faults; seed printed."""
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    out = tmp_path / "soak"
    done = demo(
        "run",
        "--duration",
        "180",
        "--concurrency",
        "24",
        "--hot-accounts",
        "10",
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--quiet",
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["figures"]["committed"] > 0


@pytest.fixture
def user_database(clusters: list[PostgresCluster]) -> Iterator[str]:
    """A database on shard 1's cluster holding a user's own `accounts` table, the
    name the README's client example uses."""
    cluster = clusters[0]
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS users_own")
        conn.execute("CREATE DATABASE users_own")
    dsn = f"host=127.0.0.1 port={cluster.port} user=postgres dbname=users_own"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance int)")
        conn.execute(
            "INSERT INTO accounts SELECT i, 'customer ' || i, 100 * i FROM generate_series(1, 10) i"
        )
    yield dsn
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS users_own")


def users_rows(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT * FROM accounts ORDER BY id").fetchall()


def test_the_demo_never_drops_a_table_it_did_not_create(
    system: LocalSystem, user_database: str, tmp_path: Path
) -> None:
    before = users_rows(user_database)
    assert len(before) == 10
    bank_before = bank.snapshot({s: d for s, d in dsns(system).items() if s != "shard1"})
    shards = [f"--shard=shard1={user_database}", *shard_args(system)[1:]]
    done = demo(
        "run",
        "--coordinator",
        system.client_address,
        *shards,
        *tls_args(system, "app"),
        "--faults",
        "none",
        "--duration",
        "2",
        "--out",
        str(tmp_path / "refused"),
        "--quiet",
        timeout=120,
    )
    assert_one_line_error(done, "bank-demo", "refusing to drop tables the demo did not create", 1)
    assert "shard1: accounts" in done.stderr and "--reset" in done.stderr
    assert users_rows(user_database) == before
    # Nothing was touched on the other shards either.
    assert bank.snapshot({s: d for s, d in dsns(system).items() if s != "shard1"}) == bank_before


def test_reset_drops_the_tables_and_marks_the_new_ones_as_the_demos(user_database: str) -> None:
    with pytest.raises(bank.NotTheDemosSchema, match="shard1: accounts"):
        bank.create_schema({"shard1": user_database})
    bank.create_schema({"shard1": user_database}, reset=True)
    with psycopg.connect(user_database) as conn:
        assert bank.tables(conn) == {"bank_meta": True, "accounts": True, "ledger": True}
    bank.create_schema({"shard1": user_database})  # its own tables: no --reset needed


def test_check_on_a_database_without_the_demo_schema_says_so(user_database: str) -> None:
    done = demo("check", f"--shard=shard1={user_database}", timeout=60)
    assert_one_line_error(done, "bank-demo", "shard shard1 has no bank-demo schema", 1)
    assert "no table bank_meta, ledger" in done.stderr


def test_check_without_transfers_shows_the_client_outcome_checks_as_skipped(
    system: LocalSystem,
) -> None:
    done = demo("check", *shard_args(system), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    skipped = [line.strip() for line in done.stdout.splitlines() if "SKIP" in line]
    assert skipped == [
        "SKIP  every committed transfer applied (no --transfers file: what the client "
        "was told is not known)",
        "SKIP  no aborted transfer applied (no --transfers file: what the client was "
        "told is not known)",
    ]
    assert done.stdout.count("PASS") == 4


def test_two_runs_against_one_deployment_use_their_own_idempotency_keys(
    system: LocalSystem, tmp_path: Path
) -> None:
    """The coordinator keeps keys for its retention: a second run must not send the
    first run's keys with other transfers (ALREADY_EXISTS) or get its outcomes. The
    DSNs carry a password (trust authentication ignores it), which must show nowhere."""
    with_password = [f"{arg} password=s3cret" for arg in shard_args(system)]
    for run in ("first", "second"):
        done = demo(
            "run",
            "--coordinator",
            system.client_address,
            *with_password,
            *tls_args(system, "app"),
            "--faults",
            "none",
            "--duration",
            "2",
            "--accounts",
            "20",
            "--seed",
            "5",
            "--out",
            str(tmp_path / run),
            "--quiet",
        )
        assert done.returncode == 0, run + done.stdout + done.stderr
        report = json.loads((tmp_path / run / "report.json").read_text())
        assert report["passed"] and report["figures"]["committed"] > 0
        assert "s3cret" not in (tmp_path / run / "report.json").read_text()
        assert "s3cret" not in done.stdout + done.stderr
