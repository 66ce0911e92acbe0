"""A simulated decision log (`coordinator.ports.DecisionLogPort`) on a simulated disk.

A full disk fails every write from then on, and the log fails stop as the SQLite one
does (`failure` set, `LogFailed` raised) until the coordinator is restarted on a disk
with room. The disk keeps a journal of writes and how much of it is durable. A forced write
returns only after an fsync (a short random delay shared by every write queued
meanwhile: group commit), which makes it and everything before it durable; an
unforced one is visible at once and durable only with the next fsync, as SQLite's
WAL with synchronous=NORMAL. A coordinator crash truncates the journal to its durable
part, and the next incarnation reads what is left. Records follow the SQLite log's
rules: one row per transaction id, idempotency keys unique, `resolve_one_phase` only
from 'one_phase', `mark_complete` only from 'committing'.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from coordinator.decision_log import LogFailed, LogRecord, LogState
from tests.sim.loop import Process, SimClock
from tests.sim.trace import Trace

_Op = Callable[["_State"], None]


@dataclass
class _State:
    records: dict[str, LogRecord]
    keys: dict[str, str]
    pruned_before: float | None = None


@dataclass(frozen=True, slots=True)
class Backup:
    """A copy of the disk as it was (an operator's backup)."""

    journal: tuple[tuple[str, str, _Op], ...]
    epochs: tuple[tuple[int, float], ...]


class SimDisk:
    """What survives a coordinator crash: the durable prefix of the journal."""

    def __init__(self) -> None:
        self.journal: list[tuple[str, str, _Op]] = []
        """(what, transaction id, the write) in order."""
        self.durable = 0
        self.epochs: dict[int, float] = {}
        """Epoch -> wall time it began (always forced)."""
        self.full = False
        """Every write fails (disk full): the log stops, the coordinator with it."""
        self.ever_committed: set[str] = set()
        """Every transaction whose COMMIT record was ever durable here, even on a log
        since replaced by an older copy: the participants' oracle."""

    def crash(self) -> None:
        del self.journal[self.durable :]

    def synced(self, upto: int) -> None:
        for what, txid, _ in self.journal[self.durable : upto]:
            if what == "committing":
                self.ever_committed.add(txid)
        self.durable = max(self.durable, upto)

    def backup(self) -> Backup:
        return Backup(tuple(self.journal[: self.durable]), tuple(self.epochs.items()))

    def restore(self, backup: Backup) -> None:
        """Replace the log by `backup` (what survives is only what it holds)."""
        self.journal = list(backup.journal)
        self.durable = len(self.journal)
        self.epochs = dict(backup.epochs)

    def state(self, upto: int | None = None) -> _State:
        state = _State({}, {})
        for _, _, op in self.journal[: self.durable if upto is None else upto]:
            op(state)
        return state

    def durable_commit(self, txid: str) -> bool:
        """Whether a COMMIT of `txid` was ever durable (the participants' oracle)."""
        return txid in self.ever_committed


class SimDecisionLog:
    def __init__(
        self,
        disk: SimDisk,
        owner: Process,
        clock: SimClock,
        rng: random.Random,
        trace: Trace,
        fsync_delay: float,
        on_complete: Callable[[str], None] = lambda txid: None,
    ) -> None:
        self._on_complete = on_complete
        self._disk = disk
        self._owner = owner
        self._clock = clock
        self._rng = rng
        self._trace = trace
        self._fsync_delay = fsync_delay
        self.coordinator_id = "c"
        self._state = disk.state(len(disk.journal))
        self.pruned_before = self._state.pruned_before
        self.last_epoch = 0
        self.epoch = 0
        self.failure: str | None = None
        self.stats: dict[str, int] = {}
        self.on_batch: Callable[[int, bool, float], None] = lambda records, forced, secs: None
        self._syncing: asyncio.Future[None] | None = None

    def acquire(self) -> None:
        self.last_epoch = max(self._disk.epochs, default=0)

    def close(self) -> None:
        return None

    def begin_epoch(self) -> None:
        self.epoch = self.last_epoch + 1
        self._disk.epochs[self.epoch] = self._clock.time()

    async def _write(self, what: str, txid: str, op: _Op, forced: bool) -> None:
        if not self._owner.alive:
            raise asyncio.CancelledError
        if self.failure is None and self._disk.full:
            self.failure = "cannot write the decision log: disk full (simulated)"
            self._trace.add("log", f"{what} failed: {self.failure}", txid)
        if self.failure is not None:  # fail-stop, as the SQLite log
            raise LogFailed(self.failure)
        op(self._state)  # raises (IntegrityError) before anything is journaled
        self._disk.journal.append((what, txid, op))
        self._trace.add("log", f"{what}{'' if forced else ' (unforced)'}", txid)
        if forced:
            await self._fsync(len(self._disk.journal))
            self._trace.add("log", f"{what} durable", txid)

    async def _fsync(self, upto: int) -> None:
        while self._disk.durable < upto:
            if self._syncing is None or self._syncing.done():
                self._syncing = asyncio.ensure_future(self._sync_batch())
            await asyncio.shield(self._syncing)
            if not self._owner.alive:
                raise asyncio.CancelledError

    async def _sync_batch(self) -> None:
        upto = len(self._disk.journal)
        await asyncio.sleep(self._rng.uniform(0, self._fsync_delay))
        if self._owner.alive:
            self._disk.synced(upto)

    # -- writes -----------------------------------------------------------------------

    def _insert(self, record: LogRecord) -> _Op:
        def op(state: _State) -> None:
            key = record.idempotency_key
            if record.transaction_id in state.records or (key is not None and key in state.keys):
                raise sqlite3.IntegrityError(f"UNIQUE constraint failed ({record.transaction_id})")
            state.records[record.transaction_id] = record
            if key is not None:
                state.keys[key] = record.transaction_id

        return op

    def _record(
        self,
        txid: str,
        state: LogState,
        participants: tuple[str, ...],
        created_at: float,
        outcome: dict[str, Any],
        key: str | None,
        request_hash: str | None,
        complete: bool,
        owner: str | None,
    ) -> LogRecord:
        now = self._clock.time()
        return LogRecord(
            transaction_id=txid,
            state=state,
            participants=participants,
            idempotency_key=key,
            request_hash=request_hash,
            outcome=dict(outcome),
            created_at=created_at,
            decided_at=now,
            completed_at=now if complete else None,
            owner=owner,
        )

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
        state = LogState.COMMITTED if completed else LogState.COMMITTING
        record = self._record(
            transaction_id,
            state,
            participants,
            created_at,
            outcome,
            idempotency_key,
            request_hash,
            completed,
            owner,
        )
        await self._write(state, transaction_id, self._insert(record), forced or not completed)

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
        record = self._record(
            transaction_id,
            LogState.ABORTED,
            participants,
            created_at,
            outcome,
            idempotency_key,
            request_hash,
            True,
            owner,
        )
        await self._write("aborted", transaction_id, self._insert(record), True)

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
        record = self._record(
            transaction_id,
            LogState.ONE_PHASE,
            (participant,),
            created_at,
            {},
            idempotency_key,
            request_hash,
            False,
            owner,
        )
        await self._write("one_phase intent", transaction_id, self._insert(record), True)

    async def resolve_one_phase(self, transaction_id: str, outcome: dict[str, Any]) -> None:
        now = self._clock.time()
        state = LogState.COMMITTED if outcome["committed"] else LogState.ABORTED

        def op(s: _State) -> None:
            old = s.records.get(transaction_id)
            if old is not None and old.state is LogState.ONE_PHASE:
                s.records[transaction_id] = replace(
                    old, state=state, outcome=dict(outcome), decided_at=now, completed_at=now
                )

        await self._write(f"one_phase {state}", transaction_id, op, False)

    async def mark_complete(self, transaction_id: str) -> None:
        self._on_complete(transaction_id)
        now = self._clock.time()

        def op(s: _State) -> None:
            old = s.records.get(transaction_id)
            if old is not None and old.state is LogState.COMMITTING:
                s.records[transaction_id] = replace(old, state=LogState.COMMITTED, completed_at=now)

        await self._write("complete", transaction_id, op, False)

    async def prune(self, older_than: float) -> None:
        horizon = max(older_than, self.pruned_before or older_than)
        self.pruned_before = horizon

        def op(s: _State) -> None:
            for txid, record in list(s.records.items()):
                finished = record.state in (LogState.COMMITTED, LogState.ABORTED)
                if finished and record.decided_at < horizon:
                    del s.records[txid]
                    if record.idempotency_key is not None:
                        s.keys.pop(record.idempotency_key, None)
            s.pruned_before = horizon

        await self._write("prune", "", op, False)

    async def probe(self) -> None:
        await self._write("probe", "", lambda s: None, True)

    # -- reads ------------------------------------------------------------------------

    async def get(self, transaction_id: str) -> LogRecord | None:
        await asyncio.sleep(0)
        return self._state.records.get(transaction_id)

    async def by_key(self, key: str) -> LogRecord | None:
        await asyncio.sleep(0)
        txid = self._state.keys.get(key)
        return None if txid is None else self._state.records.get(txid)

    async def epoch_started(self, epoch: int) -> float | None:
        return self._disk.epochs.get(epoch)

    def incomplete_commits(self) -> list[LogRecord]:
        return [r for r in self._state.records.values() if r.state is LogState.COMMITTING]

    def unresolved_one_phase(self) -> list[LogRecord]:
        return [r for r in self._state.records.values() if r.state is LogState.ONE_PHASE]
