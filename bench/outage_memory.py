"""The coordinator's memory while one agent is dead and transfers keep touching it.

Three shards; the agent of shard3 is SIGKILLed and stays down. Sixteen clients run
transfers over all three shards (two thirds touch shard3 and abort), with the prepare
timeout at 1 s so that the dead shard is hit often. Every 30 s it prints the
coordinator's RSS, the transactions it holds in memory and its abort counters. Before
aborts were bounded, each aborted transaction touching the dead shard stayed in memory
with an abort retried forever (+25 MB per 1,000 transfers).

    python bench/outage_memory.py [--minutes 10] [--no-fail-fast] [--out out/outage-memory.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfers import ACCOUNTS, BALANCE, Picker, drive, rss_kb, through_system

from bank_demo import bank
from twopc_harness.system import start_system

SHARDS = ["shard1", "shard2", "shard3"]


async def watch(system: Any, minutes: float, seed: int) -> list[dict[str, Any]]:
    pid = system.coordinator.process.pid
    samples: list[dict[str, Any]] = []
    async with system.async_client(timeout=30) as client:
        started = time.monotonic()
        load = asyncio.create_task(
            drive(through_system(client, SHARDS), Picker(SHARDS, seed), 16, minutes * 60, "o")
        )
        while True:
            counters = dict((await client.status()).counters)
            sample = {
                "t": round(time.monotonic() - started),
                "rss_kb": rss_kb(pid),
                "live_transactions": counters.get("live_transactions", 0),
                "aborted_unavailable": counters.get("aborted_participant_unavailable", 0)
                + counters.get("aborted_prepare_timeout", 0),
                "aborts_left_to_recovery": counters.get("aborts_left_to_recovery", 0),
                "committed": counters.get("committed_two_phase", 0),
            }
            samples.append(sample)
            print(json.dumps(sample), flush=True)
            if load.done():
                break
            await asyncio.wait({load}, timeout=30)
        print(f"load: {load.result()}")
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--no-fail-fast",
        action="store_true",
        help="never mark the dead agent down (probes an hour apart): every transfer that "
        "touches it waits out the prepare timeout and leaves an abort to deliver",
    )
    p.add_argument("--out", type=Path, default=Path("out/outage-memory.json"))
    a = p.parse_args()
    system = start_system(
        3,
        coordinator_args=[
            "--prepare-timeout",
            "1",
            "--rpc-timeout",
            "1",
            *(["--probe-interval", "3600"] if a.no_fail_fast else []),
        ],
        participant_args=["--pool-max-size", "40"],
    )
    try:
        dsns = {s: system.dsn(s) for s in SHARDS}
        bank.create_schema(dsns)
        bank.open_accounts(dsns, ACCOUNTS, BALANCE)
        system.participants["shard3"].kill()
        samples = asyncio.run(watch(system, a.minutes, a.seed))
    finally:
        system.stop()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(samples, indent=1))
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    print(f"RSS {first['rss_kb']} kB at t={first['t']}s -> {last['rss_kb']} kB at t={last['t']}s")


if __name__ == "__main__":
    main()
