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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc

from coordinator.failover import Endpoints, addresses_of, backoff, channel_options
from twopc_common.errors import Aborted, ResourceExhausted, TwoPCError
from twopc_common.grpc_errors import RETRY_AFTER_MS, error_for
from twopc_common.tls import TlsConfig, aio_channel, channel
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
    "AsyncCoordinatorClient",
    "AsyncTransaction",
    "CoordinatorClient",
    "Expectation",
    "Outcome",
    "Statement",
    "StatementResult",
    "TlsConfig",
    "Transaction",
    "TransactionAborted",
    "TransactionStatus",
    "TransportError",
    "exactly",
    "retry_when_refused",
    "retry_when_refused_async",
]

Branches = Mapping[str, Sequence[Statement]]
T = TypeVar("T")


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
    """An interactive transaction was rolled back because a statement failed."""


@dataclass(frozen=True, slots=True)
class Outcome:
    transaction_id: str
    committed: bool
    abort_cause: str = ""
    abort_participant: str = ""
    abort_reason: str = ""
    results: Mapping[str, tuple[StatementResult, ...]] | None = None
    one_phase: bool = False
    completed: bool = False


@dataclass(frozen=True, slots=True)
class TransactionStatus:
    transaction_id: str
    outcome: str  # committed | aborted | in_progress | unknown
    state: str
    participants: tuple[str, ...]
    age_seconds: float
    pending_acks: tuple[str, ...]


def _outcome(msg: pb.TransactionOutcome) -> Outcome:
    return Outcome(
        transaction_id=msg.transaction_id,
        committed=msg.outcome == pb.COMMITTED,
        abort_cause=pb.AbortCause.Name(msg.abort_cause) if msg.abort_cause else "",
        abort_participant=msg.abort_participant,
        abort_reason=msg.abort_reason,
        results={b.participant: tuple(result_from_pb(r) for r in b.results) for b in msg.results},
        one_phase=msg.one_phase,
        completed=msg.completed,
    )


def _status(msg: pb.TransactionStatus) -> TransactionStatus:
    return TransactionStatus(
        transaction_id=msg.transaction_id,
        outcome=pb.Outcome.Name(msg.outcome).lower(),
        state=pb.TransactionState.Name(msg.state).removeprefix("STATE_").lower(),
        participants=tuple(msg.participants),
        age_seconds=msg.age_seconds,
        pending_acks=tuple(msg.pending_acks),
    )


def _run_request(branches: Branches, key: str | None, wait: bool) -> pb.RunRequest:
    return pb.RunRequest(
        branches=[
            pb.Branch(participant=p, statements=[statement_to_pb(s) for s in stmts])
            for p, stmts in branches.items()
        ],
        idempotency_key=key or "",
        wait_for_completion=wait,
    )


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
        return TransactionAborted(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(details, _retry_after(exc))
    return error_for(code, details)


def _retry_after(exc: grpc.RpcError) -> float | None:
    """The coordinator's hint of when to try again, from the trailing metadata."""
    trailers: Any = exc.trailing_metadata()
    for key, value in trailers or ():
        if key == RETRY_AFTER_MS:
            try:
                return int(value) / 1000
            except ValueError:
                return None
    return None


_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclass(frozen=True)
class _Connection:
    """A channel to one coordinator process, and its stub (made once)."""

    channel: grpc.Channel

    @functools.cached_property
    def stub(self) -> cgrpc.CoordinatorStub:
        return cgrpc.CoordinatorStub(self.channel)


@dataclass(frozen=True)
class _AsyncConnection:
    channel: grpc.aio.Channel

    @functools.cached_property
    def stub(self) -> cgrpc.CoordinatorStub:
        return cgrpc.CoordinatorStub(self.channel)


# -- blocking client -----------------------------------------------------------------


class CoordinatorClient:
    """A blocking client; thread-safe (one channel, shared)."""

    def __init__(
        self,
        address: str | Sequence[str],
        timeout: float = 30.0,
        *,
        tls: TlsConfig | None = None,
        token: str | None = None,
        server_name: str | None = None,
    ) -> None:
        self.timeout = timeout
        addresses = addresses_of(address)
        options = _CHANNEL_OPTIONS + channel_options(addresses)
        self._endpoints = Endpoints(
            addresses,
            lambda a: _Connection(channel(a, tls or TlsConfig(), options, server_name, token)),
        )

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for connection in self._endpoints.connections():
            connection.channel.close()

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        """The call, failed over between the coordinator's processes (see
        `coordinator.failover`) within its deadline."""
        deadline = time.monotonic() + (timeout or self.timeout)
        keyed = method == "Run" and bool(request.idempotency_key)
        for attempt in itertools.count():
            stub = self._endpoints.connection().stub
            try:
                return getattr(stub, method)(request, timeout=deadline - time.monotonic())
            except grpc.RpcError as exc:
                pause = backoff(attempt)
                if (
                    not self._endpoints.should_retry(exc, method, keyed)
                    or time.monotonic() + pause >= deadline
                ):
                    raise _raise(exc) from None
                time.sleep(pause)
        raise AssertionError("unreachable")

    def run(
        self,
        branches: Branches,
        idempotency_key: str | None = None,
        wait_for_completion: bool = False,
        timeout: float | None = None,
    ) -> Outcome:
        request = _run_request(branches, idempotency_key, wait_for_completion)
        return _outcome(self._call("Run", request, timeout))

    @contextlib.contextmanager
    def transaction(self, wait_for_completion: bool = False) -> Iterator[Transaction]:
        tx = self.begin()
        try:
            yield tx
        except BaseException:
            if tx.outcome is None:
                with contextlib.suppress(TwoPCError):
                    tx.rollback()
            raise
        if tx.outcome is None:
            tx.commit(wait_for_completion)

    def begin(self) -> Transaction:
        reply = self._call("Begin", pb.BeginRequest(), None)
        return Transaction(self, reply.transaction_id)

    def get_transaction(self, transaction_id: str) -> TransactionStatus:
        reply = self._call(
            "GetTransaction", pb.GetTransactionRequest(transaction_id=transaction_id), None
        )
        return _status(reply)

    def list_transactions(self) -> list[TransactionStatus]:
        reply = self._call("ListTransactions", pb.ListTransactionsRequest(), None)
        return [_status(t) for t in reply.transactions]

    def status(self, timeout: float | None = None) -> pb.CoordinatorStatus:
        result: pb.CoordinatorStatus = self._call("Status", pb.StatusRequest(), timeout)
        return result


class Transaction:
    """An interactive transaction; `outcome` is set once it committed or rolled back."""

    def __init__(self, client: CoordinatorClient, transaction_id: str) -> None:
        self._client = client
        self.id = transaction_id
        self.outcome: Outcome | None = None

    def execute(
        self,
        participant: str,
        sql: str | Statement,
        params: Sequence[SqlValue] = (),
        expect: Expectation | None = None,
    ) -> StatementResult:
        return self.execute_many(participant, [_statement(sql, params, expect)])[0]

    def execute_many(
        self, participant: str, statements: Sequence[Statement]
    ) -> list[StatementResult]:
        request = pb.ExecuteRequest(
            transaction_id=self.id,
            participant=participant,
            statements=[statement_to_pb(s) for s in statements],
        )
        try:
            reply = self._client._call("Execute", request, None)
        except TransactionAborted:
            self.outcome = Outcome(self.id, False, "EXECUTE_FAILED")
            raise
        return [result_from_pb(r) for r in reply.results]

    def commit(self, wait_for_completion: bool = False) -> Outcome:
        request = pb.CommitRequest(transaction_id=self.id, wait_for_completion=wait_for_completion)
        self.outcome = _outcome(self._client._call("Commit", request, None))
        return self.outcome

    def rollback(self) -> Outcome:
        request = pb.RollbackRequest(transaction_id=self.id)
        self.outcome = _outcome(self._client._call("Rollback", request, None))
        return self.outcome


# -- asyncio client ------------------------------------------------------------------


class AsyncCoordinatorClient:
    """The same API for asyncio programs."""

    def __init__(
        self,
        address: str | Sequence[str],
        timeout: float = 30.0,
        *,
        tls: TlsConfig | None = None,
        token: str | None = None,
        server_name: str | None = None,
    ) -> None:
        self.timeout = timeout
        addresses = addresses_of(address)
        options = _CHANNEL_OPTIONS + channel_options(addresses)
        self._endpoints = Endpoints(
            addresses,
            lambda a: _AsyncConnection(
                aio_channel(a, tls or TlsConfig(), options, server_name, token)
            ),
        )

    async def __aenter__(self) -> AsyncCoordinatorClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for connection in self._endpoints.connections():
            await connection.channel.close()

    async def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        """`CoordinatorClient._call` for asyncio."""
        deadline = time.monotonic() + (timeout or self.timeout)
        keyed = method == "Run" and bool(request.idempotency_key)
        for attempt in itertools.count():
            stub = self._endpoints.connection().stub
            try:
                return await getattr(stub, method)(request, timeout=deadline - time.monotonic())
            except grpc.aio.AioRpcError as exc:
                pause = backoff(attempt)
                if (
                    not self._endpoints.should_retry(exc, method, keyed)
                    or time.monotonic() + pause >= deadline
                ):
                    raise _raise(exc) from None
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def run(
        self,
        branches: Branches,
        idempotency_key: str | None = None,
        wait_for_completion: bool = False,
        timeout: float | None = None,
    ) -> Outcome:
        request = _run_request(branches, idempotency_key, wait_for_completion)
        return _outcome(await self._call("Run", request, timeout))

    @contextlib.asynccontextmanager
    async def transaction(
        self, wait_for_completion: bool = False
    ) -> AsyncIterator[AsyncTransaction]:
        reply = await self._call("Begin", pb.BeginRequest(), None)
        tx = AsyncTransaction(self, reply.transaction_id)
        try:
            yield tx
        except BaseException:
            if tx.outcome is None:
                with contextlib.suppress(TwoPCError):
                    await tx.rollback()
            raise
        if tx.outcome is None:
            await tx.commit(wait_for_completion)

    async def get_transaction(self, transaction_id: str) -> TransactionStatus:
        reply = await self._call(
            "GetTransaction", pb.GetTransactionRequest(transaction_id=transaction_id), None
        )
        return _status(reply)

    async def status(self, timeout: float | None = None) -> pb.CoordinatorStatus:
        result: pb.CoordinatorStatus = await self._call("Status", pb.StatusRequest(), timeout)
        return result


class AsyncTransaction:
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
        request = pb.ExecuteRequest(
            transaction_id=self.id,
            participant=participant,
            statements=[statement_to_pb(_statement(sql, params, expect))],
        )
        try:
            reply = await self._client._call("Execute", request, None)
        except TransactionAborted:
            self.outcome = Outcome(self.id, False, "EXECUTE_FAILED")
            raise
        return result_from_pb(reply.results[0])

    async def commit(self, wait_for_completion: bool = False) -> Outcome:
        request = pb.CommitRequest(transaction_id=self.id, wait_for_completion=wait_for_completion)
        self.outcome = _outcome(await self._client._call("Commit", request, None))
        return self.outcome

    async def rollback(self) -> Outcome:
        request = pb.RollbackRequest(transaction_id=self.id)
        self.outcome = _outcome(await self._client._call("Rollback", request, None))
        return self.outcome
