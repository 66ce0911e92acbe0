"""Run simulated schedules: `python -m tests.sim --seeds N [--first S]` runs N seeds;
`python -m tests.sim --seed S` replays one exactly and tells its story."""

from __future__ import annotations

import argparse
import os
import sys
import time

from tests.sim.many import failing_seeds
from tests.sim.world import Result, run


def report(result: Result, story: bool = True) -> str:
    lines = [f"seed {result.seed}: {len(result.violations)} violation(s); shape {result.shape}"]
    txids: set[str] = set()
    for v in result.violations:
        lines.append(f"  VIOLATION: {v.what} (txids {sorted(v.txids)})")
        txids |= v.txids
    if story:
        replay = run(result.seed, capture_logs=True)  # the same schedule, with log lines
        lines.append(f"  story of {sorted(txids)} (replay: `make sim SEED={result.seed}`):")
        lines.extend(f"    {line}" for line in replay.trace.story(txids))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    parser.add_argument("--seed", type=int, help="replay this seed and print its story")
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds to run")
    parser.add_argument("--first", type=int, default=0, help="the first seed")
    parser.add_argument(
        "--stop", action="store_true", help="stop at the first failing seed (how many it took)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes (default: one per core)",
    )
    args = parser.parse_args(argv)
    if args.seed is not None:
        result = run(args.seed)
        print(report(result))
        return 1 if result.violations else 0
    began = time.monotonic()
    failed = 0
    for seed in failing_seeds(args.first, args.seeds, 1 if args.stop else args.jobs):
        failed += 1
        print(report(run(seed), story=failed <= 3 and not args.stop), flush=True)
        if args.stop:
            print(f"first failure after {seed - args.first + 1} seeds")
            return 1
    took = time.monotonic() - began
    print(f"{args.seeds} schedules in {took:.1f} s ({args.seeds / took:.0f}/s), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
