"""Random kills under load: concurrent transfers while the coordinator, or one agent,
is SIGKILLed at a random moment and restarted, round after round. Clients retry with
their idempotency key, as a real application would."""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from bank_demo import bank
from coordinator.client import TransportError
from tests.conftest import SystemFactory, dsns, reset_bank, wait_no_prepared
from twopc_harness.daemons import Daemon
from twopc_harness.system import LocalSystem

TRANSFERS_PER_ROUND = 100
ACCOUNTS = 20


async def one_round(
    system: LocalSystem, victim: Daemon, rng: random.Random, round_no: int, seen: dict[str, bool]
) -> None:
    assert system.coordinator is not None
    shards = system.shard_names
    async with system.async_client(timeout=15) as client:

        async def transfer(i: int) -> None:
            tid = f"r{round_no}-{i}"
            source, target = rng.sample(range(1, ACCOUNTS + 1), 2)
            branches = bank.transfer(tid, source, target, rng.randint(1, 30), shards)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    outcome = await client.run(branches, idempotency_key=tid)
                except TransportError:
                    await asyncio.sleep(0.2)  # the coordinator is restarting: retry
                    continue
                seen[tid] = outcome.committed
                return

        work = asyncio.gather(*(transfer(i) for i in range(TRANSFERS_PER_ROUND)))
        await asyncio.sleep(rng.uniform(0.05, 1.0))
        await asyncio.to_thread(victim.kill)
        await asyncio.to_thread(victim.start)
        await work


@pytest.mark.parametrize(
    "rounds", [3, pytest.param(20, marks=pytest.mark.chaos)], ids=["3-rounds", "20-rounds"]
)
@pytest.mark.parametrize("victim_name", ["coordinator", "shard2"])
def test_random_kills_under_load_keep_every_invariant(
    make_system: SystemFactory, victim_name: str, rounds: int
) -> None:
    seed = int(os.environ.get("TWOPC_SEED", random.randrange(2**32)))
    print(f"seed={seed} (rerun with TWOPC_SEED={seed})")
    rng = random.Random(seed)
    system = make_system()
    reset_bank(system, ACCOUNTS, 100)
    victim = (
        system.coordinator if victim_name == "coordinator" else system.participants[victim_name]
    )
    assert victim is not None
    seen: dict[str, bool] = {}
    for round_no in range(rounds):
        asyncio.run(one_round(system, victim, rng, round_no, seen))
    wait_no_prepared(system, timeout=30)
    snap = bank.snapshot(dsns(system))
    applied = bank.applied(snap, seen)
    committed = [t for t, ok in seen.items() if ok]
    print(f"answered={len(seen)} committed={len(committed)} of {rounds * TRANSFERS_PER_ROUND}")
    assert snap.total == ACCOUNTS * 100
    assert not snap.negative
    assert not snap.half_applied()
    assert all(applied[t] for t in committed)
    assert not any(applied[t] for t, ok in seen.items() if not ok)
    assert committed, "nothing committed at all"
