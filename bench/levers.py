"""A/B of coordinator settings, in one run: throughput and CPU per transfer per process.

Every variant is a whole system (coordinator and agents) over the same two PostgreSQL
clusters; the variants are measured in turn, round after round (A B A B ...), so that
a noisy neighbour hurts all of them alike. The workload is the bank's debit+ledger /
credit+ledger transfer through the async client library; CPU comes from /proc for
the coordinator, each agent, the client (this process) and the clusters' backends.

    python bench/levers.py --variant now= \
        --variant before="--prepare-calls unary --unshared-runs" \
        [--concurrency 1 16 64] [--duration 5] [--rounds 2]

A variant's ARGS are the coordinator's flags, except `--unshared-runs`: the client
then sends one unary Run call each (`share_calls=False`).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_split import cpu_seconds, processes
from transfers import Picker, drive, prepare_bank, through_system

from coordinator.client import AsyncCoordinatorClient
from twopc_harness.postgres import start_clusters, stop_clusters
from twopc_harness.system import LocalSystem, start_system


async def measure(
    system: LocalSystem, concurrency: int, seconds: float, tag: str, share_calls: bool
) -> dict[str, Any]:
    shards = system.shard_names
    async with AsyncCoordinatorClient(
        system.client_addresses, timeout=60, tls=system.tls("app"), share_calls=share_calls
    ) as client:
        transfer = through_system(client, shards)
        await drive(transfer, Picker(shards, 1), concurrency, 1.0, f"warm-{tag}")
        groups = processes(system)
        before = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
        result = await drive(transfer, Picker(shards, 2), concurrency, seconds, tag)
        groups = processes(system)
        after = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
        counters = (await client.status()).counters
    committed = result["committed"] or 1
    cpu = {g: round(1000 * (after[g] - before.get(g, 0.0)) / committed, 2) for g in after}
    cpu = {g: ms for g, ms in cpu.items() if ms >= 0.01 and not g.endswith("(other backends)")}
    return {
        **result,
        "cpu_ms": cpu,
        "cpu_ms_total": round(sum(cpu.values()), 2),
        "counters": counters,
    }


UNSHARED = "--unshared-runs"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variant", action="append", required=True, metavar="NAME=ARGS")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    variants = dict(v.split("=", 1) for v in a.variant)
    # `--unshared-runs` in a variant's arguments is the client's: unary Run calls.
    shared = {name: UNSHARED not in shlex.split(args) for name, args in variants.items()}
    workdir = Path(tempfile.mkdtemp(prefix="twopc-levers-"))
    clusters = start_clusters(2, workdir / "pg")
    systems: dict[str, LocalSystem] = {}
    try:
        for i, (name, args) in enumerate(variants.items()):
            systems[name] = start_system(
                2,
                workdir=workdir / name,
                clusters=clusters,
                coordinator_id=f"lever{i}",
                coordinator_args=[
                    "--prepare-timeout",
                    "10",
                    *(x for x in shlex.split(args) if x != UNSHARED),
                ],
                participant_args=["--pool-max-size", "70", "--lock-timeout", "5"],
            )
        first = next(iter(systems.values()))
        prepare_bank(first, first.shard_names)
        for c in a.concurrency:
            for r in range(a.rounds):
                for name, system in systems.items():
                    row = asyncio.run(
                        measure(system, c, a.duration, f"{name}-{c}-{r}", shared[name])
                    )
                    batching = {
                        k: v
                        for k, v in row["counters"].items()
                        if k.split(".")[0] in ("prepare_messages", "prepare_items", "phase2_calls")
                    }
                    print(
                        f"c={c:<3} round {r} {name:<10} {row['transfers_per_s']:>7}/s "
                        f"p50 {row['p50_ms']} ms  cpu/transfer {row['cpu_ms_total']} ms "
                        f"{row['cpu_ms']}  {batching}",
                        flush=True,
                    )
    finally:
        for system in systems.values():
            system.stop()
        stop_clusters(clusters)


if __name__ == "__main__":
    main()
