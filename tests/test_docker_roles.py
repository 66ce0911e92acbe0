"""The database roles of the Docker deployment, on real PostgreSQL: the SQL of
docker/initdb/ (run by psql, as the image's entrypoint would) gives roles with which
the agents start (logging in as `twopc_agent`, branches as `bank_app`) and the bank demo
runs and checks its transfers (as `bank_demo`, DSNs from files): no superuser needed.
No Docker engine runs here, so the rest of docker/ is checked by tests/test_docker.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import COORDINATOR_ARGS, PARTICIPANT_ARGS
from twopc_harness.daemons import DaemonTls, coordinator_daemon, participant_daemon
from twopc_harness.postgres import PostgresCluster, free_port, start_clusters, stop_clusters
from twopc_harness.system import ADMIN, issue_credentials

SCRIPT = Path(__file__).resolve().parent.parent / "docker" / "initdb" / "10-agent-role.sh"
DATABASE = "bank"


@pytest.fixture(scope="module")
def docker_like_clusters() -> Iterator[list[PostgresCluster]]:
    """Clusters of their own: the script creates cluster-wide roles."""
    started = start_clusters(2, prefix="roles")
    yield started
    stop_clusters(started)


def initdb_sql() -> tuple[str, list[str]]:
    """The SQL the script feeds psql, and the psql variables it sets."""
    text = SCRIPT.read_text()
    sql = text.split("<<'SQL'\n", 1)[1].rsplit("\nSQL", 1)[0]
    variables = re.findall(r'-v (\w+)="\$\(cat /run/secrets/[\w-]+\)"', text)
    assert variables, "the script sets its passwords from secret files"
    return sql, variables


def apply_initdb(cluster: PostgresCluster) -> None:
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DATABASE}")
    sql, variables = initdb_sql()
    done = subprocess.run(
        [
            str(cluster.bindir / "psql"),
            "-v",
            "ON_ERROR_STOP=1",
            *[arg for v in variables for arg in ("-v", f"{v}=demo-{v}")],
            f"host=127.0.0.1 port={cluster.port} user=postgres dbname={DATABASE}",
        ],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def dsn(cluster: PostgresCluster, user: str) -> str:
    return f"host=127.0.0.1 port={cluster.port} user={user} dbname={DATABASE} connect_timeout=5"


def test_the_deployments_roles_run_the_agents_and_the_demo_without_a_superuser(
    docker_like_clusters: list[PostgresCluster], tmp_path: Path
) -> None:
    shards = {f"shard{i}": c for i, c in enumerate(docker_like_clusters, 1)}
    for cluster in shards.values():
        apply_initdb(cluster)
    with psycopg.connect(dsn(shards["shard1"], "postgres")) as conn:
        logins = conn.execute(
            "SELECT rolname, rolsuper FROM pg_roles WHERE rolname IN "
            "('twopc_agent', 'bank_app', 'bank_demo') ORDER BY rolname"
        ).fetchall()
    assert logins == [("bank_app", False), ("bank_demo", False), ("twopc_agent", False)]
    credentials = issue_credentials(tmp_path / "certs", ["coord1"], list(shards))
    admin = credentials[ADMIN]
    coordinator_address = f"127.0.0.1:{free_port()}"
    agents = {}
    for name, cluster in shards.items():
        dsn_file = tmp_path / f"{name}-agent.dsn"
        dsn_file.write_text(dsn(cluster, "twopc_agent") + " password=demo-agent_password\n")
        listen = f"127.0.0.1:{free_port()}"
        agents[name] = participant_daemon(
            name,
            listen,
            "",
            {"coord1": coordinator_address},
            tmp_path / "logs" / f"{name}.log",
            [*PARTICIPANT_ARGS, "--branch-role", "bank_app"],
            DaemonTls(credentials[name], admin, ADMIN),
        )
        # As in docker/compose.yaml: the DSN from a file, not the command line.
        argv = agents[name].argv
        argv[argv.index("--dsn") : argv.index("--dsn") + 2] = ["--dsn-file", str(dsn_file)]
    coordinator = coordinator_daemon(
        "coord1",
        coordinator_address,
        tmp_path / "decisions.sqlite",
        {name: agent.address for name, agent in agents.items()},
        tmp_path / "logs" / "coordinator.log",
        COORDINATOR_ARGS,
        DaemonTls(credentials["coord1"], admin, ADMIN),
    )
    try:
        for agent in agents.values():
            agent.start()
        coordinator.start()
        demo_files = []
        for name, cluster in shards.items():
            path = tmp_path / f"{name}-demo.dsn"
            path.write_text(dsn(cluster, "bank_demo") + " password=demo-demo_password\n")
            demo_files.append(f"--shard-dsn-file={name}={path}")
        app = credentials["app"]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bank_demo",
                "run",
                "--coordinator",
                coordinator_address,
                *demo_files,
                f"--tls-cert={app.cert}",
                f"--tls-key={app.key}",
                f"--tls-ca={app.ca}",
                "--faults",
                "none",
                "--duration",
                "3",
                "--accounts",
                "20",
                "--out",
                str(tmp_path / "demo"),
                "--quiet",
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads((tmp_path / "demo" / "report.json").read_text())
        assert report["passed"] and report["figures"]["committed_two_phase"] > 0
        assert "demo-demo_password" not in done.stdout + done.stderr
    finally:
        coordinator.stop()
        for agent in agents.values():
            agent.stop()
    with psycopg.connect(dsn(shards["shard1"], "postgres")) as conn:
        owners: dict[str, str] = dict(
            conn.execute(
                "SELECT c.relname, r.rolname FROM pg_class c JOIN pg_roles r "
                "ON r.oid = c.relowner JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind = 'r' AND n.nspname IN ('public', 'twopc')"
            ).fetchall()
        )
    assert owners["accounts"] == "bank_demo" and owners["branch_marker"] == "twopc_agent"
