"""The coordinator's engine: runs global transactions through the protocol in
`coordinator.protocol`, with the decision log and the participant clients as effects.

Guarantees:
- prepare goes to every participant in parallel and the decision is taken when every
  vote is in, on the first NO, or when the prepare timeout expires, whichever is first;
- a COMMIT decision is durable in the decision log before any Commit is sent;
- phase 2 is retried with capped exponential backoff until every participant
  acknowledged; only then is the transaction forgotten from memory;
- a transaction stays in memory from its first id to its completion, so recovery,
  which only aborts branches of transactions that are neither in memory nor logged as
  committed, never races a live one;
- idempotency keys: a retry of a keyed Run joins the live transaction or returns the
  logged outcome; the key is in memory until its record is durable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.deadlock import Victim, Wait, confirmed, find_victims
from coordinator.decision_log import LogFailed, LogRecord, LogState
from coordinator.log_port import DecisionLogPort
from coordinator.participants import PrepareReply
from coordinator.ports import ParticipantTransport
from coordinator.protocol import (
    AbortCause,
    Ballot,
    Reported,
    TxEvent,
    TxState,
    Vote,
    abort_cause,
    bound_results,
    cause_of_failure,
    decide,
    one_phase_committed,
    reported,
    reported_without_record,
    transition,
)
from twopc_common import failpoints
from twopc_common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TwoPCError,
    Unavailable,
)
from twopc_common.ids import TransactionId
from twopc_common.isolation import Isolation
from twopc_common.log import EventLogger
from twopc_common.ports import SYSTEM_CLOCK, Clock, Random, system_random
from twopc_common.values import Statement, StatementResult, result_bytes

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


class LogBehind(TwoPCError):
    """The decision log is older than what a participant has seen of this coordinator."""


def _log_behind(coordinator: str, participant: str, seen: int, log_epoch: int) -> str:
    return (
        f"participant {participant} has seen epoch {seen} of coordinator {coordinator}, "
        f"but the decision log is at epoch {log_epoch}: the log was replaced by an older "
        "copy (a restored backup?) and decisions made since are missing. Not deciding "
        "anything: find the current log; to see what waits, run `twopc-coordinator "
        "inspect --participant NAME=HOST:PORT ...` (in-doubt branches per shard)"
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
class _Tx:
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
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)
    retries_left: int = 0
    """One-shot only: how many more times a deadlock victim is run again."""
    successor: _Tx | None = None
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


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig,
        log: DecisionLogPort,
        clients: Mapping[str, ParticipantTransport],
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.id = config.id
        self.decision_log = log
        self.clients = dict(clients)
        self.log = EventLogger("coordinator", config.id)
        self.counters: collections.Counter[str] = collections.Counter()
        self.recovered = False
        self._live: dict[str, _Tx] = {}
        self._keys: dict[str, _Tx] = {}
        # Outcomes of recently finished transactions, so that a Commit or Rollback
        # that comes after the transaction already ended (say, aborted by a failed
        # Execute) gets its outcome rather than NOT_FOUND.
        self._recent: collections.OrderedDict[str, Outcome] = collections.OrderedDict()
        self._sequence = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()
        self._stopped: str | None = None
        self._down: dict[str, str] = {}
        self._rng = rng if rng is not None else system_random()
        self._preparing = 0
        self._prepare_seconds = 0.01

    # -- bookkeeping ----------------------------------------------------------------

    @property
    def stopped(self) -> str | None:
        """Why this coordinator accepts no new transactions (fail-stop), if it does not."""
        if self.decision_log.failure is not None:
            return f"its decision log cannot write: {self.decision_log.failure}"
        return self._stopped

    def _new_tx(self, state: TxState = TxState.ACTIVE) -> _Tx:
        if (why := self.stopped) is not None:
            raise Unavailable(f"coordinator {self.id} accepts no new transactions: {why}")
        txid = str(TransactionId(self.id, self.decision_log.epoch, next(self._sequence)))
        tx = self._live[txid] = self._tx(txid, state)
        return tx

    def _tx(self, txid: str, state: TxState, created: float | None = None) -> _Tx:
        """A transaction's memory, started now (`created`: logged earlier)."""
        wall = self.clock.time() if created is None else created
        return _Tx(txid, state, created=wall, started=self.clock.monotonic())

    def _forget(self, tx: _Tx) -> None:
        self._live.pop(tx.id, None)
        if tx.outcome.done() and not tx.outcome.cancelled() and tx.outcome.exception() is None:
            # Without read results: a late Commit or Rollback only needs the outcome.
            self._recent[tx.id] = replace(tx.outcome.result(), results=(), completed=True)
            while len(self._recent) > self.config.recent_outcomes:
                self._recent.popitem(last=False)
        if tx.key is not None and self._keys.get(tx.key) is tx:
            del self._keys[tx.key]

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _client(self, participant: str) -> ParticipantTransport:
        client = self.clients.get(participant)
        if client is None:
            raise NotFound(f"unknown participant {participant!r}")
        return client

    def _check_branches(self, branches: Sequence[tuple[str, Sequence[Statement]]]) -> None:
        if not branches:
            raise InvalidArgument("a transaction needs at least one branch")
        if len(branches) > self.config.limits.max_branches:
            raise InvalidArgument(
                f"{len(branches)} branches, the limit is {self.config.limits.max_branches}"
            )
        seen: set[str] = set()
        for participant, statements in branches:
            self._client(participant)
            if participant in seen:
                raise InvalidArgument(f"participant {participant!r} appears in two branches")
            seen.add(participant)
            if not statements:
                raise InvalidArgument(f"branch on {participant!r} has no statements")

    # -- one-shot transactions ------------------------------------------------------

    async def run(
        self,
        branches: Sequence[tuple[str, Sequence[Statement]]],
        key: str | None = None,
        request_hash: str | None = None,
        wait: bool = False,
        owner: str | None = None,
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> Outcome:
        self._check_branches(branches)
        self._admit()
        if key is None:
            tx = self._new_tx()
            tx.owner = owner
        else:
            if len(key.encode()) > self.config.limits.max_idempotency_key_bytes:
                raise InvalidArgument(
                    f"idempotency key longer than "
                    f"{self.config.limits.max_idempotency_key_bytes} bytes"
                )
            joined = self._keys.get(key)
            if joined is not None:
                if joined.request_hash != request_hash:
                    raise AlreadyExists(f"idempotency key {key!r} was used for another request")
                self.counters["idempotent_replays"] += 1
                return await self._answer(joined, wait)
            tx = self._new_tx()
            tx.key, tx.request_hash, tx.owner = key, request_hash, owner
            self._keys[key] = tx
            record = await self.decision_log.by_key(key)
            if record is not None:
                self._forget(tx)
                if record.request_hash != request_hash:
                    error = AlreadyExists(f"idempotency key {key!r} was used for another request")
                    tx.outcome.set_exception(error)
                    tx.outcome.exception()  # retrieved: waiters re-raise it themselves
                    raise error
                if record.state is LogState.ONE_PHASE:
                    unresolved = Unavailable(
                        f"the outcome of {record.transaction_id} (key {key!r}) is being "
                        "resolved after a restart; retry"
                    )
                    tx.outcome.set_exception(unresolved)
                    tx.outcome.exception()
                    raise unresolved
                outcome = Outcome.from_record(record)
                tx.outcome.set_result(outcome)
                self.counters["idempotent_replays"] += 1
                return outcome
        work = {p: tuple(s) for p, s in branches}
        tx.isolation = isolation
        # Only a two-phase victim is run again here: a one-phase branch's intent is
        # logged under its key before it runs, and PostgreSQL's own deadlock victim
        # (40P01) on a single shard is the client's to retry.
        tx.retries_left = self.config.deadlock_retries if len(work) > 1 else 0
        outcome = await self._finish(tx, work, wait)
        while tx.successor is not None:
            # A deadlock victim: its work is all here, so run it again as a new
            # transaction (after a short random pause, so that the survivors of the
            # cycle get ahead) rather than hand the client an abort to retry.
            tx = tx.successor
            await self.clock.sleep(self._rng.uniform(0, self.config.deadlock_interval))
            outcome = await self._finish(tx, work, wait)
        return outcome

    async def _answer(self, tx: _Tx, wait: bool, follow: bool = True) -> Outcome:
        """The outcome of `tx`: with `follow`, of the last of its deadlock retries."""
        outcome = await asyncio.shield(tx.outcome)
        while follow and tx.successor is not None:
            tx = tx.successor
            outcome = await asyncio.shield(tx.outcome)
        if wait and not outcome.completed:
            await tx.completed.wait()
            outcome = replace(outcome, completed=True)
        return outcome

    def _admit(self) -> None:
        """Admission control: at most `max_in_flight` transactions prepare at once.
        Beyond it a new one is refused at once, with a hint of when to retry, instead of
        queueing behind the others until the prepare timeout throws its work away."""
        if self._preparing < self.config.max_in_flight:
            return
        self.counters["refused_in_flight_limit"] += 1
        retry_after = max(0.001, self._prepare_seconds) * self._rng.uniform(0.5, 1.5)
        raise ResourceExhausted(
            f"coordinator {self.id} is preparing {self._preparing} transactions, its limit "
            f"(--max-in-flight): retry in about {retry_after * 1000:.0f} ms",
            retry_after,
        )

    async def _finish(
        self, tx: _Tx, work: Mapping[str, tuple[Statement, ...]], wait: bool
    ) -> Outcome:
        """Prepare, decide, log, start phase 2; answer once the decision is durable."""
        self._preparing += 1
        began = self.clock.monotonic()
        try:
            return await self._finish_admitted(tx, work, wait)
        finally:
            self._preparing -= 1
            # A running mean of how long a transaction takes to its answer: the hint.
            self._prepare_seconds += 0.05 * (self.clock.monotonic() - began - self._prepare_seconds)

    async def _finish_admitted(
        self, tx: _Tx, work: Mapping[str, tuple[Statement, ...]], wait: bool
    ) -> Outcome:
        participants = tuple(work)
        tx.participants = list(participants)
        tx.state = transition(tx.state, TxEvent.PREPARE)
        tx.work_started = self.clock.monotonic()
        if (down := self.down(participants)) is not None:
            await self._fail_fast(tx, *down)
            return await self._answer(tx, wait, follow=False)
        try:
            await failpoints.hit("coordinator.before_prepare")
            if len(participants) == 1:
                await self._one_phase(tx, participants[0], work[participants[0]])
            else:
                await self._two_phase(tx, work)
        except Exception as exc:
            if tx.outcome.done():
                # Decided (and, for a commit, durable) before the error: only forward.
                self.log.error("error_after_decision", txid=tx.id, error=repr(exc))
            elif tx.state is TxState.COMMITTING:
                self.log.error("error_after_decision", txid=tx.id, error=repr(exc))
                self._commit_decided(tx, Outcome(tx.id, True))
            else:
                # Nothing is decided unless the outcome is set: presumed abort covers it.
                self._abort(
                    tx,
                    AbortCause.COORDINATOR_RESTART,
                    "",
                    f"coordinator error: {exc!r}",
                    tuple(tx.participants),
                )
                if isinstance(exc, LogFailed):
                    raise Unavailable(f"transaction {tx.id} aborted: {exc}") from exc
                raise
        return await self._answer(tx, wait, follow=False)

    async def _fail_fast(self, tx: _Tx, culprit: str, reason: str) -> None:
        """Abort before anything is sent: a participant is down."""
        if tx.key is not None:
            aborted = Outcome(tx.id, False, AbortCause.PARTICIPANT_UNAVAILABLE, culprit, reason)
            await self.decision_log.record_abort(
                tx.id,
                tuple(tx.participants),
                tx.created,
                aborted.to_json(),
                tx.key,
                tx.request_hash or "",
                owner=tx.owner,
            )
        opened = tuple(p for p in tx.participants if p in tx.incarnations)  # interactive
        self._abort(tx, AbortCause.PARTICIPANT_UNAVAILABLE, culprit, reason, opened)

    async def _two_phase(self, tx: _Tx, work: Mapping[str, tuple[Statement, ...]]) -> None:
        participants = tuple(work)
        ballots, results = await self._collect_votes(tx, work)
        sizes = {p: sum(map(result_bytes, r)) for p, r in results}
        limit = self.config.limits.max_result_bytes
        decision = bound_results(decide(participants, ballots, tx.interruption), sizes, limit)
        if sum(sizes.values()) > limit:
            results = ()  # an abort's answer must be deliverable too
        await failpoints.hit("coordinator.after_votes_before_decision")
        if not decision.commit:
            assert decision.cause is not None
            if tx.key is not None and not (
                decision.cause is AbortCause.DEADLOCK and tx.retries_left > 0
            ):
                # Durable before the outcome is announced: once the aborts are
                # delivered the key leaves memory, and a retry must then find it here.
                # (A deadlock victim about to be retried hands its key on instead.)
                aborted = Outcome(tx.id, False, decision.cause, decision.culprit, decision.reason)
                await self.decision_log.record_abort(
                    tx.id,
                    participants,
                    tx.created,
                    aborted.to_json(),
                    tx.key,
                    tx.request_hash or "",
                    owner=tx.owner,
                )
            self._abort(
                tx, decision.cause, decision.culprit, decision.reason, decision.phase2, results
            )
            return
        outcome = Outcome(tx.id, True, results=results)
        if not decision.phase2:  # every vote READ_ONLY: nothing to commit anywhere
            self.counters["committed_read_only"] += 1
            await self._complete_without_phase2(tx, outcome)
            return
        await self.decision_log.record_commit(
            tx.id,
            decision.phase2,
            tx.created,
            outcome.to_json(),
            tx.key,
            tx.request_hash,
            owner=tx.owner,
        )
        # The point of no return: from here on the only way is forward. No error or
        # cancellation may turn a durable COMMIT into an abort (see `_finish`).
        tx.state = transition(tx.state, TxEvent.COMMIT_LOGGED)
        tx.phase2 = decision.phase2
        try:
            await failpoints.hit("coordinator.after_decision_logged")
        except Exception as exc:
            self.log.error("error_after_decision", txid=tx.id, error=repr(exc))
        self._commit_decided(tx, outcome)

    def _commit_decided(self, tx: _Tx, outcome: Outcome) -> None:
        """Announce a durable COMMIT and start phase 2."""
        tx.outcome.set_result(outcome)
        self._spawn(self._deliver(tx, tx.phase2, commit=True))
        self.counters["committed_two_phase"] += 1
        self.log.debug(
            "decided", txid=tx.id, key=tx.key, decision="commit", participants=",".join(tx.phase2)
        )

    async def _collect_votes(
        self, tx: _Tx, work: Mapping[str, tuple[Statement, ...]]
    ) -> tuple[dict[str, Ballot], BranchResults]:
        timeout = self.config.prepare_timeout
        calls = {
            asyncio.create_task(
                self.clients[p].prepare(
                    tx.id, work[p], False, timeout, tx.incarnations.get(p, ""), tx.isolation
                )
            ): p
            for p in work
        }
        ballots: dict[str, Ballot] = {}
        results: dict[str, tuple[StatementResult, ...]] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending: set[asyncio.Task[PrepareReply]] = set(calls)
        interrupted: asyncio.Future[bool] = asyncio.ensure_future(tx.interrupted.wait())
        try:
            while pending and (remaining := deadline - loop.time()) > 0:
                tx.awaiting = frozenset(calls[t] for t in pending)
                waiting: set[asyncio.Future[Any]] = {*pending, interrupted}
                done, _ = await asyncio.wait(
                    waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in pending & done:
                    reply = task.result()
                    ballots[calls[task]] = reply.ballot
                    results[calls[task]] = reply.results
                pending -= done
                if interrupted.done():
                    break  # a deadlock victim, or a participant went down
                if any(b.vote is Vote.NO for b in ballots.values()):
                    break  # the outcome is known: do not wait for the slow ones
                if pending and ballots:
                    await failpoints.hit("coordinator.after_some_votes")
        finally:
            tx.awaiting = frozenset()
            interrupted.cancel()
            for task in pending:
                task.cancel()
                # A vote missing because the agent cannot be reached says why.
                missing = self.clients[calls[task]].missing_vote()
                if missing is not None:
                    ballots[calls[task]] = missing
        return ballots, tuple((p, results[p]) for p in work if p in results)

    async def _one_phase(
        self, tx: _Tx, participant: str, statements: tuple[Statement, ...]
    ) -> None:
        """A single branch commits without PREPARE. Its intent is forced first, so that
        no transaction can commit without a record (GetTransaction never has to guess,
        and a keyed retry after a crash finds it); recovery settles an intent whose
        answer was lost. If the answer is lost, an Abort fences the branch:
        acknowledged means it did not commit (and never will), FAILED_PRECONDITION
        means it had committed."""
        await self.decision_log.record_one_phase_intent(
            tx.id, participant, tx.created, tx.key, tx.request_hash, owner=tx.owner
        )
        try:
            reply = await self.clients[participant].prepare(
                tx.id,
                statements,
                True,
                self.config.prepare_timeout,
                tx.incarnations.get(participant, ""),
                tx.isolation,
            )
        except Exception as exc:  # it was sent: it may have committed
            reply = PrepareReply(Ballot(Vote.LOST, f"coordinator error: {exc!r}"))
        try:
            await failpoints.hit("coordinator.after_one_phase_reply")
        except Exception as exc:  # the answer stands: only forward
            self.log.error("error_after_one_phase_reply", txid=tx.id, error=repr(exc))
        ballot = reply.ballot
        results = ((participant, reply.results),) if reply.results else ()
        committed = one_phase_committed(ballot.vote)
        if committed is None:
            committed = await self._fence_one_phase(tx, participant)
        cause = cause_of_failure(ballot.sqlstate, abort_cause(ballot.vote))
        outcome = (
            Outcome(tx.id, True, results=results, one_phase=True)
            if committed
            else Outcome(tx.id, False, cause, participant, ballot.reason, results, one_phase=True)
        )
        # Resolved before the transaction leaves memory, so that a retry or a
        # GetTransaction finds either the live transaction or its outcome.
        await self._retry(
            lambda _: self.decision_log.resolve_one_phase(tx.id, outcome.to_json()),
            tx,
            "resolve_one_phase",
        )
        if committed:
            self.counters["committed_one_phase"] += 1
            self.log.debug("committed_one_phase", txid=tx.id, key=tx.key, participant=participant)
            await self._complete_without_phase2(tx, outcome, logged=True)
        else:
            self._abort(tx, cause, participant, ballot.reason, (), results)

    async def _fence_one_phase(self, tx: _Tx, participant: str) -> bool:
        for attempt in itertools.count():
            try:
                await self.clients[participant].abort(tx.id)
                return False
            except FailedPrecondition:
                return True
            except Exception as exc:
                self.log.warning(
                    "one_phase_fence_retry", txid=tx.id, participant=participant, error=str(exc)
                )
                await self.clock.sleep(self.config.phase2_retry.delay(attempt))
        raise AssertionError("unreachable")

    async def _complete_without_phase2(
        self, tx: _Tx, outcome: Outcome, logged: bool = False
    ) -> None:
        """Committed with nothing left to deliver: every branch read-only, none at all,
        or (`logged`) a one-phase commit whose record is resolved already."""
        if not logged and tx.key is not None:
            # The key's record is durable before the answer, for a retry to find.
            await self.decision_log.record_commit(
                tx.id,
                tuple(tx.participants),
                tx.created,
                outcome.to_json(),
                tx.key,
                tx.request_hash,
                completed=True,
                owner=tx.owner,
            )
            logged = True
        tx.state = transition(tx.state, TxEvent.COMMITTED_AT_ONCE)
        tx.outcome.set_result(replace(outcome, completed=True))
        tx.completed.set()
        if logged:
            self._forget(tx)
        else:
            self._spawn(self._record_read_only(tx, outcome))

    async def _record_read_only(self, tx: _Tx, outcome: Outcome) -> None:
        """So that GetTransaction keeps saying committed once it left memory. Not
        forced: nothing was applied anywhere, so if a crash loses the record, the
        answer it falls back to (UNKNOWN: applied nowhere) is still true."""
        await self._retry(
            lambda _: self.decision_log.record_commit(
                tx.id,
                tuple(tx.participants),
                tx.created,
                outcome.to_json(),
                completed=True,
                forced=False,
                owner=tx.owner,
            ),
            tx,
            "record_read_only",
        )
        self._forget(tx)

    def _abort(
        self,
        tx: _Tx,
        cause: AbortCause,
        culprit: str,
        reason: str,
        phase2: tuple[str, ...],
        results: BranchResults = (),
    ) -> Outcome:
        """Decide ABORT (no record needed) and start telling `phase2`. A one-shot deadlock
        victim with retries left gets a successor first, which takes over its key."""
        tx.state = transition(tx.state, TxEvent.ABORT)
        if cause is AbortCause.DEADLOCK and tx.retries_left > 0 and self.stopped is None:
            successor = tx.successor = self._new_tx()
            successor.retries_left = tx.retries_left - 1
            successor.key, successor.request_hash = tx.key, tx.request_hash
            successor.isolation = tx.isolation
            successor.owner = tx.owner
            if tx.key is not None:
                self._keys[tx.key] = successor
            self.counters["deadlock_retries"] += 1
        outcome = Outcome(tx.id, False, cause, culprit, reason, results)
        tx.outcome.set_result(outcome)
        self.counters[f"aborted_{cause.value}"] += 1
        self.log.info(
            "decided",
            txid=tx.id,
            key=tx.key,
            decision="abort",
            cause=cause.value,
            culprit=culprit,
            reason=reason,
        )
        self._spawn(self._deliver(tx, phase2, commit=False))
        return outcome

    # -- phase 2 --------------------------------------------------------------------

    async def _deliver(self, tx: _Tx, participants: tuple[str, ...], commit: bool) -> None:
        tx.pending = set(participants)
        deliver_one = self._deliver_commit if commit else self._deliver_abort
        await asyncio.gather(*(deliver_one(tx, p) for p in participants))
        if commit:
            await self._retry(self._mark_complete, tx, "mark_complete")
        tx.state = transition(tx.state, TxEvent.ACKNOWLEDGED)
        tx.completed.set()
        self._forget(tx)
        self.log.debug("completed", txid=tx.id, outcome="committed" if commit else "aborted")

    async def _mark_complete(self, tx: _Tx) -> None:
        await failpoints.hit("coordinator.before_mark_complete")
        await self.decision_log.mark_complete(tx.id)

    async def _deliver_commit(self, tx: _Tx, participant: str) -> None:
        """Retried until acknowledged, whatever fails: the COMMIT is durable."""
        client = self.clients[participant]
        for attempt in itertools.count():
            try:
                # Batched with the agent's other commits: COMMIT PREPARED never
                # waits for a lock, so one batch cannot hold up the next.
                await client.finish(tx.id, True)
            except FailedPrecondition as exc:
                # The branch is in the other final state: only an operator's heuristic
                # decision can do that, and retrying cannot undo it.
                self._heuristic_hazard(tx, participant, exc)
                break
            except Exception as exc:
                await self._phase2_retry_wait(tx, participant, attempt, exc)
                continue
            break
        tx.pending.discard(participant)
        if tx.pending:
            with contextlib.suppress(Exception):  # a test hook; an error changes nothing
                await failpoints.hit("coordinator.after_some_commits")

    async def _deliver_abort(self, tx: _Tx, participant: str) -> None:
        """Best effort, a bounded number of attempts. Under presumed abort an Abort only
        releases locks early: a participant that cannot be reached rolls its branch back
        when its own recovery asks (no record: aborted), and so does this coordinator's
        in-doubt scan once the transaction has left memory. So an unreachable agent
        costs a few attempts per transaction, not a retry loop that never ends."""
        client = self.clients[participant]
        for attempt in range(self.config.abort_attempts):
            try:
                # Alone: the branch may still be open and waiting on a lock, and the
                # agent must interrupt it first.
                await client.abort(tx.id)
            except FailedPrecondition as exc:
                self._heuristic_hazard(tx, participant, exc)
                break
            except Exception as exc:
                if attempt + 1 < self.config.abort_attempts:
                    await self._phase2_retry_wait(tx, participant, attempt, exc)
                    continue
                self.counters["aborts_left_to_recovery"] += 1
                self.log.warning(
                    "abort_left_to_recovery", txid=tx.id, participant=participant, error=str(exc)
                )
            break
        tx.pending.discard(participant)

    def _heuristic_hazard(self, tx: _Tx, participant: str, exc: Exception) -> None:
        self.counters["heuristic_hazards"] += 1
        self.log.error("heuristic_hazard", txid=tx.id, participant=participant, error=str(exc))

    async def _phase2_retry_wait(
        self, tx: _Tx, participant: str, attempt: int, exc: Exception
    ) -> None:
        self.counters["phase2_retries"] += 1
        if attempt % 10 == 0:
            self.log.warning(
                "phase2_retry",
                txid=tx.id,
                participant=participant,
                attempt=attempt,
                error=str(exc),
            )
        await self.clock.sleep(self.config.phase2_retry.delay(attempt))

    async def _retry(self, step: Callable[[_Tx], Awaitable[None]], tx: _Tx, what: str) -> None:
        """Run a step that must happen (a log write after the decision) until it does."""
        for attempt in itertools.count():
            try:
                await step(tx)
                return
            except Exception as exc:
                self.log.error("retrying", txid=tx.id, step=what, error=repr(exc))
                await self.clock.sleep(self.config.phase2_retry.delay(attempt))

    # -- interactive transactions ---------------------------------------------------

    def begin(
        self, owner: str | None = None, isolation: Isolation = Isolation.READ_COMMITTED
    ) -> str:
        tx = self._new_tx()
        tx.owner = owner
        tx.isolation = isolation
        return tx.id

    def _live_tx(self, txid: str) -> _Tx:
        TransactionId.parse(txid)
        tx = self._live.get(txid)
        if tx is None:
            raise NotFound(f"no live transaction {txid} (unknown, or already finished)")
        return tx

    async def execute(
        self, txid: str, participant: str, statements: Sequence[Statement]
    ) -> list[StatementResult]:
        if (recent := self._recent.get(txid)) is not None:
            # Ended already (rolled back by a timeout, say): say so, not NOT_FOUND.
            if recent.committed:
                raise FailedPrecondition(f"transaction {txid} has committed")
            raise Aborted(f"transaction {txid} has aborted: {recent.reason}")
        tx = self._live_tx(txid)
        client = self._client(participant)
        if not statements:
            raise InvalidArgument("Execute needs at least one statement")
        if tx.state is not TxState.ACTIVE:
            raise FailedPrecondition(f"transaction {txid} is {tx.state.value}")
        if (down := self.down([participant])) is not None:
            self._abort(
                tx, AbortCause.PARTICIPANT_UNAVAILABLE, participant, down[1], tuple(tx.participants)
            )
            raise Aborted(f"transaction {txid} aborted: {down[1]}")
        if participant not in tx.participants:
            if len(tx.participants) >= self.config.limits.max_branches:
                raise InvalidArgument(f"the limit is {self.config.limits.max_branches} branches")
            tx.participants.append(participant)
        tx.busy += 1
        tx.work_started = self.clock.monotonic()
        try:
            results, incarnation = await client.execute(
                txid, statements, tx.incarnations.get(participant, ""), tx.isolation
            )
            opened = tx.incarnations.setdefault(participant, incarnation)
            if opened != incarnation:  # two first Executes, and a restart between them
                raise Aborted(
                    f"agent {participant} restarted during the transaction "
                    f"(incarnation {opened}, then {incarnation})"
                )
            return results
        except (Aborted, Unavailable, FailedPrecondition) as exc:
            if tx.outcome.done() and not tx.outcome.result().committed:
                # Aborted meanwhile (a deadlock victim, a timeout): that is the reason.
                ended = tx.outcome.result()
                raise Aborted(
                    f"transaction {txid} aborted: {ended.reason}",
                    cause=ended.cause.value if ended.cause else "",
                ) from exc
            cause = AbortCause.EXECUTE_FAILED
            if isinstance(exc, Unavailable):
                cause = AbortCause.PARTICIPANT_UNAVAILABLE
            elif isinstance(exc, Aborted):
                cause = cause_of_failure(exc.sqlstate, cause)
            if tx.state is TxState.ACTIVE:
                self._abort(tx, cause, participant, str(exc), tuple(tx.participants))
            raise Aborted(f"transaction {txid} aborted: {exc}", cause=cause.value) from exc
        finally:
            tx.busy -= 1
            tx.last_used = self.clock.monotonic()

    async def commit(self, txid: str, wait: bool) -> Outcome:
        if (recent := self._recent.get(txid)) is not None:
            return recent  # a repeated Commit, or after an abort
        tx = self._live_tx(txid)
        if tx.state is not TxState.ACTIVE:
            return await self._answer(tx, wait)  # a repeated Commit, or after an abort
        if tx.busy:
            raise FailedPrecondition(f"transaction {txid} has an Execute in progress")
        self._admit()
        # A participant whose every Execute was refused before it ran holds no branch.
        enlisted = [p for p in tx.participants if p in tx.incarnations]
        if not enlisted:
            await self._complete_without_phase2(tx, Outcome(tx.id, True, one_phase=True))
            return await self._answer(tx, wait)
        return await self._finish(tx, {p: () for p in enlisted}, wait)

    async def rollback(self, txid: str) -> Outcome:
        if (recent := self._recent.get(txid)) is not None:
            if recent.committed:
                raise FailedPrecondition(f"transaction {txid} has committed")
            return recent
        tx = self._live_tx(txid)
        if tx.state is TxState.ACTIVE:
            return self._abort(
                tx,
                AbortCause.CLIENT_ROLLBACK,
                "",
                "rolled back by the client",
                tuple(tx.participants),
            )
        outcome = await asyncio.shield(tx.outcome)
        if outcome.committed:
            raise FailedPrecondition(f"transaction {txid} has committed")
        return outcome

    async def reap_idle_transactions(self) -> None:
        """Roll back interactive transactions idle too long or alive too long."""
        period = min(1.0, self.config.transaction_idle_timeout / 4)
        while True:
            await self.clock.sleep(period)
            now = self.clock.monotonic()
            for tx in list(self._live.values()):
                if tx.state is not TxState.ACTIVE:
                    continue
                if now - tx.started > self.config.transaction_max_lifetime:
                    self._abort(
                        tx,
                        AbortCause.LIFETIME_EXCEEDED,
                        "",
                        f"interactive transaction older than {self.config.transaction_max_lifetime}"
                        " s (--transaction-max-lifetime)",
                        tuple(tx.participants),
                    )
                elif not tx.busy and now - tx.last_used > self.config.transaction_idle_timeout:
                    self._abort(
                        tx,
                        AbortCause.IDLE_TIMEOUT,
                        "",
                        "interactive transaction idle",
                        tuple(tx.participants),
                    )

    # -- contention and availability -------------------------------------------------

    async def deadlock_loop(self) -> None:
        """Break cross-shard deadlocks (see coordinator.deadlock)."""
        while True:
            await self.clock.sleep(self.config.deadlock_interval)
            try:
                await self.break_deadlocks()
            except Exception as exc:
                self.log.error("deadlock_scan_failed", error=repr(exc))

    async def break_deadlocks(self) -> list[Victim]:
        # Nobody waits for a lock longer than one period unless someone is still at
        # work (preparing, or an Execute) a period after it began.
        since = self.clock.monotonic() - self.config.deadlock_interval
        if not any(
            tx.work_started < since
            and (tx.state is TxState.PREPARING or (tx.state is TxState.ACTIVE and tx.busy))
            for tx in self._live.values()
        ):
            return []
        first = await self._wait_snapshot(list(self.clients))
        if not find_victims(first, self._may_be_victim):
            return []
        second = await self._wait_snapshot(sorted({w.participant for w in first}))
        victims = find_victims(confirmed(first, second), self._may_be_victim)
        for victim in victims:
            self._break(victim)
        return victims

    async def _wait_snapshot(self, participants: list[str]) -> list[Wait]:
        timeout = min(1.0, self.config.rpc_timeout)

        async def one(participant: str) -> list[Wait]:
            if participant in self._down:
                return []
            try:
                return await self.clients[participant].waits_for(timeout)
            except TwoPCError:
                return []  # a shard we cannot see cannot prove a cycle

        return [w for waits in await asyncio.gather(*map(one, participants)) for w in waits]

    def _may_be_victim(self, txid: str) -> bool:
        """Ours, undecided, and not a one-phase commit in flight (whose outcome only the
        fence could tell: a cycle through it has a two-phase member to break)."""
        tx = self._live.get(txid)
        if tx is None or tx.outcome.done():
            return False
        return tx.state is TxState.ACTIVE or (
            tx.state is TxState.PREPARING and len(tx.participants) > 1
        )

    def _break(self, victim: Victim) -> None:
        tx = self._live.get(victim.transaction_id)
        if tx is None or not self._may_be_victim(tx.id):
            return
        self.counters["deadlocks_broken"] += 1
        self.log.info(
            "deadlock_broken",
            txid=tx.id,
            participant=victim.participant,
            cycle=",".join(victim.cycle),
        )
        if tx.state is TxState.ACTIVE:
            reason = victim.describe()
            self._abort(tx, AbortCause.DEADLOCK, victim.participant, reason, tuple(tx.participants))
        else:  # its vote collection decides the abort
            self._interrupt(tx, AbortCause.DEADLOCK, victim.participant, victim.describe())

    @staticmethod
    def _interrupt(tx: _Tx, cause: AbortCause, culprit: str, reason: str) -> None:
        if tx.interruption is None:
            tx.interruption = (cause, culprit, reason)
            tx.interrupted.set()

    async def probe_loop(self, participant: str) -> None:
        """Mark a participant down after consecutive failed probes, up at the first
        answer. Down, it fails new transactions fast; phase 2 and recovery go on
        retrying it as always."""
        client = self.clients[participant]
        failures = 0
        window = self.config.probe_interval * self.config.probe_failures + self.config.probe_timeout
        while True:
            down = participant in self._down
            # Down, it is probed more often: a restarted agent is back within moments.
            await self.clock.sleep(self.config.probe_interval / (5 if down else 1))
            try:
                await client.probe(self.config.probe_timeout)
            except TwoPCError as exc:
                failures += 1
                # Any other answer within the window proves it alive: a slow probe on a
                # loaded machine must not turn a working agent's transactions away.
                silent = self.clock.monotonic() - client.last_answer > window
                if failures >= self.config.probe_failures and silent and not down:
                    self._mark_down(participant, f"{failures} health probes unanswered ({exc})")
                continue
            failures = 0
            if self._down.pop(participant, None) is not None:
                self.log.info("participant_up", participant=participant)

    def _mark_down(self, participant: str, why: str) -> None:
        """New transactions touching it fail fast; those waiting for its vote stop
        waiting (their clients move on instead of sitting out the prepare timeout)."""
        reason = self._down[participant] = f"participant {participant} is down: {why}"
        self.counters["participants_marked_down"] += 1
        self.log.warning("participant_down", participant=participant, error=why)
        for tx in list(self._live.values()):
            if participant in tx.awaiting:
                self._interrupt(tx, AbortCause.PARTICIPANT_UNAVAILABLE, participant, reason)

    def down(self, participants: Sequence[str]) -> tuple[str, str] | None:
        """The first of `participants` marked down, with why."""
        for p in participants:
            if p in self._down:
                return p, self._down[p]
        return None

    # -- status ---------------------------------------------------------------------

    async def get(self, txid: str) -> TransactionInfo:
        parsed = TransactionId.parse(txid)
        tx = self._live.get(txid)
        if tx is not None:
            return self._info(tx, self.clock.time())
        record = await self.decision_log.get(txid)
        if record is None and (recent := self._recent.get(txid)) is not None:
            # Finished and not logged: an abort (every commit has a record).
            answer = Reported.COMMITTED if recent.committed else Reported.ABORTED
            state = TxState.COMMITTED if recent.committed else TxState.ABORTED
            return TransactionInfo(txid, answer, state)
        if record is not None:
            age = self.clock.time() - record.created_at
            if record.state is LogState.ONE_PHASE:
                return TransactionInfo(
                    txid, Reported.IN_PROGRESS, TxState.PREPARING, record.participants, age
                )
            state = TxState(record.state)
            return TransactionInfo(
                txid, reported(state), state, record.participants, age, owner=record.owner
            )
        if parsed.coordinator != self.id:
            raise NotFound(f"transaction {txid} belongs to coordinator {parsed.coordinator}")
        if not self.recovered:
            raise Unavailable("recovery has not finished; ask again")
        if parsed.epoch > self.decision_log.epoch:
            # A later incarnation issued it: with a shared log that is another process
            # of this id that took over from this one, and only it may answer (an
            # UNKNOWN from here would have the participant roll back its branch).
            raise Unavailable(
                f"transaction {txid} is of epoch {parsed.epoch}, later than this "
                f"process's {self.decision_log.epoch}: ask the active coordinator {self.id}"
            )
        answer = reported_without_record(
            await self.decision_log.epoch_started(parsed.epoch), self.decision_log.pruned_before
        )
        return TransactionInfo(txid, answer, None)

    def _info(self, tx: _Tx, now: float) -> TransactionInfo:
        return TransactionInfo(
            tx.id,
            reported(tx.state),
            tx.state,
            tuple(tx.participants),
            now - tx.created,
            tuple(sorted(tx.pending)),
            tx.owner,
        )

    async def owner_of(self, txid: str) -> str | None:
        """The client that began `txid`, if known: live, or named by its log record."""
        tx = self._live.get(txid)
        if tx is not None:
            return tx.owner
        record = await self.decision_log.get(txid)
        return record.owner if record is not None else None

    def in_flight(self) -> list[TransactionInfo]:
        now = self.clock.time()
        return [self._info(tx, now) for tx in self._live.values()]

    # -- recovery -------------------------------------------------------------------

    async def recover(self) -> None:
        """Start-up recovery, before serving: re-drive logged commits, then resolve the
        participants' in-doubt branches (bounded wait; the periodic scan finishes)."""
        for record in self.decision_log.incomplete_commits():
            tx = self._tx(record.transaction_id, TxState.COMMITTING, record.created_at)
            tx.participants = list(record.participants)
            tx.owner = record.owner
            tx.outcome.set_result(Outcome.from_record(record))
            self._live[tx.id] = tx
            self.counters["recovered_commits"] += 1
            self.log.info("recovering_commit", txid=tx.id)
            self._spawn(self._deliver(tx, record.participants, commit=True))
        for record in self.decision_log.unresolved_one_phase():
            self._spawn(self._resolve_one_phase(record))
        # Everything not logged as committed by now can never commit: safe to say so.
        self.recovered = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self.resolve_in_doubt(), timeout=self.config.startup_recovery_timeout
            )

    async def _resolve_one_phase(self, record: LogRecord) -> None:
        """A keyed one-phase commit whose answer died with the previous incarnation:
        the Abort fence tells whether it committed, and makes sure it never will if
        it did not."""
        (participant,) = record.participants
        tx = self._tx(record.transaction_id, TxState.PREPARING, record.created_at)
        committed = await self._fence_one_phase(tx, participant)
        if committed:
            outcome = Outcome(tx.id, True, one_phase=True, completed=True)
        else:
            outcome = Outcome(
                tx.id,
                False,
                AbortCause.COORDINATOR_RESTART,
                participant,
                "coordinator restarted before the answer",
                one_phase=True,
            )
        await self._retry(
            lambda _: self.decision_log.resolve_one_phase(tx.id, outcome.to_json()),
            tx,
            "resolve_one_phase",
        )
        self.log.info("one_phase_resolved", txid=tx.id, committed=committed)

    async def resolve_in_doubt(self) -> None:
        await asyncio.gather(*(self._resolve_on(p) for p in self.clients))

    async def check_log_is_current(self) -> None:
        """Before the epoch is bumped: refuse a decision log that is behind what the
        participants have seen (a restored backup, a copy from another machine). Its
        ids would repeat, and presumed abort would roll back branches committed under
        the lost log. Participants that do not answer in time are checked by the
        periodic scan, which then stops this coordinator from deciding."""
        last = self.decision_log.last_epoch

        async def highest(participant: str) -> int | None:
            try:
                listed = await self.clients[participant].list_prepared(self.id)
            except TwoPCError as exc:
                self.log.warning("log_check_unverified", participant=participant, error=str(exc))
                return None
            return listed.highest_epoch

        names = list(self.clients)
        try:
            seen = await asyncio.wait_for(
                asyncio.gather(*(highest(p) for p in names)),
                timeout=self.config.startup_recovery_timeout,
            )
        except TimeoutError:
            self.log.warning("log_check_unverified", participants=",".join(names))
            return
        for participant, epoch in zip(names, seen, strict=True):
            if epoch is not None and epoch > last:
                raise LogBehind(_log_behind(self.id, participant, epoch, last))

    async def _resolve_on(self, participant: str) -> None:
        client = self.clients[participant]
        try:
            listed = await client.list_prepared(self.id)
        except TwoPCError as exc:
            self.log.warning("in_doubt_scan_failed", participant=participant, error=str(exc))
            return
        if listed.highest_epoch > self.decision_log.epoch:
            # Deciding now could presume abort for a branch committed under the lost
            # log: stop deciding, and say why.
            why = _log_behind(self.id, participant, listed.highest_epoch, self.decision_log.epoch)
            if self._stopped is None:
                self._stopped = why
                self.log.error("log_behind_participants", participant=participant, error=why)
            return
        if self._stopped is not None:
            return
        for branch in listed.branches:
            txid = branch.transaction_id
            if txid in self._live:
                continue  # a live transaction: the protocol itself will finish it
            if TransactionId.parse(txid).epoch > self.decision_log.epoch:
                continue  # a later incarnation's (it took over from us): never ours to end
            record = await self.decision_log.get(txid)
            commit = record is not None and record.state in (
                LogState.COMMITTING,
                LogState.COMMITTED,
            )
            try:
                if commit:
                    await client.commit(txid)
                else:
                    await client.abort(txid)
            except TwoPCError as exc:
                self.log.warning(
                    "in_doubt_resolve_failed", txid=txid, participant=participant, error=str(exc)
                )
                continue
            self.counters["in_doubt_committed" if commit else "in_doubt_aborted"] += 1
            self.log.info(
                "in_doubt_resolved",
                txid=txid,
                participant=participant,
                outcome="commit" if commit else "abort",
            )

    async def recovery_loop(self) -> None:
        while True:
            await self.clock.sleep(self.config.recovery_interval)
            try:
                await self.resolve_in_doubt()
                await self.decision_log.prune(self.clock.time() - self.config.retention)
            except Exception as exc:
                self.log.error("recovery_scan_failed", error=repr(exc))

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for client in self.clients.values():
            await client.close()
