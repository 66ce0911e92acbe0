"""Phase 2 from the coordinator to one agent (for `coordinator.participants`):
decisions batched into Finish requests, a Commit or an Abort alone, and what a phase-2
answer means.

Decisions for an agent queue up while one Finish request is in flight and all go in
the next, like a group commit. Under load that turns one RPC per branch into a
fraction of one, and the agent finishes a whole batch in one pipelined round trip to
its database. The requests travel on the agent's FinishStream
(`coordinator.finish_stream`), or as unary Finish calls (`--finish-calls unary`, or an
agent older than FinishStream). Each decision gets its own answer: its outcome, or its
own error (a request that failed as a whole fails every decision it carried, each with
an error of its own). The engine sends aborts alone (`abort`): an abort may have to
interrupt a branch waiting on a lock, and must not hold up the commits behind it.
"""

from __future__ import annotations

import asyncio
import collections
import copy

import grpc

from coordinator.finish_stream import FinishCalls
from coordinator.participant_channel import ParticipantChannel
from twopc_common.errors import TwoPCError, Unavailable
from twopc_common.grpc_errors import error_for, status_of
from twopc_common.limits import Limits
from twopc_common.log import EventLogger
from twopc_common.participant_wire import outcome_from_pb
from twopc_common.phase2_outcome import Phase2Outcome
from twopc_pb import participant_pb2 as pb

_Decision = tuple[str, bool, "asyncio.Future[Phase2Outcome]"]


class Phase2Calls:
    """One agent's phase-2 calls: batched decisions (at most `max_batch` to a Finish
    request, on the agent's FinishStream when `streamed`, else a unary Finish call),
    and Commit and Abort alone."""

    def __init__(
        self,
        channel: ParticipantChannel,
        rpc_timeout: float,
        max_batch: int,
        stats: collections.Counter[str],
        streamed: bool = True,
        max_message: int = Limits().max_message_bytes,
        log: EventLogger | None = None,
    ) -> None:
        self._channel = channel
        self._rpc_timeout = rpc_timeout
        self._max_batch = max_batch
        self._stats = stats
        self._decisions: list[_Decision] = []
        self._sender: asyncio.Task[None] | None = None
        self._calls = FinishCalls(channel, rpc_timeout, streamed, max_message, stats, log)

    def restart(self) -> None:
        """The channel was replaced: the stream's next call goes on the new one."""
        self._calls.restart()

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        await self._calls.close()

    async def finish(self, txid: str, commit: bool) -> Phase2Outcome:
        """Commit or abort the branch in the next batched Finish call. Answers as
        `commit` / `abort` do: the branch's outcome, or raises the branch's own error."""
        self._channel.watch()
        answer: asyncio.Future[Phase2Outcome] = asyncio.get_running_loop().create_future()
        self._decisions.append((txid, commit, answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_decisions())
        return await answer

    async def _send_decisions(self) -> None:
        while self._decisions:
            batch = [d for d in self._decisions[: self._max_batch] if not d[2].done()]
            del self._decisions[: self._max_batch]
            if not batch:
                continue
            self._stats["phase2_calls"] += 1
            self._stats["phase2_decisions"] += len(batch)
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
        request = pb.FinishRequest(
            decisions=[pb.Decision(transaction_id=t, commit=c) for t, c in decisions]
        )
        reply = await self._calls.finish(request)
        if len(reply.finished) != len(decisions):
            raise Unavailable(
                f"participant {self._channel.name}: {len(reply.finished)} answers "
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
                f"participant {self._channel.name}: {answer.message}",
            )
        return self._decoded(answer.outcome, answer.changed, commit)

    async def commit(self, txid: str) -> Phase2Outcome:
        return await self._alone("Commit", txid, True)

    async def abort(self, txid: str) -> Phase2Outcome:
        return await self._alone("Abort", txid, False)

    async def _alone(self, method: str, txid: str, commit: bool) -> Phase2Outcome:
        self._channel.watch()
        ack = await self._channel.call(method, pb.BranchRef(transaction_id=txid), self._rpc_timeout)
        answer = self._decoded(ack.outcome, ack.changed, commit)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _decoded(self, value: int, changed: bool, commit: bool) -> Phase2Outcome | Exception:
        """An OK answer to a Commit (`commit`) or an Abort: the outcome, or an error if
        it is a value this coordinator does not know."""
        outcome = outcome_from_pb(value, changed, commit)
        if outcome is None:
            return Unavailable(f"participant {self._channel.name}: unknown phase-2 outcome {value}")
        return outcome

    def _as_error(self, exc: Exception) -> Exception:
        """A failed call, as the error of each decision it carried (retried by phase 2)."""
        if isinstance(exc, grpc.aio.AioRpcError):
            return self._channel.error(exc)
        if isinstance(exc, TwoPCError):
            return copy.copy(exc)  # one instance per waiting decision
        return Unavailable(f"participant {self._channel.name}: {exc!r}")
