"""The PostgreSQL decision log: the SQLite log's records and guarantees on a real
PostgreSQL cluster, plus the lease and the fence that let several processes of one
coordinator id share it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.decision_log import LogFailed, LogInUse
from coordinator.engine import Coordinator
from coordinator.lease import LeaseSettings
from coordinator.pg_log import Fenced, PostgresDecisionLog
from coordinator.pg_schema import MIGRATIONS, SCHEMA
from tests.conftest import log_url
from tests.fix_cli import assert_one_line_error, cli
from twopc_common.errors import Unavailable
from twopc_harness.daemons import wait_until
from twopc_harness.postgres import PostgresCluster, start_clusters, stop_clusters

_ids = itertools.count(1)

FAST = LeaseSettings(duration=1.0, renew_interval=0.2, poll_interval=0.05)


@pytest.fixture
def cid() -> str:
    """A coordinator id of this test's own, so tests share the log cluster."""
    return f"pglog{next(_ids)}-{int(time.time() * 1000) % 10**8}"


@pytest.fixture
def url(log_cluster: PostgresCluster) -> str:
    return log_url(log_cluster)


@pytest.fixture
def opened(url: str, cid: str) -> Iterator[PostgresDecisionLog]:
    log = PostgresDecisionLog(url, cid, lease=FAST, address="127.0.0.1:1")
    log.open()
    yield log
    log.close()


def test_epoch_is_bumped_at_every_open(url: str, cid: str) -> None:
    epochs = []
    for _ in range(3):
        log = PostgresDecisionLog(url, cid, lease=FAST)
        log.open()
        epochs.append(log.epoch)
        log.close()
    assert epochs == [1, 2, 3]


def test_commit_records_survive_reopen_until_complete(url: str, cid: str) -> None:
    async def write() -> None:
        log = PostgresDecisionLog(url, cid, lease=FAST)
        log.open()
        await log.record_commit(f"{cid}.1.1", ("a", "b"), 1.0, {"committed": True})
        await log.record_commit(f"{cid}.1.2", ("a",), 1.0, {"committed": True}, "key", "hash")
        await log.mark_complete(f"{cid}.1.2")
        log.close()

    asyncio.run(write())
    log = PostgresDecisionLog(url, cid, lease=FAST)
    log.open()
    try:
        assert [r.transaction_id for r in log.incomplete_commits()] == [f"{cid}.1.1"]
        record = asyncio.run(log.by_key("key"))
        assert record is not None and record.state == "committed"
        assert record.participants == ("a",)
        assert asyncio.run(log.epoch_started(1)) is not None
    finally:
        log.close()


def test_concurrent_commits_share_one_commit_per_batch(opened: PostgresDecisionLog) -> None:
    async def many() -> None:
        cid = opened.coordinator_id
        await asyncio.gather(
            *(
                opened.record_commit(f"{cid}.1.{i}", ("a", "b"), 1.0, {"committed": True})
                for i in range(300)
            )
        )

    asyncio.run(many())
    assert opened.stats["log_records"] == 300
    assert opened.stats["log_fsync_batches"] < 150, opened.stats
    assert len(opened.incomplete_commits()) == 300


def test_a_bad_record_fails_alone_not_its_batch(opened: PostgresDecisionLog) -> None:
    cid = opened.coordinator_id

    async def batch() -> list[BaseException | None]:
        writes = [
            opened.record_commit(f"{cid}.1.{i}", ("a",), 1.0, {}, "same-key", "h")
            if i in (3, 7)
            else opened.record_commit(f"{cid}.1.{i}", ("a",), 1.0, {})
            for i in range(10)
        ]
        return await asyncio.gather(*writes, return_exceptions=True)

    results = asyncio.run(batch())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1 and isinstance(failures[0], psycopg.errors.UniqueViolation)
    assert len(opened.incomplete_commits()) == 9
    assert opened.failure is None


def test_one_phase_intent_and_abort_records(opened: PostgresDecisionLog) -> None:
    cid = opened.coordinator_id

    async def scenario() -> None:
        await opened.record_one_phase_intent(f"{cid}.1.1", "a", 1.0, "k1", "h1")
        assert [r.transaction_id for r in opened.unresolved_one_phase()] == [f"{cid}.1.1"]
        await opened.resolve_one_phase(f"{cid}.1.1", {"committed": True})
        assert opened.unresolved_one_phase() == []
        await opened.record_abort(f"{cid}.1.2", ("a", "b"), 1.0, {"committed": False}, "k2", "h2")
        aborted = await opened.by_key("k2")
        assert aborted is not None and aborted.state == "aborted"
        assert aborted.outcome == {"committed": False}

    asyncio.run(scenario())


def test_prune_forgets_finished_records_and_keeps_its_horizon(url: str, cid: str) -> None:
    log = PostgresDecisionLog(url, cid, lease=FAST, prune_batch=3)
    log.open()

    async def scenario() -> None:
        for i in range(5):
            await log.record_commit(f"{cid}.1.{i}", ("a",), 1.0, {}, completed=True)
        await log.record_commit(f"{cid}.1.open", ("a",), 1.0, {})
        await log.prune(time.time() + 1)
        assert len(log._query("true", ())) == 3  # a bounded batch
        await log.prune(time.time() + 1)
        assert [r.transaction_id for r in log._query("true", ())] == [f"{cid}.1.open"]

    try:
        asyncio.run(scenario())
        horizon = log.pruned_before
    finally:
        log.close()
    again = PostgresDecisionLog(url, cid, lease=FAST)
    again.open()
    try:
        assert again.pruned_before == horizon
    finally:
        again.close()


def test_the_schema_is_migrated_once_and_a_newer_one_is_refused(url: str, cid: str) -> None:
    log = PostgresDecisionLog(url, cid, lease=FAST)
    log.open()
    log.close()
    with psycopg.connect(url, autocommit=True) as conn:
        versions = conn.execute(f"SELECT version FROM {SCHEMA}.schema_version").fetchall()
        assert [v for (v,) in versions] == list(range(1, len(MIGRATIONS) + 1))
        conn.execute(f"INSERT INTO {SCHEMA}.schema_version VALUES (%s)", (len(MIGRATIONS) + 1,))
        try:
            with pytest.raises(RuntimeError, match="newer than this coordinator knows"):
                PostgresDecisionLog(url, cid, lease=FAST).open()
        finally:
            conn.execute(
                f"DELETE FROM {SCHEMA}.schema_version WHERE version = %s", (len(MIGRATIONS) + 1,)
            )


def test_a_second_process_waits_while_the_holder_is_alive(
    opened: PostgresDecisionLog, url: str
) -> None:
    other = PostgresDecisionLog(url, opened.coordinator_id, lease=FAST)
    polls = itertools.count()
    with pytest.raises(LogInUse, match="held by another process"):
        other.acquire(lambda: next(polls) < 40)  # two lease durations of polling
    assert other.active_address == "127.0.0.1:1"
    other.close()


def _standby(url: str, cid: str) -> tuple[PostgresDecisionLog, threading.Thread, list[float]]:
    standby = PostgresDecisionLog(url, cid, lease=FAST, address="127.0.0.1:2")
    took: list[float] = []

    def wait() -> None:
        standby.open()
        took.append(time.monotonic())

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return standby, thread, took


def test_a_standby_takes_over_from_a_dead_holder_without_waiting_for_its_lease(
    url: str, cid: str
) -> None:
    active = PostgresDecisionLog(url, cid, lease=LeaseSettings(duration=60, renew_interval=1))
    active.open()
    standby, thread, took = _standby(url, cid)
    time.sleep(0.3)
    assert not took, "the standby took over from a live holder"
    # A crash: the holder's sessions end (its process and TCP connections are gone).
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
            (f"% {active.lease.holder}",),
        )
    died = time.monotonic()
    thread.join(10)
    try:
        assert took, "the standby did not take over"
        assert took[0] - died < 2.0, "waited for the lease (60 s) rather than the lock"
        assert standby.epoch == active.epoch + 1
    finally:
        standby.close()
        active.close()


def test_a_paused_holder_is_taken_over_and_fenced(url: str, cid: str) -> None:
    active = PostgresDecisionLog(url, cid, lease=FAST, address="127.0.0.1:1")
    active.open()
    asyncio.run(active.record_commit(f"{cid}.1.1", ("a",), 1.0, {}))
    # Paused: renewals stop, its sessions (and advisory lock) stay.
    active.lease.stop()
    standby, thread, took = _standby(url, cid)
    thread.join(15)
    assert took, "the standby did not take over from a paused holder"
    try:
        assert standby.epoch == active.epoch + 1
        # The old holder wakes up: it can make nothing durable.
        with pytest.raises(LogFailed):
            asyncio.run(active.record_commit(f"{cid}.1.2", ("a",), 1.0, {}))
        with pytest.raises(LogFailed):
            asyncio.run(active.probe())
        assert active.failure is not None
        assert asyncio.run(standby.get(f"{cid}.1.2")) is None
        assert [r.transaction_id for r in standby.incomplete_commits()] == [f"{cid}.1.1"]

        async def stopped() -> None:
            engine = Coordinator(CoordinatorConfig(id=cid, log_path="-"), active, {})
            with pytest.raises(Unavailable, match="no longer the active"):
                engine.begin()
            await engine.close()

        asyncio.run(stopped())
    finally:
        standby.close()
        active.close()


def test_a_renewal_that_finds_another_holder_steps_down(url: str, cid: str) -> None:
    active = PostgresDecisionLog(url, cid, lease=FAST)
    active.open()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"UPDATE {SCHEMA}.coordinators SET holder = 'someone-else' WHERE coordinator_id = %s",
            (cid,),
        )
    try:
        assert active.lease.lost_event.wait(10), "the renewal did not notice"
        assert active.failure is not None and "took over" in active.failure
        with pytest.raises(Fenced):
            asyncio.run(active.record_commit(f"{cid}.1.1", ("a",), 1.0, {}))
    finally:
        active.close()


def test_a_lost_connection_is_reconnected_and_the_record_made_durable_once(
    opened: PostgresDecisionLog, url: str
) -> None:
    cid = opened.coordinator_id
    asyncio.run(opened.record_commit(f"{cid}.1.1", ("a",), 1.0, {}))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"twopc-coordinator writer {opened.lease.holder}",),
        )
    asyncio.run(opened.record_commit(f"{cid}.1.2", ("a",), 1.0, {}))
    assert opened.failure is None
    wait_until(lambda: len(opened.incomplete_commits()) == 2, 5, "both records readable")


def test_a_deposed_process_never_answers_for_a_later_epoch(opened: PostgresDecisionLog) -> None:
    """Its successor's transactions are not its to call unknown (a participant would
    roll back their branches): it says to ask the active one."""
    cid = opened.coordinator_id

    async def scenario() -> None:
        engine = Coordinator(CoordinatorConfig(id=cid, log_path="-"), opened, {})
        engine.recovered = True
        with pytest.raises(Unavailable, match="ask the active coordinator"):
            await engine.get(f"{cid}.{opened.epoch + 1}.1")
        await engine.close()

    asyncio.run(scenario())


def test_a_password_in_the_log_url_is_refused_and_never_shown() -> None:
    done = cli(
        "twopc-coordinator",
        "--id",
        "c",
        "--insecure",
        "--log",
        "postgresql://coord:s3cret-word@127.0.0.1:1/decisions",
    )
    assert_one_line_error(done, "twopc-coordinator", "--log carries a password", 2)
    assert "s3cret-word" not in done.stdout + done.stderr


def test_log_and_log_dsn_file_are_exclusive(tmp_path: Path) -> None:
    done = cli(
        "twopc-coordinator",
        "--id",
        "c",
        "--insecure",
        "--log",
        str(tmp_path / "x.sqlite"),
        "--log-dsn-file",
        str(tmp_path / "dsn"),
    )
    assert_one_line_error(done, "twopc-coordinator", "exactly one of --log and --log-dsn-file", 2)


def test_the_log_dsn_file_names_a_postgresql_log(
    tmp_path: Path, log_cluster: PostgresCluster, cid: str
) -> None:
    from coordinator.__main__ import open_decision_log, parse_args

    secret = tmp_path / "log.dsn"
    secret.write_text(log_cluster.dsn + " password=not-needed-with-trust\n")
    config, _ = parse_args(["--id", cid, "--insecure", "--log-dsn-file", str(secret)])
    log = open_decision_log(config)
    assert isinstance(log, PostgresDecisionLog)
    log.open()
    try:
        assert log.epoch == 1
        assert "not-needed" not in repr(log)
    finally:
        log.close()


def test_the_lease_is_renewed_between_acquire_and_begin_epoch(url: str, cid: str) -> None:
    """The checks between the two (participants' epochs) may outlast a lease: a standby
    must not take over meanwhile."""
    active = PostgresDecisionLog(url, cid, lease=FAST)
    active.acquire()
    standby, thread, took = _standby(url, cid)
    thread.join(FAST.duration * 3)  # three leases' time for a takeover that must not come
    try:
        assert not took, "the standby took over from a process between acquire and begin"
        active.begin_epoch()
        assert active.epoch == 1
    finally:
        active.close()
    thread.join(15)
    assert took, "the standby takes over once the active stops"
    standby.close()


def test_a_record_whose_fate_is_unknown_waits_for_the_log_database_to_return(
    tmp_path: Path,
) -> None:
    """Never "failed" while it may be durable (the caller would abort a commit the log
    keeps); new records are refused meanwhile, at once."""
    (cluster,) = start_clusters(1, tmp_path / "pg", prefix="away")
    log = PostgresDecisionLog(log_url(cluster), "away", lease=FAST, reconnect_timeout=0.5)
    try:
        log.open()

        async def scenario() -> None:
            await log.record_commit("away.1.1", ("a",), 1.0, {})
            cluster.stop("immediate")
            pending = asyncio.create_task(log.record_commit("away.1.2", ("a",), 1.0, {}))
            deadline = time.monotonic() + 30
            while log.stalled is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert log.stalled is not None, "new records were not refused"
            with pytest.raises(LogFailed, match="could not write again"):
                await log.record_commit("away.1.3", ("a",), 1.0, {})
            assert not pending.done(), "a record of unknown fate was answered"
            await asyncio.to_thread(cluster.start)
            await asyncio.wait_for(pending, 60)
            assert log.stalled is None and log.failure is None

        asyncio.run(scenario())
        ids = {r.transaction_id for r in log.incomplete_commits()}
        assert ids == {"away.1.1", "away.1.2"}
    finally:
        log.close()
        stop_clusters([cluster])


def test_inspect_reads_a_postgresql_log(opened: PostgresDecisionLog, url: str) -> None:
    cid = opened.coordinator_id
    asyncio.run(opened.record_commit(f"{cid}.1.1", ("a", "b"), 1.0, {"committed": True}))
    done = cli("twopc-coordinator", "inspect", "--log", url, "--id", cid, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["epoch"] == opened.epoch
    assert report["active_address"] == "127.0.0.1:1"
    assert [t["transaction_id"] for t in report["committing_in_log"]] == [f"{cid}.1.1"]
    text = cli("twopc-coordinator", "inspect", "--log", url, "--id", cid)
    assert "active process (lease): 127.0.0.1:1" in text.stdout
    missing = cli("twopc-coordinator", "inspect", "--log", url, "--id", "nobody")
    assert_one_line_error(missing, "twopc-coordinator inspect", "no decision log of", 2)
    no_id = cli("twopc-coordinator", "inspect", "--log", url)
    assert_one_line_error(no_id, "twopc-coordinator inspect", "needs the coordinator's --id", 2)


def test_records_name_their_owner(opened: PostgresDecisionLog, url: str) -> None:
    cid = opened.coordinator_id
    asyncio.run(opened.record_commit(f"{cid}.1.1", ("a",), 1.0, {}, owner="app"))
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT owner FROM {SCHEMA}.transactions WHERE id = %s", (f"{cid}.1.1",)
        ).fetchone()
    assert row == ("app",)
    record = asyncio.run(opened.get(f"{cid}.1.1"))
    assert record is not None and record.owner == "app"


def test_of_two_standbys_exactly_one_takes_over(url: str, cid: str) -> None:
    active = PostgresDecisionLog(url, cid, lease=FAST)
    active.open()
    stop = threading.Event()
    standbys = [PostgresDecisionLog(url, cid, lease=FAST) for _ in range(2)]
    took: list[PostgresDecisionLog] = []

    def wait(log: PostgresDecisionLog) -> None:
        with contextlib.suppress(LogInUse):
            log.acquire(lambda: not stop.is_set())
            log.begin_epoch()
            took.append(log)

    threads = [threading.Thread(target=wait, args=(log,), daemon=True) for log in standbys]
    for thread in threads:
        thread.start()
    with psycopg.connect(url, autocommit=True) as conn:  # the active dies
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
            (f"% {active.lease.holder}",),
        )
    try:
        wait_until(lambda: bool(took), 15, "a takeover")
        # Three leases' time for a second takeover that must not come.
        time.sleep(FAST.duration * 3)
        assert len(took) == 1, "two processes took over"
        assert took[0].epoch == active.epoch + 1
        asyncio.run(took[0].record_commit(f"{cid}.2.1", ("a",), 1.0, {}))
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for log in [active, *standbys]:
            log.close()
