"""The coordinator's gRPC servicer: protobuf in, engine calls, protobuf out.

Engine calls are shielded from the caller's cancellation: a client that disconnects
or whose deadline expires must not interrupt a transaction between its decision and
its log record; the transaction finishes either way and a retry learns its outcome.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from coordinator.access import Owners, may_touch, owner_name, scoped_key
from coordinator.engine import Coordinator
from coordinator.standby import StandbyGate
from coordinator.wire import (
    branches_from_pb,
    cause_name,
    info_to_pb,
    outcome_to_pb,
    run_request_hash,
)
from twopc_common import multiplex
from twopc_common.auth import caller
from twopc_common.errors import Aborted
from twopc_common.failpoints_rpc import FailpointsAdmin
from twopc_common.grpc_errors import ACTIVE_ADDRESS, Context, answer_item, translate_errors
from twopc_common.isolation import isolation_from_pb
from twopc_common.shielding import shielded
from twopc_common.statements import StatementPolicy
from twopc_common.values import results_to_pb, statements_from_pb
from twopc_pb import coordinator_pb2 as pb
from twopc_pb import coordinator_pb2_grpc as cgrpc


class CoordinatorService(FailpointsAdmin, cgrpc.CoordinatorServicer):
    def __init__(
        self, engine: Coordinator, owners: Owners, gate: StandbyGate | None = None
    ) -> None:
        self._allow_failpoints = engine.config.allow_failpoints
        self._gate = gate
        self._engine = engine
        self._limits = engine.config.limits
        self._owners = owners
        # The agents check the same policy; checking here too refuses a bad Run
        # before any branch opens, with INVALID_ARGUMENT rather than an abort.
        self._policy = StatementPolicy(engine.config.statement_kinds)

    @translate_errors
    async def Run(self, request: pb.RunRequest, context: Context) -> pb.TransactionOutcome:
        return await self._run(request, context.time_remaining())

    @translate_errors
    async def RunStream(self, requests: AsyncIterator[pb.RunBatch], context: Context) -> None:
        # Each item runs in a task of its own (twopc_common.multiplex), which inherits
        # the caller's identity from this call's context.
        await multiplex.serve(
            requests,
            context,
            self._run_item,
            lambda answers: pb.OutcomeBatch(items=answers),
            self._limits.max_stream_batch,
            self._limits.max_message_bytes,
        )

    async def _run_item(self, item: pb.RunItem) -> pb.OutcomeItem:
        """One RunStream item, answered as Run would be (a standby's refusal too: the
        process may have stepped down since the call began)."""
        if self._gate is not None and not self._gate.serving:
            message, address = self._gate.refusal()
            return pb.OutcomeItem(
                ref=item.ref,
                code=grpc.StatusCode.UNAVAILABLE.value[0],
                message=message,
                trailers={ACTIVE_ADDRESS: address or ""},
            )
        return await answer_item(
            self._run(item.request, item.timeout_ms / 1000 if item.timeout_ms else None),
            lambda outcome: pb.OutcomeItem(ref=item.ref, outcome=outcome),
            lambda code, message, trailers: pb.OutcomeItem(
                ref=item.ref, code=code, message=message, trailers=trailers
            ),
            "RunStream",
        )

    async def _run(self, request: pb.RunRequest, patience: float | None) -> pb.TransactionOutcome:
        branches = branches_from_pb(request, self._limits)
        for participant, statements in branches:
            self._policy.check(statements, f"branch {participant!r}")
        isolation = isolation_from_pb(request.isolation)
        who = caller()
        may_touch(self._engine.config, who, (p for p, _ in branches))
        key = scoped_key(who, request.idempotency_key) if request.idempotency_key else None
        request_hash = run_request_hash(request, isolation) if key is not None else None
        outcome = await shielded(
            self._engine.run(
                branches,
                key,
                request_hash,
                request.wait_for_completion,
                owner_name(who),
                isolation,
                patience=patience,
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
            raise Aborted(str(exc), cause=cause_name(exc.cause)) from exc
        return pb.ExecuteResponse(results=results_to_pb(results))

    @translate_errors
    async def Commit(self, request: pb.CommitRequest, context: Context) -> pb.TransactionOutcome:
        await self._owners.check(request.transaction_id, caller())
        outcome = await shielded(
            self._engine.commit(
                request.transaction_id,
                request.wait_for_completion,
                patience=context.time_remaining(),
            )
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
