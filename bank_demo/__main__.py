"""`bank-demo`: cross-shard bank transfers through the coordinator, checked from the
shards themselves.

`bank-demo run` (the default) starts everything on this machine: PostgreSQL shards,
one participant agent each and the coordinator; opens accounts; runs concurrent
transfers; then proves the invariants and prints a report.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from pathlib import Path

from bank_demo import bank
from coordinator.client import AsyncCoordinatorClient, TransportError
from twopc_harness.postgres import HarnessError
from twopc_harness.system import LocalSystem, start_system


async def _transfers(system: LocalSystem, args: argparse.Namespace, rng: random.Random
                     ) -> tuple[Counter[str], dict[str, bool]]:
    assert system.coordinator is not None
    shards = system.shard_names
    counts: Counter[str] = Counter()
    seen: dict[str, bool] = {}
    deadline = time.monotonic() + args.duration
    async with AsyncCoordinatorClient(system.client_address, timeout=30) as client:

        async def worker(w: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                source, target = rng.sample(range(1, args.accounts + 1), 2)
                transfer_id = f"w{w}-{n}"
                branches = bank.transfer(transfer_id, source, target, rng.randint(1, 50), shards)
                try:
                    outcome = await client.run(branches, idempotency_key=transfer_id)
                except TransportError:
                    counts["unknown"] += 1
                    continue
                seen[transfer_id] = outcome.committed
                kind = "one-phase" if outcome.one_phase else "two-phase"
                counts[f"committed {kind}" if outcome.committed
                       else f"aborted ({outcome.abort_cause.lower()})"] += 1

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    return counts, seen


def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"bank-demo: seed {seed}, {args.shards} shards, {args.accounts} accounts of "
          f"{args.balance}, {args.concurrency} clients for {args.duration}s")
    rng = random.Random(seed)
    started = time.monotonic()
    system = start_system(args.shards, workdir=Path(args.workdir) if args.workdir else None)
    try:
        dsns = {s: system.dsn(s) for s in system.shard_names}
        bank.create_schema(dsns)
        bank.open_accounts(dsns, args.accounts, args.balance)
        print(f"bank-demo: system up in {time.monotonic() - started:.1f}s")
        counts, seen = asyncio.run(_transfers(system, args, rng))
        time.sleep(0)  # phase 2 may still be under way: the checker waits for it below
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            snap = bank.snapshot(dsns)
            if not any(snap.prepared.values()):
                break
            time.sleep(0.2)
        committed = [t for t, ok in seen.items() if ok]
        aborted = [t for t, ok in seen.items() if not ok]
        applied = bank.applied(snap, seen)
        checks = {
            "total money unchanged": snap.total == args.accounts * args.balance,
            "no negative balance": not snap.negative,
            "every transfer has both legs or neither": not snap.half_applied(),
            "every committed transfer applied": all(applied[t] for t in committed),
            "no aborted transfer applied": not any(applied[t] for t in aborted),
            "no prepared transaction left": not any(snap.prepared.values()),
        }
        for what, n in sorted(counts.items()):
            print(f"  {what:<40} {n}")
        for what, ok in checks.items():
            print(f"  {'PASS' if ok else 'FAIL'}  {what}")
        return 0 if all(checks.values()) else 1
    finally:
        system.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bank-demo", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("run", help="start everything and run transfers (default)")
    for target in (parser, p):
        target.add_argument("--shards", type=int, default=3)
        target.add_argument("--accounts", type=int, default=50)
        target.add_argument("--balance", type=int, default=1000)
        target.add_argument("--concurrency", type=int, default=16)
        target.add_argument("--duration", type=float, default=10.0)
        target.add_argument("--seed", type=int)
        target.add_argument("--workdir")
    args = parser.parse_args(argv)
    if args.shards < 1 or args.accounts < 2 or args.balance < 0 or args.concurrency < 1:
        parser.error("need shards >= 1, accounts >= 2, balance >= 0, concurrency >= 1")
    try:
        sys.exit(run(args))
    except HarnessError as exc:
        sys.exit(f"bank-demo: {exc}")


if __name__ == "__main__":
    main()
