"""Certificate rotation without a restart, on every channel: the daemons' servers and
their outbound channels (coordinator -> agents, agent -> coordinator) take the new
files on SIGHUP, calls under way finish, and once trust in the old CA is withdrawn
everything keeps working over fresh handshakes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from coordinator.client import TransportError
from tests.conftest import (
    COORDINATOR_ARGS,
    PARTICIPANT_ARGS,
    SystemFactory,
    create_tagged_rows,
    rows,
    tagged_inserts,
    wait_no_prepared,
)
from twopc_common import certs
from twopc_common.log import EventLogger
from twopc_common.tls import ReloadingChannel, TlsConfig
from twopc_harness.daemons import Daemon, wait_until
from twopc_harness.postgres import PostgresCluster
from twopc_harness.system import CLIENTS, LocalSystem, start_system
from twopc_pb import coordinator_pb2 as cpb
from twopc_pb import coordinator_pb2_grpc as cgrpc

BOUND = 30.0
# Only SIGHUP reloads outbound channels here, so the test knows when it happens.
NEVER = ["--tls-reload-interval", "3600"]


@pytest.fixture
def rotating(clusters: list[PostgresCluster], tmp_path: Path) -> Iterator[LocalSystem]:
    system = start_system(
        clusters=clusters,
        workdir=tmp_path / "system",
        coordinator_args=[*COORDINATOR_ARGS, *NEVER, "--allow-failpoints"],
        participant_args=[*PARTICIPANT_ARGS, *NEVER, "--allow-failpoints"],
        coordinator_id="rotate",
        faults=True,
    )
    try:
        create_tagged_rows(system)
        yield system
    finally:
        system.stop()


def identities(system: LocalSystem) -> list[certs.Identity]:
    return [
        certs.Identity("coordinator", system.coordinator_id),
        *(certs.Identity("participant", s) for s in system.shard_names),
        *(certs.Identity("client", c) for c in CLIENTS),
    ]


def hang_up(system: LocalSystem) -> None:
    """SIGHUP every daemon and wait until each logged it."""
    for daemon in system.daemons():
        before = hangups(daemon)
        assert daemon.process is not None
        os.kill(daemon.process.pid, signal.SIGHUP)
        wait_until(lambda: hangups(daemon) > before, BOUND, f"{daemon.name} to handle SIGHUP")  # noqa: B023


def hangups(daemon: Daemon) -> int:
    return daemon.log_tail(10**7).count("event=sighup")


def reloads(daemon: Daemon) -> int:
    return daemon.log_tail(10**7).count("event=tls_channel_reloaded")


def fresh_handshakes(system: LocalSystem) -> None:
    """Cut every link between the daemons and the client for a moment: the next calls
    connect again, with a new TLS handshake each."""
    assert system.network is not None
    for proxy in system.network.proxies.values():
        if not proxy.name.endswith("_postgres"):
            proxy.disable()
    system.network.heal()


def commits(system: LocalSystem, tag: str) -> None:
    def once() -> bool:
        try:
            with system.client(timeout=10) as client:
                return client.run(tagged_inserts(tag), wait_for_completion=True).committed
        except TransportError:
            return False

    wait_until(once, BOUND, f"a transaction ({tag}) over every shard to commit", 0.2)


def decision_logged(system: LocalSystem) -> bool:
    path = system.workdir / "decisions.sqlite"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT count(*) FROM transactions WHERE state = 'committing'")
        return bool(row.fetchone()[0])


def agent_resolves_in_doubt(system: LocalSystem, tag: str) -> None:
    """A commit whose phase 2 cannot reach shard2 is finished by shard2's own recovery,
    which asks the coordinator over the agent -> coordinator channel."""
    assert system.coordinator is not None and system.network is not None
    system.coordinator.set_failpoints("coordinator.after_decision_logged=1*sleep(1500)")
    link = system.network["coordinator_shard2"]
    wait_until(lambda: not decision_logged(system), BOUND, "earlier commits to finish phase 2")
    with ThreadPoolExecutor(1) as pool:
        told = pool.submit(lambda: system.client(timeout=30).run(tagged_inserts(tag)))
        wait_until(lambda: decision_logged(system), BOUND, f"the decision on {tag} logged")
        link.disable()  # during the failpoint's sleep: phase 2 cannot reach shard2
        try:
            assert told.result(timeout=BOUND).committed
            wait_until(
                lambda: rows(system, tag)["shard2"] == 1, BOUND, f"shard2 to resolve {tag} itself"
            )
        finally:
            link.enable()
    wait_until(
        lambda: rows(system, tag) == {"shard1": 1, "shard2": 1, "shard3": 1},
        BOUND,
        f"{tag} everywhere",
    )


def test_rotated_certificates_and_a_new_ca_are_used_on_every_channel_without_a_restart(
    rotating: LocalSystem, tmp_path: Path
) -> None:
    system = rotating
    coordinator = system.coordinator
    assert coordinator is not None and coordinator.process is not None
    pids = {d.name: d.process.pid for d in system.daemons() if d.process is not None}
    commits(system, "rotation-before")
    agent_resolves_in_doubt(system, "rotation-doubt-before")  # the agent's channel exists now

    # 1. New certificates from the same CA, written in place.
    certs.issue(system.workdir / "certs", identities(system))
    hang_up(system)
    assert reloads(coordinator) == len(system.shard_names)
    assert reloads(system.participants["shard2"]) == 1
    fresh_handshakes(system)
    commits(system, "rotation-same-ca")
    agent_resolves_in_doubt(system, "rotation-doubt-same-ca")

    # 2. A new CA: trust both, move every party to the new one, then drop the old one.
    new = certs.issue(tmp_path / "ca2", identities(system))
    old_ca = (system.workdir / "certs" / "ca.pem").read_bytes()
    new_ca = new[system.coordinator_id].ca.read_bytes()
    own = system.credentials
    ca_file = system.workdir / "certs" / "ca.pem"  # one for every party
    ca_file.write_bytes(old_ca + new_ca)
    hang_up(system)
    for name, files in new.items():
        target = own[name]
        assert target.key is not None and target.cert is not None
        target.key.write_bytes(files.key.read_bytes())
        target.cert.write_bytes(files.cert.read_bytes())
    hang_up(system)
    # The last step while a Prepare is under way: it finishes on the channel it began on.
    system.participants["shard3"].set_failpoints("participant.before_prepare=1*sleep(1500)")
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            lambda: system.client(timeout=30).run(tagged_inserts("rotation-in-flight"))
        )
        with system.client(identity="admin") as admin:
            wait_until(lambda: bool(admin.list_transactions()), BOUND, "the run under way")
        ca_file.write_bytes(new_ca)  # the old CA is trusted no more
        hang_up(system)
        assert in_flight.result(timeout=BOUND).committed
    fresh_handshakes(system)
    commits(system, "rotation-new-ca")
    agent_resolves_in_doubt(system, "rotation-doubt-new-ca")
    assert rows(system, "rotation-in-flight") == {"shard1": 1, "shard2": 1, "shard3": 1}
    assert {d.name: d.process.pid for d in system.daemons() if d.process is not None} == pids
    wait_no_prepared(system)


def test_an_outbound_channel_follows_its_files_at_the_interval_and_skips_a_bad_pair(
    make_system: SystemFactory, tmp_path: Path
) -> None:
    """The client side of `ReloadingChannel` alone, against a real coordinator: files
    changed in place are used after the check interval (a new identity, seen by the
    coordinator), and a certificate written without its key is not used at all."""
    system = make_system()
    create_tagged_rows(system)
    app = system.tls("app")
    assert app.cert is not None and app.key is not None and app.ca is not None
    mine = TlsConfig(tmp_path / "me.pem", tmp_path / "me.key", app.ca)
    shutil.copy(app.cert, tmp_path / "me.pem")
    shutil.copy(app.key, tmp_path / "me.key")
    with system.client(identity="app") as client:
        txid = client.run(tagged_inserts("owned-by-app", ("shard1",))).transaction_id
    issued = tmp_path / "issued"
    issued.mkdir()
    for name in ("ca.pem", "ca.key"):
        shutil.copy(app.ca.parent / name, issued / name)
    app2 = certs.issue(issued, [certs.Identity("client", "app2")])["app2"]

    async def scenario() -> None:
        channels = ReloadingChannel(
            system.client_address,
            mine,
            check_interval=0.2,
            drain=5,
            log=EventLogger("test", "rotation"),
        )

        async def owner_sees_it() -> bool:
            stub = cgrpc.CoordinatorStub(channels.current())
            try:
                await stub.GetTransaction(cpb.GetTransactionRequest(transaction_id=txid))
                return True
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                return False

        async def poll(until: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + BOUND
            while not until():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await owner_sees_it()
                await asyncio.sleep(0.1)

        try:
            assert await owner_sees_it()  # as app
            # Half a rotation: app2's certificate, app's key. Never used.
            (tmp_path / "me.pem").write_bytes(app2.cert.read_bytes())
            await asyncio.sleep(0.5)
            for _ in range(5):
                assert await owner_sees_it()
            assert channels.generation == 0
            (tmp_path / "me.key").write_bytes(app2.key.read_bytes())
            await poll(lambda: channels.generation == 1, "the new pair in use")
            assert not await owner_sees_it()  # as app2: not its transaction
        finally:
            await channels.close()

    asyncio.run(scenario())
