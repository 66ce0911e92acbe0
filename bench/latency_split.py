"""Where the latency of one transfer goes at concurrency 1, hop by hop.

On one system (2 shards, no faults), one request at a time, p50 and p90 of:

  grpc hop        an empty gRPC round trip to the coordinator (Status);
  one prepare     one agent's Prepare of a transfer leg, called directly (then its
                  Commit, untimed);
  two prepares    both legs' Prepares in parallel, called directly: phase 1 without
                  the coordinator;
  system          the whole transfer through the client library and the coordinator;
  raw             the raw psycopg 2PC baseline of bench/transfers.py.

    python bench/latency_split.py [--samples 400]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfers import Picker, prepare_bank, raw_2pc, start_bench_system

from bank_demo import bank
from coordinator.participants import ParticipantClient
from twopc_common.values import Statement
from twopc_common.votes import Vote
from twopc_harness.system import LocalSystem


async def percentiles(name: str, step: Callable[[], Awaitable[float | None]], samples: int) -> None:
    """Time `step` (or take the duration it returns) `samples` times after a warm-up."""
    for _ in range(30):
        await step()
    spans = []
    for _ in range(samples):
        started = time.perf_counter()
        measured = await step()
        spans.append(measured if measured is not None else time.perf_counter() - started)
    spans.sort()
    p50, p90 = spans[len(spans) // 2], spans[int(len(spans) * 0.9)]
    print(f"  {name:<14} p50 {1000 * p50:6.2f} ms   p90 {1000 * p90:6.2f} ms", flush=True)


async def main_async(system: LocalSystem, samples: int) -> None:
    shards = system.shard_names
    picker = Picker(shards, 1)
    numbers = itertools.count(1)
    # Transaction ids of a coordinator id the system's coordinator does not use, so
    # its recovery never touches these branches.
    epoch = int(time.time()) % 100_000

    def transfer() -> dict[str, list[Statement]]:
        source, target = picker.pick()
        return bank.transfer(f"lat-{next(numbers)}", source, target, 1, shards)

    tls = system.tls(system.coordinator_id)
    agents = {
        s: ParticipantClient(s, system.participants[s].address, 10, 4 << 20, tls=tls)
        for s in shards
    }
    pools = {
        s: AsyncConnectionPool(system.dsn(s), min_size=2, open=False, kwargs={"autocommit": True})
        for s in shards
    }
    for pool in pools.values():
        await pool.open(wait=True)
    try:
        async with system.async_client(timeout=60) as client:

            async def grpc_hop() -> None:
                await client.status()

            async def prepare_legs(legs: int) -> float:
                branches = dict(list(transfer().items())[:legs])
                txid = f"latency.{epoch}.{next(numbers)}"
                started = time.perf_counter()
                replies = await asyncio.gather(
                    *(agents[s].prepare(txid, st, False, 10) for s, st in branches.items())
                )
                spent = time.perf_counter() - started
                assert all(r.ballot.vote is Vote.YES for r in replies), replies
                await asyncio.gather(*(agents[s].commit(txid) for s in branches))
                return spent

            async def one_prepare() -> float:
                return await prepare_legs(1)

            async def two_prepares() -> float:
                return await prepare_legs(2)

            async def through_system() -> None:
                assert (await client.run(transfer())).committed

            raw = raw_2pc(pools, shards)

            async def raw_transfer() -> None:
                source, target = picker.pick()
                assert await raw(f"raw-{next(numbers)}", source, target)

            print("concurrency 1, 2 shards:")
            await percentiles("grpc hop", grpc_hop, samples)
            await percentiles("one prepare", one_prepare, samples)
            await percentiles("two prepares", two_prepares, samples)
            await percentiles("system", through_system, samples)
            await percentiles("raw", raw_transfer, samples)
    finally:
        for agent in agents.values():
            await agent.close()
        for pool in pools.values():
            await pool.close()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", type=int, default=400)
    a = p.parse_args()
    system = start_bench_system()
    try:
        prepare_bank(system, system.shard_names)
        asyncio.run(main_async(system, a.samples))
    finally:
        system.stop()


if __name__ == "__main__":
    main()
