"""Work whose answer cannot reach the client is never committed: results larger than
`Limits.max_result_bytes` fail the branch (one phase, interactive) or abort the
transaction (two phase) before anything commits, and the message names the limit."""

from __future__ import annotations

import pytest

from bank_demo import bank
from coordinator.client import Statement, TransactionAborted
from tests.conftest import dsns
from twopc_common.limits import Limits
from twopc_harness.system import LocalSystem

LIMIT = Limits().max_result_bytes
# 100 rows of 30 KB: about 3 MB, under the limit alone, over it twice.
THREE_MB = Statement("SELECT repeat('x', 30000) FROM generate_series(1, 100)")
FIVE_MB = Statement("SELECT repeat('x', 50000) FROM generate_series(1, 100)")


def _debit(account: int) -> Statement:
    return Statement("UPDATE accounts SET balance = balance - 1 WHERE id = %s", (account,))


def test_one_phase_branch_with_undeliverable_results_does_not_commit(
    system: LocalSystem,
) -> None:
    before = bank.snapshot(dsns(system))
    with system.client() as client:
        outcome = client.run({"shard1": [_debit(1), _debit(2), FIVE_MB]})
        assert not outcome.committed and outcome.abort_participant == "shard1"
        assert "max_result_bytes" in outcome.abort_reason and str(LIMIT) in outcome.abort_reason
        # Under the limit, the same branch commits and the rows arrive.
        small = client.run({"shard1": [Statement("SELECT repeat('x', 1000)")]})
        assert small.committed and small.results is not None
        assert small.results["shard1"][0].rows == (("x" * 1000,),)
    assert bank.snapshot(dsns(system)).total == before.total


def test_two_phase_results_too_large_together_abort_everywhere(system: LocalSystem) -> None:
    before = bank.snapshot(dsns(system))
    with system.client() as client:
        # A pooled connection a previous test's database crash left broken makes the
        # first attempt PARTICIPANT_UNAVAILABLE (the agent then purges its pool).
        for _ in range(3):
            outcome = client.run(
                {
                    "shard1": [_debit(1), THREE_MB],
                    "shard2": [_debit(2), THREE_MB],
                },
                wait_for_completion=True,
            )
            assert not outcome.committed
            if outcome.abort_cause != "PARTICIPANT_UNAVAILABLE":
                break
    why = (outcome.abort_cause, outcome.abort_participant, outcome.abort_reason)
    assert outcome.abort_cause == "VOTE_NO" and "max_result_bytes" in outcome.abort_reason, why
    after = bank.snapshot(dsns(system))
    assert after.total == before.total and not any(after.prepared.values())


def test_interactive_execute_with_undeliverable_results_aborts(system: LocalSystem) -> None:
    before = bank.snapshot(dsns(system))
    with system.client() as client:
        tx = client.begin()
        tx.execute_many("shard1", [_debit(1)])
        with pytest.raises(TransactionAborted, match="max_result_bytes"):
            tx.execute_many("shard1", [FIVE_MB])
    assert bank.snapshot(dsns(system)).total == before.total
