"""Contention and availability, side by side in one run.

1. Hot accounts: 2 shards, 16 clients, 10 hot accounts taking 80% of the transfers,
   through the system with its deadlock detector, through the system without it
   (`--deadlock-interval 0`, lock timeout 5 s: how it was), and raw PostgreSQL 2PC with
   a 5 s lock timeout; committed/s, share aborted, deadlocks broken.
2. Availability: 3 shards, 16 clients over every shard pair (two thirds of the
   transfers touch shard3). Throughput of the transfers that do not touch shard3,
   before and during three failures of shard3: its agent hung (SIGSTOP), killed, and
   partitioned from the coordinator (Toxiproxy); the ratio is during / before.

    python bench/contention.py [--duration 20] [--fault-seconds 10] [--out out/contention.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfers import ACCOUNTS, Picker, drive, prepare_bank, raw_2pc, raw_pools, through_system

from bank_demo import bank
from coordinator.client import AsyncCoordinatorClient
from twopc_harness.daemons import wait_until
from twopc_harness.postgres import start_clusters, stop_clusters
from twopc_harness.system import LocalSystem, start_system


def wait_settled(system: LocalSystem) -> None:
    """Answers come before phase 2: let it finish before the daemons stop."""
    wait_until(
        lambda: not any(system.prepared_transactions().values()),
        60,
        "phase 2 to finish",
        interval=0.2,
    )


async def deadlocks_broken(client: AsyncCoordinatorClient) -> int:
    return int((await client.status()).counters.get("deadlocks_broken", 0))


async def hot_accounts(duration: float, seed: int) -> list[dict[str, Any]]:
    clusters = start_clusters(2)
    rows: list[dict[str, Any]] = []
    try:
        variants = {
            "system": ["--deadlock-interval", "0.05"],
            "system, detector off": ["--deadlock-interval", "0"],
        }
        for name, flags in variants.items():
            lock = "15" if name == "system" else "5"
            system = start_system(
                2,
                clusters=clusters,
                coordinator_args=["--prepare-timeout", "10", *flags],
                participant_args=["--pool-max-size", "70", "--lock-timeout", lock],
                coordinator_id=f"hot{len(rows)}",
            )
            try:
                shards = system.shard_names
                prepare_bank(system, shards)
                async with system.async_client(timeout=60) as client:
                    before = await deadlocks_broken(client)
                    result = await drive(
                        through_system(client, shards),
                        Picker(shards, seed, hot=10),
                        16,
                        duration,
                        f"hot{len(rows)}",
                    )
                    result["deadlocks_broken"] = await deadlocks_broken(client) - before
                rows.append({"variant": name, **result})
                wait_settled(system)
            finally:
                system.stop()
        system = start_system(2, clusters=clusters, start_daemons=False)
        shards = system.shard_names
        prepare_bank(system, shards)
        pools = await raw_pools(system, shards, 20)
        try:
            result = await drive(
                raw_2pc(pools, shards), Picker(shards, seed, hot=10), 16, duration, "hotraw"
            )
        finally:
            for pool in pools.values():
                await pool.close()
        rows.append({"variant": "raw 2PC, lock timeout 5 s", **result})
    finally:
        stop_clusters(clusters)
    for row in rows:
        total = row["committed"] + row["aborted"]
        row["aborted_share"] = round(row["aborted"] / total, 3) if total else None
        print(
            f"hot accounts, {row['variant']:<26} {row['transfers_per_s']:>7}/s committed, "
            f"{100 * (row['aborted_share'] or 0):5.1f}% aborted, "
            f"{row.get('deadlocks_broken', '-')} deadlocks broken, p99 {row['p99_ms']} ms",
            flush=True,
        )
    return rows


class Load:
    """Sixteen clients over every shard pair; counts commits per second, split by
    whether the transfer touched the failing shard."""

    def __init__(self, client: AsyncCoordinatorClient, shards: list[str], seed: int) -> None:
        self.client, self.shards = client, shards
        self.rng = random.Random(seed)
        self.by_shard: dict[str, list[int]] = {s: [] for s in shards}
        for account in range(1, ACCOUNTS + 1):
            self.by_shard[bank.shard_of(account, shards)].append(account)
        self.commits: list[tuple[float, bool]] = []  # (time, touched shard3)
        self.stop = False

    async def worker(self, w: int) -> None:
        n = 0
        while not self.stop:
            n += 1
            a, b = self.rng.sample(self.shards, 2)
            source, target = self.rng.choice(self.by_shard[a]), self.rng.choice(self.by_shard[b])
            try:
                outcome = await self.client.run(
                    bank.transfer(f"av-{w}-{n}", source, target, 1, self.shards)
                )
            except Exception:
                continue
            if outcome.committed:
                self.commits.append((time.monotonic(), "shard3" in (a, b)))

    def unaffected_rate(self, start: float, end: float) -> float:
        count = sum(1 for t, touched in self.commits if start <= t < end and not touched)
        return count / (end - start)


async def availability(fault_seconds: float, seed: int) -> list[dict[str, Any]]:
    system = start_system(3, faults=True, participant_args=["--pool-max-size", "40"])
    rows: list[dict[str, Any]] = []
    try:
        prepare_bank(system, system.shard_names)
        agent = system.participants["shard3"]
        assert system.network is not None
        network = system.network

        def signal_agent(sig: signal.Signals) -> Callable[[], None]:
            def send() -> None:
                assert agent.process is not None
                os.killpg(agent.process.pid, sig)

            return send

        def restart() -> None:
            agent.start()

        def cut() -> None:
            network["coordinator_shard3"].disable()
            network["shard3_coordinator"].disable()

        faults = [
            ("agent hung (SIGSTOP)", signal_agent(signal.SIGSTOP), signal_agent(signal.SIGCONT)),
            ("agent killed", agent.kill, restart),
            ("partitioned from the coordinator", cut, network.heal),
        ]
        async with system.async_client(timeout=30) as client:
            load = Load(client, system.shard_names, seed)
            workers = [asyncio.create_task(load.worker(w)) for w in range(16)]
            await asyncio.sleep(3)  # warm up
            for name, start_fault, end_fault in faults:
                before_start = time.monotonic()
                await asyncio.sleep(fault_seconds)
                before_end = time.monotonic()
                await asyncio.to_thread(start_fault)
                await asyncio.sleep(fault_seconds)
                during_end = time.monotonic()
                await asyncio.to_thread(end_fault)
                before = load.unaffected_rate(before_start, before_end)
                during = load.unaffected_rate(before_end, during_end)
                row = {
                    "fault": name,
                    "unaffected_before_per_s": round(before, 1),
                    "unaffected_during_per_s": round(during, 1),
                    "ratio": round(during / before, 3) if before else None,
                }
                rows.append(row)
                print(
                    f"availability, {name:<34} unaffected {before:6.1f}/s before, "
                    f"{during:6.1f}/s during: ratio {row['ratio']}",
                    flush=True,
                )
                await asyncio.sleep(3)  # recovery settles before the next baseline
            load.stop = True
            await asyncio.gather(*workers)
    finally:
        system.stop()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=20.0, help="seconds per hot-account run")
    p.add_argument("--fault-seconds", type=float, default=10.0, help="seconds before/during")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("out/contention.json"))
    a = p.parse_args()
    results = {
        "hot_accounts": asyncio.run(hot_accounts(a.duration, a.seed)),
        "availability": asyncio.run(availability(a.fault_seconds, a.seed)),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
