"""Fixtures: real PostgreSQL clusters (one set per test session), real daemons on
loopback, and the bank schema reset before each test that uses it."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bank_demo import bank
from twopc_common.values import Statement
from twopc_harness.daemons import wait_until
from twopc_harness.postgres import PostgresCluster, start_clusters, stop_clusters
from twopc_harness.system import LocalSystem, start_system

# Short timeouts so that faults resolve quickly in tests; generous enough for a loaded
# 2-core machine.
COORDINATOR_ARGS = [
    "--prepare-timeout",
    "3",
    "--recovery-interval",
    "1",
    "--rpc-timeout",
    "3",
    "--phase2-backoff-max",
    "0.5",
]
PARTICIPANT_ARGS = [
    "--lock-timeout",
    "2",
    "--recovery-interval",
    "0.5",
    "--recovery-grace",
    "1",
    "--idle-branch-timeout",
    "10",
]

_ids = itertools.count(1)


@pytest.fixture(scope="session")
def clusters() -> Iterator[list[PostgresCluster]]:
    # Not under pytest's temp root: a pytest session starting meanwhile resets its
    # permissions, locking the postgres user out of its data folders.
    started = start_clusters(3)
    yield started
    stop_clusters(started)


@pytest.fixture(scope="session")
def log_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for decision logs (`--log postgresql://...`); tests share
    it by using coordinator ids of their own."""
    (started,) = start_clusters(1, prefix="log")
    yield started
    stop_clusters([started])


def log_url(cluster: PostgresCluster) -> str:
    """The `--log` URL of a decision log in `cluster`."""
    return f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres?connect_timeout=5"


SystemFactory = Callable[..., LocalSystem]


@pytest.fixture
def make_system(clusters: list[PostgresCluster], tmp_path: Path) -> Iterator[SystemFactory]:
    """Start daemons over the session's clusters, with flags of the test's choosing.
    Every system gets its own coordinator id so that systems never resolve each
    other's branches."""
    started: list[LocalSystem] = []

    def make(
        coordinator_args: list[str] | None = None,
        participant_args: list[str] | None = None,
        **options: Any,
    ) -> LocalSystem:
        system = start_system(
            clusters=clusters,
            workdir=tmp_path / f"system{len(started) + 1}",
            coordinator_args=COORDINATOR_ARGS + (coordinator_args or []),
            participant_args=PARTICIPANT_ARGS + (participant_args or []),
            coordinator_id=f"coord{next(_ids)}",
            **options,
        )
        started.append(system)
        return system

    yield make
    for system in started:
        settle(system)
        system.stop()


SETTLE_TIMEOUT = 10.0
"""How long a test's system gets, after the test, to finish what it decided."""


def settle(system: LocalSystem) -> None:
    """Let a system whose daemons all run finish phase 2 of what it decided before it
    is stopped: a client is answered once a commit is durable, and a branch whose
    Commit was still on its way when the agents stopped would stay prepared on the
    session's shared clusters, where the next tests would find it. A system the test
    left broken (a daemon down) is stopped as it is."""
    if not system.daemons() or not all(d.running for d in system.daemons()):
        return
    prefixes = tuple(f"{c}." for c in system.group_members())

    def ours() -> list[str]:
        found = []
        for gids in system.prepared_transactions().values():
            for gid in gids:
                with contextlib.suppress(ValueError):
                    if str(psycopg.Xid.from_string(gid).gtrid).startswith(prefixes):
                        found.append(gid)
        return found

    with contextlib.suppress(AssertionError):
        wait_until(lambda: not ours(), SETTLE_TIMEOUT, "the system's branches finished")


@pytest.fixture(scope="session")
def shared_system(
    clusters: list[PostgresCluster], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalSystem]:
    """One system for the tests that do not kill or reconfigure daemons."""
    system = start_system(
        clusters=clusters,
        workdir=tmp_path_factory.mktemp("shared"),
        coordinator_args=COORDINATOR_ARGS,
        participant_args=PARTICIPANT_ARGS,
        coordinator_id="shared",
    )
    yield system
    system.stop()


def dsns(system: LocalSystem) -> dict[str, str]:
    return {shard: system.dsn(shard) for shard in system.shard_names}


def wait_coordinator_reaches(system: LocalSystem, shard: str, timeout: float = 30.0) -> None:
    """After an agent restart, until the coordinator's health probes see the agent again
    (a one-branch Run on it commits), so that the next call meets the agent itself and
    not the probes' verdict of the restart window."""
    with system.client() as client:
        wait_until(
            lambda: client.run({shard: [Statement("SELECT 1")]}).committed,
            timeout,
            f"the coordinator reaching {shard} again",
        )


def tls_args(system: LocalSystem, identity: str) -> list[str]:
    """The command-line flags of a tool acting as `identity`."""
    tls = system.tls(identity)
    return [f"--tls-cert={tls.cert}", f"--tls-key={tls.key}", f"--tls-ca={tls.ca}"]


def reset_bank(system: LocalSystem, accounts: int = 20, balance: int = 100) -> None:
    bank.create_schema(dsns(system))
    bank.open_accounts(dsns(system), accounts, balance)


def wait_no_prepared(system: LocalSystem, timeout: float = 30.0) -> None:
    wait_until(
        lambda: not any(system.prepared_transactions().values()),
        timeout,
        "no prepared transaction on any shard",
    )


@pytest.fixture
def system(shared_system: LocalSystem) -> Iterator[LocalSystem]:
    """The shared system with a fresh bank (20 accounts of 100) and, after the test,
    the check that nothing was left prepared."""
    reset_bank(shared_system)
    yield shared_system
    wait_no_prepared(shared_system)


# -- tagged rows: one row per shard, to tell which shards a transaction reached -------

SHARDS = ("shard1", "shard2", "shard3")


def create_tagged_rows(system: LocalSystem) -> None:
    for shard in SHARDS:
        with system.connect(shard) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS twopc_test_rows (tag text)")


def tagged_inserts(tag: str, shards: tuple[str, ...] = SHARDS) -> dict[str, list[Statement]]:
    return {s: [Statement("INSERT INTO twopc_test_rows VALUES (%s)", (tag,))] for s in shards}


def rows(system: LocalSystem, tag: str) -> dict[str, int]:
    """How many rows tagged `tag` each shard holds."""
    out = {}
    for shard in SHARDS:
        with system.connect(shard) as conn:
            row = conn.execute(
                "SELECT count(*) FROM twopc_test_rows WHERE tag = %s", (tag,)
            ).fetchone()
        assert row is not None
        out[shard] = int(row[0])
    return out
