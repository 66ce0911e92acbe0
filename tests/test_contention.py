"""Contention and availability: cross-shard deadlocks broken in milliseconds by the
coordinator's detector, and a failed participant failed fast while the others flow."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from bank_demo import bank
from coordinator.client import (
    Outcome,
    Statement,
    TransactionAborted,
    exactly,
)
from tests.conftest import SystemFactory, reset_bank, wait_no_prepared
from twopc_harness.daemons import Daemon, wait_until
from twopc_harness.system import LocalSystem

# A lock timeout far longer than the detector's bound: only the detector can end the
# deadlocks below in time.
SLOW_LOCK_TIMEOUT = ["--lock-timeout", "20"]


def debit(tx_account: int) -> str:
    return f"UPDATE accounts SET balance = balance - 1 WHERE id = {tx_account}"


def accounts_on(system: LocalSystem, shard: str, count: int) -> list[int]:
    return [a for a in range(1, 200) if bank.shard_of(a, system.shard_names) == shard][:count]


def deadlock(
    system: LocalSystem, shards: list[str]
) -> tuple[list[str], list[BaseException | None], float]:
    """Transaction i locks an account on shards[i], then wants the one on shards[i+1]:
    a cycle through every shard. Returns the ids, what each last Execute raised, and
    the seconds from the closing wait to the first answer."""
    accounts = [accounts_on(system, s, 1)[0] for s in shards]
    client = system.client(timeout=30)
    txs = [client.begin() for _ in shards]
    for tx, shard, account in zip(txs, shards, accounts, strict=True):
        tx.execute(shard, debit(account), expect=exactly(1))

    def close_the_ring(i: int) -> BaseException | None:
        nxt = (i + 1) % len(shards)
        try:
            txs[i].execute(shards[nxt], debit(accounts[nxt]), expect=exactly(1))
        except TransactionAborted as exc:
            return exc
        assert txs[i].commit().committed  # releases what the next one waits for
        return None

    with ThreadPoolExecutor(len(shards)) as pool:
        started = time.monotonic()
        futures = [pool.submit(close_the_ring, i) for i in range(len(shards))]
        first = next(iter(f for f in futures if f.done()), None)
        while first is None:
            time.sleep(0.005)
            first = next(iter(f for f in futures if f.done()), None)
        elapsed = time.monotonic() - started
        errors = [f.result() for f in futures]
    client.close()
    return [tx.id for tx in txs], errors, elapsed


def test_a_two_shard_deadlock_is_broken_within_a_second_naming_both(
    make_system: SystemFactory,
) -> None:
    system = make_system(participant_args=SLOW_LOCK_TIMEOUT)
    reset_bank(system)
    ids, errors, elapsed = deadlock(system, ["shard1", "shard2"])
    victims = [(i, e) for i, e in zip(ids, errors, strict=True) if e is not None]
    assert len(victims) == 1, errors
    victim, error = victims[0]
    assert victim == max(ids, key=lambda t: int(t.rsplit(".", 1)[1]))  # the youngest
    assert "deadlock" in str(error) and all(t in str(error) for t in ids), error
    assert elapsed < 1.0, f"broken after {elapsed:.2f} s"
    with system.client() as client:
        assert client.status().counters["deadlocks_broken"] == 1
    wait_no_prepared(system)


def test_a_three_shard_deadlock_is_broken(make_system: SystemFactory) -> None:
    system = make_system(participant_args=SLOW_LOCK_TIMEOUT)
    reset_bank(system)
    ids, errors, elapsed = deadlock(system, ["shard1", "shard2", "shard3"])
    assert sum(e is not None for e in errors) == 1, errors
    error = next(e for e in errors if e is not None)
    assert all(t in str(error) for t in ids), error
    assert elapsed < 1.0, f"broken after {elapsed:.2f} s"
    wait_no_prepared(system)


def opposite_transfers(system: LocalSystem) -> tuple[list[Outcome], float]:
    """Two one-shot transfers in opposite directions over the same two accounts. Each
    prepares its first branch at once (holding the row, prepared) and reaches the other
    shard half a second later, where the other one's prepared branch holds the row: a
    cycle through two prepared branches of undecided transactions."""
    a, b = _pair(system)
    shards = system.shard_names

    def transfer(source: int, target: int, late: str) -> Outcome:
        branches = bank.transfer(f"oneshot-{source}-{target}", source, target, 1, shards)
        branches[late].insert(0, Statement("SELECT pg_sleep(0.5)"))
        with system.client() as client:
            return client.run(branches)

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(transfer, a, b, "shard2")
        two = pool.submit(transfer, b, a, "shard1")
        outcomes = [one.result(), two.result()]
    return outcomes, time.monotonic() - started


def test_a_one_shot_deadlock_through_prepared_branches_aborts_the_youngest(
    make_system: SystemFactory,
) -> None:
    system = make_system(["--deadlock-retries", "0"], SLOW_LOCK_TIMEOUT)
    reset_bank(system)
    outcomes, elapsed = opposite_transfers(system)
    assert sorted(o.committed for o in outcomes) == [False, True], outcomes
    (victim,) = [o for o in outcomes if not o.committed]
    assert victim.abort_cause == "DEADLOCK", victim
    assert victim.transaction_id == max(
        (o.transaction_id for o in outcomes), key=lambda t: int(t.rsplit(".", 1)[1])
    )
    assert all(o.transaction_id in victim.abort_reason for o in outcomes)
    assert elapsed < 2.0, f"{elapsed:.2f} s"  # 0.5 s of sleep, then the detector
    wait_no_prepared(system)


def test_a_one_shot_deadlock_victim_is_run_again_and_commits(make_system: SystemFactory) -> None:
    system = make_system(participant_args=SLOW_LOCK_TIMEOUT)
    reset_bank(system)
    outcomes, elapsed = opposite_transfers(system)
    assert all(o.committed for o in outcomes), outcomes
    assert elapsed < 4.0, f"{elapsed:.2f} s"
    with system.client() as client:
        counters = client.status().counters
    assert counters["deadlocks_broken"] >= 1 and counters["deadlock_retries"] >= 1
    wait_no_prepared(system)
    # Each transfer applied exactly once (both legs, on their shards), money unchanged.
    legs = []
    total = 0
    for shard in ("shard1", "shard2", "shard3"):
        with system.connect(shard) as conn:
            legs += conn.execute("SELECT transfer_id, leg FROM ledger").fetchall()
            row = conn.execute("SELECT sum(balance) FROM accounts").fetchone()
            total += int(row[0]) if row and row[0] is not None else 0
    assert sorted(legs) == sorted(
        (f"oneshot-{s}-{t}", leg)
        for s, t in [(a, b) for a, b in [_pair(system)]] + [(b, a) for a, b in [_pair(system)]]
        for leg in ("debit", "credit")
    )
    assert total == 20 * 100


def _pair(system: LocalSystem) -> tuple[int, int]:
    return accounts_on(system, "shard1", 1)[0], accounts_on(system, "shard2", 1)[0]


def test_no_deadlock_victims_under_a_load_without_skew(system: LocalSystem) -> None:
    with system.client() as client:
        before = client.status().counters.get("deadlocks_broken", 0)

        def transfer(i: int) -> bool:
            source, target = 1 + (i * 7) % 20, 1 + (i * 7 + 3) % 20
            return client.run(
                bank.transfer(f"noskew-{i}", source, target, 1, system.shard_names)
            ).committed

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(transfer, range(120)))
        assert client.status().counters.get("deadlocks_broken", 0) == before
    assert sum(results) >= 100, f"{sum(results)} of 120 committed"


def pause(daemon: Daemon) -> None:
    assert daemon.process is not None
    os.killpg(daemon.process.pid, signal.SIGSTOP)


def resume(daemon: Daemon) -> None:
    assert daemon.process is not None
    os.killpg(daemon.process.pid, signal.SIGCONT)


def test_a_hung_agent_is_failed_fast_and_the_others_keep_committing(
    make_system: SystemFactory,
) -> None:
    system = make_system()
    reset_bank(system)
    hung = system.participants["shard3"]
    ones = {s: accounts_on(system, s, 4) for s in system.shard_names}
    pause(hung)
    try:
        with system.client() as client:
            wait_until(
                lambda: client.status().counters.get("participants_marked_down", 0) >= 1,
                10,
                "shard3 marked down",
            )
            started = time.monotonic()
            touching = client.run(
                bank.transfer("hung-3", ones["shard1"][0], ones["shard3"][0], 1, system.shard_names)
            )
            assert time.monotonic() - started < 2.0
            assert not touching.committed and touching.abort_cause == "PARTICIPANT_UNAVAILABLE"
            assert touching.abort_participant == "shard3" and "down" in touching.abort_reason
            for i in range(10):
                other = client.run(
                    bank.transfer(
                        f"hung-ok-{i}",
                        ones["shard1"][i % 4],
                        ones["shard2"][i % 4],
                        1,
                        system.shard_names,
                    )
                )
                assert other.committed, other
    finally:
        resume(hung)
    with system.client() as client:
        wait_until(
            lambda: (
                client.run(
                    bank.transfer(
                        "after", ones["shard1"][1], ones["shard3"][1], 1, system.shard_names
                    )
                ).committed
            ),
            10,
            "a transfer touching shard3 to commit once it answers again",
            interval=0.5,
        )
    wait_no_prepared(system)
