"""The coordinator's client of the participant service: one per agent, every call with
a deadline, results as domain objects. `ParticipantClient` is the engine's
`coordinator.ports.ParticipantTransport` in the daemon, a facade over its parts:

- `coordinator.participant_channel`: the long-lived channel (it follows the TLS files),
  whether the agent can be reached and why not, what a failed call's error is;
- `coordinator.participant_phase1`: Execute, and Prepare on PrepareStream or unary,
  and what a failed Prepare counts as (a missing vote, not an exception);
- `coordinator.participant_phase2`: phase-2 decisions batched into Finish requests
  (on FinishStream or unary), and Commit and Abort alone;
- `coordinator.participant_queries`: status, probe, lock waits, in-doubt branches,
  heuristic decisions.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from coordinator.deadlock import Wait
from coordinator.participant_channel import ParticipantChannel
from coordinator.participant_phase1 import Phase1Calls, PrepareReply
from coordinator.participant_phase2 import Phase2Calls
from coordinator.participant_queries import (
    HeuristicDecision,
    InDoubtBranch,
    InDoubtList,
    Queries,
)
from coordinator.protocol import Ballot
from twopc_common.isolation import Isolation, isolation_to_pb
from twopc_common.limits import Limits
from twopc_common.log import EventLogger
from twopc_common.phase2_outcome import Phase2Outcome
from twopc_common.tls import TlsConfig
from twopc_common.values import Statement, StatementResult, statement_to_pb
from twopc_pb import participant_pb2 as pb

__all__ = [
    "HeuristicDecision",
    "InDoubtBranch",
    "InDoubtList",
    "ParticipantClient",
    "PrepareReply",
]


class ParticipantClient:
    def __init__(
        self,
        name: str,
        address: str,
        rpc_timeout: float,
        max_message: int,
        phase2_batch: int = Limits().max_phase2_batch,
        probe_timeout: float = 1.0,
        *,
        prepare_stream: bool = True,
        finish_stream: bool = True,
        prepare_batch: int = Limits().max_stream_batch,
        tls: TlsConfig,
        tls_reload_interval: float = 5.0,
        drain: float = 10.0,
        log: EventLogger | None = None,
    ) -> None:
        """`drain`: seconds calls on a replaced channel get to finish (at least the longest
        deadline this client gives a call: the prepare timeout or the RPC timeout)."""
        self.name = name
        self.address = address
        self.stats: collections.Counter[str] = collections.Counter()
        log = log or EventLogger("coordinator", name)
        self._channel = ParticipantChannel(
            name,
            address,
            max_message,
            tls=tls,
            tls_reload_interval=tls_reload_interval,
            drain=drain,
            probe_timeout=probe_timeout,
            log=log,
            on_change=self._restart_streams,
        )
        self._phase1 = Phase1Calls(
            self._channel, rpc_timeout, prepare_stream, prepare_batch, max_message, self.stats, log
        )
        self._phase2 = Phase2Calls(
            self._channel, rpc_timeout, phase2_batch, self.stats, finish_stream, max_message, log
        )
        self._queries = Queries(self._channel, rpc_timeout)

    def _restart_streams(self) -> None:
        self._phase1.restart()
        self._phase2.restart()

    @property
    def unreachable(self) -> str | None:
        """Why the last attempt to connect failed; None once connected."""
        return self._channel.unreachable

    @property
    def last_answer(self) -> float:
        """When the agent last answered any call (monotonic)."""
        return self._channel.last_answer

    def reload_tls(self) -> bool:
        """Check the TLS files now (SIGHUP); True if the channel was replaced."""
        return self._channel.reload_tls()

    async def close(self) -> None:
        await self._phase1.close()
        await self._phase2.close()
        await self._channel.close()

    def missing_vote(self) -> Ballot | None:
        """What a vote that did not come is, if the agent cannot be reached at all."""
        return self._channel.missing_vote()

    async def prepare(
        self,
        txid: str,
        statements: Sequence[Statement],
        one_phase: bool,
        timeout: float,
        incarnation: str = "",
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> PrepareReply:
        request = pb.PrepareRequest(
            transaction_id=txid,
            statements=[statement_to_pb(s) for s in statements],
            one_phase=one_phase,
            incarnation=incarnation,
            isolation=isolation_to_pb(isolation),
        )
        return await self._phase1.prepare(request, timeout)

    async def execute(
        self,
        txid: str,
        statements: Sequence[Statement],
        incarnation: str,
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> tuple[list[StatementResult], str]:
        return await self._phase1.execute(txid, statements, incarnation, isolation)

    async def finish(self, txid: str, commit: bool) -> Phase2Outcome:
        return await self._phase2.finish(txid, commit)

    async def commit(self, txid: str) -> Phase2Outcome:
        return await self._phase2.commit(txid)

    async def abort(self, txid: str) -> Phase2Outcome:
        return await self._phase2.abort(txid)

    async def participant_id(self) -> str:
        return await self._queries.participant_id()

    async def probe(self, timeout: float) -> None:
        await self._queries.probe(timeout)

    async def waits_for(self, timeout: float) -> list[Wait]:
        return await self._queries.waits_for(timeout)

    async def list_prepared(self, coordinator_id: str) -> InDoubtList:
        return await self._queries.list_prepared(coordinator_id)

    async def list_heuristic(self, coordinator_id: str) -> list[HeuristicDecision]:
        return await self._queries.list_heuristic(coordinator_id)
