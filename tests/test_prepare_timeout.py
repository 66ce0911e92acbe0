"""The prepare timeout: a branch stuck on a row lock must not hold the transaction."""

from __future__ import annotations

import time

import psycopg

from bank_demo import bank
from coordinator.client import Statement, exactly
from tests.conftest import SystemFactory, dsns, reset_bank, wait_no_prepared


def test_branch_blocked_on_a_lock_aborts_after_the_prepare_timeout(
    make_system: SystemFactory,
) -> None:
    # The lock wait (30 s) outlasts the prepare timeout (2 s): only the timeout can end it.
    system = make_system(["--prepare-timeout", "2"], ["--lock-timeout", "30"])
    reset_bank(system)
    shards = system.shard_names
    source = next(a for a in range(1, 21) if bank.shard_of(a, shards) == "shard1")
    target = next(a for a in range(1, 21) if bank.shard_of(a, shards) == "shard2")
    before = bank.snapshot(dsns(system))

    with psycopg.connect(system.dsn("shard2")) as blocker:
        blocker.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (target,))
        with system.client() as client:
            started = time.monotonic()
            outcome = client.run(bank.transfer("locked", source, target, 10, shards))
            elapsed = time.monotonic() - started
        assert not outcome.committed
        assert outcome.abort_cause == "PREPARE_TIMEOUT"
        assert outcome.abort_participant == "shard2"
        # About the prepare timeout: not before it, and not waiting for the lock.
        assert 1.8 <= elapsed < 10, elapsed
        after = bank.snapshot(dsns(system))
        assert "locked" not in after.legs
        assert after.total == before.total
        blocker.rollback()

    wait_no_prepared(system)
    final = bank.snapshot(dsns(system))
    assert "locked" not in final.legs and final.total == before.total
    # The stuck branch was cancelled and rolled back, so the row is free again.
    with system.client() as client:
        again = client.run(
            {
                "shard2": [
                    Statement(
                        "UPDATE accounts SET balance = balance WHERE id = %s", (target,), exactly(1)
                    )
                ]
            },
            timeout=10,
        )
    assert again.committed
