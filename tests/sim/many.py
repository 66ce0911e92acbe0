"""Many seeds on several processes: each worker runs a slice of the seeds and sends
back the seeds that broke an invariant (a schedule is replayed by its seed alone, so
nothing else needs to cross the process boundary)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

from tests.sim.world import run


def _failing(seeds: range) -> list[int]:
    return [seed for seed in seeds if run(seed).violations]


def failing_seeds(first: int, count: int, jobs: int) -> Iterator[int]:
    """The seeds of first..first+count-1 whose schedules broke an invariant, in order.
    Workers are spawned, not forked: the caller may hold gRPC threads."""
    if jobs <= 1:
        yield from _failing(range(first, first + count))
        return
    size = max(1, min(250, count // (jobs * 4) or 1))
    slices = [range(s, min(s + size, first + count)) for s in range(first, first + count, size)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        for failed in pool.map(_failing, slices):
            yield from failed
