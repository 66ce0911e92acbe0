"""The deterministic simulation (tests/sim): the real engine and agents on virtual
time, against a simulated network, decision log and PostgreSQL, with crashes,
partitions and lost or duplicated messages, on thousands of seeds.

A failure prints each failing seed, its violations and the story of the transactions
involved; `make sim SEED=N` replays one exactly. TWOPC_SIM_SEEDS sets how many seeds
this test runs (2,000 by default, about half a minute on two cores); `make sim
SEEDS=N` runs more.
"""

from __future__ import annotations

import os

from tests.sim.__main__ import report
from tests.sim.trace import digest
from tests.sim.world import run

SEEDS = int(os.environ.get("TWOPC_SIM_SEEDS", "2000"))


def test_every_simulated_schedule_keeps_the_invariants() -> None:
    failed = [r for r in map(run, range(SEEDS)) if r.violations]
    details = "\n".join(report(r, story=i < 3) for i, r in enumerate(failed))
    assert not failed, f"{len(failed)} of {SEEDS} schedules broke an invariant:\n{details}"


def test_a_seed_replays_exactly() -> None:
    for seed in (3, 17, 1234):
        first, again = run(seed), run(seed)
        assert len(first.trace.events) > 10, "a schedule that does nothing proves nothing"
        assert digest(first.trace) == digest(again.trace), f"seed {seed} did not replay exactly"


def test_schedules_exercise_the_faults_they_are_meant_to() -> None:
    """The generator is not vacuous: across 200 seeds there are crashes of both kinds,
    partitions, commits, aborts and one-phase commits."""
    seen: set[str] = set()
    for seed in range(200):
        for event in run(seed).trace.events:
            what = event.what
            if what.startswith("crash coord"):
                seen.add("coordinator crash")
            elif what.startswith("crash p"):
                seen.add("agent crash")
            elif what.startswith("partition"):
                seen.add("partition")
            elif what == "COMMIT PREPARED":
                seen.add("two-phase commit")
            elif what == "ROLLBACK PREPARED":
                seen.add("rollback of a prepared branch")
            elif what == "COMMIT (one phase)":
                seen.add("one-phase commit")
            elif what.startswith("connection lost"):
                seen.add("connection lost while settling")
            elif "told aborted" in what:
                seen.add("abort told to a client")
            elif what.startswith("failpoint"):
                seen.add("failpoint")
    assert seen == {
        "coordinator crash",
        "agent crash",
        "partition",
        "two-phase commit",
        "rollback of a prepared branch",
        "one-phase commit",
        "connection lost while settling",
        "abort told to a client",
        "failpoint",
    }
