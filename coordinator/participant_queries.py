"""What the coordinator asks an agent outside its transactions' work (for
`coordinator.participants`): the id it answers to, a health probe, its lock waits,
the branches it holds in doubt and the heuristic decisions an operator took there;
answers as domain objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.deadlock import Wait
from coordinator.participant_channel import ParticipantChannel
from twopc_pb import participant_pb2 as pb


@dataclass(frozen=True, slots=True)
class HeuristicDecision:
    """An operator's heuristic decision on one of our branches (the agent's audit table)."""

    transaction_id: str
    commit: bool
    reason: str
    operator: str
    decided_at: float


@dataclass(frozen=True, slots=True)
class InDoubtBranch:
    transaction_id: str
    age_seconds: float


@dataclass(frozen=True, slots=True)
class InDoubtList:
    branches: tuple[InDoubtBranch, ...]
    highest_epoch: int
    """The highest epoch of the asking coordinator the participant has seen."""


class Queries:
    def __init__(self, channel: ParticipantChannel, rpc_timeout: float) -> None:
        self._channel = channel
        self._rpc_timeout = rpc_timeout

    async def participant_id(self) -> str:
        """The id the agent at this address answers to (its Status)."""
        self._channel.watch()
        reply = await self._channel.call("Status", pb.ParticipantStatusRequest(), self._rpc_timeout)
        return str(reply.participant_id)

    async def probe(self, timeout: float) -> None:
        """One health probe: the agent answers Status within `timeout`, or this raises.
        No waiting for a reconnect: a refused connection fails at once."""
        self._channel.watch()
        await self._channel.call("Status", pb.ParticipantStatusRequest(), timeout, None)

    async def waits_for(self, timeout: float) -> list[Wait]:
        """The agent's lock waits between open branches (see coordinator.deadlock)."""
        self._channel.watch()
        reply = await self._channel.call("WaitsFor", pb.WaitsForRequest(), timeout, None)
        return [
            Wait(
                self._channel.name, e.waiter_transaction_id, e.holder_transaction_id, e.wait_started
            )
            for e in reply.edges
            if e.holder_transaction_id
        ]

    async def list_prepared(self, coordinator_id: str) -> InDoubtList:
        self._channel.watch()
        reply = await self._channel.call(
            "ListPrepared",
            pb.ListPreparedRequest(coordinator_id=coordinator_id),
            self._rpc_timeout,
        )
        return InDoubtList(
            tuple(InDoubtBranch(b.transaction_id, b.age_seconds) for b in reply.branches),
            reply.highest_epoch,
        )

    async def list_heuristic(self, coordinator_id: str) -> list[HeuristicDecision]:
        reply = await self._channel.call(
            "ListHeuristic",
            pb.ListHeuristicRequest(coordinator_id=coordinator_id),
            self._rpc_timeout,
        )
        return [
            HeuristicDecision(d.transaction_id, d.commit, d.reason, d.operator, d.decided_at)
            for d in reply.decisions
        ]
