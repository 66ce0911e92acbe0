"""Client library for applications: one-shot and interactive global transactions.

    from coordinator.client import CoordinatorClient, Statement, exactly

    with CoordinatorClient("127.0.0.1:7000") as client:
        outcome = client.run({
            "shard1": [Statement("UPDATE accounts SET balance = balance - %s "
                                 "WHERE id = %s AND balance >= %s", (10, 1, 10), exactly(1))],
            "shard2": [Statement("UPDATE accounts SET balance = balance + %s WHERE id = %s",
                                 (10, 2), exactly(1))],
        }, idempotency_key="transfer-42")
        if not outcome.committed:
            print(outcome.abort_participant, outcome.abort_reason)

        with client.transaction() as tx:      # commits on success, rolls back on error
            balance = tx.execute("shard1", "SELECT balance FROM accounts WHERE id = %s", (1,))
            tx.execute("shard2", "UPDATE ...", (...))
        print(tx.outcome)

Credentials: `tls=TlsConfig(cert, key, ca)` authenticates the client by its certificate
(mutual TLS), `tls=TlsConfig(ca=ca), token=...` by a bearer token (on the coordinator's
token port); `server_name` is the name the coordinator's certificate must carry
(default: the host dialled). Without `tls` the channel is plaintext, which only a
coordinator started with `--insecure` accepts.

Isolation: `run(..., isolation="serializable")` and `transaction(isolation=...)` (or
`begin`) choose the level every branch runs at: "read_committed" (the default),
"repeatable_read" or "serializable" (or an `Isolation`).

Retrying: an outcome whose `retryable` is true aborted because it lost a conflict, not
because its work was wrong (see `RETRYABLE_CAUSES`); `run_with_retries` (and
`run_with_retries_async`) runs keyed work again until it commits, with jittered
exponential backoff, applying it at most once; `transact_with_retries` (and
`transact_with_retries_async`) does the same for an interactive transaction's work.

One implementation: `AsyncCoordinatorClient` makes every call (its failover between a
coordinator's processes, its deadline, its error mapping); `CoordinatorClient` runs
those calls on a private event loop in a background thread (`coordinator.loop_thread`),
so it may be shared by any number of threads, and closing it stops that thread.

SQL uses psycopg placeholders (`%s`); values are sent typed and bound by PostgreSQL.
An aborted transaction is an outcome, not an exception. Exceptions mean the request
itself failed: `TransportError` (coordinator unreachable or deadline exceeded: the
outcome is unknown, retry with the same idempotency key), `TransactionAborted` (a
statement of an interactive transaction failed, so the transaction was rolled back),
and the project's errors for a refused request (`InvalidArgument`, `NotFound`,
`AlreadyExists`, `FailedPrecondition`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc

from coordinator.answers import RETRYABLE_CAUSES, Outcome, TransactionStatus
from coordinator.failover import Endpoints, addresses_of, backoff, channel_options
from coordinator.loop_thread import LoopThread
from coordinator.protocol import RetryPolicy
from coordinator.run_sharing import SharedRuns
from coordinator.wire import outcome_from_pb, run_request_to_pb, status_from_pb
from twopc_common.errors import Aborted, ResourceExhausted, TwoPCError
from twopc_common.grpc_errors import ABORT_CAUSE, RETRY_AFTER_MS, error_for
from twopc_common.isolation import Isolation, isolation_to_pb, parse_isolation
from twopc_common.limits import Limits
from twopc_common.tls import TlsConfig, aio_channel
from twopc_common.values import (
    Expectation,
    SqlValue,
    Statement,
    StatementResult,
    exactly,
    result_from_pb,
    statement_to_pb,
)
from twopc_pb import coordinator_pb2 as pb
from twopc_pb import coordinator_pb2_grpc as cgrpc

__all__ = [
    "RETRYABLE_CAUSES",
    "AsyncCoordinatorClient",
    "AsyncTransaction",
    "CoordinatorClient",
    "Expectation",
    "Isolation",
    "Outcome",
    "Retry",
    "Statement",
    "StatementResult",
    "TlsConfig",
    "Transaction",
    "TransactionAborted",
    "TransactionStatus",
    "TransportError",
    "attempt_key",
    "exactly",
    "retry_when_refused",
    "retry_when_refused_async",
    "run_with_retries",
    "run_with_retries_async",
    "transact_with_retries",
    "transact_with_retries_async",
]

Branches = Mapping[str, Sequence[Statement]]
T = TypeVar("T")
IsolationArg = Isolation | str


def _refusal_delay(exc: ResourceExhausted, attempt: int) -> float:
    """The coordinator's hint, or capped exponential backoff, with full jitter."""
    base = exc.retry_after if exc.retry_after is not None else min(2.0, 0.05 * 2**attempt)
    return random.uniform(0.5, 1.5) * base


def retry_when_refused(call: Callable[[], T], attempts: int = 10) -> T:
    """`call()`, again after each RESOURCE_EXHAUSTED of a coordinator at its admission
    limit (--max-in-flight), waiting its retry hint with jitter. Safe for any call:
    refused work never ran. Other errors, and the last refusal, are raised."""
    for attempt in range(attempts - 1):
        try:
            return call()
        except ResourceExhausted as exc:
            time.sleep(_refusal_delay(exc, attempt))
    return call()


async def retry_when_refused_async(call: Callable[[], Awaitable[T]], attempts: int = 10) -> T:
    """`retry_when_refused` for the asyncio client."""
    for attempt in range(attempts - 1):
        try:
            return await call()
        except ResourceExhausted as exc:
            await asyncio.sleep(_refusal_delay(exc, attempt))
    return await call()


class TransportError(TwoPCError):
    """The coordinator could not be reached or did not answer in time. The outcome is
    unknown: retry with the same idempotency key, or ask with `get_transaction`."""


class TransactionAborted(Aborted):
    """An interactive transaction was rolled back because a statement failed; `cause`
    says why (e.g. "SERIALIZATION_FAILURE", "EXECUTE_FAILED")."""

    @property
    def retryable(self) -> bool:
        """The transaction lost a conflict (`RETRYABLE_CAUSES`): running it again may
        succeed."""
        return self.cause in RETRYABLE_CAUSES


def _isolation(level: IsolationArg) -> Isolation:
    return level if isinstance(level, Isolation) else parse_isolation(level)


def _statement(
    sql: str | Statement, params: Sequence[SqlValue], expect: Expectation | None
) -> Statement:
    return sql if isinstance(sql, Statement) else Statement(sql, tuple(params), expect)


def _raise(exc: grpc.RpcError) -> TwoPCError:
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or code.name
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    ):
        return TransportError(f"{code.name}: {details}")
    if code == grpc.StatusCode.ABORTED:
        return TransactionAborted(details, cause=_trailer(exc, ABORT_CAUSE) or "")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(details, _retry_after(exc))
    return error_for(code, details)


def _trailer(exc: grpc.RpcError, name: str) -> str | None:
    trailers: Any = exc.trailing_metadata()
    for key, value in trailers or ():
        if key == name and isinstance(value, str):
            return value
    return None


def _retry_after(exc: grpc.RpcError) -> float | None:
    """The coordinator's hint of when to try again, from the trailing metadata."""
    value = _trailer(exc, RETRY_AFTER_MS)
    try:
        return None if value is None else int(value) / 1000
    except ValueError:
        return None


# A Run larger than this goes as a unary call: a RunStream message is held to the
# default server message limit, and a coordinator may be configured to accept more.
_SHARED_MAX = Limits().max_message_bytes - 64 * 1024

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclass(frozen=True)
class _Connection:
    """A channel to one coordinator process, and its stub (made once)."""

    channel: grpc.aio.Channel

    @functools.cached_property
    def stub(self) -> cgrpc.CoordinatorStub:
        return cgrpc.CoordinatorStub(self.channel)

    @functools.cached_property
    def runs(self) -> SharedRuns:
        return SharedRuns(self.stub)

    async def close(self) -> None:
        if "runs" in self.__dict__:
            await self.runs.close()
        await self.channel.close()


class _Calls:
    """Every call of the client: failed over between the coordinator's processes
    (`coordinator.failover`) within its deadline, its gRPC error mapped (`_raise`)."""

    def __init__(
        self,
        address: str | Sequence[str],
        tls: TlsConfig | None,
        token: str | None,
        server_name: str | None,
        share_calls: bool,
    ) -> None:
        self._share_calls = share_calls
        addresses = addresses_of(address)
        options = _CHANNEL_OPTIONS + channel_options(addresses)
        self._endpoints = Endpoints(
            addresses,
            lambda a: _Connection(aio_channel(a, tls or TlsConfig(), options, server_name, token)),
        )

    async def call(self, method: str, request: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        keyed = method == "Run" and bool(request.idempotency_key)
        shared = method == "Run" and self._share_calls and request.ByteSize() < _SHARED_MAX
        for attempt in itertools.count():
            connection = self._endpoints.connection()
            try:
                if shared:
                    return await connection.runs.run(request, deadline - time.monotonic())
                call = getattr(connection.stub, method)
                return await call(request, timeout=deadline - time.monotonic())
            except grpc.aio.AioRpcError as exc:
                pause = backoff(attempt)
                if (
                    not self._endpoints.should_retry(exc, method, keyed)
                    or time.monotonic() + pause >= deadline
                ):
                    raise _raise(exc) from None
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for connection in self._endpoints.connections():
            await connection.close()


# -- asyncio client: the one implementation -------------------------------------------


class AsyncCoordinatorClient:
    """A client for asyncio programs; `CoordinatorClient` runs its calls."""

    def __init__(
        self,
        address: str | Sequence[str],
        timeout: float = 30.0,
        *,
        tls: TlsConfig | None = None,
        token: str | None = None,
        server_name: str | None = None,
        share_calls: bool = True,
    ) -> None:
        """`share_calls`: Runs go over one long-lived RunStream call per coordinator
        process, several in a message when they queue (`coordinator.run_sharing`);
        False: one unary Run call each."""
        self.timeout = timeout
        """Seconds a call may take, its failover attempts included."""
        self._calls = _Calls(address, tls, token, server_name, share_calls)

    async def __aenter__(self) -> AsyncCoordinatorClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._calls.close()

    async def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        return await self._calls.call(method, request, timeout or self.timeout)

    async def run(
        self,
        branches: Branches,
        idempotency_key: str | None = None,
        wait_for_completion: bool = False,
        timeout: float | None = None,
        isolation: IsolationArg = Isolation.READ_COMMITTED,
    ) -> Outcome:
        request = run_request_to_pb(
            branches, idempotency_key, wait_for_completion, _isolation(isolation)
        )
        return outcome_from_pb(await self._call("Run", request, timeout))

    @contextlib.asynccontextmanager
    async def transaction(
        self,
        wait_for_completion: bool = False,
        isolation: IsolationArg = Isolation.READ_COMMITTED,
    ) -> AsyncIterator[AsyncTransaction]:
        """An interactive transaction that commits when the block ends and rolls back
        when it raises (unless it already ended)."""
        tx = await self.begin(isolation)
        try:
            yield tx
        except BaseException:
            if tx.outcome is None:
                with contextlib.suppress(TwoPCError):
                    await tx.rollback()
            raise
        if tx.outcome is None:
            await tx.commit(wait_for_completion)

    async def begin(self, isolation: IsolationArg = Isolation.READ_COMMITTED) -> AsyncTransaction:
        request = pb.BeginRequest(isolation=isolation_to_pb(_isolation(isolation)))
        reply = await self._call("Begin", request, None)
        return AsyncTransaction(self, reply.transaction_id)

    async def get_transaction(self, transaction_id: str) -> TransactionStatus:
        reply = await self._call(
            "GetTransaction", pb.GetTransactionRequest(transaction_id=transaction_id), None
        )
        return status_from_pb(reply)

    async def list_transactions(self) -> list[TransactionStatus]:
        reply = await self._call("ListTransactions", pb.ListTransactionsRequest(), None)
        return [status_from_pb(t) for t in reply.transactions]

    async def status(self, timeout: float | None = None) -> pb.CoordinatorStatus:
        result: pb.CoordinatorStatus = await self._call("Status", pb.StatusRequest(), timeout)
        return result


class AsyncTransaction:
    """An interactive transaction; `outcome` is set once it committed or rolled back."""

    def __init__(self, client: AsyncCoordinatorClient, transaction_id: str) -> None:
        self._client = client
        self.id = transaction_id
        self.outcome: Outcome | None = None

    async def execute(
        self,
        participant: str,
        sql: str | Statement,
        params: Sequence[SqlValue] = (),
        expect: Expectation | None = None,
    ) -> StatementResult:
        return (await self.execute_many(participant, [_statement(sql, params, expect)]))[0]

    async def execute_many(
        self, participant: str, statements: Sequence[Statement]
    ) -> list[StatementResult]:
        request = pb.ExecuteRequest(
            transaction_id=self.id,
            participant=participant,
            statements=[statement_to_pb(s) for s in statements],
        )
        try:
            reply = await self._client._call("Execute", request, None)
        except TransactionAborted as exc:
            self.outcome = Outcome(self.id, False, exc.cause or "EXECUTE_FAILED", participant)
            raise
        return [result_from_pb(r) for r in reply.results]

    async def commit(self, wait_for_completion: bool = False) -> Outcome:
        request = pb.CommitRequest(transaction_id=self.id, wait_for_completion=wait_for_completion)
        self.outcome = outcome_from_pb(await self._client._call("Commit", request, None))
        return self.outcome

    async def rollback(self) -> Outcome:
        request = pb.RollbackRequest(transaction_id=self.id)
        self.outcome = outcome_from_pb(await self._client._call("Rollback", request, None))
        return self.outcome


# -- blocking client: the asyncio one, run on a private event loop --------------------


class CoordinatorClient:
    """A blocking client, thread-safe: each call is `AsyncCoordinatorClient`'s, run on
    the client's own event loop in a background thread (`coordinator.loop_thread`)
    while the calling thread waits. Close it (or use `with`); one that is garbage
    collected unclosed, or still open at exit, is closed then."""

    def __init__(
        self,
        address: str | Sequence[str],
        timeout: float = 30.0,
        *,
        tls: TlsConfig | None = None,
        token: str | None = None,
        server_name: str | None = None,
        share_calls: bool = True,
    ) -> None:
        self._aio = AsyncCoordinatorClient(
            address,
            timeout,
            tls=tls,
            token=token,
            server_name=server_name,
            share_calls=share_calls,
        )
        self._loop = LoopThread("twopc-client")
        # Holds the loop and the asyncio client, never `self`: so it can close them.
        self._finalizer = weakref.finalize(self, self._loop.close, self._aio.close)

    @property
    def timeout(self) -> float:
        """Seconds a call may take, its failover attempts included."""
        return self._aio.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._aio.timeout = value

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._finalizer()

    def run(
        self,
        branches: Branches,
        idempotency_key: str | None = None,
        wait_for_completion: bool = False,
        timeout: float | None = None,
        isolation: IsolationArg = Isolation.READ_COMMITTED,
    ) -> Outcome:
        return self._loop.run(
            self._aio.run(branches, idempotency_key, wait_for_completion, timeout, isolation)
        )

    @contextlib.contextmanager
    def transaction(
        self,
        wait_for_completion: bool = False,
        isolation: IsolationArg = Isolation.READ_COMMITTED,
    ) -> Iterator[Transaction]:
        """`AsyncCoordinatorClient.transaction`, for a block of blocking code."""
        tx = self.begin(isolation)
        try:
            yield tx
        except BaseException:
            if tx.outcome is None:
                with contextlib.suppress(TwoPCError):
                    tx.rollback()
            raise
        if tx.outcome is None:
            tx.commit(wait_for_completion)

    def begin(self, isolation: IsolationArg = Isolation.READ_COMMITTED) -> Transaction:
        return Transaction(self, self._loop.run(self._aio.begin(isolation)).id)

    def get_transaction(self, transaction_id: str) -> TransactionStatus:
        return self._loop.run(self._aio.get_transaction(transaction_id))

    def list_transactions(self) -> list[TransactionStatus]:
        return self._loop.run(self._aio.list_transactions())

    def status(self, timeout: float | None = None) -> pb.CoordinatorStatus:
        return self._loop.run(self._aio.status(timeout))


class Transaction:
    """An interactive transaction; `outcome` is set once it committed or rolled back."""

    def __init__(self, client: CoordinatorClient, transaction_id: str) -> None:
        self._loop = client._loop
        self._aio = AsyncTransaction(client._aio, transaction_id)

    @property
    def id(self) -> str:
        return self._aio.id

    @property
    def outcome(self) -> Outcome | None:
        return self._aio.outcome

    def execute(
        self,
        participant: str,
        sql: str | Statement,
        params: Sequence[SqlValue] = (),
        expect: Expectation | None = None,
    ) -> StatementResult:
        return self._loop.run(self._aio.execute(participant, sql, params, expect))

    def execute_many(
        self, participant: str, statements: Sequence[Statement]
    ) -> list[StatementResult]:
        return self._loop.run(self._aio.execute_many(participant, statements))

    def commit(self, wait_for_completion: bool = False) -> Outcome:
        return self._loop.run(self._aio.commit(wait_for_completion))

    def rollback(self) -> Outcome:
        return self._loop.run(self._aio.rollback())


# -- retrying keyed work ---------------------------------------------------------------


_BACKOFF = RetryPolicy(initial=0.02, cap=1.0)


@dataclass(frozen=True, slots=True)
class Retry:
    """How `run_with_retries` retries keyed work."""

    attempts: int = 8
    """Runs in all, the first included: retryable aborts and unanswered calls
    (`TransportError`) both count. The last outcome (or error) is the answer."""
    backoff: RetryPolicy = _BACKOFF
    """Capped exponential backoff before run n+1 (`initial * 2**n` seconds, at most
    `cap`), each wait jittered to 50-150% so that the losers of one conflict do not
    meet again at the same instant."""
    refusals: int = 10
    """Per run: admission refusals (RESOURCE_EXHAUSTED) waited out with the
    coordinator's hint (`retry_when_refused`). They are not attempts: refused work
    never ran."""

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.refusals < 1:
            raise ValueError("Retry needs attempts >= 1 and refusals >= 1")

    def delay(self, run: int) -> float:
        """Seconds to wait after run number `run` (from 0)."""
        return random.uniform(0.5, 1.5) * self.backoff.delay(run)


def attempt_key(key: str, attempt: int) -> str:
    """The idempotency key `run_with_retries` sends for attempt `attempt`: the key
    itself first, then `KEY#1`, `KEY#2`, ... An aborted attempt's outcome is final
    under its key, so the next attempt needs a key of its own; running the helper
    again with the same key replays the attempts in order (each answers its recorded
    outcome, nothing runs twice) and so finds the one that committed."""
    return key if attempt == 0 else f"{key}#{attempt}"


Work = Branches | Callable[[int], Branches]


class _Plan:
    """The retry loop of `run_with_retries` as plain state, shared by the blocking and
    the asyncio helper: which branches and key to send next, and after each answer
    whether to stop or how long to wait."""

    def __init__(self, work: Work, key: str, retry: Retry) -> None:
        if not key:
            raise ValueError(
                "run_with_retries needs an idempotency key: without one a "
                "lost answer could make the same work run twice"
            )
        self._work, self._key, self._retry = work, key, retry
        self._attempt = 0
        self._branches: Branches | None = None
        self.runs = 0

    def next_run(self) -> tuple[Branches, str]:
        # An unanswered run is sent again unchanged: the same key must carry the
        # same request, or the coordinator refuses it (ALREADY_EXISTS).
        if self._branches is None:
            self._branches = self._work(self._attempt) if callable(self._work) else self._work
        self.runs += 1
        return self._branches, attempt_key(self._key, self._attempt)

    def after(self, outcome: Outcome | None) -> float | None:
        """None: the answer stands (return the outcome, or raise the TransportError
        that `outcome=None` stands for); else wait that many seconds and run again."""
        if self.runs >= self._retry.attempts:
            return None
        if outcome is not None:
            if outcome.committed or not outcome.retryable:
                return None
            self._attempt += 1
            self._branches = None
        return self._retry.delay(self.runs - 1)


class _Reruns:
    """The retry rule of `transact_with_retries`, shared by the blocking and the
    asyncio helper: after each run's failure or outcome, stop or wait and run again."""

    def __init__(self, retry: Retry) -> None:
        self._retry = retry
        self._run = 0

    def after(self, answer: TransactionAborted | Outcome) -> float | None:
        """None: the answer stands (raise the failure, return the outcome); else wait
        that many seconds and run again. Only a lost conflict is run again, and not
        after the last attempt."""
        if not answer.retryable or self._run + 1 >= self._retry.attempts:
            return None
        self._run += 1
        return self._retry.delay(self._run - 1)


def run_with_retries(
    client: CoordinatorClient,
    work: Work,
    idempotency_key: str,
    *,
    isolation: IsolationArg = Isolation.READ_COMMITTED,
    retry: Retry = Retry(),
    wait_for_completion: bool = False,
) -> Outcome:
    """Run keyed work until it commits, aborts for a reason retrying cannot fix, or
    `retry.attempts` runs are spent; returns the last outcome.

    `work` is the transaction's branches, or a function from the attempt number
    (0, 1, ...) to them (to read fresh values, say). Retried: outcomes that are
    `retryable` (a serialization failure, a deadlock, a lock timeout: see
    `RETRYABLE_CAUSES`), each under its own key (`attempt_key`), after a jittered
    exponential backoff; and a `TransportError` (the outcome is unknown), under the
    same key, which returns the first run's outcome if it ran. Admission refusals are
    waited out with the coordinator's hint (`retry_when_refused`). Never retried: a
    COMMITTED outcome, a non-retryable abort, any other error. Applied at most once."""
    plan = _Plan(work, idempotency_key, retry)
    while True:
        branches, key = plan.next_run()
        try:
            outcome = retry_when_refused(
                functools.partial(
                    client.run, branches, key, wait_for_completion, isolation=isolation
                ),
                retry.refusals,
            )
        except TransportError:
            if (wait := plan.after(None)) is None:
                raise
        else:
            if (wait := plan.after(outcome)) is None:
                return outcome
        time.sleep(wait)


async def run_with_retries_async(
    client: AsyncCoordinatorClient,
    work: Work,
    idempotency_key: str,
    *,
    isolation: IsolationArg = Isolation.READ_COMMITTED,
    retry: Retry = Retry(),
    wait_for_completion: bool = False,
) -> Outcome:
    """`run_with_retries` for the asyncio client."""
    plan = _Plan(work, idempotency_key, retry)
    while True:
        branches, key = plan.next_run()
        try:
            outcome = await retry_when_refused_async(
                functools.partial(
                    client.run, branches, key, wait_for_completion, isolation=isolation
                ),
                retry.refusals,
            )
        except TransportError:
            if (wait := plan.after(None)) is None:
                raise
        else:
            if (wait := plan.after(outcome)) is None:
                return outcome
        await asyncio.sleep(wait)


def transact_with_retries(
    client: CoordinatorClient,
    work: Callable[[Transaction], T],
    *,
    isolation: IsolationArg = Isolation.READ_COMMITTED,
    retry: Retry = Retry(),
) -> tuple[T, Outcome]:
    """Run an interactive transaction (`work(tx)` executes its statements; this
    commits) until it commits, fails for a reason retrying cannot fix, or
    `retry.attempts` runs are spent; returns what `work` returned and the last
    outcome. A read-modify-write (read a balance, write what you computed from it) at
    REPEATABLE READ or SERIALIZABLE is the pattern: the loser of a concurrent update
    gets a retryable abort, and its next run reads the winner's value.

    Retried, after the same backoff as `run_with_retries`: a retryable
    `TransactionAborted` from an `execute`, and a retryable commit outcome. Not
    retried: anything else `work` raises (the transaction is rolled back and the
    error propagates), and a `TransportError` at commit: interactive transactions
    carry no idempotency key, so after a lost commit answer only
    `get_transaction(tx.id)` can tell whether the work was applied, and running it
    again could apply it twice."""
    reruns = _Reruns(retry)
    while True:
        tx = client.begin(isolation)
        try:
            value = work(tx)
        except TransactionAborted as exc:
            if (wait := reruns.after(exc)) is None:
                raise
        except BaseException:
            with contextlib.suppress(TwoPCError):
                tx.rollback()
            raise
        else:
            outcome = tx.outcome or tx.commit()
            if (wait := reruns.after(outcome)) is None:
                return value, outcome
        time.sleep(wait)


async def transact_with_retries_async(
    client: AsyncCoordinatorClient,
    work: Callable[[AsyncTransaction], Awaitable[T]],
    *,
    isolation: IsolationArg = Isolation.READ_COMMITTED,
    retry: Retry = Retry(),
) -> tuple[T, Outcome]:
    """`transact_with_retries` for the asyncio client."""
    reruns = _Reruns(retry)
    while True:
        tx = await client.begin(isolation)
        try:
            value = await work(tx)
        except TransactionAborted as exc:
            if (wait := reruns.after(exc)) is None:
                raise
        except BaseException:
            with contextlib.suppress(TwoPCError):
                await tx.rollback()
            raise
        else:
            outcome = tx.outcome or await tx.commit()
            if (wait := reruns.after(outcome)) is None:
                return value, outcome
        await asyncio.sleep(wait)
