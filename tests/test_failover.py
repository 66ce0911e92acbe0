"""A standby coordinator and takeover, for real: two coordinator processes of one id on
a shared PostgreSQL decision log, the active one killed or paused under keyed load.

Failover time (documented in the README): a SIGKILLed active is replaced within
about one standby poll (0.2 s) plus the new active's start-up (epoch bump, log check,
recovery before it serves); these tests allow FAILOVER_BOUND on a loaded machine.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from bank_demo import bank
from coordinator.client import AsyncCoordinatorClient, CoordinatorClient, Outcome, TransportError
from participant.config import ParticipantConfig
from participant.ports import CoordinatorUnreachable
from participant.recovery import GrpcCoordinators
from tests.conftest import SystemFactory, dsns, log_url, reset_bank, wait_no_prepared
from twopc_common.errors import TwoPCError
from twopc_common.grpc_errors import active_hint
from twopc_common.log import EventLogger
from twopc_common.tls import channel
from twopc_harness.daemons import wait_until
from twopc_harness.postgres import (
    PostgresCluster,
    free_port,
    promote,
    start_clusters,
    start_replica,
    stop_clusters,
)
from twopc_harness.system import LocalSystem
from twopc_pb import coordinator_pb2 as pb
from twopc_pb import coordinator_pb2_grpc as cgrpc

FAILOVER_BOUND = 5.0
"""Seconds from the active's SIGKILL until a standby serves (the issue's target)."""

HA_ARGS = ["--lease-duration", "2", "--standby-poll-interval", "0.1", "--allow-failpoints"]


@pytest.fixture
def ha_system(make_system: SystemFactory, log_cluster: PostgresCluster) -> Iterator[LocalSystem]:
    system = make_system(HA_ARGS, log=log_url(log_cluster), standbys=1)
    reset_bank(system)
    yield system
    for daemon in system.coordinators():
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.resume()  # never leave a stopped process behind


def test_a_standby_refuses_with_the_active_address_and_is_not_serving(
    ha_system: LocalSystem,
) -> None:
    active = ha_system.coordinator
    (standby,) = ha_system.standbys
    assert active is not None and active.serving()
    assert not standby.serving()
    with (
        channel(standby.address, ha_system.tls("app"), server_name=ha_system.coordinator_id) as ch,
        pytest.raises(grpc.RpcError) as caught,
    ):
        cgrpc.CoordinatorStub(ch).Begin(pb.BeginRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "standby" in (caught.value.details() or "")
    assert active_hint(caught.value) == active.address
    # The client library, given only the standby, follows the hint.
    with CoordinatorClient(standby.address, tls=ha_system.tls("app")) as client:
        outcome = client.run(bank.transfer("hint-1", 1, 2, 5, ha_system.shard_names))
    assert outcome.committed

    async def run_async() -> Outcome:
        async with AsyncCoordinatorClient(standby.address, tls=ha_system.tls("app")) as client:
            return await client.run(bank.transfer("hint-2", 3, 4, 5, ha_system.shard_names))

    assert asyncio.run(run_async()).committed
    # A standby stops cleanly on SIGTERM while it waits for the lease.
    standby.stop()
    assert standby.process is not None and standby.process.returncode == 0, standby.log_tail()


def test_an_agent_asks_whichever_process_of_its_coordinator_is_active(
    ha_system: LocalSystem,
) -> None:
    """Recovery's questions reach the active process however the agent's address list
    is ordered: a dead address is passed over, a standby's refusal names the active."""
    active = ha_system.coordinator
    (standby,) = ha_system.standbys
    assert active is not None
    with ha_system.client() as client:
        outcome = client.run(bank.transfer("agent-asks-1", 1, 2, 5, ha_system.shard_names))
    assert outcome.committed
    cid = ha_system.coordinator_id
    dead = f"127.0.0.1:{free_port()}"

    async def ask(addresses: tuple[str, ...], txid: str) -> tuple[bool | None, str | None]:
        config = ParticipantConfig(
            id="shard1",
            dsn="dbname=unused",
            coordinators={cid: addresses},
            tls=ha_system.tls("shard1"),
            coordinator_rpc_timeout=5.0,
        )
        coordinators = GrpcCoordinators(config, EventLogger("participant", "shard1"))
        try:
            return await coordinators.outcome(cid, txid), coordinators.answered(cid)
        finally:
            await coordinators.close()

    committed = str(outcome.transaction_id)
    assert asyncio.run(ask((dead, standby.address), committed)) == (True, active.address)
    with ha_system.client() as client:  # more than the account holds: voted NO
        refused = client.run(bank.transfer("agent-asks-2", 3, 4, 10**9, ha_system.shard_names))
    assert not refused.committed
    aborted = str(refused.transaction_id)
    assert asyncio.run(ask((standby.address, dead, active.address), aborted)) == (
        False,
        active.address,
    )
    with pytest.raises(CoordinatorUnreachable):
        asyncio.run(ask((dead,), committed))


def _keyed_load(
    system: LocalSystem, stop: threading.Event, seed: int
) -> tuple[threading.Thread, dict[str, Outcome], list[str]]:
    """Transfers with idempotency keys, each retried with its key until it has an
    outcome (the client fails over between the coordinator's processes)."""
    outcomes: dict[str, Outcome] = {}
    retried: list[str] = []
    rng = random.Random(seed)
    shards = system.shard_names

    def run() -> None:
        with system.client(timeout=20) as client:
            n = 0
            while not stop.is_set():
                source, target = rng.sample(range(1, 21), 2)
                if bank.shard_of(source, shards) == bank.shard_of(target, shards):
                    continue
                n += 1
                tid = f"ha-{seed}-{n}"
                request = bank.transfer(tid, source, target, rng.randint(1, 20), shards)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        outcomes[tid] = client.run(request, idempotency_key=tid)
                        break
                    except (TransportError, TwoPCError):
                        retried.append(tid)
                        time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcomes, retried


def _check_bank(system: LocalSystem, outcomes: dict[str, Outcome]) -> None:
    wait_no_prepared(system, timeout=60)
    snap = bank.snapshot(dsns(system))
    applied = bank.applied(snap, outcomes)
    assert snap.total == snap.initial_total
    assert not snap.negative
    assert not snap.half_applied()
    assert all(applied[t] for t, o in outcomes.items() if o.committed)
    assert not any(applied[t] for t, o in outcomes.items() if not o.committed)
    # Applied once: exactly one debit and one credit row per transfer, across shards.
    counts: dict[str, int] = {}
    for shard in system.shard_names:
        with system.connect(shard) as conn:
            for tid, n in conn.execute("SELECT transfer_id, count(*) FROM ledger GROUP BY 1"):
                counts[str(tid)] = counts.get(str(tid), 0) + int(n)
    assert all(n == 2 for n in counts.values()), {t: n for t, n in counts.items() if n != 2}


def test_a_standby_serves_within_seconds_after_the_active_is_killed_under_keyed_load(
    ha_system: LocalSystem,
) -> None:
    seed = int(os.environ.get("TWOPC_SEED", random.randrange(2**32)))
    print(f"seed={seed} (rerun with TWOPC_SEED={seed})")
    active = ha_system.coordinator
    assert active is not None
    (standby,) = ha_system.standbys
    stop = threading.Event()
    thread, outcomes, retried = _keyed_load(ha_system, stop, seed)
    wait_until(lambda: len(outcomes) >= 20, 60, "transfers before the kill")
    # Leave work in every state a crash can: prepared and undecided, and decided
    # (logged) with phase 2 half done. The keyed clients wait in their calls.
    active.set_failpoints(
        "coordinator.after_votes_before_decision=50%hang;coordinator.after_some_commits=hang"
    )
    wait_until(
        lambda: sum(map(len, ha_system.prepared_transactions().values())) >= 2,
        30,
        "branches left prepared by the hung active",
    )
    active.kill()
    killed = time.monotonic()
    wait_until(standby.serving, 30, "the standby serving")
    took = time.monotonic() - killed
    print(f"failover: the standby served {took:.2f}s after the SIGKILL")
    before = len(outcomes)
    wait_until(lambda: len(outcomes) >= before + 20, 60, "transfers after the takeover")

    async def keyed_past_the_dead_one() -> Outcome:
        # The dead process first in the list: a keyed Run moves on to the live one.
        addresses = [active.address, standby.address]
        async with AsyncCoordinatorClient(addresses, tls=ha_system.tls("app")) as client:
            request = bank.transfer(f"async-{seed}", 1, 2, 1, ha_system.shard_names)
            return await client.run(request, idempotency_key=f"async-{seed}")

    outcomes[f"async-{seed}"] = asyncio.run(keyed_past_the_dead_one())
    stop.set()
    thread.join(90)
    assert not thread.is_alive()
    print(f"transfers={len(outcomes)} retried={len(set(retried))}")
    assert took < FAILOVER_BOUND, f"failover took {took:.2f}s"
    story = standby.log_tail(1_000_000)
    print({e: story.count(e) for e in ("in_doubt_resolved", "recovering_commit", "serving")})
    assert "in_doubt_resolved" in story or "recovering_commit" in story, "nothing was in doubt"
    _check_bank(ha_system, outcomes)


def test_a_paused_active_is_fenced_when_it_resumes_and_steps_down(
    ha_system: LocalSystem,
) -> None:
    old = ha_system.coordinator
    assert old is not None
    (standby,) = ha_system.standbys
    shards = ha_system.shard_names
    # An interactive transfer with both branches open on the old active.
    old_client = CoordinatorClient(old.address, timeout=20, tls=ha_system.tls("app"))
    tx = old_client.begin()
    for shard, statements in bank.transfer("paused-1", 1, 2, 7, shards).items():
        for s in statements:
            tx.execute(shard, s.sql, s.params, s.expect)
    old.pause()
    paused = time.monotonic()
    try:
        wait_until(standby.serving, 30, "the standby taking over from the paused active")
        print(f"takeover: the standby served {time.monotonic() - paused:.2f}s after the SIGSTOP")
        # Keyed, so the client may send it again past the paused process.
        with ha_system.client() as client:
            request = bank.transfer("after-takeover", 3, 4, 5, shards)
            assert client.run(request, idempotency_key="after-takeover").committed
    finally:
        old.resume()
    # Woken up, it can commit nothing: its log writes are fenced (and the agents,
    # which saw the new epoch, refuse its branches).
    try:
        committed = tx.commit().committed
    except TwoPCError as exc:  # refused outright (stepping down): equally not committed
        print(f"the old active refused the commit: {exc!r}")
        committed = False
    assert not committed
    assert old.wait_exit(30) != 0
    assert "stepped down" in old.log_tail()
    wait_no_prepared(ha_system)
    snap = bank.snapshot(dsns(ha_system))
    assert bank.applied(snap, ["paused-1", "after-takeover"]) == {
        "paused-1": False,
        "after-takeover": True,
    }
    assert snap.total == snap.initial_total
    old_client.close()


@pytest.fixture
def replicated_log(tmp_path: Path) -> Iterator[tuple[PostgresCluster, PostgresCluster]]:
    """A log database with a synchronous streaming replica, of this test's own."""
    (primary,) = start_clusters(1, tmp_path / "logdb", prefix="logprimary")
    replica = None
    try:
        replica = start_replica(primary, "logreplica")
        yield primary, replica
    finally:
        stop_clusters([primary, *([replica] if replica else [])])


@pytest.mark.chaos
def test_the_log_database_fails_over_to_its_replica_and_no_committed_decision_is_lost(
    make_system: SystemFactory, replicated_log: tuple[PostgresCluster, PostgresCluster]
) -> None:
    seed = int(os.environ.get("TWOPC_SEED", random.randrange(2**32)))
    print(f"seed={seed} (rerun with TWOPC_SEED={seed})")
    primary, replica = replicated_log
    # Both hosts in one URL: libpq takes the first that accepts writes.
    url = (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{replica.port}/postgres"
        "?target_session_attrs=read-write&connect_timeout=2"
    )
    system = make_system(HA_ARGS, log=url, standbys=1)
    reset_bank(system)
    stop = threading.Event()
    thread, outcomes, _ = _keyed_load(system, stop, seed)
    try:
        wait_until(lambda: len(outcomes) >= 30, 60, "transfers before the crash")
        committed_before = {t for t, o in outcomes.items() if o.committed}
        primary.stop("immediate")  # a crash: no checkpoint, no goodbye to the clients
        promote(replica)
        before = len(outcomes)
        wait_until(lambda: len(outcomes) >= before + 30, 120, "transfers on the promoted log")
    finally:
        stop.set()
        thread.join(120)
    assert not thread.is_alive()
    assert system.active_coordinator() is not None, "no coordinator serves after the failover"
    # Every decision a client was told committed is in the promoted log.
    with psycopg.connect(replica.dsn, autocommit=True) as conn:
        logged = {str(r[0]) for r in conn.execute("SELECT id FROM twopc_coordinator.transactions")}
    told = {o.transaction_id for o in outcomes.values() if o.committed}
    print(
        f"transfers={len(outcomes)} committed before the crash={len(committed_before)} "
        f"coordinators running={[d.running for d in system.coordinators()]}"
    )
    assert committed_before
    assert told <= logged, sorted(told - logged)[:10]
    _check_bank(system, outcomes)
