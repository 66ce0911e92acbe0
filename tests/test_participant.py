"""The participant agent against real PostgreSQL: start-up checks, the silent-rollback
trap, idempotent phase 2, and late messages after an abort."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import psycopg
import pytest

from participant.branch_sql import BranchFailed
from participant.config import ParticipantConfig
from participant.schema import MARKER_TABLE
from participant.store import Store
from tests.conftest import SystemFactory
from twopc_common.isolation import Isolation
from twopc_common.values import Statement
from twopc_harness.daemons import wait_until
from twopc_harness.postgres import free_port, start_clusters, stop_clusters
from twopc_harness.system import LocalSystem
from twopc_pb import participant_pb2 as ppb
from twopc_pb import participant_pb2_grpc as pgrpc
from twopc_pb import types_pb2 as tpb


def run_agent(dsn: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "participant",
            "--id",
            "p1",
            "--dsn",
            dsn,
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--insecure",  # allowed: loopback
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_agent_refuses_a_database_without_prepared_transactions() -> None:
    clusters = start_clusters(1, None, {"max_prepared_transactions": "0"}, "noprep")
    try:
        done = run_agent(clusters[0].dsn)
    finally:
        stop_clusters(clusters)
    assert done.returncode != 0
    assert "max_prepared_transactions is 0" in done.stderr


def test_agent_says_clearly_when_the_database_does_not_answer() -> None:
    done = run_agent(f"host=127.0.0.1 port={free_port()} user=postgres connect_timeout=2")
    assert done.returncode != 0
    assert "cannot connect" in done.stderr


def test_agent_creates_its_marker_table(system: LocalSystem) -> None:
    for shard in system.shard_names:
        with system.connect(shard) as conn:
            row = conn.execute("SELECT to_regclass(%s)", (MARKER_TABLE,)).fetchone()
        assert row == (MARKER_TABLE,)


def test_prepare_of_a_failed_transaction_is_refused_not_silently_rolled_back(
    system: LocalSystem,
) -> None:
    async def scenario() -> None:
        store = Store(ParticipantConfig(id="trap", dsn=system.dsn("shard1"), pool_min_size=1))
        await store.open()
        try:
            conn = await store.branches.connect_branch(Isolation.READ_COMMITTED)
            with pytest.raises(BranchFailed, match="division by zero"):
                await store.branches.execute(conn, [Statement("SELECT 1 / 0")])
            with pytest.raises(BranchFailed, match="already failed"):
                await store.branches.prepare(conn, [], "trap.1.1", "trap")
            await store.branches.rollback(conn)
            await store.branches.release(conn)
            assert (await store.control.prepared_branches("trap")).ours == ()
        finally:
            await store.close()

    asyncio.run(scenario())


def test_commit_and_abort_are_idempotent_and_exact(system: LocalSystem) -> None:
    txid = "agenttest.999.1"  # no running coordinator: its in-doubt scan stays away
    insert = tpb.Statement(sql="INSERT INTO ledger VALUES ('idem', 'debit', 1, 1)")
    with system.participant_channel("shard1") as channel:
        agent = pgrpc.ParticipantStub(channel)
        vote = agent.Prepare(ppb.PrepareRequest(transaction_id=txid, statements=[insert]))
        assert vote.vote == ppb.YES
        listed = agent.ListPrepared(ppb.ListPreparedRequest(coordinator_id="agenttest"))
        assert [b.transaction_id for b in listed.branches] == [txid]
        assert agent.Commit(ppb.BranchRef(transaction_id=txid)).changed
        assert not agent.Commit(ppb.BranchRef(transaction_id=txid)).changed  # a retry
        # A second transaction aborted before its Prepare arrived: the late Prepare
        # must vote NO instead of preparing a branch nobody will finish.
        late = "agenttest.999.2"
        assert not agent.Abort(ppb.BranchRef(transaction_id=late)).changed
        vote = agent.Prepare(ppb.PrepareRequest(transaction_id=late, statements=[insert]))
        assert vote.vote == ppb.NO and "aborted" in vote.reason
    with system.connect("shard1") as conn:
        rows = conn.execute("SELECT count(*) FROM ledger WHERE transfer_id = 'idem'").fetchone()
    assert rows == (1,)
    assert not any(system.prepared_transactions().values())


def test_commit_and_abort_answer_the_state_they_left_the_branch_in(system: LocalSystem) -> None:
    """Each phase-2 answer is an outcome, the other final state included (status OK);
    only real errors are status codes."""
    committed, rolled_back, open_branch, never = (f"agenttest.999.{i}" for i in (3, 4, 5, 6))

    def row(tag: str) -> tpb.Statement:
        return tpb.Statement(sql=f"INSERT INTO ledger VALUES ('{tag}', 'debit', 1, 1)")

    with system.participant_channel("shard1") as channel:
        agent = pgrpc.ParticipantStub(channel)

        def commit(txid: str) -> ppb.Ack:
            answer: ppb.Ack = agent.Commit(ppb.BranchRef(transaction_id=txid))
            return answer

        def abort(txid: str) -> ppb.Ack:
            answer: ppb.Ack = agent.Abort(ppb.BranchRef(transaction_id=txid))
            return answer

        for txid, tag in ((committed, "answer-c"), (rolled_back, "answer-r")):
            vote = agent.Prepare(ppb.PrepareRequest(transaction_id=txid, statements=[row(tag)]))
            assert vote.vote == ppb.YES
        agent.Execute(
            ppb.BranchExecuteRequest(transaction_id=open_branch, statements=[row("answer-o")])
        )
        assert [commit(committed).outcome, commit(committed).outcome, abort(committed).outcome] == [
            ppb.PHASE2_COMMITTED,
            ppb.PHASE2_ALREADY_COMMITTED,
            ppb.PHASE2_ALREADY_COMMITTED,  # the other final state: an answer, not an error
        ]
        assert [abort(rolled_back).outcome, abort(rolled_back).outcome] == [
            ppb.PHASE2_ROLLED_BACK,
            ppb.PHASE2_ALREADY_ROLLED_BACK,
        ]
        assert commit(rolled_back).outcome == ppb.PHASE2_ALREADY_ROLLED_BACK  # fenced by the repeat
        assert commit(never).outcome == ppb.PHASE2_NOT_PREPARED  # no trace: no fence written
        assert commit(never).outcome == ppb.PHASE2_NOT_PREPARED
        assert abort(never).outcome == ppb.PHASE2_ALREADY_ROLLED_BACK  # fenced now
        assert commit(never).outcome == ppb.PHASE2_ALREADY_ROLLED_BACK
        # `changed` stays for older coordinators: true only where this call did it.
        assert [commit(committed).changed, abort(never).changed] == [False, False]
        # A Commit of a branch still open is refused (an error, nothing ran); an Abort
        # rolls it back.
        with pytest.raises(grpc.RpcError) as caught:
            commit(open_branch)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not prepared" in (caught.value.details() or "")
        rolled = abort(open_branch)
        assert (rolled.outcome, rolled.changed) == (ppb.PHASE2_ROLLED_BACK, True)
    with system.connect("shard1") as conn:
        tags = conn.execute(
            "SELECT transfer_id FROM ledger WHERE transfer_id LIKE 'answer-%'"
        ).fetchall()
    assert tags == [("answer-c",)]
    assert not any(system.prepared_transactions().values())


def test_an_abort_fences_a_branch_still_in_flight(system: LocalSystem) -> None:
    """An Abort that finds nothing prepared writes a fence: a one-phase commit of the
    same branch arriving later (an orphaned backend, delayed bytes) must fail."""
    txid = "shared.999.3"
    with system.participant_channel("shard1") as channel:
        agent = pgrpc.ParticipantStub(channel)
        assert not agent.Abort(ppb.BranchRef(transaction_id=txid)).changed

    async def orphan() -> None:
        store = Store(ParticipantConfig(id="shard1", dsn=system.dsn("shard1"), pool_min_size=1))
        await store.open()
        try:
            conn = await store.branches.connect_branch(Isolation.READ_COMMITTED)
            await store.branches.execute(
                conn, [Statement("INSERT INTO ledger VALUES ('orphan', 'debit', 1, 1)")]
            )
            with pytest.raises(BranchFailed, match="branch_marker_pkey"):
                await store.branches.commit_one_phase(conn, [], txid, "shard1")
            await store.branches.rollback(conn)
            await store.branches.release(conn)
        finally:
            await store.close()

    asyncio.run(orphan())
    with system.connect("shard1") as conn:
        assert conn.execute(
            "SELECT count(*) FROM ledger WHERE transfer_id = 'orphan'"
        ).fetchone() == (0,)


def test_a_prepare_whose_caller_gave_up_still_finishes_and_abort_tells_the_truth(
    make_system: SystemFactory,
) -> None:
    """gRPC cancels a handler whose deadline passed. The agent must not be cut off
    halfway: the one-phase branch commits once its lock frees, and an Abort (the
    coordinator's fence) then reports it committed instead of 'rolled back'."""
    system = make_system(participant_args=["--lock-timeout", "30"])
    txid = f"{system.coordinator.name if system.coordinator else 'x'}.999.7"
    with system.connect("shard1") as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS shield_rows (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO shield_rows VALUES (1, 0) ON CONFLICT DO NOTHING")
    update = tpb.Statement(sql="UPDATE shield_rows SET v = v + 1 WHERE id = 1")
    blocker = psycopg.connect(system.dsn("shard1"))
    blocker.execute("SELECT 1 FROM shield_rows WHERE id = 1 FOR UPDATE")
    with system.participant_channel("shard1") as channel:
        agent = pgrpc.ParticipantStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            agent.Prepare(
                ppb.PrepareRequest(transaction_id=txid, statements=[update], one_phase=True),
                timeout=1.0,
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        blocker.rollback()
        blocker.close()

        def committed() -> bool:
            with system.connect("shard1") as conn:
                return conn.execute("SELECT v FROM shield_rows WHERE id = 1").fetchone() == (1,)

        wait_until(committed, 15, "the abandoned one-phase branch to commit")
        answer = agent.Abort(ppb.BranchRef(transaction_id=txid))
        assert answer.outcome == ppb.PHASE2_ALREADY_COMMITTED
