"""Throw-away local PostgreSQL clusters for the tests, the demo and the benchmarks.

Each cluster is made with `initdb` in a work folder, listens on a free loopback port,
has `max_prepared_transactions` set, and is started and stopped with `pg_ctl`. The
server binaries come from `pg_config --bindir` or Debian's /usr/lib/postgresql/*/bin.
PostgreSQL refuses to run as root, so when we are root every server command runs as
the `postgres` system user and the data folders belong to it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: install them with "
    "`apt-get install -y postgresql` (Debian/Ubuntu), or put their folder on PATH"
)


class HarnessError(RuntimeError):
    """The local test infrastructure could not be set up."""


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free loopback port for a server to bind later. It is taken from below the
    kernel's ephemeral range, so that no outgoing connection (nor a proxy listening on
    port 0) can grab it between now and the bind."""
    low = _ephemeral_range()[0]
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(15000, max(15001, low))
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise HarnessError("no free port below the ephemeral range")


def find_bindir() -> Path:
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb") or "").parent)
    for path in candidates:
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    raise HarnessError(INSTALL_HINT)


def _server_user() -> str | None:
    """The user to run servers as: `postgres` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise HarnessError(
            "running as root and there is no `postgres` user to run PostgreSQL as "
            "(installing the postgresql package creates it)"
        ) from None
    return "postgres"


def _as_server_user(cmd: list[str]) -> list[str]:
    user = _server_user()
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def _give_to_server_user(path: Path) -> None:
    user = _server_user()
    if user:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


@dataclass
class PostgresCluster:
    name: str
    datadir: Path
    port: int
    bindir: Path
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def dsn(self) -> str:
        return self.dsn_via(f"127.0.0.1:{self.port}")

    @staticmethod
    def dsn_via(address: str) -> str:
        """The DSN of this cluster reached at `address` (for example through a proxy)."""
        host, _, port = address.rpartition(":")
        return f"host={host} port={port} user=postgres dbname=postgres connect_timeout=5"

    @property
    def logfile(self) -> Path:
        return self.datadir.parent / f"{self.name}.log"

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _as_server_user([str(self.bindir / args[0]), *args[1:]]),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def init(self) -> None:
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        _give_to_server_user(self.datadir.parent)
        done = self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        if done.returncode != 0:
            raise HarnessError(f"initdb {self.name} failed: {done.stderr.strip()}")
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "max_prepared_transactions": "1000",
            "max_connections": "300",
            "shared_buffers": "64MB",
            "logging_collector": "off",
            **self.settings,
        }
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())

    def start(self) -> None:
        done = self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60", "start"
        )
        if done.returncode != 0:
            tail = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise HarnessError(f"pg_ctl start {self.name} failed: {done.stderr.strip()}\n{tail}")

    def create_branch_role(self) -> None:
        """The least-privilege role agents run branch statements as (README "Database
        roles"): the application's rights on its tables in schema public, none on the
        agent's schema twopc, no CREATE anywhere (a function it could create might
        call set_config('role', ...), which PostgreSQL checks against the agent's
        session user). Idempotent."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for statement in BRANCH_ROLE_SQL:
                conn.execute(statement)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `immediate` is a crash (no checkpoint, recovery at start)."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise HarnessError(f"PostgreSQL {self.name} did not accept connections in {timeout}s")


def start_replica(primary: PostgresCluster, name: str, synchronous: bool = True) -> PostgresCluster:
    """A streaming replica of `primary` (pg_basebackup), started; with `synchronous`,
    the primary waits for it at every commit (`synchronous_standby_names = '*'`), so
    that a commit the primary acknowledged survives the primary's loss."""
    replica = PostgresCluster(
        name=name,
        datadir=primary.datadir.parent.parent / name / "data",
        port=free_port(),
        bindir=primary.bindir,
        settings=dict(primary.settings),
    )
    replica.datadir.parent.mkdir(parents=True, exist_ok=True)
    _give_to_server_user(replica.datadir.parent)
    done = replica._run(
        "pg_basebackup",
        "-h",
        "127.0.0.1",
        "-p",
        str(primary.port),
        "-U",
        "postgres",
        "-D",
        str(replica.datadir),
        "-R",
        "-X",
        "stream",
        "-c",
        "fast",
    )
    if done.returncode != 0:
        raise HarnessError(f"pg_basebackup for {name} failed: {done.stderr.strip()}")
    with open(replica.datadir / "postgresql.auto.conf", "a") as f:
        f.write(f"port = {replica.port}\n")
    replica.start()
    if synchronous:
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
                ).fetchone()
                if row and row[0]:
                    break
                time.sleep(0.1)
            else:
                raise HarnessError(f"{name} did not become a synchronous standby in 30s")
    return replica


def promote(replica: PostgresCluster) -> None:
    """Make a replica the primary (`pg_ctl promote`), waiting until it accepts writes."""
    done = replica._run("pg_ctl", "-D", str(replica.datadir), "-w", "-t", "60", "promote")
    if done.returncode != 0:
        raise HarnessError(f"pg_ctl promote {replica.name} failed: {done.stderr.strip()}")


BRANCH_ROLE = "twopc_app"
BRANCH_ROLE_SQL = [
    f"""DO $$ BEGIN CREATE ROLE {BRANCH_ROLE} NOLOGIN;
        EXCEPTION WHEN duplicate_object THEN NULL; END $$""",
    f"GRANT USAGE ON SCHEMA public TO {BRANCH_ROLE}",
    f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {BRANCH_ROLE}",
    f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {BRANCH_ROLE}",
    # Tables the tests and the demo create later (as the cluster's superuser).
    "ALTER DEFAULT PRIVILEGES IN SCHEMA public "
    f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {BRANCH_ROLE}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA public "
    f"GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {BRANCH_ROLE}",
]


def start_clusters(
    count: int,
    workdir: Path | None = None,
    settings: dict[str, str] | None = None,
    prefix: str = "shard",
) -> list[PostgresCluster]:
    """Create and start `count` clusters under `workdir` (default: a new folder of
    their own, which nothing else will chmod under them, unlike pytest's temp root);
    stop and remove them with `stop_clusters`."""
    bindir = find_bindir()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="twopc-pg-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # The server user must be able to reach its folders through every parent.
    for parent in [workdir, *workdir.parents]:
        if parent == Path("/"):
            break
        mode = parent.stat().st_mode
        if not mode & 0o001 and _server_user():
            os.chmod(parent, mode | 0o011)
    clusters = []
    try:
        for i in range(1, count + 1):
            cluster = PostgresCluster(
                name=f"{prefix}{i}",
                datadir=workdir / f"{prefix}{i}" / "data",
                port=free_port(),
                bindir=bindir,
                settings=dict(settings or {}),
            )
            cluster.init()
            clusters.append(cluster)
            cluster.start()
    except BaseException:
        stop_clusters(clusters)
        raise
    return clusters


def stop_clusters(clusters: list[PostgresCluster], remove: bool = True) -> None:
    for cluster in clusters:
        if cluster.datadir.exists():
            cluster.stop("immediate")
            if remove:
                shutil.rmtree(cluster.datadir.parent, ignore_errors=True)
    if remove and clusters:
        # The folder start_clusters made, once empty.
        with contextlib.suppress(OSError):
            clusters[0].datadir.parent.parent.rmdir()
