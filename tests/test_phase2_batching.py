"""Batched phase 2: the agent's Finish answers each decision on its own, and the
coordinator's client folds concurrent decisions into few Finish calls.

Transaction ids here name coordinators nobody runs ("batching5" to "batching8", one per
test, since agents refuse a branch of an epoch older than one they saw): the shared
system's own coordinator would otherwise find these prepared branches in its in-doubt
scan and abort them under the test's feet."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from coordinator.participants import ParticipantClient
from twopc_common.errors import InvalidArgument, Unavailable
from twopc_common.phase2_outcome import Phase2Outcome
from twopc_common.tls import TlsConfig
from twopc_common.values import Statement
from twopc_harness.postgres import free_port
from twopc_harness.system import LocalSystem
from twopc_pb import participant_pb2 as ppb
from twopc_pb import participant_pb2_grpc as pgrpc
from twopc_pb import types_pb2 as tpb

OK = grpc.StatusCode.OK.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def ledger_row(transfer_id: str) -> tpb.Statement:
    return tpb.Statement(sql=f"INSERT INTO ledger VALUES ('{transfer_id}', 'debit', 1, 1)")


def ledger_ids(system: LocalSystem, prefix: str) -> set[str]:
    with system.connect("shard1") as conn:
        rows = conn.execute(
            "SELECT transfer_id FROM ledger WHERE transfer_id LIKE %s", (prefix + "%",)
        ).fetchall()
    return {str(r[0]) for r in rows}


def test_finish_answers_every_decision_on_its_own(system: LocalSystem) -> None:
    prepared = {name: f"batching8.1.{i}" for i, name in enumerate("abc", 1)}
    open_branch, never_seen, still_open = "batching8.1.4", "batching8.1.5", "batching8.1.6"
    with system.participant_channel("shard1") as channel:
        agent = pgrpc.ParticipantStub(channel)
        for name, txid in prepared.items():
            vote = agent.Prepare(
                ppb.PrepareRequest(transaction_id=txid, statements=[ledger_row(f"fin-{name}")])
            )
            assert vote.vote == ppb.YES
        for txid, tag in ((open_branch, "fin-d"), (still_open, "fin-e")):
            agent.Execute(
                ppb.BranchExecuteRequest(transaction_id=txid, statements=[ledger_row(tag)])
            )
        decisions = [
            (prepared["a"], True),
            (prepared["b"], False),
            (prepared["c"], True),
            (prepared["a"], True),  # a repeat
            ("not-a-transaction-id", True),
            (never_seen, True),  # never prepared: cannot commit
            (open_branch, False),  # still open: rolled back without a phase-2 connection
            (prepared["b"], True),  # aborted above: the other final state
            (prepared["c"], False),  # committed above: the other final state
            (still_open, True),  # still open, never prepared: refused
        ]
        reply = agent.Finish(
            ppb.FinishRequest(
                decisions=[ppb.Decision(transaction_id=t, commit=c) for t, c in decisions]
            )
        )
        agent.Abort(ppb.BranchRef(transaction_id=still_open))
    answers = [(f.code, f.outcome) for f in reply.finished]
    assert answers == [
        (OK, ppb.PHASE2_COMMITTED),
        (OK, ppb.PHASE2_ROLLED_BACK),
        (OK, ppb.PHASE2_COMMITTED),
        (OK, ppb.PHASE2_ALREADY_COMMITTED),
        (INVALID_ARGUMENT, ppb.PHASE2_OUTCOME_UNSPECIFIED),
        (OK, ppb.PHASE2_NOT_PREPARED),
        (OK, ppb.PHASE2_ROLLED_BACK),
        (OK, ppb.PHASE2_NOT_PREPARED),  # its ROLLBACK PREPARED left no fence
        (OK, ppb.PHASE2_ALREADY_COMMITTED),
        (FAILED_PRECONDITION, ppb.PHASE2_OUTCOME_UNSPECIFIED),
    ]
    changed = [True, True, True, False, False, False, True, False, False, False]
    assert [f.changed for f in reply.finished] == changed  # as older coordinators read it
    assert "malformed transaction id" in reply.finished[4].message
    assert "not prepared" in reply.finished[9].message
    assert ledger_ids(system, "fin-") == {"fin-a", "fin-c"}
    assert not any(system.prepared_transactions().values())


def test_finish_refuses_a_batch_over_the_limit(system: LocalSystem) -> None:
    with system.participant_channel("shard1") as channel:
        agent = pgrpc.ParticipantStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            agent.Finish(
                ppb.FinishRequest(
                    decisions=[ppb.Decision(transaction_id=f"batching7.1.{i}") for i in range(1001)]
                )
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit is 1000" in (caught.value.details() or "")


def test_concurrent_decisions_share_finish_calls(system: LocalSystem) -> None:
    count = 60

    async def scenario() -> None:
        client = ParticipantClient(
            "shard1",
            system.participants["shard1"].address,
            10,
            4 << 20,
            tls=system.tls(system.coordinator_id),
        )
        try:
            txids = [f"batching6.1.{i}" for i in range(1, count + 1)]
            votes = await asyncio.gather(
                *(
                    client.prepare(t, [Statement(ledger_row(f"batch-{i}").sql)], False, 10)
                    for i, t in enumerate(txids)
                )
            )
            assert all(v.ballot.vote.value == "yes" for v in votes), votes
            outcomes = await asyncio.gather(*(client.finish(t, True) for t in txids))
            assert outcomes == [Phase2Outcome.COMMITTED] * count
            # Decisions that arrive while a Finish is in flight ride the next one.
            assert client.stats["phase2_decisions"] == count
            assert client.stats["phase2_calls"] < count
            # ... each a message on the agent's FinishStream (one call), not a unary call.
            assert client.stats["finish_streams"] == 1
            assert client.stats["finish_items"] == client.stats["phase2_calls"]
            # The other final state is an answer, which phase 2 must not take for done.
            assert await client.finish(txids[0], False) is Phase2Outcome.ALREADY_COMMITTED
            assert await client.finish(txids[0], True) is Phase2Outcome.ALREADY_COMMITTED
            assert await client.abort(txids[0]) is Phase2Outcome.ALREADY_COMMITTED
            assert await client.commit(txids[0]) is Phase2Outcome.ALREADY_COMMITTED
            never = f"batching6.1.{count + 1}"
            assert await client.commit(never) is Phase2Outcome.NOT_PREPARED
            assert await client.abort(never) is Phase2Outcome.ALREADY_ROLLED_BACK
            assert await client.finish(never, True) is Phase2Outcome.ALREADY_ROLLED_BACK
            with pytest.raises(InvalidArgument):
                await client.commit("not-a-transaction-id")
        finally:
            await client.close()

    asyncio.run(scenario())
    assert len(ledger_ids(system, "batch-")) == count


def test_an_unreachable_agent_fails_every_waiting_decision(system: LocalSystem) -> None:
    async def scenario() -> None:
        client = ParticipantClient(
            "gone", f"127.0.0.1:{free_port()}", 0.5, 4 << 20, tls=system.tls(system.coordinator_id)
        )
        try:
            results = await asyncio.gather(
                *(client.finish(f"batching5.1.{i}", True) for i in range(1, 6)),
                return_exceptions=True,
            )
        finally:
            await client.close()
        assert all(isinstance(r, Unavailable) for r in results), results

    asyncio.run(scenario())


def test_finish_stream_answers_each_request_on_its_own(system: LocalSystem) -> None:
    """One FinishStream message with a request over the decision limit and a good one:
    the first is refused as a unary Finish would be, the second carried out."""
    txid = "batching4.1.1"
    with system.participant_channel("shard1") as channel:
        agent = pgrpc.ParticipantStub(channel)
        vote = agent.Prepare(
            ppb.PrepareRequest(transaction_id=txid, statements=[ledger_row("finstream-a")])
        )
        assert vote.vote == ppb.YES
        too_many = ppb.FinishRequest(
            decisions=[ppb.Decision(transaction_id=f"batching4.1.{i}") for i in range(2, 1003)]
        )
        good = ppb.FinishRequest(decisions=[ppb.Decision(transaction_id=txid, commit=True)])
        batch = ppb.FinishBatch(
            items=[ppb.FinishItem(ref=7, request=too_many), ppb.FinishItem(ref=8, request=good)]
        )
        answers = {a.ref: a for m in agent.FinishStream(iter([batch]), timeout=30) for a in m.items}
    assert answers[7].code == INVALID_ARGUMENT and "limit is 1000" in answers[7].message
    assert answers[8].code == OK
    assert [f.outcome for f in answers[8].response.finished] == [ppb.PHASE2_COMMITTED]
    assert ledger_ids(system, "finstream-") == {"finstream-a"}


class FinishOnly(pgrpc.ParticipantServicer):
    """An agent from before FinishStream: the generated base answers UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.calls = 0

    async def Finish(self, request: ppb.FinishRequest, context: object) -> ppb.FinishResponse:
        self.calls += 1
        return ppb.FinishResponse(
            finished=[ppb.Finished(outcome=ppb.PHASE2_COMMITTED) for _ in request.decisions]
        )


def test_an_agent_without_finish_stream_gets_unary_finish_calls() -> None:
    async def scenario() -> None:
        servicer = FinishOnly()
        server = grpc.aio.server()
        pgrpc.add_ParticipantServicer_to_server(servicer, server)
        address = f"127.0.0.1:{free_port()}"
        server.add_insecure_port(address)
        await server.start()
        client = ParticipantClient("old", address, 5.0, 1 << 20, tls=TlsConfig())
        try:
            for i in range(3):
                assert await client.finish(f"old.1.{i}", True) is Phase2Outcome.COMMITTED
            assert servicer.calls == 3
            assert client.stats["finish_streams"] == 1  # tried once, then unary for good
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(scenario())
