"""The coordinator engine's ports: what `coordinator.engine.Coordinator` needs from a
participant transport and from a decision log, as `typing.Protocol`s.

In the daemon they are `coordinator.participants.ParticipantClient` (gRPC) and
`coordinator.decision_log.DecisionLog` (SQLite); in the simulator (`tests/sim`) a
seeded network and a log whose crash keeps only what was made durable. A new
backend (a PostgreSQL decision log, say) satisfies `DecisionLogPort` and the engine
runs on it unchanged; mypy checks that it does wherever it is handed to the engine.

The contracts the engine relies on, beyond the signatures:
- transport: a Prepare answers with a ballot, never raises for transport trouble (a
  missing vote is a ballot); every other call raises a `TwoPCError` subclass:
  `Unavailable` when the agent could not be reached or did not answer in time,
  `FailedPrecondition` from Commit/Abort when the branch is in the other final state
  (or, for the one-phase fence's Abort, has committed);
- log: `record_commit`, `record_abort` and `record_one_phase_intent` return only once
  the record is durable (unless `forced=False`); `resolve_one_phase`, `mark_complete`
  and `prune` need not be; a failed log sets `failure` and fails every later write.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from coordinator.deadlock import Wait
from coordinator.decision_log import LogRecord
from coordinator.participants import HeuristicDecision, InDoubtList, PrepareReply
from coordinator.protocol import Ballot
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
    ) -> PrepareReply: ...

    async def execute(
        self, txid: str, statements: Sequence[Statement], incarnation: str
    ) -> tuple[list[StatementResult], str]: ...

    async def finish(self, txid: str, commit: bool) -> bool: ...

    async def commit(self, txid: str) -> bool: ...

    async def abort(self, txid: str) -> bool: ...

    async def waits_for(self, timeout: float) -> list[Wait]: ...

    async def probe(self, timeout: float) -> None: ...

    async def list_prepared(self, coordinator_id: str) -> InDoubtList: ...

    async def list_heuristic(self, coordinator_id: str) -> list[HeuristicDecision]: ...

    async def close(self) -> None: ...


class DecisionLogPort(Protocol):
    @property
    def epoch(self) -> int:
        """This incarnation's epoch (bumped durably at open)."""
        ...

    @property
    def last_epoch(self) -> int:
        """The previous incarnation's epoch."""
        ...

    @property
    def pruned_before(self) -> float | None: ...

    @property
    def failure(self) -> str | None: ...

    @property
    def stats(self) -> Mapping[str, int]: ...

    on_batch: Callable[[int, bool, float], None]

    async def record_commit(
        self,
        transaction_id: str,
        participants: tuple[str, ...],
        created_at: float,
        outcome: dict[str, Any],
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        completed: bool = False,
        forced: bool = True,
    ) -> None: ...

    async def record_abort(
        self,
        transaction_id: str,
        participants: tuple[str, ...],
        created_at: float,
        outcome: dict[str, Any],
        idempotency_key: str,
        request_hash: str,
    ) -> None: ...

    async def record_one_phase_intent(
        self,
        transaction_id: str,
        participant: str,
        created_at: float,
        idempotency_key: str | None,
        request_hash: str | None,
    ) -> None: ...

    async def resolve_one_phase(self, transaction_id: str, outcome: dict[str, Any]) -> None: ...

    async def mark_complete(self, transaction_id: str) -> None: ...

    async def prune(self, older_than: float) -> None: ...

    async def probe(self) -> None: ...

    async def get(self, transaction_id: str) -> LogRecord | None: ...

    async def by_key(self, key: str) -> LogRecord | None: ...

    async def epoch_started(self, epoch: int) -> float | None: ...

    def incomplete_commits(self) -> list[LogRecord]: ...

    def unresolved_one_phase(self) -> list[LogRecord]: ...
