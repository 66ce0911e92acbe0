"""The coordinator's side of the participant service: one long-lived gRPC channel per
agent, every call with a deadline, results as domain objects.

Transport failures are part of the protocol here: a Prepare that times out or cannot
reach its agent is a missing vote (Ballot TIMEOUT or UNAVAILABLE), not an exception.
Calls wait for a reconnecting channel (wait_for_ready) within their deadline: a link
that is back within the prepare timeout costs a delay, not an abort.

Commits are batched (`finish`): decisions for an agent queue up while one Finish call
is in flight and all go in the next, like a group commit. Under load that turns one
RPC per branch into a fraction of one, and the agent finishes a whole batch in one
pipelined round trip to its database. The engine sends aborts alone (`abort`): an abort may have to
interrupt a branch waiting on a lock, and must not hold up the commits behind it.

An agent that cannot be reached is reported as what it is: a watcher follows the
channel's connectivity and, when connecting fails, finds out why with one plain TCP
connect (`connection refused at 127.0.0.1:7001`), so that abort reasons and log lines
say that instead of gRPC's "Deadline Exceeded".

The channel follows the coordinator's TLS files (`twopc_common.tls.ReloadingChannel`):
after a certificate rotation new calls use the new credentials, calls under way finish
on the old channel.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from coordinator.deadlock import Wait
from coordinator.prepare_stream import CallBroken, PrepareStream
from coordinator.protocol import Ballot, NoVote
from twopc_common.errors import Unavailable
from twopc_common.grpc_errors import error_for, status_of
from twopc_common.isolation import Isolation, isolation_to_pb
from twopc_common.limits import Limits
from twopc_common.log import EventLogger
from twopc_common.participant_wire import outcome_from_pb, vote_from_pb
from twopc_common.phase2_outcome import Phase2Outcome
from twopc_common.tls import ReloadingChannel, TlsConfig
from twopc_common.values import Statement, StatementResult, result_from_pb, statement_to_pb
from twopc_common.votes import Vote
from twopc_pb import participant_pb2 as pb
from twopc_pb import participant_pb2_grpc as pgrpc

_UNREACHABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


# Codes with which an agent refuses a call before it runs anything.
_REFUSED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
)


@dataclass(frozen=True, slots=True)
class PrepareReply:
    ballot: Ballot
    results: tuple[StatementResult, ...] = ()


def _reply(reply: pb.PrepareResponse) -> PrepareReply:
    vote = vote_from_pb(reply.vote)
    if vote is None:
        return PrepareReply(Ballot(Vote.NO, f"unknown vote {reply.vote}"))
    return PrepareReply(
        Ballot(vote, reply.reason, reply.sqlstate), tuple(result_from_pb(r) for r in reply.results)
    )


@dataclass(frozen=True, slots=True)
class HeuristicDecision:
    """An operator's heuristic decision on one of our branches (the agent's audit table)."""

    transaction_id: str
    commit: bool
    reason: str
    operator: str
    decided_at: float


@dataclass(frozen=True, slots=True)
class InDoubtBranch:
    transaction_id: str
    age_seconds: float


@dataclass(frozen=True, slots=True)
class InDoubtList:
    branches: tuple[InDoubtBranch, ...]
    highest_epoch: int
    """The highest epoch of the asking coordinator the participant has seen."""


def _unwrap(answer: Phase2Outcome | Exception) -> Phase2Outcome:
    if isinstance(answer, Exception):
        raise answer
    return answer


async def why_unreachable(address: str, timeout: float) -> str:
    """Why `address` cannot be reached, from one TCP connect (closed at once)."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), timeout
        )
    except ConnectionRefusedError:
        return f"connection refused at {address}"
    except TimeoutError:
        return f"no TCP answer from {address} within {timeout:g}s"
    except OSError as exc:
        return f"cannot connect to {address}: {exc.strerror or exc}"
    writer.close()
    return f"{address} accepts TCP connections but does not speak gRPC (is it the agent?)"


_Decision = tuple[str, bool, "asyncio.Future[Phase2Outcome]"]


class _Answered:
    """The stub, noting in `client.last_answer` when each call was answered."""

    def __init__(self, stub: pgrpc.ParticipantStub, client: ParticipantClient) -> None:
        self._stub = stub
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            reply = await method(*args, **kwargs)
            self._client.last_answer = time.monotonic()
            return reply

        return call


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
        prepare_batch: int = Limits().max_stream_batch,
        tls: TlsConfig,
        tls_reload_interval: float = 5.0,
        drain: float = 10.0,
        log: EventLogger | None = None,
    ) -> None:
        """`drain`: seconds calls on a replaced channel get to finish (at least the
        longest deadline this client gives a call, the prepare timeout's or the RPC
        timeout's)."""
        self.name = name
        self.address = address
        self.unreachable: str | None = None
        """Why the last attempt to connect failed; None once connected."""
        self._probe_timeout = probe_timeout
        self._watcher: asyncio.Task[None] | None = None
        self._rpc_timeout = rpc_timeout
        self._phase2_batch = phase2_batch
        self._decisions: list[_Decision] = []
        self._sender: asyncio.Task[None] | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        # The agent must prove it is `name` (a DNS SAN of its certificate), whatever
        # address or proxy it is dialled through.
        self._log = log or EventLogger("coordinator", name)
        self._channels = ReloadingChannel(
            address,
            tls,
            server_name=name,
            check_interval=tls_reload_interval,
            drain=drain,
            log=self._log,
            on_change=self._channel_changed,
            options=[
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
                # Notice a dead peer on an idle channel rather than at the next call.
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                # Reconnect quickly after a partition heals.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2_000),
            ],
        )
        self.last_answer = 0.0
        """When the agent last answered any call (monotonic): proof of life, so that a
        probe that times out on a loaded machine does not mark a working agent down."""
        self._answered = _Answered(pgrpc.ParticipantStub(self._channels.current()), self)
        self._prepares = (
            PrepareStream(
                self._open_prepare_stream, prepare_batch, max_message, self._alive, self.stats
            )
            if prepare_stream
            else None
        )

    def _alive(self) -> None:
        self.last_answer = time.monotonic()

    def _open_prepare_stream(self) -> Any:
        return pgrpc.ParticipantStub(self._channels.current()).PrepareStream(wait_for_ready=True)

    @property
    def _stub(self) -> _Answered:
        """The stub for the next call (on a new channel after a certificate rotation)."""
        self._channels.current()
        return self._answered

    def _channel_changed(self) -> None:
        self._answered = _Answered(pgrpc.ParticipantStub(self._channels.current()), self)
        if self._prepares is not None:
            self._prepares.restart()
        if self._watcher is not None:  # it follows the old channel: the next call restarts it
            self._watcher.cancel()
            self._watcher = None

    def reload_tls(self) -> bool:
        """Check the TLS files now (SIGHUP); True if the channel was replaced."""
        return self._channels.reload()

    async def close(self) -> None:
        if self._prepares is not None:
            await self._prepares.close()
        if self._sender is not None:
            self._sender.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        await self._channels.close()

    def _watch(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._follow_connectivity())

    async def _follow_connectivity(self) -> None:
        channel = self._channels.current()
        state = channel.get_state(try_to_connect=False)
        while True:
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=False)
            if state is grpc.ChannelConnectivity.READY:
                self.unreachable = None
            elif state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                self.unreachable = await why_unreachable(self.address, self._probe_timeout)

    def missing_vote(self) -> Ballot | None:
        """What a vote that did not come is, if the agent cannot be reached at all."""
        if self.unreachable is None:
            return None
        return Ballot(NoVote.UNAVAILABLE, self.unreachable)

    def _error(self, exc: grpc.aio.AioRpcError) -> Exception:
        if exc.code() in _UNREACHABLE:
            return Unavailable(
                f"participant {self.name}: {self.unreachable or exc.details() or exc.code().name}"
            )
        return error_for(
            exc.code(),
            f"participant {self.name}: {exc.details() or exc.code().name}",
            exc.trailing_metadata(),
        )

    def _as_error(self, exc: Exception) -> Exception:
        """A failed call, as the error of each decision it carried (retried by phase 2)."""
        if isinstance(exc, grpc.aio.AioRpcError):
            return self._error(exc)
        if isinstance(exc, Unavailable):
            return Unavailable(str(exc))  # one instance per waiting decision
        return Unavailable(f"participant {self.name}: {exc!r}")

    async def participant_id(self) -> str:
        """The id the agent at this address answers to (its Status)."""
        self._watch()
        try:
            reply = await self._stub.Status(
                pb.ParticipantStatusRequest(), timeout=self._rpc_timeout, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return str(reply.participant_id)

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
        self._watch()
        if self._prepares is not None:
            return await self._prepare_streamed(request, timeout)
        return await self.prepare_unary(request, timeout)

    async def prepare_unary(self, request: pb.PrepareRequest, timeout: float) -> PrepareReply:
        try:
            reply = await self._stub.Prepare(request, timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            return PrepareReply(self._failed_vote(exc.code(), exc.details() or ""))
        return _reply(reply)

    async def _prepare_streamed(self, request: pb.PrepareRequest, timeout: float) -> PrepareReply:
        assert self._prepares is not None
        try:
            answer = await asyncio.wait_for(self._prepares.prepare(request), timeout)
        except TimeoutError:
            return PrepareReply(self._failed_vote(grpc.StatusCode.DEADLINE_EXCEEDED, ""))
        except CallBroken as exc:
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:  # an agent older than PrepareStream
                self._log.warning("prepare_stream_unimplemented", participant=self.name)
                self._prepares = None
                return await self.prepare_unary(request, timeout)
            return PrepareReply(self._failed_vote(exc.code, exc.details))
        if answer.code != 0:
            code = status_of(answer.code)
            return PrepareReply(self._failed_vote(code, answer.message))
        return _reply(answer.response)

    def _failed_vote(self, code: grpc.StatusCode, details: str) -> Ballot:
        """What a Prepare that failed with `code` counts as."""
        if code in _UNREACHABLE and (missing := self.missing_vote()) is not None:
            return missing
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Ballot(NoVote.TIMEOUT, "no vote before the prepare timeout")
        if code in _UNREACHABLE:
            return Ballot(NoVote.UNAVAILABLE, details or "unreachable")
        reason = f"{code.name}: {details}"
        if code in _REFUSED:
            return Ballot(Vote.NO, reason)
        # The call failed after the agent may have prepared (an answer too large to
        # deliver, an internal error): no vote, and the participant must hear the Abort.
        return Ballot(NoVote.LOST, reason)

    async def execute(
        self,
        txid: str,
        statements: Sequence[Statement],
        incarnation: str,
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> tuple[list[StatementResult], str]:
        """Run statements in the branch (opened if `incarnation` is empty); returns the
        results and the incarnation of the agent that ran them."""
        self._watch()
        request = pb.BranchExecuteRequest(
            transaction_id=txid,
            statements=[statement_to_pb(s) for s in statements],
            incarnation=incarnation,
            isolation=isolation_to_pb(isolation),
        )
        try:
            reply = await self._stub.Execute(
                request, timeout=self._rpc_timeout, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return [result_from_pb(r) for r in reply.results], reply.incarnation

    async def finish(self, txid: str, commit: bool) -> Phase2Outcome:
        """Commit or abort the branch in the next batched Finish call. Answers as
        `commit` / `abort` do: the branch's outcome, or raises the branch's own error."""
        self._watch()
        answer: asyncio.Future[Phase2Outcome] = asyncio.get_running_loop().create_future()
        self._decisions.append((txid, commit, answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_decisions())
        return await answer

    async def _send_decisions(self) -> None:
        while self._decisions:
            batch = [d for d in self._decisions[: self._phase2_batch] if not d[2].done()]
            del self._decisions[: self._phase2_batch]
            if not batch:
                continue
            self.stats["phase2_calls"] += 1
            self.stats["phase2_decisions"] += len(batch)
            try:
                answers = await self._finish_call([(t, c) for t, c, _ in batch])
            except Exception as exc:  # every decision of the batch waits for an answer
                answers = [self._as_error(exc) for _ in batch]
            for (_, _, answer), outcome in zip(batch, answers, strict=True):
                if answer.done():
                    continue
                if isinstance(outcome, Exception):
                    answer.set_exception(outcome)
                else:
                    answer.set_result(outcome)

    async def _finish_call(
        self, decisions: list[tuple[str, bool]]
    ) -> list[Phase2Outcome | Exception]:
        reply = await self._stub.Finish(
            pb.FinishRequest(
                decisions=[pb.Decision(transaction_id=t, commit=c) for t, c in decisions]
            ),
            timeout=self._rpc_timeout,
            wait_for_ready=True,
        )
        if len(reply.finished) != len(decisions):
            raise Unavailable(
                f"participant {self.name}: {len(reply.finished)} answers "
                f"to {len(decisions)} decisions"
            )
        return [
            self._answer(f, commit)
            for f, (_, commit) in zip(reply.finished, decisions, strict=True)
        ]

    def _answer(self, answer: pb.Finished, commit: bool) -> Phase2Outcome | Exception:
        """One decision's answer in a FinishResponse: its outcome, or its error."""
        if answer.code != 0:
            return error_for(
                status_of(answer.code),
                f"participant {self.name}: {answer.message}",
            )
        return self._decoded(answer.outcome, answer.changed, commit)

    def _decoded(self, value: int, changed: bool, commit: bool) -> Phase2Outcome | Exception:
        outcome = outcome_from_pb(value, changed, commit)
        if outcome is None:
            return Unavailable(f"participant {self.name}: unknown phase-2 outcome {value}")
        return outcome

    async def commit(self, txid: str) -> Phase2Outcome:
        self._watch()
        try:
            ack = await self._stub.Commit(
                pb.BranchRef(transaction_id=txid), timeout=self._rpc_timeout, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return _unwrap(self._decoded(ack.outcome, ack.changed, True))

    async def abort(self, txid: str) -> Phase2Outcome:
        self._watch()
        try:
            ack = await self._stub.Abort(
                pb.BranchRef(transaction_id=txid), timeout=self._rpc_timeout, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return _unwrap(self._decoded(ack.outcome, ack.changed, False))

    async def waits_for(self, timeout: float) -> list[Wait]:
        """The agent's lock waits between open branches (see coordinator.deadlock)."""
        self._watch()
        try:
            reply = await self._stub.WaitsFor(pb.WaitsForRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return [
            Wait(self.name, e.waiter_transaction_id, e.holder_transaction_id, e.wait_started)
            for e in reply.edges
            if e.holder_transaction_id
        ]

    async def probe(self, timeout: float) -> None:
        """One health probe: the agent answers Status within `timeout`, or this raises.
        No waiting for a reconnect: a refused connection fails at once."""
        self._watch()
        try:
            await self._stub.Status(pb.ParticipantStatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc

    async def list_prepared(self, coordinator_id: str) -> InDoubtList:
        self._watch()
        try:
            reply = await self._stub.ListPrepared(
                pb.ListPreparedRequest(coordinator_id=coordinator_id),
                timeout=self._rpc_timeout,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return InDoubtList(
            tuple(InDoubtBranch(b.transaction_id, b.age_seconds) for b in reply.branches),
            reply.highest_epoch,
        )

    async def list_heuristic(self, coordinator_id: str) -> list[HeuristicDecision]:
        try:
            reply = await self._stub.ListHeuristic(
                pb.ListHeuristicRequest(coordinator_id=coordinator_id),
                timeout=self._rpc_timeout,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return [
            HeuristicDecision(d.transaction_id, d.commit, d.reason, d.operator, d.decided_at)
            for d in reply.decisions
        ]
