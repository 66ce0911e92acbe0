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
from typing import Any

import pytest

from participant.branches import BranchTable
from tests.sim.__main__ import report
from tests.sim.log import SimDecisionLog
from tests.sim.many import failing_seeds
from tests.sim.trace import digest
from tests.sim.world import run
from twopc_common.isolation import Isolation

SEEDS = int(os.environ.get("TWOPC_SIM_SEEDS", "2000"))
JOBS = min(2, os.cpu_count() or 1)


def test_every_simulated_schedule_keeps_the_invariants() -> None:
    failed = [run(seed) for seed in failing_seeds(0, SEEDS, JOBS)]
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


def test_the_simulator_catches_an_agent_that_forgets_incarnations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hole 1 of issue 12 put back: the agent ignores the incarnation a Prepare or an
    Execute names, so after a restart it votes READ_ONLY for the branch it lost, and
    the transaction commits on the other shards only. The simulation must notice."""
    opened = BranchTable.open

    def forgetful(
        self: BranchTable,
        txid: str,
        incarnation: str = "",
        interactive: bool = False,
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> Any:
        return opened(self, txid, "", interactive, isolation)

    monkeypatch.setattr(BranchTable, "open", forgetful)
    caught = [r for r in map(run, range(300)) if r.violations]
    assert caught, "300 schedules with a forgetful agent and no violation: the simulator is blind"
    assert any("partial commit" in v.what for r in caught for v in r.violations)


def test_the_simulator_catches_one_phase_commits_without_a_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hole 3 of issue 12 put back: an unkeyed one-phase commit writes no intent, so
    GetTransaction answers UNKNOWN (will never commit) for a committed transaction."""
    monkeypatch.setattr(SimDecisionLog, "record_one_phase_intent", _no_intent_unless_keyed)
    caught = [r for r in map(run, range(100)) if r.violations]
    assert any(
        "GetTransaction said unknown, but applied" in v.what for r in caught for v in r.violations
    )


_record_intent = SimDecisionLog.record_one_phase_intent


async def _no_intent_unless_keyed(
    self: SimDecisionLog,
    transaction_id: str,
    participant: str,
    created_at: float,
    idempotency_key: str | None,
    request_hash: str | None,
    *,
    owner: str | None = None,
) -> None:
    if idempotency_key is not None:
        await _record_intent(
            self,
            transaction_id,
            participant,
            created_at,
            idempotency_key,
            request_hash,
            owner=owner,
        )
