"""Atomicity on the paths the crash matrix did not walk: an agent restarted inside an
interactive transaction, outcome queries after the transaction left memory, errors
after the point of no return, lost votes, and the bounds that keep a coordinator
with one dead agent from growing without limit."""

from __future__ import annotations

import pytest

from coordinator.client import Statement, TransactionAborted
from tests.conftest import (
    SystemFactory,
    create_tagged_rows,
    rows,
    tagged_inserts,
    wait_no_prepared,
)
from twopc_harness.daemons import wait_until
from twopc_harness.system import LocalSystem


def _insert(tag: str) -> Statement:
    return Statement("INSERT INTO twopc_test_rows VALUES (%s)", (tag,))


def _nowhere(system: LocalSystem, tag: str) -> None:
    assert rows(system, tag) == {"shard1": 0, "shard2": 0, "shard3": 0}


def test_interactive_commit_after_agent_restart_aborts_naming_the_agent(
    make_system: SystemFactory,
) -> None:
    system = make_system()
    create_tagged_rows(system)
    with system.client() as client:
        tx = client.begin()
        tx.execute_many("shard1", [_insert("restart-commit")])
        tx.execute_many("shard2", [_insert("restart-commit")])
        agent = system.participants["shard1"]
        agent.kill()
        agent.start()
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
    create_tagged_rows(system)
    with system.client() as client:
        tx = client.begin()
        tx.execute_many("shard1", [_insert("restart-exec")])
        tx.execute_many("shard2", [_insert("restart-exec")])
        agent = system.participants["shard1"]
        agent.kill()
        agent.start()
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
