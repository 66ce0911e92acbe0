"""Who owns a transaction survives a coordinator restart: the decision log names each
record's owner, so another client learns nothing about a transaction, or a key, that
is not its own, before or after the restart (see `coordinator.access`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from coordinator.client import CoordinatorClient
from coordinator.decision_log import DecisionLog
from tests.conftest import SystemFactory, create_tagged_rows, rows, tagged_inserts
from twopc_common.errors import NotFound, TwoPCError
from twopc_harness.daemons import wait_until
from twopc_harness.system import LocalSystem


def not_yours(client: CoordinatorClient, txid: str) -> str:
    with pytest.raises(NotFound) as caught:
        client.get_transaction(txid)
    return str(caught.value)


def restart_coordinator(system: LocalSystem, kill: bool) -> None:
    assert system.coordinator is not None
    if kill:
        system.coordinator.kill()
    else:
        system.coordinator.stop()
    system.coordinator.start()


@pytest.mark.parametrize("kill", [False, True], ids=["stop", "kill"])
def test_another_client_learns_nothing_of_a_transaction_or_key_after_a_restart(
    make_system: SystemFactory, kill: bool
) -> None:
    system = make_system()
    create_tagged_rows(system)
    tag = f"owned-{'kill' if kill else 'stop'}"
    with system.client(identity="app") as app:
        keyed = app.run(tagged_inserts(f"{tag}-keyed"), idempotency_key="pay-1")
        tx = app.begin()
        tx.execute("shard1", f"INSERT INTO twopc_test_rows VALUES ('{tag}-interactive')")
        tx.execute("shard2", f"INSERT INTO twopc_test_rows VALUES ('{tag}-interactive')")
        interactive = tx.commit(wait_for_completion=True)
        assert keyed.committed and interactive.committed
        aborted = app.begin()
        aborted.execute("shard1", f"INSERT INTO twopc_test_rows VALUES ('{tag}-aborted')")
        assert not aborted.rollback().committed
        assert app.get_transaction(aborted.id).outcome == "aborted"
    with system.client(identity="other") as other:
        never_issued = f"{system.coordinator_id}.1.999999"
        before = not_yours(other, never_issued)
        for txid in (keyed.transaction_id, interactive.transaction_id):
            assert not_yours(other, txid) == before.replace(never_issued, txid)
    restart_coordinator(system, kill)
    with system.client(identity="other") as other:
        # The same answer as for an id never issued: not even existence leaks.
        never_issued = f"{system.coordinator_id}.1.999999"
        baseline = not_yours(other, never_issued)
        assert "of yours" in baseline
        for txid in (keyed.transaction_id, interactive.transaction_id, aborted.id):
            assert not_yours(other, txid) == baseline.replace(never_issued, txid)
        assert other.list_transactions() == []
        # Another client's key is its own key: the same request runs afresh.
        theirs = other.run(tagged_inserts(f"{tag}-keyed"), idempotency_key="pay-1")
        assert theirs.committed and theirs.transaction_id != keyed.transaction_id
    with system.client(identity="app") as app:
        assert app.get_transaction(keyed.transaction_id).outcome == "committed"
        assert app.get_transaction(interactive.transaction_id).outcome == "committed"
        again = app.run(tagged_inserts(f"{tag}-keyed"), idempotency_key="pay-1")
        assert again.transaction_id == keyed.transaction_id  # a replay, nothing ran
        # The documented price: an abort without a record has no owner after a restart.
        not_yours(app, aborted.id)
    with system.client(identity="admin") as admin:
        assert admin.get_transaction(keyed.transaction_id).outcome == "committed"
        assert admin.get_transaction(aborted.id).outcome in ("unknown", "aborted")
    # Answers come once decisions are durable; phase 2 may still be under way.
    wait_until(
        lambda: rows(system, f"{tag}-keyed") == {"shard1": 2, "shard2": 2, "shard3": 2},
        30,
        "both keyed runs applied, each once",
    )
    assert rows(system, f"{tag}-interactive") == {"shard1": 1, "shard2": 1, "shard3": 0}


def test_a_recovered_commit_is_listed_to_its_owner_only(make_system: SystemFactory) -> None:
    """A commit whose phase 2 was cut short by a crash is recovered from the log after
    the restart; only its owner (and admins) see it in ListTransactions."""
    system = make_system(["--allow-failpoints"])
    create_tagged_rows(system)
    coordinator = system.coordinator
    assert coordinator is not None
    coordinator.set_failpoints("coordinator.after_decision_logged=1*crash")
    with system.client(identity="app") as app, pytest.raises(TwoPCError) as crashed:
        app.run(tagged_inserts("owner-recovered", ("shard1", "shard2")))
    print("client was told:", crashed.value)
    coordinator.wait_exit(30)
    system.participants["shard2"].kill()  # phase 2 cannot finish: it stays listed
    try:
        coordinator.start()
        with system.client(identity="admin") as admin:
            wait_until(lambda: bool(admin.list_transactions()), 30, "the recovered commit")
            (recovered,) = admin.list_transactions()
        with system.client(identity="app") as app:
            assert [t.transaction_id for t in app.list_transactions()] == [recovered.transaction_id]
            assert app.get_transaction(recovered.transaction_id).outcome == "committed"
        with system.client(identity="other") as other:
            assert other.list_transactions() == []
            not_yours(other, recovered.transaction_id)
    finally:
        system.participants["shard2"].start()
    wait_until(
        lambda: rows(system, "owner-recovered") == {"shard1": 1, "shard2": 1, "shard3": 0},
        60,
        "the recovered commit applied",
    )


def test_an_older_log_gets_the_owner_column_and_its_rows_belong_to_no_client(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # the schema before rows named their owner
        conn.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('coordinator_id', 'c'), ('epoch', '3');
            CREATE TABLE transactions (
                id TEXT PRIMARY KEY, state TEXT NOT NULL, participants TEXT NOT NULL,
                idempotency_key TEXT UNIQUE, request_hash TEXT, outcome TEXT NOT NULL,
                created_at REAL NOT NULL, decided_at REAL NOT NULL, completed_at REAL);
            INSERT INTO transactions VALUES
                ('c.3.1', 'committed', '["p1"]', 'app/k', 'h', '{"committed": true}', 1, 1, 1);
            """
        )
    log = DecisionLog(str(path), "c")
    log.open()
    try:

        async def check() -> None:
            old = await log.get("c.3.1")
            assert old is not None and old.owner is None and old.idempotency_key == "app/k"
            await log.record_commit("c.4.1", ("p1",), 2.0, {"committed": True}, owner="app")
            new = await log.get("c.4.1")
            assert new is not None and new.owner == "app"

        asyncio.run(check())
    finally:
        log.close()
