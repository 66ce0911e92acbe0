"""What the engine needs of a decision log: the SQLite log (`coordinator.decision_log`)
and the PostgreSQL log (`coordinator.pg_log`) both provide it, so the engine cannot
tell which one it has.

Every new record names its `owner` (the client identity that began the transaction, or
None), which `get` returns in `LogRecord.owner`: who may see a transaction must survive
a restart (`coordinator.access`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from coordinator.log_records import LogRecord


class DecisionLogPort(Protocol):
    coordinator_id: str
    epoch: int
    last_epoch: int
    pruned_before: float | None
    failure: str | None
    stats: dict[str, int]
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
        *,
        owner: str | None = None,
    ) -> None: ...

    async def record_abort(
        self,
        transaction_id: str,
        participants: tuple[str, ...],
        created_at: float,
        outcome: dict[str, Any],
        idempotency_key: str,
        request_hash: str,
        *,
        owner: str | None = None,
    ) -> None: ...

    async def record_one_phase_intent(
        self,
        transaction_id: str,
        participant: str,
        created_at: float,
        idempotency_key: str | None,
        request_hash: str | None,
        *,
        owner: str | None = None,
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

    def acquire(self) -> None: ...

    def begin_epoch(self) -> None: ...

    def close(self) -> None: ...
