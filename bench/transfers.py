"""Benchmark: the system against raw PostgreSQL two-phase commit, side by side.

On the same clusters and the same transfer statements (debit with the enough-money
expectation plus its ledger row on one shard, credit plus its ledger row on another):

  raw        one Python process drives psycopg directly: per transfer BEGIN, the
             statements and PREPARE TRANSACTION on both shards in parallel, then
             COMMIT PREPARED on both. No coordinator, no gRPC: the limit.
  system     the same transfers through the client library, the coordinator and the
             agents, with mutual TLS on every channel (as deployed: the headline).
  insecure   the same system started with --insecure (plaintext, no authentication),
             on the same clusters: what TLS and authentication cost.
  nonatomic  two independent local commits (what you give up without 2PC).

At concurrency 1, 16 and 64, with 2 and 4 shards, plus a hot-account run. Also the
decision log alone (forced COMMIT records per second, 1 and 64 writers) and the
coordinator's RSS. Prints a table and writes JSON. Ratios compare runs made in the
same session, because the machine is shared and noisy.

    python bench/transfers.py [--duration 8] [--out out/bench.json] [--soak-minutes 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bank_demo import bank
from coordinator.client import AsyncCoordinatorClient
from coordinator.decision_log import DecisionLog
from twopc_common.values import Statement
from twopc_harness.postgres import PostgresCluster, start_clusters, stop_clusters
from twopc_harness.system import LocalSystem, start_system

ACCOUNTS = 20_000
BALANCE = 1_000_000
Transfer = Callable[[str, int, int], Awaitable[bool]]


class Picker:
    """Cross-shard (source, target) pairs; with a hot set, most pick among few rows."""

    def __init__(self, shards: Sequence[str], seed: int, hot: int = 0, hot_fraction: float = 0.8):
        self.shards, self.hot, self.hot_fraction = list(shards), hot, hot_fraction
        self.rng = random.Random(seed)
        self.by_shard: dict[str, list[int]] = {s: [] for s in shards}
        for account in range(1, ACCOUNTS + 1):
            self.by_shard[bank.shard_of(account, self.shards)].append(account)
        self.hot_by_shard = {s: a[: max(1, hot // len(shards))] for s, a in self.by_shard.items()}

    def pick(self) -> tuple[int, int]:
        a, b = self.rng.sample(self.shards, 2)
        pool = (
            self.hot_by_shard
            if self.hot and self.rng.random() < self.hot_fraction
            else (self.by_shard)
        )
        return self.rng.choice(pool[a]), self.rng.choice(pool[b])


async def drive(
    transfer: Transfer, picker: Picker, concurrency: int, duration: float, tag: str
) -> dict[str, Any]:
    latencies: list[float] = []
    aborted = 0
    until = time.monotonic() + duration

    async def worker(w: int) -> None:
        nonlocal aborted
        n = 0
        while time.monotonic() < until:
            n += 1
            source, target = picker.pick()
            began = time.perf_counter()
            ok = await transfer(f"{tag}-{w}-{n}", source, target)
            if ok:
                latencies.append(time.perf_counter() - began)
            else:
                aborted += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "transfers_per_s": round(len(latencies) / elapsed, 1),
        "committed": len(latencies),
        "aborted": aborted,
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else None,
    }


async def _run_branch(conn: psycopg.AsyncConnection[Any], statements: Sequence[Statement]) -> bool:
    """BEGIN and the statements (the pools are autocommit: transactions are explicit).
    False, with the transaction rolled back, if a statement fails or breaks its rule."""
    await conn.execute("BEGIN")
    try:
        async with conn.cursor() as cur:
            for st in statements:
                await cur.execute(st.sql.encode(), st.params or None)
                if st.expect is not None and st.expect.violation(cur.rowcount):
                    await conn.execute("ROLLBACK")
                    return False
    except psycopg.Error:
        await conn.execute("ROLLBACK")
        return False
    return True


def raw_2pc(pools: dict[str, AsyncConnectionPool[Any]], shards: Sequence[str]) -> Transfer:
    async def transfer(tid: str, source: int, target: int) -> bool:
        branches = bank.transfer(tid, source, target, 1, shards)

        async def prepare(shard: str) -> bool:
            async with pools[shard].connection() as conn:
                if not await _run_branch(conn, branches[shard]):
                    return False
                await conn.execute(sql.SQL("PREPARE TRANSACTION {}").format(f"{tid}:{shard}"))
                return True

        async def finish(shard: str, commit: bool) -> None:
            async with pools[shard].connection() as conn:
                await conn.execute(
                    sql.SQL("{} PREPARED {}").format(
                        sql.SQL("COMMIT" if commit else "ROLLBACK"), f"{tid}:{shard}"
                    )
                )

        votes = await asyncio.gather(*(prepare(s) for s in branches))
        commit = all(votes)
        await asyncio.gather(
            *(finish(s, commit) for s, ok in zip(branches, votes, strict=True) if ok)
        )
        return commit

    return transfer


def non_atomic(pools: dict[str, AsyncConnectionPool[Any]], shards: Sequence[str]) -> Transfer:
    async def transfer(tid: str, source: int, target: int) -> bool:
        branches = bank.transfer(tid, source, target, 1, shards)

        async def commit(shard: str) -> bool:
            async with pools[shard].connection() as conn:
                ok = await _run_branch(conn, branches[shard])
                if ok:
                    await conn.execute("COMMIT")
                return ok

        return all(await asyncio.gather(*(commit(s) for s in branches)))

    return transfer


def through_system(client: AsyncCoordinatorClient, shards: Sequence[str]) -> Transfer:
    async def transfer(tid: str, source: int, target: int) -> bool:
        outcome = await client.run(bank.transfer(tid, source, target, 1, shards))
        return outcome.committed

    return transfer


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def raw_pools(
    system: LocalSystem, shards: Sequence[str], max_size: int
) -> dict[str, AsyncConnectionPool[Any]]:
    """Open autocommit pools for the raw baseline, one per shard, with the lock timeout
    (5 s) the baselines use."""
    pools = {
        s: AsyncConnectionPool(
            system.dsn(s),
            min_size=4,
            max_size=max_size,
            open=False,
            kwargs={"autocommit": True, "options": "-c lock_timeout=5000"},
        )
        for s in shards
    }
    for pool in pools.values():
        await pool.open(wait=True)
    return pools


async def run_config(
    system: LocalSystem,
    insecure: LocalSystem,
    shards: list[str],
    concurrencies: list[int],
    duration: float,
    hot: int,
    seed: int,
) -> list[dict[str, Any]]:
    pools = await raw_pools(system, shards, 70)
    assert system.coordinator is not None and system.coordinator.process is not None
    pid = system.coordinator.process.pid
    rows = []
    try:
        async with (
            system.async_client(timeout=60) as client,
            insecure.async_client(timeout=60) as plain,
        ):
            variants: dict[str, Transfer] = {
                "raw": raw_2pc(pools, shards),
                "system": through_system(client, shards),
                "insecure": through_system(plain, shards),
                "nonatomic": non_atomic(pools, shards),
            }
            for concurrency in concurrencies:
                row: dict[str, Any] = {
                    "shards": len(shards),
                    "concurrency": concurrency,
                    "hot_accounts": hot,
                }
                for name, transfer in variants.items():
                    picker = Picker(shards, seed, hot)
                    await drive(transfer, picker, concurrency, 1.0, f"warm{name}{concurrency}")
                    row[name] = await drive(
                        transfer, picker, concurrency, duration, f"{name}{concurrency}{hot}"
                    )
                raw_tps = row["raw"]["transfers_per_s"]
                row["throughput_ratio_system_to_raw"] = (
                    round(row["system"]["transfers_per_s"] / raw_tps, 3) if raw_tps else None
                )
                plain_tps = row["insecure"]["transfers_per_s"]
                row["throughput_ratio_tls_to_insecure"] = (
                    round(row["system"]["transfers_per_s"] / plain_tps, 3) if plain_tps else None
                )
                if row["raw"]["p50_ms"] and row["system"]["p50_ms"]:
                    row["p50_ratio_system_to_raw"] = round(
                        row["system"]["p50_ms"] / row["raw"]["p50_ms"], 3
                    )
                row["coordinator_rss_kb"] = rss_kb(pid)
                rows.append(row)
                print(format_row(row), flush=True)
    finally:
        for pool in pools.values():
            await pool.close()
    return rows


def format_row(row: dict[str, Any]) -> str:
    cells = [f"{row['shards']} shards", f"c={row['concurrency']:<3}"]
    if row["hot_accounts"]:
        cells.append(f"hot={row['hot_accounts']}")
    for name in ("raw", "system", "insecure", "nonatomic"):
        r = row[name]
        cells.append(f"{name} {r['transfers_per_s']:>7}/s p50 {r['p50_ms']}ms p99 {r['p99_ms']}ms")
    cells.append(f"system/raw {row['throughput_ratio_system_to_raw']}")
    cells.append(f"tls/insecure {row['throughput_ratio_tls_to_insecure']}")
    if "p50_ratio_system_to_raw" in row:
        cells.append(f"p50 ratio {row['p50_ratio_system_to_raw']}")
    return " | ".join(cells)


async def bench_log(writers: int, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        log = DecisionLog(str(Path(tmp) / "log.sqlite"), "bench")
        log.open()
        done = 0
        until = time.monotonic() + seconds

        async def writer(w: int) -> None:
            nonlocal done
            n = 0
            while time.monotonic() < until:
                n += 1
                await log.record_commit(f"bench.1.{w}-{n}", ("a", "b"), 0.0, {"committed": True})
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        rate = done / (time.monotonic() - started)
        log.close()
        return rate


def start_bench_system(shards: int = 2, **options: Any) -> LocalSystem:
    """The system every benchmark measures: a prepare timeout that load alone never
    hits, agent pools as large as the highest concurrency, and the same lock timeout
    as the raw baseline's connections (it is what ends cross-shard deadlocks)."""
    return start_system(
        shards,
        coordinator_args=["--prepare-timeout", "10"],
        participant_args=["--pool-max-size", "70", "--lock-timeout", "5"],
        **options,
    )


def prepare_bank(system: LocalSystem, shards: list[str]) -> None:
    dsns = {s: system.dsn(s) for s in shards}
    bank.create_schema(dsns)
    bank.open_accounts(dsns, ACCOUNTS, BALANCE)


async def soak(
    system: LocalSystem, shards: list[str], minutes: float, seed: int
) -> list[tuple[float, int]]:
    assert system.coordinator is not None and system.coordinator.process is not None
    pid = system.coordinator.process.pid
    samples: list[tuple[float, int]] = []
    async with system.async_client(timeout=60) as client:
        started = time.monotonic()
        load = asyncio.create_task(
            drive(through_system(client, shards), Picker(shards, seed), 16, minutes * 60, "soak")
        )
        while not load.done():
            samples.append((round(time.monotonic() - started), rss_kb(pid)))
            print(f"soak t={samples[-1][0]}s coordinator RSS {samples[-1][1]} kB", flush=True)
            await asyncio.wait({load}, timeout=30)
        print(f"soak: {load.result()}")
    return samples


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--soak-minutes",
        type=float,
        default=0.0,
        help="also run the system for this long and sample the coordinator's RSS",
    )
    p.add_argument("--out", default="out/bench.json")
    a = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="twopc-bench-"))
    clusters: list[PostgresCluster] = start_clusters(max(a.shards), workdir / "pg")
    results: dict[str, Any] = {
        "duration_s": a.duration,
        "seed": a.seed,
        "runs": [],
        "machine": {"cpus": os.cpu_count()},
    }
    try:
        print("decision log alone (forced COMMIT records per second):", flush=True)
        for writers in (1, 64):
            rate = asyncio.run(bench_log(writers, min(5.0, a.duration)))
            results[f"log_commits_per_s_{writers}_writers"] = round(rate)
            print(f"  {writers:>2} writers: {rate:,.0f}/s", flush=True)
        for n in a.shards:
            system = start_bench_system(
                clusters=clusters[:n], workdir=workdir / f"sys{n}", coordinator_id=f"bench{n}"
            )
            insecure = start_bench_system(
                clusters=clusters[:n],
                workdir=workdir / f"sys{n}-insecure",
                coordinator_id=f"bench{n}plain",
                secure=False,
            )
            try:
                shards = system.shard_names
                prepare_bank(system, shards)
                results["runs"] += asyncio.run(
                    run_config(system, insecure, shards, a.concurrency, a.duration, 0, a.seed)
                )
                if n == min(a.shards):
                    prepare_bank(system, shards)
                    results["runs"] += asyncio.run(
                        run_config(system, insecure, shards, [16], a.duration, 20, a.seed)
                    )
                    if a.soak_minutes:
                        results["soak_rss_kb"] = asyncio.run(
                            soak(system, shards, a.soak_minutes, a.seed)
                        )
            finally:
                system.stop()
                insecure.stop()
    finally:
        stop_clusters(clusters)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out}")
    ratios = [r["throughput_ratio_system_to_raw"] for r in results["runs"]]
    print(f"system/raw throughput ratio: median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
