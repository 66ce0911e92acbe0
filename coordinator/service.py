"""The coordinator's gRPC servicer: protobuf in, engine calls, protobuf out.

Engine calls are shielded from the caller's cancellation: a client that disconnects
or whose deadline expires must not interrupt a transaction between its decision and
its log record; the transaction finishes either way and a retry learns its outcome.
"""

from __future__ import annotations

import hashlib

from coordinator.access import Owners, may_touch, owner_name, scoped_key
from coordinator.engine import Coordinator, Outcome, TransactionInfo
from coordinator.protocol import AbortCause, Reported, TxState
from twopc_common.auth import caller
from twopc_common.errors import Aborted
from twopc_common.failpoints_rpc import FailpointsAdmin
from twopc_common.grpc_errors import Context, translate_errors
from twopc_common.isolation import Isolation, isolation_from_pb
from twopc_common.shielding import shielded
from twopc_common.statements import StatementPolicy
from twopc_common.values import results_to_pb, statements_from_pb
from twopc_pb import coordinator_pb2 as pb
from twopc_pb import coordinator_pb2_grpc as cgrpc
from twopc_pb import types_pb2

_CAUSES = {
    AbortCause.VOTE_NO: pb.VOTE_NO,
    AbortCause.PREPARE_TIMEOUT: pb.PREPARE_TIMEOUT,
    AbortCause.PARTICIPANT_UNAVAILABLE: pb.PARTICIPANT_UNAVAILABLE,
    AbortCause.CLIENT_ROLLBACK: pb.CLIENT_ROLLBACK,
    AbortCause.EXECUTE_FAILED: pb.EXECUTE_FAILED,
    AbortCause.COORDINATOR_RESTART: pb.COORDINATOR_RESTART,
    AbortCause.IDLE_TIMEOUT: pb.TRANSACTION_TIMEOUT,
    AbortCause.LIFETIME_EXCEEDED: pb.TRANSACTION_TIMEOUT,
    AbortCause.DEADLOCK: pb.DEADLOCK,
    AbortCause.SERIALIZATION_FAILURE: pb.SERIALIZATION_FAILURE,
    AbortCause.LOCK_TIMEOUT: pb.LOCK_TIMEOUT,
}
_OUTCOMES = {
    Reported.COMMITTED: pb.COMMITTED,
    Reported.ABORTED: pb.ABORTED,
    Reported.IN_PROGRESS: pb.IN_PROGRESS,
    Reported.UNKNOWN: pb.UNKNOWN,
    Reported.FORGOTTEN: pb.FORGOTTEN,
}
_STATES = {
    TxState.ACTIVE: pb.ACTIVE,
    TxState.PREPARING: pb.PREPARING,
    TxState.COMMITTING: pb.COMMITTING,
    TxState.ABORTING: pb.ABORTING,
    TxState.COMMITTED: pb.STATE_COMMITTED,
    TxState.ABORTED: pb.STATE_ABORTED,
}


def outcome_to_pb(outcome: Outcome) -> pb.TransactionOutcome:
    return pb.TransactionOutcome(
        transaction_id=outcome.transaction_id,
        outcome=pb.COMMITTED if outcome.committed else pb.ABORTED,
        abort_cause=_CAUSES[outcome.cause] if outcome.cause else pb.ABORT_CAUSE_UNSPECIFIED,
        abort_participant=outcome.culprit,
        abort_reason=outcome.reason,
        results=[
            types_pb2.BranchResults(participant=p, results=results_to_pb(r))
            for p, r in outcome.results
        ],
        one_phase=outcome.one_phase,
        completed=outcome.completed,
    )


def info_to_pb(info: TransactionInfo) -> pb.TransactionStatus:
    return pb.TransactionStatus(
        transaction_id=info.transaction_id,
        outcome=_OUTCOMES[info.outcome],
        state=_STATES[info.state] if info.state else pb.STATE_UNKNOWN,
        participants=info.participants,
        age_seconds=info.age_seconds,
        pending_acks=info.pending_acks,
    )


class CoordinatorService(FailpointsAdmin, cgrpc.CoordinatorServicer):
    def __init__(self, engine: Coordinator, owners: Owners) -> None:
        self._allow_failpoints = engine.config.allow_failpoints
        self._engine = engine
        self._limits = engine.config.limits
        self._owners = owners
        # The agents check the same policy; checking here too refuses a bad Run
        # before any branch opens, with INVALID_ARGUMENT rather than an abort.
        self._policy = StatementPolicy(engine.config.statement_kinds)

    @translate_errors
    async def Run(self, request: pb.RunRequest, context: Context) -> pb.TransactionOutcome:
        branches = [
            (
                b.participant,
                statements_from_pb(b.statements, self._limits, f"branch {b.participant!r}"),
            )
            for b in request.branches
        ]
        for participant, statements in branches:
            self._policy.check(statements, f"branch {participant!r}")
        isolation = isolation_from_pb(request.isolation)
        who = caller()
        may_touch(self._engine.config, who, (p for p, _ in branches))
        key = scoped_key(who, request.idempotency_key) if request.idempotency_key else None
        request_hash = None
        if key is not None:
            # The same work at another level is another request. READ COMMITTED hashes
            # as the field left out, as requests from before the field existed did.
            canonical = pb.RunRequest(branches=request.branches)
            if isolation is not Isolation.READ_COMMITTED:
                canonical.isolation = request.isolation
            request_hash = hashlib.sha256(
                canonical.SerializeToString(deterministic=True)
            ).hexdigest()
        outcome = await shielded(
            self._engine.run(
                branches,
                key,
                request_hash,
                request.wait_for_completion,
                owner_name(who),
                isolation,
            )
        )
        self._owners.claim(outcome.transaction_id, who)
        return outcome_to_pb(outcome)

    @translate_errors
    async def Begin(self, request: pb.BeginRequest, context: Context) -> pb.BeginResponse:
        who = caller()
        transaction_id = self._engine.begin(owner_name(who), isolation_from_pb(request.isolation))
        self._owners.claim(transaction_id, who)
        return pb.BeginResponse(transaction_id=transaction_id)

    @translate_errors
    async def Execute(self, request: pb.ExecuteRequest, context: Context) -> pb.ExecuteResponse:
        await self._owners.check(request.transaction_id, caller())
        may_touch(self._engine.config, caller(), (request.participant,))
        statements = statements_from_pb(request.statements, self._limits, "Execute")
        self._policy.check(statements, "Execute")
        try:
            results = await shielded(
                self._engine.execute(request.transaction_id, request.participant, statements)
            )
        except Aborted as exc:
            # The cause by its name in the protocol, for the client library.
            cause = pb.AbortCause.Name(_CAUSES[AbortCause(exc.cause)]) if exc.cause else ""
            raise Aborted(str(exc), cause=cause) from exc
        return pb.ExecuteResponse(results=results_to_pb(results))

    @translate_errors
    async def Commit(self, request: pb.CommitRequest, context: Context) -> pb.TransactionOutcome:
        await self._owners.check(request.transaction_id, caller())
        outcome = await shielded(
            self._engine.commit(request.transaction_id, request.wait_for_completion)
        )
        return outcome_to_pb(outcome)

    @translate_errors
    async def Rollback(
        self, request: pb.RollbackRequest, context: Context
    ) -> pb.TransactionOutcome:
        await self._owners.check(request.transaction_id, caller())
        return outcome_to_pb(await shielded(self._engine.rollback(request.transaction_id)))

    @translate_errors
    async def GetTransaction(
        self, request: pb.GetTransactionRequest, context: Context
    ) -> pb.TransactionStatus:
        await self._owners.check(request.transaction_id, caller())
        return info_to_pb(await self._engine.get(request.transaction_id))

    @translate_errors
    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, context: Context
    ) -> pb.ListTransactionsResponse:
        who = caller()
        return pb.ListTransactionsResponse(
            transactions=[
                info_to_pb(i)
                for i in self._engine.in_flight()
                if self._owners.visible(i.transaction_id, i.owner, who)
            ]
        )

    @translate_errors
    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.CoordinatorStatus:
        counters = dict(self._engine.counters)
        counters.update(self._engine.decision_log.stats)
        counters["live_transactions"] = len(self._engine.in_flight())
        for client in self._engine.clients.values():
            for name, value in client.stats.items():
                counters[f"{name}.{client.name}"] = value
        return pb.CoordinatorStatus(
            coordinator_id=self._engine.id,
            epoch=self._engine.decision_log.epoch,
            recovered=self._engine.recovered,
            counters=counters,
        )
