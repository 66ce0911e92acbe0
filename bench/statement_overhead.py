"""What the statement policy and the containment cost per transfer, A/B in one run.

Three measurements, on the same clusters, in one session:

  policy       parsing and checking the transfer's statements, in this process: a cold
               parse per distinct text (pglast), and per transfer what the daemons do
               on a cache hit (the coordinator's policy check of both branches, each
               agent's check and session-safety test of its branch).
  containment  one agent's branch work, in this process, on a real shard, two ways in
               alternating blocks: "agent" is `Store.prepare` as the agent runs it (the
               isolation level, the settings and role every branch starts from, the
               role switch back for the marker, the marker, PREPARE); "bare" is the
               same round trip without the containment (BEGIN, the statements, the marker,
               PREPARE). CPU of this process and of the branch's PostgreSQL backend
               (its /proc schedstat, in nanoseconds) per branch; the difference is what
               containment costs: the median over pairs of neighbouring blocks, which
               a machine whose load drifts disturbs least.
  system       the whole system's CPU per committed transfer (client, coordinator,
               agents, PostgreSQL backends) at the given concurrency: the denominator.
               Throughput is CPU-bound (see README "Performance"), so a share of CPU
               per transfer is the share of throughput.

Prints each, and the policy and containment cost as a share of the system's CPU per
transfer (target: under 3% together).

    python bench/statement_overhead.py [--branches 3000] [--duration 8] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_split import cpu_seconds, processes
from transfers import ACCOUNTS, Picker, drive, prepare_bank, start_bench_system, through_system

from bank_demo import bank
from participant import branch_batch
from participant.config import ParticipantConfig
from participant.schema import MARKER_TABLE
from participant.store import Store
from twopc_common import ids
from twopc_common.isolation import Isolation
from twopc_common.statements import StatementPolicy, classify, policy_kinds, session_safe
from twopc_common.values import Statement
from twopc_harness.postgres import BRANCH_ROLE
from twopc_harness.system import LocalSystem

BLOCK = 200  # branches per block; blocks of the two variants alternate


def on_cpu(pid: int) -> float:
    """Seconds process `pid` has run on a CPU (nanosecond resolution)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def policy_costs(shards: list[str], rounds: int = 20_000) -> tuple[float, float]:
    """(µs per cold parse of one statement, µs of policy work per transfer on a hit)."""
    branches = bank.transfer("policy-1", 1, 2, 1, shards)
    statements = [st for stmts in branches.values() for st in stmts]
    started = time.perf_counter()
    for _ in range(200):
        for st in statements:
            classify(st.sql, bool(st.params))
    cold = (time.perf_counter() - started) / (200 * len(statements)) * 1e6
    policy = StatementPolicy(policy_kinds())
    started = time.perf_counter()
    for _ in range(rounds):
        for participant, stmts in branches.items():
            policy.check(stmts, participant)  # the coordinator
            policy.check(stmts, participant)  # the agent's servicer
            session_safe(stmts)  # the agent's store
    warm = (time.perf_counter() - started) / rounds * 1e6
    return cold, warm


def debit(account: int, transfer_id: str) -> list[Statement]:
    return bank.transfer(transfer_id, account, account + 1, 1, ["one"])["one"][:2]


async def containment_costs(system: LocalSystem, shard: str, branches: int) -> dict[str, Any]:
    """CPU per branch (µs, this process and the branch's backend) of the agent's
    prepare and of the bare round trip, in alternating blocks on one connection each."""
    config = ParticipantConfig(
        id="bench-overhead",
        dsn=system.dsn(shard),
        pool_min_size=1,
        pool_max_size=1,
        branch_role=BRANCH_ROLE,
    )
    store = Store(config)
    await store.open()
    bare_pool = Store(
        ParticipantConfig(
            id="bench-overhead", dsn=system.dsn(shard), pool_min_size=1, pool_max_size=1
        )
    )
    await bare_pool.open()
    accounts = [a for a in range(1, ACCOUNTS) if bank.shard_of(a, system.shard_names) == shard]
    epoch = int(time.time())
    seq = 0
    totals = {"agent": [0.0, 0.0, 0.0], "bare": [0.0, 0.0, 0.0]}
    blocks: dict[str, list[float]] = {"agent": [], "bare": []}

    async def agent_branch(conn: Any, txid: str, statements: list[Statement]) -> None:
        _, wrote = await store.branches.prepare(conn, statements, txid, config.id)
        assert wrote

    async def bare_branch(conn: Any, txid: str, statements: list[Statement]) -> None:
        gid = str(ids.branch_xid(txid, config.id))
        marker = (
            f"INSERT INTO {MARKER_TABLE} (gid, transaction_id) SELECT %s, %s "
            "WHERE pg_current_xact_id_if_assigned() IS NOT NULL"
        )
        parts: list[branch_batch.Part] = [
            branch_batch.begin(conn),
            *((st.sql, st.params or None) for st in statements),
            (marker, (gid, txid)),
            ("PREPARE TRANSACTION %s", (gid,)),
        ]
        cur = await branch_batch.send(conn, parts)
        done = await branch_batch.Results(cur, 1).read(
            statements, config.limits.max_result_bytes, 2
        )
        assert done.tails[-1][0] == "PREPARE TRANSACTION"

    variants = {"agent": (store.branches, agent_branch), "bare": (bare_pool.branches, bare_branch)}
    try:
        for block in range(2 * (branches // BLOCK)):
            name = ("agent", "bare")[block % 2]
            owner, run = variants[name]
            conn = await owner.connect_branch(Isolation.READ_COMMITTED)
            await owner.release(conn)
            prepared = []
            conn = await owner.connect_branch(Isolation.READ_COMMITTED)
            backend = conn.info.backend_pid
            await owner.release(conn)
            cpu0, db0 = time.process_time(), on_cpu(backend)
            for _ in range(BLOCK):
                seq += 1
                txid = f"benchovh.{epoch}.{seq}"
                conn = await owner.connect_branch(Isolation.READ_COMMITTED)
                await run(conn, txid, debit(accounts[seq % len(accounts)], txid))
                await owner.release(conn)
                prepared.append((txid, True))
            cpu1, db1 = time.process_time(), on_cpu(backend)
            totals[name][0] += cpu1 - cpu0
            totals[name][1] += db1 - db0
            totals[name][2] += BLOCK
            blocks[name].append(1e6 * (cpu1 - cpu0 + db1 - db0) / BLOCK)
            async with store.phase2.phase2_connection() as phase2:
                for i in range(0, len(prepared), 50):
                    await store.phase2.finish_many(phase2, prepared[i : i + 50], config.id)
    finally:
        await store.close()
        await bare_pool.close()
    out: dict[str, Any] = {}
    for name, (client_cpu, backend_cpu, n) in totals.items():
        out[name] = {"client_us": 1e6 * client_cpu / n, "backend_us": 1e6 * backend_cpu / n}
        out[name]["total_us"] = out[name]["client_us"] + out[name]["backend_us"]
    out["extra_us"] = statistics.median(
        a - b for a, b in zip(blocks["agent"], blocks["bare"], strict=True)
    )
    return out


async def system_cost(
    system: LocalSystem, concurrency: int, duration: float
) -> tuple[float, float]:
    """(committed transfers/s, CPU ms per committed transfer) of the whole system."""
    shards = system.shard_names
    async with system.async_client(timeout=60) as client:
        transfer = through_system(client, shards)
        await drive(transfer, Picker(shards, 1), concurrency, 2.0, "ovh-warm")
        groups = processes(system)
        before = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
        result = await drive(transfer, Picker(shards, 2), concurrency, duration, "ovh")
        groups = processes(system)
        after = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
    cpu = sum(after[g] - before.get(g, 0.0) for g in after)
    return result["transfers_per_s"], 1000 * cpu / max(1, result["committed"])


async def main_async(a: argparse.Namespace) -> None:
    system = start_bench_system()
    try:
        shards = system.shard_names
        prepare_bank(system, shards)
        cold, warm = policy_costs(shards)
        print(
            f"policy: cold parse {cold:.1f} us per statement; per transfer on a cache hit "
            f"(coordinator check, agent check, session test; 2 branches) {warm:.1f} us"
        )
        costs = await containment_costs(system, shards[0], a.branches)
        for name in ("agent", "bare"):
            c = costs[name]
            print(
                f"containment {name:>5}: {c['client_us']:6.1f} us client + "
                f"{c['backend_us']:6.1f} us backend = {c['total_us']:6.1f} us CPU per branch"
            )
        extra = costs["extra_us"]
        print(f"containment: {extra:.1f} us CPU per branch (median of block pairs)")
        tps, cpu_ms = await system_cost(system, a.concurrency, a.duration)
        print(f"system: {tps}/s at concurrency {a.concurrency}, {cpu_ms:.2f} ms CPU per transfer")
        per_transfer_us = 2 * extra + warm
        print(
            f"containment {2 * extra:.1f} us + policy {warm:.1f} us = {per_transfer_us:.1f} us "
            f"per transfer (2 branches): {100 * per_transfer_us / (1000 * cpu_ms):.1f}% of the "
            "system's CPU per transfer"
        )
    finally:
        system.stop()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--branches", type=int, default=3000, help="branches per variant")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of system load")
    p.add_argument("--concurrency", type=int, default=16)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
