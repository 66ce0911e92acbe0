"""Phase 1 from the coordinator to one agent (for `coordinator.participants`): a
branch's statements (Execute), and its Prepare, on the agent's PrepareStream
(`coordinator.prepare_stream`) or one unary call each, and what a Prepare that failed
counts as.

Transport failures are part of the protocol here: a Prepare that times out or cannot
reach its agent is a missing vote (Ballot TIMEOUT or UNAVAILABLE), not an exception
(`failed_vote`, which the simulator's transport in `tests/sim` applies too). Calls
wait for a reconnecting channel (wait_for_ready) within their deadline: a link that
is back within the prepare timeout costs a delay, not an abort. An agent older than
PrepareStream (UNIMPLEMENTED) is asked by unary calls from then on.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from coordinator.participant_channel import UNREACHABLE, ParticipantChannel
from coordinator.prepare_stream import CallBroken, PrepareStream
from coordinator.protocol import Ballot, NoVote
from twopc_common.grpc_errors import status_of
from twopc_common.isolation import Isolation, isolation_to_pb
from twopc_common.log import EventLogger
from twopc_common.participant_wire import vote_from_pb
from twopc_common.values import Statement, StatementResult, result_from_pb, statement_to_pb
from twopc_common.votes import Vote
from twopc_pb import participant_pb2 as pb

REFUSED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
)
"""Codes with which an agent refuses a call before it runs anything."""


@dataclass(frozen=True, slots=True)
class PrepareReply:
    ballot: Ballot
    results: tuple[StatementResult, ...] = ()


def failed_vote(code: grpc.StatusCode, details: str, missing: Ballot | None) -> Ballot:
    """What a Prepare that failed with `code` counts as; `missing` is what a vote that
    did not come is when the agent cannot be reached at all (None: it may be)."""
    if code in UNREACHABLE and missing is not None:
        return missing
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Ballot(NoVote.TIMEOUT, "no vote before the prepare timeout")
    if code in UNREACHABLE:
        return Ballot(NoVote.UNAVAILABLE, details or "unreachable")
    reason = f"{code.name}: {details}"
    if code in REFUSED:
        return Ballot(Vote.NO, reason)
    # The call failed after the agent may have prepared (an answer too large to
    # deliver, an internal error): no vote, and the participant must hear the Abort.
    return Ballot(NoVote.LOST, reason)


def _reply(reply: pb.PrepareResponse) -> PrepareReply:
    vote = vote_from_pb(reply.vote)
    if vote is None:
        return PrepareReply(Ballot(Vote.NO, f"unknown vote {reply.vote}"))
    return PrepareReply(
        Ballot(vote, reply.reason, reply.sqlstate), tuple(result_from_pb(r) for r in reply.results)
    )


class Phase1Calls:
    """One agent's Execute calls, and its Prepares: on its PrepareStream when
    `streamed`, else unary."""

    def __init__(
        self,
        channel: ParticipantChannel,
        rpc_timeout: float,
        streamed: bool,
        max_items: int,
        max_message: int,
        stats: collections.Counter[str],
        log: EventLogger,
    ) -> None:
        self._channel = channel
        self._rpc_timeout = rpc_timeout
        self._log = log
        self._stream = (
            PrepareStream(channel.open_prepare_stream, max_items, max_message, channel.alive, stats)
            if streamed
            else None
        )

    def restart(self) -> None:
        """The channel was replaced: the stream's next call goes on the new one."""
        if self._stream is not None:
            self._stream.restart()

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()

    async def execute(
        self,
        txid: str,
        statements: Sequence[Statement],
        incarnation: str,
        isolation: Isolation,
    ) -> tuple[list[StatementResult], str]:
        """Run statements in the branch (opened if `incarnation` is empty); returns the
        results and the incarnation of the agent that ran them."""
        self._channel.watch()
        request = pb.BranchExecuteRequest(
            transaction_id=txid,
            statements=[statement_to_pb(s) for s in statements],
            incarnation=incarnation,
            isolation=isolation_to_pb(isolation),
        )
        reply = await self._channel.call("Execute", request, self._rpc_timeout)
        return [result_from_pb(r) for r in reply.results], reply.incarnation

    async def prepare(self, request: pb.PrepareRequest, timeout: float) -> PrepareReply:
        self._channel.watch()
        if self._stream is not None:
            return await self._streamed(request, timeout)
        return await self._unary(request, timeout)

    async def _unary(self, request: pb.PrepareRequest, timeout: float) -> PrepareReply:
        try:
            reply = await self._channel.stub.Prepare(request, timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            return PrepareReply(self._failed(exc.code(), exc.details() or ""))
        return _reply(reply)

    async def _streamed(self, request: pb.PrepareRequest, timeout: float) -> PrepareReply:
        assert self._stream is not None
        try:
            async with asyncio.timeout(timeout):  # no task of its own, as wait_for makes
                answer = await self._stream.prepare(request)
        except TimeoutError:
            return PrepareReply(self._failed(grpc.StatusCode.DEADLINE_EXCEEDED, ""))
        except CallBroken as exc:
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:  # an agent older than PrepareStream
                self._log.warning("prepare_stream_unimplemented", participant=self._channel.name)
                self._stream = None
                return await self._unary(request, timeout)
            return PrepareReply(self._failed(exc.code, exc.details))
        if answer.code != 0:
            code = status_of(answer.code)
            return PrepareReply(self._failed(code, answer.message))
        return _reply(answer.response)

    def _failed(self, code: grpc.StatusCode, details: str) -> Ballot:
        return failed_vote(code, details, self._channel.missing_vote())
