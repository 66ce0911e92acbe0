"""Heuristic resolution: when a coordinator and its log are gone, the operator can
commit or roll back a prepared branch by hand, but only while the coordinator does not
answer, with an audit record on the shard; a returning coordinator reports the
decision that contradicts its log (a heuristic hazard) in its log, its metrics and
`inspect`."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from coordinator.client import TransportError
from tests.conftest import SystemFactory, create_tagged_rows, rows, tagged_inserts, tls_args
from twopc_common.failpoints import FAILPOINT_EXIT_CODE
from twopc_harness.daemons import wait_until
from twopc_harness.postgres import free_port
from twopc_harness.system import ADMIN, LocalSystem


def resolve(
    system: LocalSystem, txid: str, *flags: str, tls: bool = True
) -> subprocess.CompletedProcess[str]:
    coordinator = system.coordinator
    assert coordinator is not None
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "participant",
            "resolve",
            "--dsn",
            system.dsn("shard1"),
            "--txid",
            txid,
            "--coordinator",
            f"{coordinator.name}={coordinator.address}",
            "--operator",
            "alice",
            "--timeout",
            "2",
            *(tls_args(system, ADMIN) if tls else []),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def prepared_txids(system: LocalSystem, shard: str) -> list[str]:
    with system.connect(shard) as conn:
        return [x.gtrid for x in conn.tpc_recover()]


def audit_rows(system: LocalSystem) -> list[tuple[object, ...]]:
    with system.connect("shard1") as conn:
        return conn.execute(
            "SELECT transaction_id, decision, reason, operator, state, coordinator_check "
            "FROM twopc_heuristic_decision ORDER BY id"
        ).fetchall()


def test_heuristic_commit_after_the_log_was_lost_is_audited_and_reported(
    make_system: SystemFactory,
) -> None:
    system = make_system(coordinator_args=["--allow-failpoints"])
    coordinator, shard1 = system.coordinator, system.participants["shard1"]
    assert coordinator is not None
    create_tagged_rows(system)
    # The coordinator dies with both branches prepared and nothing decided.
    coordinator.stop()
    coordinator.start(env={"TWOPC_FAILPOINTS": "coordinator.after_votes_before_decision=crash"})
    with system.client() as client, pytest.raises(TransportError):
        client.run(tagged_inserts("heuristic", ("shard1", "shard2")))
    assert coordinator.wait_exit(30) == FAILPOINT_EXIT_CODE
    (txid,) = prepared_txids(system, "shard1")
    # shard1's agent is down too, so nothing resolves its branch on its own.
    shard1.stop()
    coordinator.start()

    # Refused while the coordinator answers: it knows the outcome (presumed abort).
    refused = resolve(system, txid, "--commit", "--reason", "customer was charged")
    assert refused.returncode == 1, refused
    assert "knows the outcome" in refused.stderr and "UNKNOWN" in refused.stderr, refused.stderr
    assert prepared_txids(system, "shard1") == [txid]
    assert "--reason" in resolve(system, txid, "--commit", "--reason", " ").stderr
    # Without the TLS flags the coordinator cannot be asked (its handshake fails), but
    # it still listens: that is no proof it is gone.
    blind = resolve(system, txid, "--commit", "--reason", "customer was charged", tls=False)
    assert blind.returncode == 1, blind
    assert "something accepts connections" in blind.stderr, blind.stderr
    assert prepared_txids(system, "shard1") == [txid]

    # The coordinator's machine is gone, and its decision log with it (a coordinator
    # on an empty log refuses to start while participants remember its epochs).
    coordinator.stop()
    lost = Path(system.workdir) / "lost"
    lost.mkdir()
    for path in Path(system.workdir).glob("decisions.sqlite*"):
        path.rename(lost / path.name)

    # Accepted once it does not answer; recorded before it acts.
    coordinator.stop()
    accepted = resolve(system, txid, "--commit", "--reason", "customer was charged")
    assert accepted.returncode == 0, accepted.stderr
    assert prepared_txids(system, "shard1") == []
    assert rows(system, "heuristic")["shard1"] == 1
    ((audit_txid, decision, reason, operator, state, check),) = audit_rows(system)
    assert (audit_txid, decision, reason, operator, state) == (
        txid,
        "commit",
        "customer was charged",
        "alice",
        "applied",
    )
    assert str(check).startswith("unreachable")
    # Nothing left to resolve: a second attempt is refused before anything is recorded.
    again = resolve(system, txid, "--abort", "--reason", "changed my mind")
    assert again.returncode == 1 and "no prepared branch" in again.stderr
    assert len(audit_rows(system)) == 1

    # The log is found after all and the coordinator returns. It has no record of
    # txid (presumed abort): the heuristic commit contradicts it, and it says so.
    for path in lost.iterdir():
        path.rename(Path(system.workdir) / path.name)
    shard1.start()
    metrics = f"127.0.0.1:{free_port()}"
    coordinator.argv += ["--metrics", metrics]
    coordinator.start()

    def hazards() -> float:
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        line = next(
            ln
            for ln in text.splitlines()
            if ln.startswith("twopc_coordinator_heuristic_hazard_branches ")
        )
        return float(line.split()[1])

    wait_until(lambda: hazards() == 1, 30, "the heuristic hazard in the metrics")
    assert f"event=heuristic_hazard txid={txid} participant=shard1" in coordinator.log_tail(20000)

    def inspect(*flags: str) -> str:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "coordinator",
                "inspect",
                "--log",
                str(Path(system.workdir) / "decisions.sqlite"),
                "--participant",
                f"shard1={shard1.address}",
                *tls_args(system, system.coordinator_id),
                *flags,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout

    text = inspect()
    assert "heuristic decisions on shard1: 1 (1 HAZARD)" in text, text
    assert txid in text and "customer was charged" in text
    (shown,) = json.loads(inspect("--json"))["heuristic"]["shard1"]
    assert shown["transaction_id"] == txid
    assert shown["decision"] == "commit" and shown["hazard"] is True
    assert shown["operator"] == "alice" and shown["reason"] == "customer was charged"
    assert shown["logged"] == "unknown"


def test_a_commit_that_finds_its_branch_rolled_back_by_hand_is_a_heuristic_hazard(
    make_system: SystemFactory,
) -> None:
    """Phase 2 answers are typed: a Commit that finds its branch neither prepared nor
    committed is answered NOT_PREPARED, which the coordinator must report as a hazard
    (and stop retrying), never take for an acknowledgement."""
    system = make_system(coordinator_args=["--allow-failpoints"])
    coordinator = system.coordinator
    assert coordinator is not None
    create_tagged_rows(system)
    # COMMIT is logged, then the coordinator dies before phase 2.
    coordinator.stop()
    coordinator.start(env={"TWOPC_FAILPOINTS": "coordinator.after_decision_logged=crash"})
    with system.client() as client, pytest.raises(TransportError):
        client.run(tagged_inserts("by-hand", ("shard1", "shard2")))
    assert coordinator.wait_exit(30) == FAILPOINT_EXIT_CODE
    (txid,) = prepared_txids(system, "shard1")
    # Someone rolls shard1's branch back by hand, outside twopc (no audit row, no fence).
    with system.connect("shard1") as conn:
        (gid,) = [x for x in conn.tpc_recover() if x.gtrid == txid]
        conn.tpc_rollback(gid)
    coordinator.start()

    hazard = f"event=heuristic_hazard txid={txid} participant=shard1 outcome=not_prepared"
    wait_until(lambda: hazard in coordinator.log_tail(20000), 30, "the hazard in the log")
    wait_until(lambda: rows(system, "by-hand")["shard2"] == 1, 30, "shard2's commit")
    assert rows(system, "by-hand") == {"shard1": 0, "shard2": 1, "shard3": 0}
    assert prepared_txids(system, "shard1") == [] and prepared_txids(system, "shard2") == []
    with system.client() as client:

        def completed() -> bool:
            status = client.get_transaction(txid)
            return status.outcome == "committed" and status.pending_acks == ()

        # Complete: the hazard ends the Commit's delivery, it is not retried forever.
        wait_until(completed, 30, "the transaction to complete")
