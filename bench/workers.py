"""One coordinator process against several (`coordinator.group`), with CPU per process.

A coordinator is one Python event loop: on a host with more cores than the system
has processes, it is the first to saturate. This runs the same transfers through a
group of 1 and of N coordinators (each its own id and log, all known to the same two
agents, over the same two PostgreSQL clusters), measures CPU per committed transfer
for every process, and projects what each layout could reach on a bigger host: the
lower of (cores / all CPU per transfer) and, for each single-event-loop process, one
core / its CPU per transfer.

    python bench/workers.py [--workers 2] [--concurrency 64] [--duration 8] [--cores 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_split import cpu_seconds
from transfers import Picker, drive, prepare_bank, through_system

from twopc_harness.postgres import start_clusters, stop_clusters
from twopc_harness.system import LocalSystem, start_system


def processes(system: LocalSystem) -> dict[str, list[int]]:
    """Every coordinator and agent by name, this client, and the agents' backends."""
    groups: dict[str, list[int]] = {"client": [os.getpid()]}
    for daemon in [*system.coordinators(), *system.participants.values()]:
        assert daemon.process is not None
        kind = "agent" if daemon.name in system.participants else "coordinator"
        groups[f"{kind} {daemon.name}"] = [daemon.process.pid]
    for name in system.participants:
        with psycopg.connect(system.dsn(name), autocommit=True) as conn:
            for pid, app in conn.execute("SELECT pid, application_name FROM pg_stat_activity"):
                if str(app).startswith("twopc-participant"):
                    groups.setdefault(f"postgres {name}", []).append(int(pid))
    return groups


async def measure(
    system: LocalSystem, concurrency: int, seconds: float, tag: str
) -> dict[str, Any]:
    """`tag` makes the transfer ids unique (the ledger refuses one used before)."""
    shards = system.shard_names
    async with system.group_client(timeout=60) as group:
        transfer = through_system(group, shards)  # type: ignore[arg-type]
        await drive(transfer, Picker(shards, 1), concurrency, 1.0, f"warm-{tag}")
        before = {g: sum(map(cpu_seconds, p)) for g, p in processes(system).items()}
        result = await drive(transfer, Picker(shards, 2), concurrency, seconds, tag)
        after = {g: sum(map(cpu_seconds, p)) for g, p in processes(system).items()}
    committed = result["committed"] or 1
    cpu = {g: 1000 * (after[g] - before.get(g, 0.0)) / committed for g in after}
    return {**result, "cpu_ms": cpu}


def projection(cpu_ms: dict[str, float], cores: int) -> tuple[float, str]:
    """Transfers/s this layout could reach on `cores` cores, and what would limit it."""
    total = sum(cpu_ms.values())
    limits = {f"{cores} cores": 1000 * cores / total}
    for group, ms in cpu_ms.items():
        if group.startswith(("coordinator", "agent")) and ms > 0:
            limits[group] = 1000 / ms  # one event loop: one core at most
    bound = min(limits, key=lambda k: limits[k])
    return limits[bound], bound


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cores", type=int, default=8)
    p.add_argument("--workers-first", action="store_true", help="measure the group first")
    a = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="twopc-workers-"))
    clusters = start_clusters(2, workdir / "pg")
    systems: dict[int, LocalSystem] = {}
    try:
        for n in (a.workers, 1) if a.workers_first else (1, a.workers):
            systems[n] = start_system(
                2,
                workdir=workdir / f"w{n}",
                clusters=clusters,
                coordinator_id=f"work{n}",
                coordinator_args=["--prepare-timeout", "10"],
                participant_args=["--pool-max-size", "70", "--lock-timeout", "5"],
                workers=n,
            )
        prepare_bank(systems[1], systems[1].shard_names)
        for r in range(a.rounds):
            for n, system in systems.items():
                row = asyncio.run(measure(system, a.concurrency, a.duration, f"w{n}r{r}"))
                ceiling, bound = projection(row["cpu_ms"], a.cores)
                cpu = ", ".join(f"{g} {ms:.2f}" for g, ms in sorted(row["cpu_ms"].items()))
                print(
                    f"round {r} coordinators={n}: {row['transfers_per_s']}/s"
                    f" p50 {row['p50_ms']} ms, {row['aborted']} aborted;"
                    f" CPU ms/transfer {sum(row['cpu_ms'].values()):.2f} ({cpu});"
                    f" on {a.cores} cores at most {ceiling:.0f}/s, bound by {bound}",
                    flush=True,
                )
    finally:
        for system in systems.values():
            system.stop()
        stop_clusters(clusters)


if __name__ == "__main__":
    main()
