"""Forced decisions per second, SQLite against PostgreSQL, in the same run.

Each writer is a loop awaiting `record_commit` (a forced COMMIT record, as the engine
writes one per two-phase commit), one after another; `--writers` of them run at once,
so with 64 writers group commit shares each fsync (SQLite) or commit (PostgreSQL)
between up to 64 records. The PostgreSQL log is a throw-away local cluster started by
the harness (`synchronous_commit=on`, fsync on, no standby): a remote or replicated
log adds its round trip and replication to every batch.

    python bench/log_backends.py [--seconds 5] [--writers 1,64]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import tempfile
import time
from pathlib import Path

from coordinator.decision_log import DecisionLog
from coordinator.log_port import DecisionLogPort
from coordinator.pg_log import PostgresDecisionLog
from twopc_harness.postgres import start_clusters, stop_clusters

_ids = itertools.count()  # across measurements: every record is new


async def rate(log: DecisionLogPort, writers: int, seconds: float) -> dict[str, float]:
    ids = _ids
    stop_at = time.perf_counter() + seconds
    done = 0
    batches_before = log.stats["log_batches"]

    async def writer() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            n = next(ids)
            await log.record_commit(
                f"bench.{log.epoch}.{n}", ("shard1", "shard2"), time.time(), {"committed": True}
            )
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - started
    batches = log.stats["log_batches"] - batches_before
    return {
        "decisions_per_s": done / elapsed,
        "records_per_batch": done / max(1, batches),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    p.add_argument("--writers", default="1,64", help="comma-separated writer counts")
    a = p.parse_args()
    counts = [int(w) for w in a.writers.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {"sqlite": {}, "postgresql": {}}
    clusters = start_clusters(1, prefix="benchlog")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            logs: dict[str, DecisionLogPort] = {
                "sqlite": DecisionLog(str(Path(tmp) / "log.sqlite"), "bench"),
                "postgresql": PostgresDecisionLog(clusters[0].dsn, "bench"),
            }
            for log in logs.values():
                log.acquire()
                log.begin_epoch()
            try:
                for writers in counts:
                    for name, log in logs.items():
                        results[name][writers] = asyncio.run(rate(log, writers, a.seconds))
            finally:
                for log in logs.values():
                    log.close()
    finally:
        stop_clusters(clusters)
    print(f"{'backend':<12}" + "".join(f"{f'{w} writer(s)':>26}" for w in counts))
    for name, by_writers in results.items():
        cells = "".join(
            f"{r['decisions_per_s']:>12.0f}/s ({r['records_per_batch']:>5.1f}/batch)"
            for r in (by_writers[w] for w in counts)
        )
        print(f"{name:<12}{cells}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
