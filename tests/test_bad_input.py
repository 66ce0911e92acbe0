"""Bad input gets the right gRPC status and a message saying what was wrong, and
leaves no prepared transaction and no changed row behind."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

import grpc
import pytest

from bank_demo import bank
from coordinator.client import Statement
from tests.conftest import dsns
from twopc_harness.system import LocalSystem
from twopc_pb import coordinator_pb2 as cpb
from twopc_pb import coordinator_pb2_grpc as cgrpc
from twopc_pb import participant_pb2 as ppb
from twopc_pb import participant_pb2_grpc as pgrpc
from twopc_pb import types_pb2 as tpb

UPDATE = "UPDATE accounts SET balance = 0"


@pytest.fixture
def stub(system: LocalSystem) -> Iterator[cgrpc.CoordinatorStub]:
    assert system.coordinator is not None
    before = bank.snapshot(dsns(system))
    with system.coordinator_channel() as channel:
        yield cgrpc.CoordinatorStub(channel)
    after = bank.snapshot(dsns(system))
    assert after.total == before.total and after.legs == before.legs
    assert not any(after.prepared.values())


def stmt(sql: str = UPDATE, *params: tpb.Value) -> tpb.Statement:
    return tpb.Statement(sql=sql, params=list(params))


def branch(participant: str, *statements: tpb.Statement) -> cpb.Branch:
    return cpb.Branch(participant=participant, statements=list(statements))


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    return error.code(), error.details() or ""


def test_unknown_participant_is_not_found(stub: cgrpc.CoordinatorStub) -> None:
    request = cpb.RunRequest(branches=[branch("shard1", stmt()), branch("nowhere", stmt())])
    code, details = status_of(lambda: stub.Run(request))
    assert code == grpc.StatusCode.NOT_FOUND and "nowhere" in details


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (cpb.RunRequest(), "at least one branch"),
        (cpb.RunRequest(branches=[branch("shard1")]), "no statements"),
        (cpb.RunRequest(branches=[branch("shard1", stmt("   "))]), "empty SQL"),
        (
            cpb.RunRequest(branches=[branch("shard1", stmt()), branch("shard1", stmt())]),
            "two branches",
        ),
        (
            cpb.RunRequest(branches=[branch("shard1", stmt("SELECT %s", tpb.Value()))]),
            "parameter 1 has no value",
        ),
        (
            cpb.RunRequest(
                branches=[branch("shard1", stmt("SELECT %s", tpb.Value(other_value="x")))]
            ),
            "results only",
        ),
        (
            cpb.RunRequest(
                branches=[branch("shard1", stmt("SELECT %s", tpb.Value(decimal_value="1,5")))]
            ),
            "not a decimal",
        ),
        (cpb.RunRequest(branches=[branch("shard1", *[stmt()] * 1001)]), "limit is 1000"),
        (
            cpb.RunRequest(
                branches=[branch("shard1", stmt("SELECT 1"))], idempotency_key="k" * 201
            ),
            "idempotency key longer",
        ),
        (
            cpb.RunRequest(
                branches=[
                    branch("shard1", stmt("UPDATE accounts SET balance = 0\x00 WHERE id = 1"))
                ]
            ),
            "NUL",
        ),
        (
            cpb.RunRequest(
                branches=[branch("shard1", stmt("SELECT %s", tpb.Value(text_value="a\x00b")))]
            ),
            "NUL",
        ),
        (
            cpb.RunRequest(
                branches=[branch("shard1", stmt("SELECT %s, %s", tpb.Value(int_value=1)))]
            ),
            "2 placeholder(s) for 1 parameter(s)",
        ),
    ],
    ids=[
        "no-branches",
        "empty-branch",
        "empty-sql",
        "duplicate-branch",
        "unset-value",
        "result-only-type",
        "bad-decimal",
        "too-many-statements",
        "long-key",
        "nul-in-sql",
        "nul-in-text-parameter",
        "placeholder-count",
    ],
)
def test_invalid_run_is_invalid_argument(
    stub: cgrpc.CoordinatorStub, request_: cpb.RunRequest, message: str
) -> None:
    code, details = status_of(lambda: stub.Run(request_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details


def test_oversized_request_is_resource_exhausted(stub: cgrpc.CoordinatorStub) -> None:
    big = stmt("SELECT %s", tpb.Value(text_value="x" * (5 * 1024 * 1024)))
    request = cpb.RunRequest(branches=[branch("shard1", big)])
    code, _ = status_of(lambda: stub.Run(request))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_execute_on_unknown_or_finished_transaction(stub: cgrpc.CoordinatorStub) -> None:
    request = cpb.ExecuteRequest(
        transaction_id="shared.1.999999", participant="shard1", statements=[stmt("SELECT 1")]
    )
    code, details = status_of(lambda: stub.Execute(request))
    assert code == grpc.StatusCode.NOT_FOUND and "shared.1.999999" in details

    txid = stub.Begin(cpb.BeginRequest()).transaction_id
    stub.Execute(
        cpb.ExecuteRequest(transaction_id=txid, participant="shard1", statements=[stmt("SELECT 1")])
    )
    stub.Commit(cpb.CommitRequest(transaction_id=txid, wait_for_completion=True))
    again = cpb.ExecuteRequest(transaction_id=txid, participant="shard1", statements=[stmt(UPDATE)])
    code, details = status_of(lambda: stub.Execute(again))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "has committed" in details

    txid = stub.Begin(cpb.BeginRequest()).transaction_id
    stub.Rollback(cpb.RollbackRequest(transaction_id=txid))
    after_rollback = cpb.ExecuteRequest(
        transaction_id=txid, participant="shard1", statements=[stmt("SELECT 1")]
    )
    code, details = status_of(lambda: stub.Execute(after_rollback))
    assert code == grpc.StatusCode.ABORTED and "rolled back by the client" in details


def test_malformed_transaction_id_is_invalid_argument(stub: cgrpc.CoordinatorStub) -> None:
    code, details = status_of(
        lambda: stub.GetTransaction(cpb.GetTransactionRequest(transaction_id="not-an-id"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not-an-id" in details


def test_execute_on_unknown_participant_or_empty(stub: cgrpc.CoordinatorStub) -> None:
    txid = stub.Begin(cpb.BeginRequest()).transaction_id
    code, _ = status_of(
        lambda: stub.Execute(
            cpb.ExecuteRequest(transaction_id=txid, participant="nowhere", statements=[stmt()])
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = status_of(
        lambda: stub.Execute(cpb.ExecuteRequest(transaction_id=txid, participant="shard1"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    stub.Rollback(cpb.RollbackRequest(transaction_id=txid))


def test_client_refuses_unsupported_parameter_types(system: LocalSystem) -> None:
    from twopc_common.errors import InvalidArgument

    with system.client() as client, pytest.raises(InvalidArgument, match="datetime"):
        client.run({"shard1": [Statement("SELECT %s", (dt.datetime.now(),))]})  # type: ignore[arg-type]


def test_participant_answers_not_prepared_to_a_commit_of_a_branch_never_prepared(
    system: LocalSystem,
) -> None:
    with system.participant_channel("shard1") as channel:
        participant = pgrpc.ParticipantStub(channel)
        answer = participant.Commit(ppb.BranchRef(transaction_id="shared.1.424242"))
        assert answer.outcome == ppb.PHASE2_NOT_PREPARED and not answer.changed
        code, details = status_of(lambda: participant.Commit(ppb.BranchRef(transaction_id="x")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "'x'" in details


MALFORMED_TXIDS = [
    "x" * 65,
    "shared.1." + "1" * 60,
    "c" * 25 + ".1.1",
    "shared.1.+1",
    "shared.1.1_0",
    "shared. 1.2",
    "shared.1.2\x00",
    "shared.-1.2",
    "shar ed.1.2",
    "",
]


@pytest.mark.parametrize("txid", MALFORMED_TXIDS, ids=range(len(MALFORMED_TXIDS)))
def test_malformed_transaction_id_opens_nothing_at_the_agent(
    system: LocalSystem, txid: str
) -> None:
    with system.participant_channel("shard1") as channel:
        participant = pgrpc.ParticipantStub(channel)
        for call in (
            lambda: participant.Prepare(
                ppb.PrepareRequest(transaction_id=txid, statements=[stmt("SELECT 1")])
            ),
            lambda: participant.Prepare(
                ppb.PrepareRequest(
                    transaction_id=txid, statements=[stmt("SELECT 1")], one_phase=True
                )
            ),
            lambda: participant.Execute(
                ppb.BranchExecuteRequest(transaction_id=txid, statements=[stmt("SELECT 1")])
            ),
            lambda: participant.Commit(ppb.BranchRef(transaction_id=txid)),
            lambda: participant.Abort(ppb.BranchRef(transaction_id=txid)),
        ):
            code, details = status_of(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert "malformed transaction id" in details
        status = participant.Status(ppb.ParticipantStatusRequest())
    assert status.open_branches == 0
    assert system.prepared_transactions() == {s: [] for s in system.shard_names}


@pytest.mark.parametrize("txid", MALFORMED_TXIDS, ids=range(len(MALFORMED_TXIDS)))
def test_malformed_transaction_id_is_invalid_argument_at_the_coordinator(
    stub: cgrpc.CoordinatorStub, txid: str
) -> None:
    for call in (
        lambda: stub.GetTransaction(cpb.GetTransactionRequest(transaction_id=txid)),
        lambda: stub.Commit(cpb.CommitRequest(transaction_id=txid)),
        lambda: stub.Rollback(cpb.RollbackRequest(transaction_id=txid)),
        lambda: stub.Execute(
            cpb.ExecuteRequest(transaction_id=txid, participant="shard1", statements=[stmt()])
        ),
    ):
        code, details = status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details


# Field 1 (a string) holding bytes that are not UTF-8, and a message cut short.
UNDECODABLE = {
    "invalid-utf8": b"\x0a\x03\xff\xfe\xfd",
    "truncated": b"\x0a\x10abc",
}


@pytest.mark.parametrize("payload", UNDECODABLE.values(), ids=UNDECODABLE.keys())
def test_undecodable_request_bytes_are_invalid_argument(
    system: LocalSystem, payload: bytes
) -> None:
    assert system.coordinator is not None
    # Each as a caller the method's authorization rule admits, so that the request
    # reaches its decoding.
    targets = [
        (None, "/twopc.v1.Coordinator/GetTransaction"),
        (None, "/twopc.v1.Coordinator/Commit"),
        ("shard1", "/twopc.v1.Participant/Prepare"),
        ("shard1", "/twopc.v1.Participant/Abort"),
    ]
    for shard, method in targets:
        opened = (
            system.coordinator_channel() if shard is None else system.participant_channel(shard)
        )
        with opened as channel:
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
            code, details = status_of(lambda: call(payload, timeout=10))  # noqa: B023
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
        assert "undecodable request" in details
