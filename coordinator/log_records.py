"""What every decision log stores, and the errors every log raises: the SQLite log
(`coordinator.decision_log`) and the PostgreSQL log (`coordinator.pg_log`) share
these, so the engine reads the same records whichever log it has.

A record is one decided transaction (see `LogState` for what each state means; no
record means abort). `NewRecords` is the part of the log's API that writes new
records: the same in every log, over each log's own `_insert`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class LogInUse(Exception):
    """Another process holds this decision log."""


class LogFailed(Exception):
    """The decision log cannot write; the coordinator must stop deciding."""


class LogState(enum.StrEnum):
    """A record's state: `committing` (decision durable, phase 2 under way),
    `committed` (every participant acknowledged), `aborted` (written only for
    transactions with an idempotency key, so a retry returns the same outcome),
    `one_phase` (a keyed single-branch commit was sent and its outcome is not known
    yet: recovery asks the participant)."""

    ONE_PHASE = "one_phase"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class LogRecord:
    transaction_id: str
    state: LogState
    participants: tuple[str, ...]
    idempotency_key: str | None
    request_hash: str | None
    outcome: dict[str, Any]
    created_at: float
    decided_at: float
    completed_at: float | None
    owner: str | None = None
    """The client identity that began the transaction (None: no client, or an old row)."""


class NewRecords:
    """The records a transaction starts with, the same in every decision log: each is
    one new row written by the log's own `_insert` (`coordinator.sqlite_records`,
    `coordinator.pg_records`)."""

    async def _insert(
        self,
        transaction_id: str,
        state: str,
        participants: tuple[str, ...],
        created_at: float,
        outcome: dict[str, Any],
        idempotency_key: str | None,
        request_hash: str | None,
        complete: bool,
        forced: bool = True,
        owner: str | None = None,
    ) -> None:
        raise NotImplementedError

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
    ) -> None:
        """Make a COMMIT decision durable (forced). `completed` for a transaction that needs no
        phase 2 (read-only), logged to remember its key and its outcome; only such a
        record may go unforced. `owner`, on this and every other new record: the client
        identity that began the transaction."""
        state = "committed" if completed else "committing"
        await self._insert(
            transaction_id,
            state,
            participants,
            created_at,
            outcome,
            idempotency_key,
            request_hash,
            complete=completed,
            forced=forced or not completed,
            owner=owner,
        )

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
    ) -> None:
        """Remember an aborted keyed transaction, so a retry gets the same answer."""
        await self._insert(
            transaction_id,
            "aborted",
            participants,
            created_at,
            outcome,
            idempotency_key,
            request_hash,
            complete=True,
            owner=owner,
        )

    async def record_one_phase_intent(
        self,
        transaction_id: str,
        participant: str,
        created_at: float,
        idempotency_key: str | None,
        request_hash: str | None,
        *,
        owner: str | None = None,
    ) -> None:
        """Force the intent of a single-branch transaction to disk before its one-phase
        commit is sent: after a crash, recovery settles it (a keyed retry must find
        it, or it would run twice) and GetTransaction never mistakes a commit whose
        answer was lost for one that never happened."""
        await self._insert(
            transaction_id,
            "one_phase",
            (participant,),
            created_at,
            {},
            idempotency_key,
            request_hash,
            complete=False,
            owner=owner,
        )
