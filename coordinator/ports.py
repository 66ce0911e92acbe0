"""The coordinator engine's ports: what `coordinator.engine.Coordinator` needs from a
participant transport, as a `typing.Protocol` (the decision log's port is
`coordinator.log_port.DecisionLogPort`; the clock and randomness are in
`twopc_common.ports`).

In the daemon the transport is `coordinator.participants.ParticipantClient` (gRPC);
in the simulator (`tests/sim`) a seeded network. mypy checks that each satisfies the
port wherever it is handed to the engine.

The contracts the engine relies on, beyond the signatures:
- transport: a Prepare answers with a ballot, never raises for transport trouble (a
  missing vote is a ballot); Commit, Abort and Finish answer the branch's
  `Phase2Outcome`, the other final state included; every call raises only for an
  error, a `TwoPCError` subclass: `Unavailable` when the agent could not be reached or
  did not answer in time, others when it refused the call (a Commit of a branch still
  open there is `FailedPrecondition`);
- log: `record_commit`, `record_abort` and `record_one_phase_intent` return only once
  the record is durable (unless `forced=False`); `resolve_one_phase`, `mark_complete`
  and `prune` need not be; a failed log sets `failure` and fails every later write.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Protocol

from coordinator.deadlock import Wait
from coordinator.participants import HeuristicDecision, InDoubtList, PrepareReply
from coordinator.protocol import Ballot
from twopc_common.isolation import Isolation
from twopc_common.phase2_outcome import Phase2Outcome
from twopc_common.values import Statement, StatementResult


class ParticipantTransport(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def last_answer(self) -> float:
        """When the agent last answered any call (the engine clock's monotonic)."""
        ...

    @property
    def unreachable(self) -> str | None: ...

    @property
    def stats(self) -> collections.Counter[str]: ...

    def missing_vote(self) -> Ballot | None: ...

    async def prepare(
        self,
        txid: str,
        statements: Sequence[Statement],
        one_phase: bool,
        timeout: float,
        incarnation: str = "",
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> PrepareReply: ...

    async def execute(
        self,
        txid: str,
        statements: Sequence[Statement],
        incarnation: str,
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> tuple[list[StatementResult], str]: ...

    async def finish(self, txid: str, commit: bool) -> Phase2Outcome: ...

    async def commit(self, txid: str) -> Phase2Outcome: ...

    async def abort(self, txid: str) -> Phase2Outcome: ...

    async def waits_for(self, timeout: float) -> list[Wait]: ...

    async def probe(self, timeout: float) -> None: ...

    async def list_prepared(self, coordinator_id: str) -> InDoubtList: ...

    async def list_heuristic(self, coordinator_id: str) -> list[HeuristicDecision]: ...

    async def close(self) -> None: ...
