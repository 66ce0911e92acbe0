"""A whole local deployment: N PostgreSQL shards, one participant agent per shard and
a coordinator, all real processes on loopback, in one work folder.

Used by the tests, the quick-start scenario, the demo and the benchmarks. By default
the system runs as it should in production: mutual TLS on every channel with
certificates issued per run into `WORKDIR/certs` (a CA, the coordinator, each agent,
and the clients `app`, `other` and `admin`; `admin` has the admin role on every
daemon), so the secure path is the one every test walks. `secure=False` starts the
daemons with `--insecure` on loopback.
"""

from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg

from coordinator.client import AsyncCoordinatorClient, CoordinatorClient
from coordinator.group import AsyncCoordinatorGroup
from twopc_common import certs
from twopc_common.tls import TlsConfig, channel
from twopc_harness.daemons import (
    CoordinatorDaemon,
    DaemonTls,
    ParticipantDaemon,
    coordinator_daemon,
    participant_daemon,
)
from twopc_harness.network import FaultNetwork, start_network
from twopc_harness.postgres import (
    BRANCH_ROLE,
    PostgresCluster,
    free_port,
    start_clusters,
    stop_clusters,
)

COORDINATOR_ID = "coord1"
CLIENTS = ("app", "other", "admin")
"""Client identities every secure system has certificates for; `admin` is admin."""
ADMIN = "admin"


@dataclass
class LocalSystem:
    workdir: Path
    clusters: list[PostgresCluster]
    participants: dict[str, ParticipantDaemon] = field(default_factory=dict)
    coordinator: CoordinatorDaemon | None = None
    owns_clusters: bool = True
    network: FaultNetwork | None = None
    """Toxiproxy on every path, when the system was started with faults=True."""
    client_address: str = ""
    """Where applications reach the coordinator (through its proxy, if any)."""
    credentials: dict[str, TlsConfig] = field(default_factory=dict)
    """Identity name -> its certificate files; empty when the system runs --insecure."""
    coordinator_id: str = COORDINATOR_ID
    standbys: list[CoordinatorDaemon] = field(default_factory=list)
    """Further coordinator processes of the same id on a shared PostgreSQL log."""
    workers: list[CoordinatorDaemon] = field(default_factory=list)
    """Further coordinators of ids of their own, each with its own log, over the same
    agents (`start_system(workers=N)`; `coordinator.group`)."""

    @property
    def shard_names(self) -> list[str]:
        return list(self.participants)

    def dsn(self, shard: str) -> str:
        return self.clusters[self.shard_names.index(shard)].dsn

    def cluster(self, shard: str) -> PostgresCluster:
        return self.clusters[self.shard_names.index(shard)]

    def connect(self, shard: str) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.dsn(shard), autocommit=True)

    def tls(self, identity: str) -> TlsConfig:
        """The credentials of `identity` (plaintext when the system is insecure)."""
        return self.credentials[identity] if self.credentials else TlsConfig()

    @property
    def client_addresses(self) -> list[str]:
        """Every coordinator process's address (the first one's through its proxy)."""
        return [self.client_address, *(d.address for d in self.standbys)]

    def client(self, timeout: float = 30.0, identity: str = "app") -> CoordinatorClient:
        return CoordinatorClient(self.client_addresses, timeout=timeout, tls=self.tls(identity))

    def async_client(self, timeout: float = 30.0, identity: str = "app") -> AsyncCoordinatorClient:
        return AsyncCoordinatorClient(
            self.client_addresses, timeout=timeout, tls=self.tls(identity)
        )

    def coordinators(self) -> list[CoordinatorDaemon]:
        return [*([self.coordinator] if self.coordinator else []), *self.standbys, *self.workers]

    def group_members(self) -> dict[str, list[str]]:
        """Coordinator id -> its addresses: the first coordinator and the workers."""
        members = {self.coordinator_id: self.client_addresses}
        members.update({w.name: [w.address] for w in self.workers})
        return members

    def group_client(self, timeout: float = 30.0, identity: str = "app") -> AsyncCoordinatorGroup:
        return AsyncCoordinatorGroup(self.group_members(), timeout=timeout, tls=self.tls(identity))

    def active_coordinator(self) -> CoordinatorDaemon | None:
        """The coordinator process whose health says SERVING, if one does."""
        for daemon in self.coordinators():
            if daemon.serving():
                return daemon
        return None

    def coordinator_channel(self, identity: str = "app") -> grpc.Channel:
        """A raw channel to the coordinator as `identity`."""
        return channel(self.client_address, self.tls(identity))

    def participant_channel(self, shard: str, identity: str | None = None) -> grpc.Channel:
        """A raw channel to an agent, as its coordinator unless `identity` says otherwise."""
        daemon = self.participants[shard]
        who = identity or self.coordinator_id
        return channel(daemon.address, self.tls(who), server_name=shard)

    def daemons(self) -> list[CoordinatorDaemon | ParticipantDaemon]:
        found: list[CoordinatorDaemon | ParticipantDaemon] = list(self.participants.values())
        found += self.coordinators()
        return found

    def prepared_transactions(self) -> dict[str, list[str]]:
        """Every shard's prepared transactions (gids)."""
        out = {}
        for shard in self.shard_names:
            with self.connect(shard) as conn:
                rows = conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()
            out[shard] = [str(r[0]) for r in rows]
        return out

    def stop(self, logs_to: Path | None = None) -> None:
        """Stop everything; first copy the daemons' logs to `logs_to` if given."""
        for daemon in self.daemons():
            daemon.stop()
        if logs_to is not None and (self.workdir / "logs").exists():
            shutil.copytree(self.workdir / "logs", logs_to, dirs_exist_ok=True)
        if self.network is not None:
            self.network.stop()
        if self.owns_clusters:
            stop_clusters(self.clusters)
            shutil.rmtree(self.workdir, ignore_errors=True)


def local_proxy_names(shards: list[str]) -> list[str]:
    """The proxies `start_system(faults=True)` creates, by name, sorted (so that a fault
    schedule can be checked before anything starts)."""
    names = ["client_coordinator"]
    for shard in shards:
        names += [f"{shard}_postgres", f"{shard}_coordinator", f"coordinator_{shard}"]
    return sorted(names)


def start_system(
    shards: int = 3,
    workdir: Path | None = None,
    clusters: list[PostgresCluster] | None = None,
    coordinator_args: list[str] | None = None,
    participant_args: list[str] | None = None,
    start_daemons: bool = True,
    coordinator_id: str = COORDINATOR_ID,
    faults: bool = False,
    secure: bool = True,
    log: str | None = None,
    standbys: int = 0,
    workers: int = 1,
) -> LocalSystem:
    """Start clusters (unless given), agents and the coordinator; wait until all serve.
    With `faults`, every network path goes through its own Toxiproxy proxy. `log` is
    the coordinator's `--log` (default: a SQLite file in `workdir`); with a PostgreSQL
    log, `standbys` more coordinator processes of the same id share it. `workers` > 1
    starts that many coordinators in all, the others of ids `<coordinator_id>-2` ...,
    each with its own SQLite log, known to every agent."""
    if standbys and log is None:
        raise ValueError("standby coordinators need a shared PostgreSQL log")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="twopc-"))
    owns = clusters is None
    if clusters is None:
        clusters = start_clusters(shards, workdir / "pg")
    system = LocalSystem(workdir, clusters, owns_clusters=owns, coordinator_id=coordinator_id)
    shard_names = [f"shard{i}" for i in range(1, len(clusters) + 1)]
    worker_ids = [f"{coordinator_id}-{i}" for i in range(2, workers + 1)]
    if secure:
        system.credentials = issue_credentials(
            workdir / "certs", [coordinator_id, *worker_ids], shard_names
        )

    def tls(name: str) -> DaemonTls | None:
        if not secure:
            return None
        return DaemonTls(system.credentials[name], system.credentials[ADMIN], ADMIN)

    try:
        network = system.network = start_network() if faults else None

        def route(name: str, upstream: str) -> str:
            return network.add(name, upstream) if network is not None else upstream

        coord_address = f"127.0.0.1:{free_port()}"
        standby_addresses = [f"127.0.0.1:{free_port()}" for _ in range(standbys)]
        worker_addresses = {w: f"127.0.0.1:{free_port()}" for w in worker_ids}
        agent_routes = {}
        for i, cluster in enumerate(clusters, 1):
            cluster.create_branch_role()
            name = f"shard{i}"
            listen = f"127.0.0.1:{free_port()}"
            system.participants[name] = participant_daemon(
                name,
                listen,
                cluster.dsn_via(route(f"{name}_postgres", f"127.0.0.1:{cluster.port}")),
                # Every process of the coordinator id: the agent asks whichever is active.
                {
                    coordinator_id: ",".join(
                        [route(f"{name}_coordinator", coord_address), *standby_addresses]
                    ),
                    **worker_addresses,
                },
                workdir / "logs" / f"{name}.log",
                # Branch statements as a least-privilege role, never the superuser.
                ["--branch-role", BRANCH_ROLE, *(participant_args or [])],
                tls(name),
            )
            agent_routes[name] = route(f"coordinator_{name}", listen)
        system.client_address = route("client_coordinator", coord_address)
        system.coordinator = coordinator_daemon(
            coordinator_id,
            coord_address,
            log or workdir / "decisions.sqlite",
            agent_routes,
            workdir / "logs" / "coordinator.log",
            coordinator_args,
            tls(coordinator_id),
        )
        for i, address in enumerate(standby_addresses):
            system.standbys.append(
                coordinator_daemon(
                    coordinator_id,
                    address,
                    log or "",
                    agent_routes,
                    workdir / "logs" / f"coordinator-standby{i + 1}.log",
                    coordinator_args,
                    tls(coordinator_id),
                )
            )
        for worker, address in worker_addresses.items():
            system.workers.append(
                coordinator_daemon(
                    worker,
                    address,
                    workdir / f"decisions-{worker}.sqlite",
                    agent_routes,
                    workdir / "logs" / f"coordinator-{worker}.log",
                    coordinator_args,
                    tls(worker),
                )
            )
        if start_daemons:
            start_all(system)
    except BaseException:
        system.stop()
        raise
    return system


def issue_credentials(
    out: Path, coordinator_ids: list[str], shards: list[str]
) -> dict[str, TlsConfig]:
    """A fresh CA and a certificate for each coordinator, each agent and each client."""
    identities = [
        *(certs.Identity("coordinator", c) for c in coordinator_ids),
        *(certs.Identity("participant", s) for s in shards),
        *(certs.Identity("client", c) for c in CLIENTS),
    ]
    return {
        name: TlsConfig(f.cert, f.key, f.ca) for name, f in certs.issue(out, identities).items()
    }


def start_all(system: LocalSystem) -> None:
    with ThreadPoolExecutor(len(system.participants) or 1) as pool:
        for future in [pool.submit(d.start) for d in system.participants.values()]:
            future.result()
    assert system.coordinator is not None
    system.coordinator.start()
    for standby in system.standbys:
        standby.start(wait=False)
        standby.wait_ready(serving=False)
    for worker in system.workers:
        worker.start()
