"""Atomicity on the paths the crash matrix did not walk: an agent restarted inside an
interactive transaction, outcome queries after the transaction left memory, errors
after the point of no return, lost votes, and the bounds that keep a coordinator
with one dead agent from growing without limit."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from psycopg import sql

from coordinator.client import CoordinatorClient, Statement, Transaction, TransactionAborted
from tests.conftest import (
    SystemFactory,
    create_tagged_rows,
    rows,
    tagged_inserts,
    wait_coordinator_reaches,
    wait_no_prepared,
)
from twopc_common.errors import ResourceExhausted
from twopc_common.ids import branch_xid
from twopc_harness.daemons import wait_until
from twopc_harness.postgres import HarnessError, free_port
from twopc_harness.system import LocalSystem
from twopc_pb import participant_pb2 as ppb
from twopc_pb import participant_pb2_grpc as pgrpc
from twopc_pb import types_pb2


def _insert(tag: str) -> Statement:
    return Statement("INSERT INTO twopc_test_rows VALUES (%s)", (tag,))


def _nowhere(system: LocalSystem, tag: str) -> None:
    assert rows(system, tag) == {"shard1": 0, "shard2": 0, "shard3": 0}


def _open_on_two_shards_then_restart_shard1(
    system: LocalSystem, client: CoordinatorClient, tag: str
) -> Transaction:
    """An interactive transaction with a row on shard1 and on shard2, then shard1's
    agent SIGKILLed and restarted (and seen again by the coordinator): its open branch
    is gone."""
    create_tagged_rows(system)
    tx = client.begin()
    tx.execute_many("shard1", [_insert(tag)])
    tx.execute_many("shard2", [_insert(tag)])
    agent = system.participants["shard1"]
    agent.kill()
    agent.start()
    wait_coordinator_reaches(system, "shard1")
    return tx


def test_interactive_commit_after_agent_restart_aborts_naming_the_agent(
    make_system: SystemFactory,
) -> None:
    system = make_system()
    with system.client() as client:
        tx = _open_on_two_shards_then_restart_shard1(system, client, "restart-commit")
        outcome = tx.commit()
        assert not outcome.committed, outcome
        assert outcome.abort_participant == "shard1"
        assert "restarted" in outcome.abort_reason
        assert client.get_transaction(tx.id).outcome == "aborted"
    wait_no_prepared(system)
    _nowhere(system, "restart-commit")


def test_execute_after_agent_restart_fails_instead_of_opening_a_new_branch(
    make_system: SystemFactory,
) -> None:
    system = make_system()
    with system.client() as client:
        tx = _open_on_two_shards_then_restart_shard1(system, client, "restart-exec")
        with pytest.raises(TransactionAborted, match="restarted"):
            tx.execute_many("shard1", [_insert("restart-exec-later")])
        outcome = tx.commit()
        assert not outcome.committed
    wait_no_prepared(system)
    _nowhere(system, "restart-exec")
    _nowhere(system, "restart-exec-later")


def test_get_transaction_tells_a_forgotten_one_phase_commit_committed(
    make_system: SystemFactory,
) -> None:
    system = make_system()
    create_tagged_rows(system)
    with system.client() as client:
        outcome = client.run(tagged_inserts("one-phase-get", ("shard1",)))
        assert outcome.committed and outcome.one_phase
        assert client.get_transaction(outcome.transaction_id).outcome == "committed"
    # After a restart the coordinator's memory is gone: the log must still know.
    assert system.coordinator is not None
    system.coordinator.kill()
    system.coordinator.start()
    with system.client() as client:
        assert client.get_transaction(outcome.transaction_id).outcome == "committed"


def test_an_error_after_the_commit_record_is_durable_still_commits_everywhere(
    make_system: SystemFactory,
) -> None:
    system = make_system(coordinator_args=["--allow-failpoints"])
    create_tagged_rows(system)
    assert system.coordinator is not None
    system.coordinator.set_failpoints("coordinator.after_decision_logged=1*error(injected)")
    with system.client() as client:
        try:
            outcome = client.run(tagged_inserts("after-logged"))
        except Exception as exc:  # an error answer is allowed; a rollback is not
            txid = None
            print("client was told:", exc)
        else:
            assert outcome.committed, outcome
            txid = outcome.transaction_id
        wait_until(
            lambda: rows(system, "after-logged") == {"shard1": 1, "shard2": 1, "shard3": 1},
            20,
            "the transaction committed on every shard",
        )
        if txid is not None:
            assert client.get_transaction(txid).outcome == "committed"
    wait_no_prepared(system)


def test_a_second_coordinator_on_the_same_log_refuses_to_start(
    make_system: SystemFactory,
) -> None:
    system = make_system()
    assert system.coordinator is not None
    argv = list(system.coordinator.argv)
    argv[argv.index("--listen") + 1] = f"127.0.0.1:{free_port()}"
    second = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert second.returncode != 0
    assert "in use by another process" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    # The first one is untouched and still decides.
    create_tagged_rows(system)
    with system.client() as client:
        assert client.run(tagged_inserts("two-coordinators")).committed


def test_a_coordinator_on_an_older_copy_of_its_log_refuses_to_start(
    make_system: SystemFactory,
) -> None:
    system = make_system()
    coordinator = system.coordinator
    assert coordinator is not None
    log = Path(coordinator.argv[coordinator.argv.index("--log") + 1])
    create_tagged_rows(system)
    with system.client() as client:
        assert client.run(tagged_inserts("old-log-1"), wait_for_completion=True).committed
    coordinator.stop()
    backup = log.with_name("backup.sqlite")
    shutil.copy(log, backup)
    coordinator.start()  # epoch 2, seen by every agent
    with system.client() as client:
        assert client.run(tagged_inserts("old-log-2"), wait_for_completion=True).committed
    coordinator.stop()
    for suffix in ("-wal", "-shm"):
        Path(f"{log}{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, log)  # the operator restores last week's backup
    with pytest.raises(HarnessError, match="older copy"):
        coordinator.start()
    # Refusing changed nothing: the restored log was not bumped past the agents.
    assert _meta(log)["epoch"] == "1"


def _meta(log: Path) -> dict[str, str]:
    with sqlite3.connect(log) as db:
        return dict(db.execute("SELECT key, value FROM meta").fetchall())


def test_an_agent_refuses_a_branch_of_an_older_coordinator_epoch(
    shared_system: LocalSystem,
) -> None:
    with shared_system.participant_channel("shard1") as channel:
        agent = pgrpc.ParticipantStub(channel)
        select = types_pb2.Statement(sql="SELECT 1")
        newer = agent.Prepare(
            ppb.PrepareRequest(transaction_id="epochtest.7.1", statements=[select]), timeout=10
        )
        assert newer.vote == ppb.READ_ONLY
        older = agent.Prepare(
            ppb.PrepareRequest(transaction_id="epochtest.6.1", statements=[select]), timeout=10
        )
        assert older.vote == ppb.NO and "epoch 7" in older.reason
        listed = agent.ListPrepared(ppb.ListPreparedRequest(coordinator_id="epochtest"))
        assert listed.highest_epoch == 7


def test_a_malformed_gid_that_looks_like_ours_is_reported_and_recovery_goes_on(
    make_system: SystemFactory,
) -> None:
    system = make_system()
    create_tagged_rows(system)
    assert system.coordinator is not None
    in_doubt = f"{system.coordinator.name}.1.424242"
    gids = {
        "malformed": str(branch_xid("not a transaction id", "shard1")),
        "foreign": "another-application-7",
        "ours": str(branch_xid(in_doubt, "shard1")),
    }
    for gid in gids.values():
        with system.connect("shard1") as conn:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO twopc_test_rows VALUES (%s)", (gid,))
            conn.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
    assert set(gids.values()) <= set(system.prepared_transactions()["shard1"])
    try:
        # Our own in-doubt branch is still resolved (no record: rolled back) ...
        wait_until(
            lambda: gids["ours"] not in system.prepared_transactions()["shard1"],
            30,
            "the in-doubt branch rolled back by recovery",
        )
        # ... and the other two are reported, with why, and left alone.
        with system.participant_channel("shard1") as channel:
            agent = pgrpc.ParticipantStub(channel)
            wait_until(
                lambda: len(agent.Status(ppb.ParticipantStatusRequest()).foreign_prepared) == 2,
                30,
                "two foreign prepared transactions reported",
            )
            status = agent.Status(ppb.ParticipantStatusRequest())
            reported = {f.gid: f for f in status.foreign_prepared}
            assert "malformed transaction id" in reported[gids["malformed"]].why
            assert reported[gids["foreign"]].why == "not a twopc branch"
            assert all(f.locks >= 1 for f in reported.values())
            listed = agent.ListPrepared(
                ppb.ListPreparedRequest(coordinator_id=system.coordinator.name), timeout=10
            )
            assert list(listed.branches) == []
        assert set(system.prepared_transactions()["shard1"]) == {
            gids["malformed"],
            gids["foreign"],
        }
    finally:
        with system.connect("shard1") as conn:
            for gid in (gids["malformed"], gids["foreign"]):
                conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))


def test_idle_interactive_transactions_cannot_starve_prepares_or_phase_two(
    make_system: SystemFactory,
) -> None:
    # A pool of 6: at most 4 may be held by interactive branches (2 kept for one-shot
    # work), and phase 2 and recovery have a pool of their own.
    system = make_system(participant_args=["--pool-max-size", "6", "--interactive-reserve", "2"])
    create_tagged_rows(system)
    with system.client() as client:
        held = []
        for i in range(4):
            tx = client.begin()
            tx.execute_many("shard1", [_insert(f"idle-{i}")])
            held.append(tx)
        # The next interactive branch is refused at once, with a reason; nothing was
        # opened, and the transaction can still go elsewhere.
        started = time.monotonic()
        tx = client.begin()
        with pytest.raises(ResourceExhausted, match="interactive branches"):
            tx.execute_many("shard1", [_insert("one-too-many")])
        assert time.monotonic() - started < 2.0
        tx.execute_many("shard2", [_insert("one-too-many")])
        assert tx.commit().committed
        # One-shot work and phase 2 go on meanwhile.
        for i in range(3):
            assert client.run(tagged_inserts(f"starve-{i}", ("shard1", "shard2"))).committed
        for tx in held:
            tx.rollback()
    wait_no_prepared(system)
    assert rows(system, "starve-2") == {"shard1": 1, "shard2": 1, "shard3": 0}
    assert rows(system, "one-too-many") == {"shard1": 0, "shard2": 1, "shard3": 0}


def test_an_interactive_transaction_kept_busy_is_still_ended_at_its_maximum_lifetime(
    make_system: SystemFactory,
) -> None:
    system = make_system(coordinator_args=["--transaction-max-lifetime", "3"])
    create_tagged_rows(system)
    with system.client() as client:
        tx = client.begin()
        started = time.monotonic()
        with pytest.raises(TransactionAborted):
            while time.monotonic() - started < 30:  # an Execute every 0.5 s: never idle
                tx.execute_many("shard1", [_insert("long-lived")])
                time.sleep(0.5)
        assert time.monotonic() - started < 15
        status = client.get_transaction(tx.id)
        assert status.outcome == "aborted"
    wait_no_prepared(system)
    _nowhere(system, "long-lived")


def test_an_execute_while_the_abort_is_being_delivered_is_told_aborted(
    make_system: SystemFactory,
) -> None:
    """Between the abort decision and the last participant's acknowledgement the
    transaction is still in memory (aborting): an Execute then is told ABORTED, as
    after the abort was delivered, not FAILED_PRECONDITION (the reaper's abort of the
    test above met this window one run in many)."""
    system = make_system()
    create_tagged_rows(system)
    with system.client() as client:
        tx = client.begin()
        tx.execute_many("shard1", [_insert("decided")])
        tx.execute_many("shard2", [_insert("decided")])
        system.participants["shard2"].pause()  # its Abort waits out the RPC deadline
        try:
            assert not tx.rollback().committed
            with pytest.raises(TransactionAborted, match="rolled back by the client"):
                tx.execute_many("shard1", [_insert("decided")])
            assert not tx.commit().committed  # a Commit answers the outcome, as before
            assert client.get_transaction(tx.id).outcome == "aborted"
        finally:
            system.participants["shard2"].resume()
    wait_no_prepared(system)
    _nowhere(system, "decided")


def test_aborts_to_a_dead_agent_do_not_pile_up_in_the_coordinator(
    make_system: SystemFactory,
) -> None:
    system = make_system()
    create_tagged_rows(system)
    system.participants["shard3"].kill()

    def live() -> int:
        with system.client() as client:
            return int(client.status().counters.get("live_transactions", 0))

    with system.client() as client, ThreadPoolExecutor(10) as pool:
        outcomes = list(
            pool.map(
                lambda i: client.run(tagged_inserts(f"dead-{i}", ("shard1", "shard3"))),
                range(20),
            )
        )
    assert not any(o.committed for o in outcomes)
    # Every aborted transaction leaves memory after a bounded number of attempts; the
    # agent's own recovery (or the in-doubt scan) rolls back whatever it holds.
    wait_until(lambda: live() == 0, 60, "no aborted transaction left in memory")
    system.participants["shard3"].start()
    wait_no_prepared(system)
    assert all(rows(system, f"dead-{i}")["shard1"] == 0 for i in range(20))


def test_a_participant_whose_vote_was_lost_is_sent_the_abort(make_system: SystemFactory) -> None:
    # Recovery on both sides slowed right down: only the coordinator's Abort can
    # release the branch whose answer (too large to deliver) never arrived.
    system = make_system(
        coordinator_args=["--recovery-interval", "120"],
        participant_args=["--recovery-grace", "120"],
    )
    create_tagged_rows(system)
    branches = tagged_inserts("lost-vote", ("shard1", "shard2"))
    branches["shard1"].append(Statement("SELECT repeat('x', 5 * 1024 * 1024)"))
    with system.client() as client:
        outcome = client.run(branches)
    assert not outcome.committed
    wait_no_prepared(system, timeout=15)
    _nowhere(system, "lost-vote")
