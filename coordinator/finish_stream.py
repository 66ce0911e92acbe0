"""The coordinator's end of FinishStream: one long-lived call per agent carries every
batched phase-2 decision, as PrepareStream carries every Prepare
(`twopc_common.multiplex`). A message on an open call costs Python gRPC much less CPU
than a unary call on both ends, and at concurrency 1 every transaction sends one
Finish to each of its agents.

A Finish whose call breaks before its answer gets `CallBroken`; phase 2 counts it as
it would a failed unary Finish: every decision it carried is retried.
"""

from __future__ import annotations

import asyncio
import collections

import grpc

from coordinator.participant_channel import ParticipantChannel
from twopc_common.errors import Unavailable
from twopc_common.grpc_errors import error_for, status_of
from twopc_common.log import EventLogger
from twopc_common.multiplex import CallBroken, Multiplexer
from twopc_pb import participant_pb2 as pb


class FinishCalls:
    """One agent's Finish requests: on its FinishStream when `streamed`, else unary. A
    failure raises as a unary Finish's would; an agent older than FinishStream
    (UNIMPLEMENTED) is asked by unary calls from then on."""

    def __init__(
        self,
        channel: ParticipantChannel,
        rpc_timeout: float,
        streamed: bool,
        max_message: int,
        stats: collections.Counter[str],
        log: EventLogger | None,
    ) -> None:
        self._channel = channel
        self._rpc_timeout = rpc_timeout
        self._log = log or EventLogger("coordinator", channel.name)
        # One Finish request is in flight at a time (phase 2 batches behind it), so a
        # message carries one item.
        self._stream: Multiplexer[pb.FinishRequest, pb.FinishItem, pb.FinishedItem] | None = None
        if streamed:
            self._stream = Multiplexer(
                channel.open_finish_stream,
                lambda ref, request: pb.FinishItem(ref=ref, request=request),
                lambda items: pb.FinishBatch(items=items),
                1,
                max_message,
                name="finish",
                on_answer=channel.alive,
                stats=stats,
            )

    def restart(self) -> None:
        if self._stream is not None:
            self._stream.restart()

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()

    async def finish(self, request: pb.FinishRequest) -> pb.FinishResponse:
        if self._stream is None:
            return await self._unary(request)
        try:
            async with asyncio.timeout(self._rpc_timeout):  # no task of its own
                answer = await self._stream.call(request)
        except TimeoutError:
            raise Unavailable(
                f"participant {self._channel.name}: no Finish answer within {self._rpc_timeout:g}s"
            ) from None
        except CallBroken as exc:
            if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                raise self._channel.status_error(exc.code, exc.details, exc.trailers) from None
            self._log.warning("finish_stream_unimplemented", participant=self._channel.name)
            self._stream = None
            return await self._unary(request)
        if answer.code != 0:
            raise error_for(
                status_of(answer.code), f"participant {self._channel.name}: {answer.message}"
            )
        return answer.response

    async def _unary(self, request: pb.FinishRequest) -> pb.FinishResponse:
        reply: pb.FinishResponse = await self._channel.stub.Finish(
            request, timeout=self._rpc_timeout, wait_for_ready=True
        )
        return reply
