"""Recovery at scale: a thousand prepared branches left by a coordinator crash are all
resolved after its restart. Prints how long that took (goal: under 5 s)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from coordinator.client import Statement, TransportError
from tests.conftest import SystemFactory, wait_no_prepared
from twopc_harness.daemons import wait_until
from twopc_harness.system import LocalSystem

TRANSACTIONS = 500  # two branches each
PAIRS = [("shard1", "shard2"), ("shard2", "shard3"), ("shard1", "shard3")]


def prepared_count(system: LocalSystem) -> int:
    return sum(len(gids) for gids in system.prepared_transactions().values())


def test_a_thousand_in_doubt_branches_are_resolved_after_a_coordinator_crash(
    make_system: SystemFactory,
) -> None:
    # Every one of them stays in flight (hung after its votes): admit them all.
    system = make_system(["--allow-failpoints", "--max-in-flight", str(2 * TRANSACTIONS)])
    for shard in system.shard_names:
        with system.connect(shard) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS scale_rows (tag text)")
    assert system.coordinator is not None
    # Every transaction stops after its votes, with both branches prepared.
    system.coordinator.set_failpoints("coordinator.after_votes_before_decision=hang")

    async def pile_up() -> None:
        assert system.coordinator is not None
        async with system.async_client(timeout=120) as client:

            async def one(i: int) -> None:
                a, b = PAIRS[i % len(PAIRS)]
                row = Statement("INSERT INTO scale_rows VALUES (%s)", (f"s{i}",))
                # The coordinator is killed under it, as intended.
                with contextlib.suppress(TransportError):
                    await client.run({a: [row], b: [row]})

            calls = asyncio.gather(*(one(i) for i in range(TRANSACTIONS)))
            await asyncio.to_thread(
                wait_until,
                lambda: prepared_count(system) == 2 * TRANSACTIONS,
                120,
                f"{2 * TRANSACTIONS} prepared branches",
                0.5,
            )
            await asyncio.to_thread(system.coordinator.kill)
            await calls

    asyncio.run(pile_up())
    assert prepared_count(system) == 2 * TRANSACTIONS
    started = time.monotonic()
    system.coordinator.start()
    serving = time.monotonic()
    wait_no_prepared(system, timeout=60)
    done = time.monotonic()
    print(
        f"resolved {2 * TRANSACTIONS} in-doubt branches: {done - started:.2f}s after restart "
        f"({done - serving:.2f}s after the coordinator was serving)"
    )
    for shard in system.shard_names:
        with system.connect(shard) as conn:
            assert conn.execute("SELECT count(*) FROM scale_rows").fetchone() == (0,)
