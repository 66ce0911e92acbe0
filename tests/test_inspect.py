"""The operator's view: `twopc-coordinator inspect` lists commits awaiting phase 2 from
the log, live transactions from the coordinator and in-doubt branches from agents."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from coordinator.client import Statement
from coordinator.decision_log import DecisionLog
from tests.conftest import SystemFactory, tls_args
from tests.fix_cli import assert_one_line_error
from twopc_harness.daemons import wait_until
from twopc_harness.postgres import free_port


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


def test_retries_of_a_stuck_commit_leave_the_agent_room_to_scan(make_system: SystemFactory) -> None:
    """A branch hung in COMMIT PREPARED, and the coordinator retrying its Commit
    (every call times out): each retry waits for the first attempt instead of taking
    another of the agent's control connections (3), so the agent can still list its
    in-doubt branches for the operator and for recovery."""
    system = make_system(["--allow-failpoints", "--rpc-timeout", "0.5"], ["--allow-failpoints"])
    assert system.coordinator is not None
    shard1 = system.participants["shard1"]
    shard1.set_failpoints("participant.before_commit_prepared=hang")
    work = {s: [Statement("SELECT pg_current_xact_id()")] for s in ("shard1", "shard2")}
    with system.client() as client:
        outcome = client.run(work)
        assert outcome.committed
        wait_until(
            lambda: client.status().counters["phase2_retries"] >= 5,
            30,
            "the coordinator to retry the stuck Commit more times than the agent has connections",
        )
    done = inspect(
        "--log",
        str(system.workdir / "decisions.sqlite"),
        "--coordinator",
        system.client_address,
        f"--participant=shard1={shard1.address}",
        *tls_args(system, system.coordinator_id),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    in_doubt = json.loads(done.stdout)["in_doubt"]["shard1"]
    assert [b["transaction_id"] for b in in_doubt] == [outcome.transaction_id]
    shard1.set_failpoints("participant.before_commit_prepared=off")
    wait_until(lambda: not any(system.prepared_transactions().values()), 20, "phase 2")


def test_inspect_refuses_a_file_that_is_not_a_decision_log() -> None:
    done = inspect("--log", "/dev/null")
    assert done.returncode != 0
    assert "not a decision log" in done.stderr


def test_inspect_on_a_missing_log_says_so_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "decisions.sqlite"
    done = inspect("--log", str(missing))
    assert_one_line_error(done, "twopc-coordinator inspect", f"no decision log at {missing}", 2)
    assert not missing.exists()
    in_missing_folder = tmp_path / "nowhere" / "decisions.sqlite"
    done = inspect("--log", str(in_missing_folder))
    assert_one_line_error(done, "twopc-coordinator inspect", "does not exist either", 2)
    assert not in_missing_folder.parent.exists()


def test_inspect_prints_plain_text_and_fails_when_a_source_is_unreachable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "decisions.sqlite"
    log = DecisionLog(str(path), "c1")
    log.open()
    log.close()
    before = path.read_bytes()
    coordinator, agent = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    args = ["--log", str(path), "--coordinator", coordinator, "--participant", f"p1={agent}"]
    done = inspect(*args)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "{" not in done.stdout and "'" not in done.stdout, done.stdout
    assert "coordinator c1, epoch 1; log holds no transactions" in done.stdout
    assert f"in flight (coordinator): unreachable (UNAVAILABLE at {coordinator}" in done.stdout
    assert f"in doubt on p1: unreachable (UNAVAILABLE at {agent}" in done.stdout
    assert_one_line_error(
        done, "twopc-coordinator inspect", "could not reach coordinator, participant p1", 1
    )
    as_json = inspect(*args, "--json")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["epoch"] == 1 and report["log_counts"] == {}
    assert path.read_bytes() == before, "inspect wrote to the log"
