"""Idempotency keys: the double-charge problem. A retried Run with the same key returns
the first outcome and applies nothing again, across coordinator restarts."""

from __future__ import annotations

import asyncio

import pytest

from bank_demo import bank
from coordinator.client import Statement
from tests.conftest import SystemFactory, dsns, reset_bank, wait_no_prepared
from twopc_common.errors import AlreadyExists
from twopc_harness.system import LocalSystem


def pair(system: LocalSystem) -> tuple[int, int]:
    shards = system.shard_names
    source = next(a for a in range(1, 21) if bank.shard_of(a, shards) == "shard1")
    target = next(a for a in range(1, 21) if bank.shard_of(a, shards) == "shard3")
    return source, target


def balances(system: LocalSystem, *accounts: int) -> list[int]:
    out = []
    for account in accounts:
        shard = bank.shard_of(account, system.shard_names)
        with system.connect(shard) as conn:
            row = conn.execute("SELECT balance FROM accounts WHERE id = %s", (account,)).fetchone()
        assert row is not None
        out.append(int(row[0]))
    return out


def test_repeated_run_returns_the_first_outcome_and_applies_once(system: LocalSystem) -> None:
    source, target = pair(system)
    request = bank.transfer("k1", source, target, 30, system.shard_names)
    with system.client() as client:
        first = client.run(request, idempotency_key="key-1", wait_for_completion=True)
        second = client.run(request, idempotency_key="key-1", wait_for_completion=True)
    assert first.committed and second.committed
    assert second.transaction_id == first.transaction_id
    assert balances(system, source, target) == [70, 130]


def test_same_key_with_another_request_is_already_exists(system: LocalSystem) -> None:
    source, target = pair(system)
    with system.client() as client:
        client.run(
            bank.transfer("k2", source, target, 10, system.shard_names), idempotency_key="key-2"
        )
        with pytest.raises(AlreadyExists, match="key-2"):
            client.run(
                bank.transfer("k2", source, target, 99, system.shard_names), idempotency_key="key-2"
            )
    wait_no_prepared(system)
    assert balances(system, source, target) == [90, 110]


def test_an_aborted_outcome_is_repeated_too(system: LocalSystem) -> None:
    source, target = pair(system)
    request = bank.transfer("k3", source, target, 150, system.shard_names)  # only 100 there
    with system.client() as client:
        first = client.run(request, idempotency_key="key-3")
        assert not first.committed
        # Even once the money is there, the retry answers what the first attempt did.
        deposit = [Statement("UPDATE accounts SET balance = 500 WHERE id = %s", (source,))]
        assert client.run({"shard1": deposit}).committed
        second = client.run(request, idempotency_key="key-3")
    assert not second.committed and second.transaction_id == first.transaction_id
    assert balances(system, source, target) == [500, 100]


def test_concurrent_duplicates_run_once(system: LocalSystem) -> None:
    source, target = pair(system)
    request = bank.transfer("k4", source, target, 5, system.shard_names)

    async def burst() -> set[str]:
        assert system.coordinator is not None
        async with system.async_client() as client:
            outcomes = await asyncio.gather(
                *(client.run(request, idempotency_key="key-4") for _ in range(20))
            )
        assert all(o.committed for o in outcomes)
        return {o.transaction_id for o in outcomes}

    assert len(asyncio.run(burst())) == 1
    wait_no_prepared(system)
    assert balances(system, source, target) == [95, 105]


def test_key_survives_a_coordinator_kill(make_system: SystemFactory) -> None:
    system = make_system()
    reset_bank(system)
    source, target = pair(system)
    request = bank.transfer("k5", source, target, 40, system.shard_names)
    assert system.coordinator is not None
    with system.client() as client:
        first = client.run(request, idempotency_key="key-5")
    assert first.committed
    system.coordinator.kill()
    system.coordinator.start()
    with system.client() as client:
        again = client.run(request, idempotency_key="key-5", wait_for_completion=True)
    assert again.committed and again.transaction_id == first.transaction_id
    wait_no_prepared(system)
    assert balances(system, source, target) == [60, 140]
    assert bank.snapshot(dsns(system)).total == 2000


def test_a_replay_after_the_run_finished_has_the_outcome_but_not_the_read_results(
    system: LocalSystem,
) -> None:
    """As the README says: the log keeps outcomes, not the rows statements returned."""
    request = {
        "shard1": [Statement("SELECT balance FROM accounts ORDER BY id LIMIT 1")],
        "shard2": [Statement("UPDATE accounts SET balance = balance WHERE id = 0")],
    }
    with system.client() as client:
        # An agent of the shared system may still hold a pooled connection that an
        # earlier test's PostgreSQL crash broke: its first branch aborts (safely).
        for attempt in range(3):
            key = f"key-6-{attempt}"
            first = client.run(request, idempotency_key=key, wait_for_completion=True)
            if first.committed:
                break
        again = client.run(request, idempotency_key=key, wait_for_completion=True)
    assert first.committed, f"{first.abort_cause} {first.abort_participant}: {first.abort_reason}"
    assert first.results and first.results["shard1"]
    assert again.committed and again.transaction_id == first.transaction_id
    assert again.results == {}
