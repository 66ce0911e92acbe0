"""The operator's view: `twopc-coordinator inspect` lists commits awaiting phase 2 from
the log, live transactions from the coordinator and in-doubt branches from agents."""

from __future__ import annotations

import json
import subprocess
import sys

from coordinator.client import Statement
from tests.conftest import SystemFactory, tls_args
from twopc_harness.daemons import wait_until


def inspect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_inspect_shows_a_commit_stuck_in_phase_two_everywhere(make_system: SystemFactory) -> None:
    system = make_system(["--allow-failpoints"], ["--allow-failpoints"])
    assert system.coordinator is not None
    for agent in system.participants.values():
        agent.set_failpoints("participant.before_commit_prepared=hang")
    work = {s: [Statement("SELECT pg_current_xact_id()")] for s in ("shard1", "shard2")}
    with system.client() as client:
        outcome = client.run(work)
    assert outcome.committed
    log = str(system.workdir / "decisions.sqlite")
    args = [
        "--log",
        log,
        "--coordinator",
        system.client_address,
        *[f"--participant={n}={d.address}" for n, d in system.participants.items()],
        *tls_args(system, system.coordinator_id),
    ]
    done = inspect(*args, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    txid = outcome.transaction_id
    assert report["coordinator_id"] == txid.split(".")[0]
    assert [t["transaction_id"] for t in report["committing_in_log"]] == [txid]
    (live,) = [t for t in report["in_flight"] if t["transaction_id"] == txid]
    assert live["state"] == "committing" and sorted(live["pending_acks"]) == ["shard1", "shard2"]
    assert [b["transaction_id"] for b in report["in_doubt"]["shard1"]] == [txid]
    assert report["in_doubt"]["shard3"] == []
    text = inspect(*args)
    assert text.returncode == 0 and txid in text.stdout
    for agent in system.participants.values():
        agent.set_failpoints("participant.before_commit_prepared=off")
    wait_until(lambda: not any(system.prepared_transactions().values()), 20, "phase 2")


def test_inspect_refuses_a_file_that_is_not_a_decision_log() -> None:
    done = inspect("--log", "/dev/null")
    assert done.returncode != 0
    assert "not a decision log" in done.stderr
