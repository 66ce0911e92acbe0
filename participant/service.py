"""The participant's gRPC servicer: protobuf in, domain calls, protobuf out. Here the
transaction RPCs (Execute, Prepare, PrepareStream, Commit, Abort, Finish,
FinishStream); the read-only ones are `participant.inspection_rpcs`, SetFailpoints is
`twopc_common.failpoints_rpc`.

Every call that touches a branch is shielded from the caller's cancellation. gRPC
cancels a handler whose deadline expired (a Prepare that outlived the prepare
timeout); cancelled halfway, a one-phase COMMIT could land in PostgreSQL while the
branch still looked open here, and a later Abort would then report a committed
branch as rolled back. Shielded, the operation finishes and its result stands.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from participant import streams
from participant.agent import Agent
from participant.inspection_rpcs import InspectionRpcs
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


class ParticipantService(InspectionRpcs, FailpointsAdmin, pgrpc.ParticipantServicer):
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
        # Each item runs in a task of its own (see participant.streams): no shield needed.
        await streams.serve(
            requests,
            context,
            self._prepare,
            pb.VoteItem,
            pb.VoteBatch,
            "PrepareStream",
            self._limits,
        )

    @translate_errors
    async def Commit(self, request: pb.BranchRef, context: Context) -> pb.Ack:
        return ack_to_pb(await shielded(self._agent.commit(request.transaction_id)))

    @translate_errors
    async def Abort(self, request: pb.BranchRef, context: Context) -> pb.Ack:
        return ack_to_pb(await shielded(self._agent.abort(request.transaction_id)))

    async def _finish(self, request: pb.FinishRequest) -> pb.FinishResponse:
        if len(request.decisions) > self._limits.max_phase2_batch:
            raise InvalidArgument(
                f"{len(request.decisions)} decisions, the limit is {self._limits.max_phase2_batch}"
            )
        answers = await self._agent.finish(
            [(d.transaction_id, d.commit) for d in request.decisions]
        )
        return pb.FinishResponse(finished=[finished_to_pb(a) for a in answers])

    @translate_errors
    async def Finish(self, request: pb.FinishRequest, context: Context) -> pb.FinishResponse:
        return await shielded(self._finish(request))

    @translate_errors
    async def FinishStream(self, requests: AsyncIterator[pb.FinishBatch], context: Context) -> None:
        await streams.serve(
            requests,
            context,
            self._finish,
            pb.FinishedItem,
            pb.FinishedBatch,
            "FinishStream",
            self._limits,
        )
