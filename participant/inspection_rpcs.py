"""The participant's read-only RPCs: ListPrepared (what recovery and the coordinator's
in-doubt scan read), ListHeuristic (branches an operator resolved by hand), Status and
WaitsFor (the lock graph for the coordinator's deadlock detector).

None of them changes a branch, so none needs the shielding that the transaction RPCs
of `participant.service` get: a cancelled one only loses its answer.
"""

from __future__ import annotations

import datetime as dt

from participant import heuristic
from participant.agent import Agent
from participant.recovery import Recovery
from participant.store import Store
from twopc_common.grpc_errors import Context, translate_errors
from twopc_pb import participant_pb2 as pb


class InspectionRpcs:
    """A servicer base whose subclass sets the agent, recovery and store it reads."""

    _agent: Agent
    _recovery: Recovery
    _store: Store

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
