"""Where the time goes: CPU per committed transfer, process by process.

Runs the system and the raw 2PC baseline of `bench/transfers.py` at one concurrency on
2 shards, and reads each process's CPU time (utime + stime from /proc) before and after:
the coordinator, each agent, the client (this process) and the PostgreSQL backends,
told apart by application_name. Prints milliseconds of CPU per committed transfer.

    python bench/cpu_split.py [--concurrency 16] [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfers import Picker, drive, prepare_bank, raw_2pc, through_system

from coordinator.client import AsyncCoordinatorClient
from twopc_harness.system import LocalSystem, start_system

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def processes(system: LocalSystem) -> dict[str, list[int]]:
    """Process groups: our daemons, this client, and PostgreSQL backends by role."""
    assert system.coordinator is not None and system.coordinator.process is not None
    groups: dict[str, list[int]] = {
        "coordinator": [system.coordinator.process.pid],
        "client": [os.getpid()],
    }
    for name, agent in system.participants.items():
        assert agent.process is not None
        groups[f"agent {name}"] = [agent.process.pid]
        with psycopg.connect(system.dsn(name), autocommit=True) as conn:
            for pid, app in conn.execute("SELECT pid, application_name FROM pg_stat_activity"):
                role = "agent" if str(app).startswith("twopc-participant") else "other"
                groups.setdefault(f"postgres {name} ({role} backends)", []).append(int(pid))
    return groups


async def measure(
    name: str,
    transfer: Callable[[str, int, int], Any],
    system: LocalSystem,
    concurrency: int,
    duration: float,
) -> None:
    shards = system.shard_names
    await drive(transfer, Picker(shards, 1), concurrency, 2.0, f"warm-{name}")
    groups = processes(system)
    before = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
    result = await drive(transfer, Picker(shards, 2), concurrency, duration, name)
    groups = processes(system)  # the pool may have opened backends meanwhile
    after = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
    committed = result["committed"] or 1
    print(f"{name}: {result['transfers_per_s']}/s committed; CPU ms per transfer:")
    total = 0.0
    for group in sorted(after):
        ms = 1000 * (after[group] - before.get(group, 0.0)) / committed
        total += ms
        if ms >= 0.01:
            print(f"  {group:<40} {ms:6.2f}")
    print(f"  {'total':<40} {total:6.2f}")


async def main_async(system: LocalSystem, concurrency: int, duration: float) -> None:
    shards = system.shard_names
    pools = {
        s: AsyncConnectionPool(
            system.dsn(s),
            min_size=4,
            max_size=70,
            open=False,
            kwargs={"autocommit": True, "options": "-c lock_timeout=5000"},
        )
        for s in shards
    }
    for pool in pools.values():
        await pool.open(wait=True)
    try:
        async with AsyncCoordinatorClient(system.client_address, timeout=60) as client:
            await measure("system", through_system(client, shards), system, concurrency, duration)
        await measure("raw", raw_2pc(pools, shards), system, concurrency, duration)
    finally:
        for pool in pools.values():
            await pool.close()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0)
    a = p.parse_args()
    system = start_system(
        2,
        coordinator_args=["--prepare-timeout", "10"],
        participant_args=["--pool-max-size", "70", "--lock-timeout", "5"],
    )
    try:
        prepare_bank(system, system.shard_names)
        asyncio.run(main_async(system, a.concurrency, a.duration))
    finally:
        system.stop()


if __name__ == "__main__":
    main()
