"""Goodput under overload: more concurrent clients than the coordinator admits.

Transfers (debit+ledger / credit+ledger) through the async client library at rising
concurrency; a refusal at the admission limit (RESOURCE_EXHAUSTED with its retry hint)
is retried by `retry_when_refused_async` with jittered backoff, as an application
would. Prints committed transfers per second (goodput), aborts by cause (a prepare
timeout means work done and thrown away), refusals retried, and p50, against the
best goodput of the run.

    python bench/overload.py [--concurrency 16 64 256 1024] [--duration 8] \
        [--variant queue= --variant refuse="--admission-queue 0"]

Each variant (NAME=the coordinator's extra flags) runs every concurrency in turn on
the same clusters and agents, its coordinator restarted with its flags; the default
is one variant with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfers import Picker, prepare_bank, start_bench_system

from bank_demo import bank
from coordinator.client import retry_when_refused_async
from twopc_common.errors import ResourceExhausted
from twopc_harness.system import LocalSystem


async def measure(system: LocalSystem, concurrency: int, seconds: float) -> dict[str, Any]:
    shards = system.shard_names
    picker = Picker(shards, concurrency)
    causes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    refused = 0
    async with system.async_client(timeout=120) as client:

        async def attempt(tid: str, source: int, target: int) -> Any:
            async def run() -> Any:
                nonlocal refused
                try:
                    return await client.run(bank.transfer(tid, source, target, 1, shards))
                except ResourceExhausted:
                    refused += 1
                    raise

            try:
                return await retry_when_refused_async(run, attempts=50)
            except ResourceExhausted:
                return None

        until = time.monotonic() + seconds

        async def worker(w: int) -> None:
            n = 0
            while time.monotonic() < until:
                n += 1
                source, target = picker.pick()
                began = time.perf_counter()
                outcome = await attempt(f"over{concurrency}-{w}-{n}", source, target)
                if outcome is not None and outcome.committed:
                    latencies.append(time.perf_counter() - began)
                else:
                    causes[outcome.abort_cause if outcome else "refused 50 times"] += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "goodput": round(len(latencies) / elapsed, 1),
        "aborted": dict(causes),
        "refused": refused,
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1) if latencies else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256, 1024])
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--variant", action="append", metavar="NAME=ARGS", default=[])
    a = p.parse_args()
    variants = dict(v.split("=", 1) for v in a.variant) or {"defaults": ""}
    system = start_bench_system(2)
    assert system.coordinator is not None
    base = list(system.coordinator.argv)
    try:
        for name, args in variants.items():
            prepare_bank(system, system.shard_names)  # every variant from full accounts
            system.coordinator.stop()
            system.coordinator.argv = base + shlex.split(args)
            system.coordinator.start()
            rows = []
            for c in a.concurrency:
                row = asyncio.run(measure(system, c, a.duration))
                rows.append(row)
                peak = max(r["goodput"] for r in rows)
                print(
                    f"{name}: c={c:<5} goodput {row['goodput']:>7}/s ({row['goodput'] / peak:.0%} "
                    f"of the best so far) p50 {row['p50_ms']} ms, refused and retried "
                    f"{row['refused']}, aborted {row['aborted'] or 'none'}",
                    flush=True,
                )
    finally:
        system.stop()


if __name__ == "__main__":
    main()
