"""What the coordinator holds in memory about its transactions, shared by the
engine's collaborators (`coordinator.engine` lists them).

Guarantees:
- a transaction stays in `Memory.live` from its first id to its completion, so
  recovery, which only aborts branches of transactions that are neither in memory nor
  logged as committed, never races a live one;
- an idempotency key stays in `Memory.keys` until its record is durable;
- the outcomes of the last `recent_outcomes` finished transactions stay in
  `Memory.recent`, so a late Commit or Rollback gets its outcome;
- no new transaction id is handed out once the coordinator stopped (fail-stop).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.log_port import DecisionLogPort
from coordinator.log_records import LogRecord, LogState
from coordinator.ports import ParticipantTransport
from coordinator.protocol import AbortCause, Reported, TxState
from twopc_common.errors import InvalidArgument, NotFound, Unavailable
from twopc_common.ids import TransactionId
from twopc_common.isolation import Isolation
from twopc_common.log import EventLogger
from twopc_common.ports import Clock, Random
from twopc_common.values import Statement, StatementResult

BranchResults = tuple[tuple[str, tuple[StatementResult, ...]], ...]


@dataclass(frozen=True, slots=True)
class Outcome:
    transaction_id: str
    committed: bool
    cause: AbortCause | None = None
    culprit: str = ""
    reason: str = ""
    results: BranchResults = ()
    one_phase: bool = False
    completed: bool = False

    def to_json(self) -> dict[str, Any]:
        """What the log keeps for an idempotent replay (read results are not kept)."""
        return {
            "committed": self.committed,
            "cause": self.cause.value if self.cause else None,
            "culprit": self.culprit,
            "reason": self.reason,
            "one_phase": self.one_phase,
        }

    @classmethod
    def from_record(cls, record: LogRecord) -> Outcome:
        data = record.outcome
        return cls(
            transaction_id=record.transaction_id,
            committed=bool(data["committed"]),
            cause=AbortCause(data["cause"]) if data.get("cause") else None,
            culprit=data.get("culprit", ""),
            reason=data.get("reason", ""),
            one_phase=bool(data.get("one_phase", False)),
            completed=record.state is not LogState.COMMITTING,
        )


@dataclass(frozen=True, slots=True)
class TransactionInfo:
    transaction_id: str
    outcome: Reported
    state: TxState | None
    participants: tuple[str, ...] = ()
    age_seconds: float = 0.0
    pending_acks: tuple[str, ...] = ()
    owner: str | None = None
    """The client identity that began it, where known (live, or logged)."""


@dataclass
class Tx:
    id: str
    state: TxState
    created: float
    """Wall-clock time of its first id (the log's created_at)."""
    started: float
    """Monotonic time of its first id (its lifetime)."""
    last_used: float = 0.0
    work_started: float = 0.0
    """When its current Execute or its Prepare began (the deadlock detector's trigger)."""
    participants: list[str] = field(default_factory=list)
    incarnations: dict[str, str] = field(default_factory=dict)
    """Participant -> the agent incarnation that opened its branch (interactive)."""
    phase2: tuple[str, ...] = ()
    """Once COMMIT is logged: the participants that must acknowledge it."""
    awaiting: frozenset[str] = frozenset()
    """While votes are collected: the participants whose vote is still missing."""
    interruption: tuple[AbortCause, str, str] | None = None
    """Why vote collection was cut short (cause, culprit, reason): a deadlock victim,
    or a participant marked down while its vote was missing."""
    on_interrupt: Callable[[], None] | None = None
    """While votes are collected: wakes the collection (`coordinator.vote_collection`)."""
    retries_left: int = 0
    """One-shot only: how many more times a deadlock victim is run again."""
    successor: Tx | None = None
    """The transaction that runs this one's work again after it lost a deadlock."""
    key: str | None = None
    request_hash: str | None = None
    isolation: Isolation = Isolation.READ_COMMITTED
    """Every branch runs at this level (the agents apply it)."""
    owner: str | None = None
    """The client identity that began it; logged with each of its records."""
    busy: int = 0
    pending: set[str] = field(default_factory=set)
    outcome: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    completed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.last_used = self.work_started = self.started

    async def answer(self, wait: bool, follow: bool = True) -> Outcome:
        """Its outcome once decided: with `follow`, of the last of its deadlock
        retries; with `wait`, once phase 2 has completed too."""
        tx = self
        outcome = await asyncio.shield(tx.outcome)
        while follow and tx.successor is not None:
            tx = tx.successor
            outcome = await asyncio.shield(tx.outcome)
        if wait and not outcome.completed:
            await tx.completed.wait()
            outcome = replace(outcome, completed=True)
        return outcome


class Memory:
    """The engine's shared state and its bookkeeping."""

    def __init__(
        self,
        config: CoordinatorConfig,
        log: DecisionLogPort,
        clients: Mapping[str, ParticipantTransport],
        clock: Clock,
        rng: Random,
    ) -> None:
        self.config = config
        self.clock = clock
        self.id = config.id
        self.decision_log = log
        self.clients = dict(clients)
        self.log = EventLogger("coordinator", config.id)
        self.counters: collections.Counter[str] = collections.Counter()
        self.recovered = False
        self.live: dict[str, Tx] = {}
        self.keys: dict[str, Tx] = {}
        # Outcomes of recently finished transactions, so that a Commit or Rollback
        # that comes after the transaction already ended (say, aborted by a failed
        # Execute) gets its outcome rather than NOT_FOUND.
        self.recent: collections.OrderedDict[str, Outcome] = collections.OrderedDict()
        self.sequence = itertools.count(1)
        self.background: set[asyncio.Task[None]] = set()
        self.stopped_because: str | None = None
        """Why recovery stopped this coordinator from deciding, if it did."""
        self.down_because: dict[str, str] = {}
        """Participant -> why it is marked down."""
        self.rng = rng

    @property
    def stopped(self) -> str | None:
        """Why this coordinator accepts no new transactions (fail-stop), if it does not."""
        if self.decision_log.failure is not None:
            return f"its decision log cannot write: {self.decision_log.failure}"
        return self.stopped_because

    def new_tx(self, state: TxState = TxState.ACTIVE) -> Tx:
        if (why := self.stopped) is not None:
            raise Unavailable(f"coordinator {self.id} accepts no new transactions: {why}")
        txid = str(TransactionId(self.id, self.decision_log.epoch, next(self.sequence)))
        tx = self.live[txid] = self.tx(txid, state)
        return tx

    def successor(self, tx: Tx) -> Tx:
        """A new transaction to run a deadlock victim's work again, with one retry
        fewer; it takes over the victim's key."""
        successor = self.new_tx()
        successor.retries_left = tx.retries_left - 1
        successor.key, successor.request_hash = tx.key, tx.request_hash
        successor.isolation = tx.isolation
        successor.owner = tx.owner
        if tx.key is not None:
            self.keys[tx.key] = successor
        return successor

    def tx(self, txid: str, state: TxState, created: float | None = None) -> Tx:
        """A transaction's memory, started now (`created`: logged earlier)."""
        wall = self.clock.time() if created is None else created
        return Tx(txid, state, created=wall, started=self.clock.monotonic())

    def forget(self, tx: Tx) -> None:
        self.live.pop(tx.id, None)
        if tx.outcome.done() and not tx.outcome.cancelled() and tx.outcome.exception() is None:
            # Without read results: a late Commit or Rollback only needs the outcome.
            self.recent[tx.id] = replace(tx.outcome.result(), results=(), completed=True)
            while len(self.recent) > self.config.recent_outcomes:
                self.recent.popitem(last=False)
        if tx.key is not None and self.keys.get(tx.key) is tx:
            del self.keys[tx.key]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def client(self, participant: str) -> ParticipantTransport:
        client = self.clients.get(participant)
        if client is None:
            raise NotFound(f"unknown participant {participant!r}")
        return client

    def check_branches(self, branches: Sequence[tuple[str, Sequence[Statement]]]) -> None:
        if not branches:
            raise InvalidArgument("a transaction needs at least one branch")
        if len(branches) > self.config.limits.max_branches:
            raise InvalidArgument(
                f"{len(branches)} branches, the limit is {self.config.limits.max_branches}"
            )
        seen: set[str] = set()
        for participant, statements in branches:
            self.client(participant)
            if participant in seen:
                raise InvalidArgument(f"participant {participant!r} appears in two branches")
            seen.add(participant)
            if not statements:
                raise InvalidArgument(f"branch on {participant!r} has no statements")

    def down(self, participants: Sequence[str]) -> tuple[str, str] | None:
        """The first of `participants` marked down, with why."""
        for p in participants:
            if p in self.down_because:
                return p, self.down_because[p]
        return None


class Part:
    """One of the engine's collaborators (or its facade): shortcuts to the shared memory."""

    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.config = memory.config
        self.clock = memory.clock
        self.id = memory.id
        self.decision_log = memory.decision_log
        self.clients = memory.clients
        self.log = memory.log
        self.counters = memory.counters
