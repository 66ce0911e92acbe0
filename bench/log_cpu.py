"""CPU per decision-log write on the event loop and in the whole process (the writer
thread included): what a record costs the coordinator besides its fsync.

`--writers` coroutines each await `mark_complete` (an unforced record, as phase 2 writes
one per transaction) one after another, on a fresh SQLite log in a temporary folder;
`--rounds` rounds of `--writes` records per writer, the median printed.

    python bench/log_cpu.py [--writers 16] [--writes 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.decision_log import DecisionLog


async def measure(writers: int, writes: int, rounds: int) -> tuple[float, float]:
    """(event-loop us, process us) per write, medians over the rounds."""
    with tempfile.TemporaryDirectory() as folder:
        log = DecisionLog(str(Path(folder) / "log.sqlite"), "bench")
        log.open()
        try:

            async def writer(tag: str) -> None:
                for i in range(writes):
                    await log.mark_complete(f"bench.1.{tag}-{i}")

            await asyncio.gather(*(writer(f"warm{w}") for w in range(writers)))
            loop_us, process_us = [], []
            for r in range(rounds):
                thread0, process0 = time.thread_time(), time.process_time()
                await asyncio.gather(*(writer(f"{r}.{w}") for w in range(writers)))
                n = writers * writes
                loop_us.append(1e6 * (time.thread_time() - thread0) / n)
                process_us.append(1e6 * (time.process_time() - process0) / n)
        finally:
            log.close()
    return statistics.median(loop_us), statistics.median(process_us)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writers", type=int, default=16)
    p.add_argument("--writes", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    loop_us, process_us = asyncio.run(measure(a.writers, a.writes, a.rounds))
    print(
        f"{a.writers} writers: {loop_us:.1f} us of event-loop CPU and {process_us:.1f} us of "
        "process CPU per decision-log write"
    )


if __name__ == "__main__":
    main()
