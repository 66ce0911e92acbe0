"""The participant's gRPC servicer: protobuf in, domain calls, protobuf out.

Every call that touches a branch is shielded from the caller's cancellation. gRPC
cancels a handler whose deadline expired (a Prepare that outlived the prepare
timeout); cancelled halfway, a one-phase COMMIT could land in PostgreSQL while the
branch still looked open here, and a later Abort would then report a committed
branch as rolled back. Shielded, the operation finishes and its result stands.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

from participant import heuristic, prepare_stream
from participant.agent import Agent
from participant.recovery import Recovery
from participant.store import Store
from twopc_common.errors import InvalidArgument
from twopc_common.failpoints_rpc import FailpointsAdmin
from twopc_common.grpc_errors import Context, translate_errors
from twopc_common.isolation import isolation_from_pb
from twopc_common.participant_wire import ack_to_pb, finished_to_pb, vote_to_pb
from twopc_common.shielding import shielded
from twopc_common.statements import StatementPolicy
from twopc_common.values import results_to_pb, statements_from_pb
from twopc_pb import participant_pb2 as pb
from twopc_pb import participant_pb2_grpc as pgrpc


class ParticipantService(FailpointsAdmin, pgrpc.ParticipantServicer):
    def __init__(self, agent: Agent, recovery: Recovery, store: Store) -> None:
        self._allow_failpoints = agent.config.allow_failpoints
        self._agent = agent
        self._store = store
        self._recovery = recovery
        self._limits = agent.config.limits
        self._policy = StatementPolicy(agent.config.statement_kinds)

    @translate_errors
    async def Execute(
        self, request: pb.BranchExecuteRequest, context: Context
    ) -> pb.BranchExecuteResponse:
        statements = statements_from_pb(request.statements, self._limits, "Execute")
        self._policy.check(statements, "Execute")
        isolation = isolation_from_pb(request.isolation)
        results = await shielded(
            self._agent.execute(request.transaction_id, statements, request.incarnation, isolation)
        )
        return pb.BranchExecuteResponse(
            results=results_to_pb(results), incarnation=self._agent.incarnation
        )

    async def _prepare(self, request: pb.PrepareRequest) -> pb.PrepareResponse:
        statements = statements_from_pb(request.statements, self._limits, "Prepare")
        self._policy.check(statements, "Prepare")
        isolation = isolation_from_pb(request.isolation)
        vote = await self._agent.prepare(
            request.transaction_id, statements, request.one_phase, request.incarnation, isolation
        )
        return pb.PrepareResponse(
            vote=vote_to_pb(vote.vote),
            reason=vote.reason,
            sqlstate=vote.sqlstate,
            results=results_to_pb(vote.results),
        )

    @translate_errors
    async def Prepare(self, request: pb.PrepareRequest, context: Context) -> pb.PrepareResponse:
        return await shielded(self._prepare(request))

    @translate_errors
    async def PrepareStream(
        self, requests: AsyncIterator[pb.PrepareBatch], context: Context
    ) -> None:
        # Each item runs in a task of its own (see participant.prepare_stream): no shield needed.
        await prepare_stream.serve(
            requests,
            context,
            self._prepare,
            self._limits.max_stream_batch,
            self._limits.max_message_bytes,
        )

    @translate_errors
    async def Commit(self, request: pb.BranchRef, context: Context) -> pb.Ack:
        return ack_to_pb(await shielded(self._agent.commit(request.transaction_id)))

    @translate_errors
    async def Abort(self, request: pb.BranchRef, context: Context) -> pb.Ack:
        return ack_to_pb(await shielded(self._agent.abort(request.transaction_id)))

    @translate_errors
    async def Finish(self, request: pb.FinishRequest, context: Context) -> pb.FinishResponse:
        if len(request.decisions) > self._limits.max_phase2_batch:
            raise InvalidArgument(
                f"{len(request.decisions)} decisions, the limit is {self._limits.max_phase2_batch}"
            )
        answers = await shielded(
            self._agent.finish([(d.transaction_id, d.commit) for d in request.decisions])
        )
        return pb.FinishResponse(finished=[finished_to_pb(a) for a in answers])

    @translate_errors
    async def ListPrepared(
        self, request: pb.ListPreparedRequest, context: Context
    ) -> pb.ListPreparedResponse:
        now = dt.datetime.now(dt.UTC)
        branches = await self._agent.list_prepared(request.coordinator_id)
        return pb.ListPreparedResponse(
            branches=[
                pb.PreparedBranch(
                    transaction_id=b.transaction_id,
                    gid=b.gid,
                    age_seconds=(now - b.prepared_at).total_seconds() if b.prepared_at else 0.0,
                )
                for b in branches
            ],
            highest_epoch=self._agent.epochs.highest(request.coordinator_id),
        )

    @translate_errors
    async def ListHeuristic(
        self, request: pb.ListHeuristicRequest, context: Context
    ) -> pb.ListHeuristicResponse:
        decisions = await heuristic.list_applied(
            self._store, request.coordinator_id, self._agent.config.id
        )
        return pb.ListHeuristicResponse(
            decisions=[
                pb.HeuristicDecision(
                    transaction_id=d.transaction_id,
                    commit=d.commit,
                    reason=d.reason,
                    operator=d.operator,
                    decided_at=d.decided_at.timestamp(),
                    coordinator_check=d.coordinator_check,
                )
                for d in decisions
            ]
        )

    @translate_errors
    async def Status(
        self, request: pb.ParticipantStatusRequest, context: Context
    ) -> pb.ParticipantStatus:
        now = dt.datetime.now(dt.UTC)
        return pb.ParticipantStatus(
            participant_id=self._agent.config.id,
            open_branches=self._agent.open_branches,
            prepared_branches=self._recovery.prepared,
            counters={**self._agent.counters, "in_doubt_waiting": self._recovery.waiting},
            incarnation=self._agent.incarnation,
            foreign_prepared=[
                pb.ForeignPrepared(
                    gid=f.gid,
                    age_seconds=(now - f.prepared_at).total_seconds() if f.prepared_at else 0.0,
                    owner=f.owner,
                    database=f.database,
                    locks=f.locks,
                    why=f.why,
                )
                for f in self._recovery.foreign
            ],
        )

    @translate_errors
    async def WaitsFor(self, request: pb.WaitsForRequest, context: Context) -> pb.WaitsForResponse:
        return pb.WaitsForResponse(
            edges=[
                pb.WaitEdge(
                    waiter_transaction_id=e.waiter,
                    holder_transaction_id=e.holder,
                    holder_prepared=e.holder_prepared,
                    holder_pid=e.holder_pid,
                    wait_started=e.wait_started,
                )
                for e in await self._agent.waits_for()
            ]
        )
