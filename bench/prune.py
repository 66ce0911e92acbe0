"""How long one prune of the decision log takes as the log grows (10k to 1M records).

Pruning runs inside the log's single writer, so a slow one holds up forced commits.
Fills a log with completed records (a steady state: most are younger than the
retention, a few hundred are due), then times `prune` and a forced commit queued
behind it. `python bench/prune.py [--sizes 10000,100000,1000000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
from pathlib import Path

from coordinator.decision_log import DecisionLog

DUE = 500  # records past the retention at each prune: a few seconds of traffic


def fill(path: str, records: int) -> None:
    now = time.time()
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO transactions (id, state, participants, outcome, created_at, "
            "decided_at, completed_at) VALUES (?, 'committed', ?, ?, ?, ?, ?)",
            (
                (f"bench.1.{i}", '["a", "b"]', '{"committed": true}', t, t, t)
                for i in range(records)
                for t in [now - 1000 if i < DUE else now - 10 + i / records]
            ),
        )


async def measure(log: DecisionLog) -> tuple[float, float]:
    started = time.perf_counter()
    prune = asyncio.create_task(log.prune(time.time() - 500))
    await asyncio.sleep(0)
    commit_started = time.perf_counter()
    await log.record_commit("bench.2.1", ("a", "b"), time.time(), {"committed": True})
    commit = time.perf_counter() - commit_started
    await prune
    return time.perf_counter() - started, commit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    args = p.parse_args()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "log.sqlite")
            log = DecisionLog(path, "bench")
            log.open()
            log.close()
            fill(path, size)
            log = DecisionLog(path, "bench")
            log.open()
            try:
                prune, commit = asyncio.run(measure(log))
            finally:
                log.close()
        rows.append({"records": size, "prune_ms": prune * 1e3, "commit_behind_ms": commit * 1e3})
        print(
            f"{size:>9} records: prune {prune * 1e3:7.2f} ms, "
            f"a forced commit queued behind it {commit * 1e3:7.2f} ms"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
