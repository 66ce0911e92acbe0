"""Crash recovery: the coordinator, an agent or PostgreSQL dies at every protocol step,
is restarted, and the outcome is atomic, final, and what the client was told."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from coordinator.client import Outcome, Statement, TransactionAborted, TransportError, exactly
from tests.conftest import (
    COORDINATOR_ARGS,
    PARTICIPANT_ARGS,
    SHARDS,
    SystemFactory,
    create_tagged_rows,
    rows,
    tagged_inserts,
    wait_no_prepared,
)
from twopc_common.errors import TwoPCError
from twopc_common.failpoints import FAILPOINT_EXIT_CODE
from twopc_harness.daemons import Daemon, wait_until
from twopc_harness.postgres import PostgresCluster
from twopc_harness.system import LocalSystem, start_system

# Within this many seconds of the restart, every shard agrees and nothing is prepared.
RECOVERY_BOUND = 10.0


@pytest.fixture(scope="module")
def crash_system(
    clusters: list[PostgresCluster], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalSystem]:
    system = start_system(
        clusters=clusters,
        workdir=tmp_path_factory.mktemp("crash"),
        coordinator_args=[*COORDINATOR_ARGS, "--allow-failpoints"],
        participant_args=[*PARTICIPANT_ARGS, "--allow-failpoints"],
        coordinator_id="crash",
    )
    yield system
    system.stop()


def work(
    tag: str, slow_shard3: bool = False, fail_shard3: bool = False
) -> dict[str, list[Statement]]:
    """One row per shard. Shard 3 can answer a second late, and then vote NO, so that
    the others have voted (and prepared) first."""
    branches = tagged_inserts(tag)
    if slow_shard3:
        branches["shard3"].insert(0, Statement("SELECT pg_sleep(1)"))
    if fail_shard3:
        branches["shard3"].append(
            Statement("UPDATE twopc_test_rows SET tag = tag WHERE false", (), exactly(1))
        )
    return branches


def run_expecting_a_crash(
    system: LocalSystem, victim: Daemon, tag: str, branches: dict[str, list[Statement]]
) -> Outcome | None:
    """Run the transaction; return what the client was told, or None if nothing."""

    async def go() -> Outcome | None:
        assert system.coordinator is not None
        async with system.async_client(timeout=20) as client:
            try:
                return await client.run(branches)
            except TransportError:
                return None

    told = asyncio.run(go())
    assert victim.wait_exit(30) == FAILPOINT_EXIT_CODE, f"{victim.name} did not crash"
    return told


def check_atomic(system: LocalSystem, tag: str, expected: str, told: Outcome | None) -> None:
    def settled() -> bool:
        counts = set(rows(system, tag).values())
        return len(counts) == 1 and not any(system.prepared_transactions().values())

    wait_until(settled, RECOVERY_BOUND, f"every shard to agree on {tag} with nothing prepared")
    applied = set(rows(system, tag).values()) == {1}
    assert applied == (expected == "commit"), rows(system, tag)
    if told is not None:
        assert told.committed == applied, f"client was told {told}"


COORDINATOR_POINTS = [
    ("coordinator.before_prepare", "abort", {}),
    ("coordinator.after_some_votes", "abort", {"slow_shard3": True}),
    ("coordinator.after_votes_before_decision", "abort", {}),
    ("coordinator.after_decision_logged", "commit", {}),
    ("coordinator.after_some_commits", "commit", {}),
    ("coordinator.before_mark_complete", "commit", {}),
]

PARTICIPANT_POINTS = [
    ("participant.before_prepare", "abort", {}),
    ("participant.after_prepare_before_vote", "abort", {}),
    ("participant.before_commit_prepared", "commit", {}),
    ("participant.after_commit_prepared", "commit", {}),
    ("participant.before_rollback_prepared", "abort", {"slow_shard3": True, "fail_shard3": True}),
    ("participant.after_rollback_prepared", "abort", {"slow_shard3": True, "fail_shard3": True}),
]


@pytest.mark.parametrize(
    ("point", "expected", "shape"), COORDINATOR_POINTS, ids=[p for p, *_ in COORDINATOR_POINTS]
)
def test_coordinator_crash_at(
    crash_system: LocalSystem, point: str, expected: str, shape: dict[str, bool]
) -> None:
    system = crash_system
    create_tagged_rows(system)
    victim = system.coordinator
    assert victim is not None
    victim.set_failpoints(f"{point}=1*crash")
    tag = f"coord-{point}"
    told = run_expecting_a_crash(system, victim, tag, work(tag, **shape))
    victim.start()
    check_atomic(system, tag, expected, told)


@pytest.mark.parametrize(
    ("point", "expected", "shape"), PARTICIPANT_POINTS, ids=[p for p, *_ in PARTICIPANT_POINTS]
)
def test_participant_crash_at(
    crash_system: LocalSystem, point: str, expected: str, shape: dict[str, bool]
) -> None:
    system = crash_system
    create_tagged_rows(system)
    victim = system.participants["shard2"]
    victim.set_failpoints(f"{point}=1*crash")
    tag = f"part-{point}"
    told = run_expecting_a_crash(system, victim, tag, work(tag, **shape))
    victim.start()
    check_atomic(system, tag, expected, told)


# An error (not a crash) at each step: before the COMMIT record it aborts, after it the
# only way is forward. `one_phase` runs a single-branch transaction.
COORDINATOR_ERROR_POINTS = [
    ("coordinator.before_prepare", "abort", False),
    ("coordinator.after_votes_before_decision", "abort", False),
    ("coordinator.after_decision_logged", "commit", False),
    ("coordinator.after_some_commits", "commit", False),
    ("coordinator.before_mark_complete", "commit", False),
    ("coordinator.after_one_phase_reply", "commit", True),
]


@pytest.mark.parametrize(
    ("point", "expected", "one_phase"),
    COORDINATOR_ERROR_POINTS,
    ids=[p for p, *_ in COORDINATOR_ERROR_POINTS],
)
def test_coordinator_error_at(
    crash_system: LocalSystem, point: str, expected: str, one_phase: bool
) -> None:
    system = crash_system
    create_tagged_rows(system)
    assert system.coordinator is not None
    system.coordinator.set_failpoints(f"{point}=1*error(injected at {point})")
    tag = f"coord-error-{point}"
    branches = tagged_inserts(tag, ("shard1",)) if one_phase else work(tag)
    told: Outcome | None = None
    with system.client() as client:
        try:
            told = client.run(branches)
        except TwoPCError as exc:  # an error answer is allowed; a lie is not
            assert expected == "abort", f"{point}: {exc}"
        if told is not None:
            status = client.get_transaction(told.transaction_id)
            assert status.outcome in ("committed" if told.committed else "aborted", "unknown")
    shards = ("shard1",) if one_phase else SHARDS
    wait_until(
        lambda: (
            len({rows(system, tag)[s] for s in shards}) == 1
            and not any(system.prepared_transactions().values())
        ),
        RECOVERY_BOUND,
        f"every shard to agree on {tag}",
    )
    applied = {rows(system, tag)[s] for s in shards} == {1}
    assert applied == (expected == "commit"), rows(system, tag)
    if told is not None:
        assert told.committed == applied


# The agent of shard 2 is SIGKILLed inside an interactive transaction: between its
# Executes and the Commit, or during the Commit (before its PREPARE, or prepared but
# before it voted). Restarted, it must not vote for a branch it lost.
INTERACTIVE_AGENT_KILLS = [
    ("between_execute_and_commit", None),
    ("during_commit_before_prepare", "participant.before_prepare"),
    ("during_commit_prepared_before_vote", "participant.after_prepare_before_vote"),
]


@pytest.mark.parametrize(
    ("moment", "point"), INTERACTIVE_AGENT_KILLS, ids=[m for m, _ in INTERACTIVE_AGENT_KILLS]
)
def test_interactive_transaction_with_an_agent_killed(
    crash_system: LocalSystem, moment: str, point: str | None
) -> None:
    system = crash_system
    create_tagged_rows(system)
    victim = system.participants["shard2"]
    tag = f"interactive-kill-{moment}"
    told: Outcome | None = None
    with system.client(timeout=20) as client:
        tx = client.begin()
        for shard in SHARDS:
            tx.execute("shard" + shard[-1], "INSERT INTO twopc_test_rows VALUES (%s)", (tag,))
        if point is None:
            victim.kill()
            victim.start()
        else:
            victim.set_failpoints(f"{point}=1*crash")
        try:
            told = tx.commit()
        except TransportError:
            told = None
        except TransactionAborted as exc:
            # The probes found shard2 down and aborted the transaction before its
            # Commit got to it: told aborted, as the check below requires.
            assert "shard2" in str(exc), exc
            told = None
        if point is not None:
            assert victim.wait_exit(30) == FAILPOINT_EXIT_CODE
            victim.start()
    if told is not None:
        assert not told.committed and told.abort_participant == "shard2", told
    check_atomic(system, tag, "abort", told)


def test_commit_told_to_the_client_survives_an_immediate_coordinator_kill(
    crash_system: LocalSystem,
) -> None:
    """Phase 2 is held back on every agent, so once the client hears COMMITTED the
    decision exists only in the coordinator's log; then everything is SIGKILLed."""
    system = crash_system
    create_tagged_rows(system)
    for agent in system.participants.values():
        agent.set_failpoints("participant.before_commit_prepared=hang")
    with system.client() as client:
        outcome = client.run(work("durable"))
    assert outcome.committed and not outcome.completed
    assert system.coordinator is not None
    system.coordinator.kill()
    assert all(len(p) == 1 for p in system.prepared_transactions().values())
    for agent in system.participants.values():
        agent.kill()
        agent.start()
    system.coordinator.start()
    check_atomic(system, "durable", "commit", outcome)


def test_prepared_branch_survives_a_postgres_crash_and_follows_the_decision(
    crash_system: LocalSystem,
) -> None:
    system = crash_system
    create_tagged_rows(system)
    agent = system.participants["shard2"]
    agent.set_failpoints("participant.before_commit_prepared=hang")
    with system.client() as client:
        outcome = client.run(work("pgcrash"))
    assert outcome.committed
    cluster = system.cluster("shard2")
    wait_until(
        lambda: len(system.prepared_transactions()["shard2"]) == 1,
        10,
        "the branch on shard2 to be prepared",
    )
    cluster.stop("immediate")
    cluster.start()
    assert len(system.prepared_transactions()["shard2"]) == 1  # it survived the crash
    agent.set_failpoints("participant.before_commit_prepared=off")
    check_atomic(system, "pgcrash", "commit", outcome)


def test_agents_wait_out_a_long_coordinator_outage(make_system: SystemFactory) -> None:
    system = make_system(
        ["--allow-failpoints"],
        ["--idle-branch-timeout", "1", "--lock-timeout", "1", "--recovery-grace", "0.5"],
    )
    create_tagged_rows(system)
    assert system.coordinator is not None
    system.coordinator.set_failpoints("coordinator.after_decision_logged=crash")
    told = run_expecting_a_crash(system, system.coordinator, "outage", work("outage"))
    # Longer than every timeout of the agents: they must not decide alone.
    outage_end = time.monotonic() + 6
    while time.monotonic() < outage_end:
        assert all(len(p) == 1 for p in system.prepared_transactions().values())
        time.sleep(0.5)
    system.coordinator.start()
    check_atomic(system, "outage", "commit", told)
    wait_no_prepared(system)


def test_keyed_one_phase_commit_is_not_repeated_after_a_coordinator_crash(
    crash_system: LocalSystem,
) -> None:
    """The single branch committed, the coordinator died before it recorded that: a
    retry with the same key must learn COMMITTED, not run the branch again."""
    system = crash_system
    create_tagged_rows(system)
    assert system.coordinator is not None
    system.coordinator.set_failpoints("coordinator.after_one_phase_reply=1*crash")
    branch = {"shard1": [Statement("INSERT INTO twopc_test_rows VALUES ('once')")]}
    with system.client(timeout=20) as client:
        with pytest.raises(TransportError):
            client.run(branch, idempotency_key="once")
        assert system.coordinator.wait_exit(30) == FAILPOINT_EXIT_CODE
        system.coordinator.start()
        outcome: Outcome | None = None
        deadline = time.monotonic() + RECOVERY_BOUND
        while outcome is None and time.monotonic() < deadline:
            try:
                outcome = client.run(branch, idempotency_key="once")
            except TransportError:  # still resolving the outcome: ask again
                time.sleep(0.1)
    assert outcome is not None and outcome.committed
    assert rows(system, "once")["shard1"] == 1
