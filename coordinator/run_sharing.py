"""The client library's Runs over one long-lived RunStream call per coordinator
process (`twopc_common.multiplex`): an application with many transactions in flight
(an async server, say) sends them all on one call, several in a message when they
queue behind a write, instead of one unary call each.

An answer, or the failure of the call it travelled on, comes back as the
`grpc.aio.AioRpcError` the unary Run would have raised (the same code, message and
trailing metadata), so that failover, retries and error mapping are the unary path's,
unchanged.
"""

from __future__ import annotations

import asyncio

import grpc

from twopc_common.grpc_errors import status_of
from twopc_common.limits import Limits
from twopc_common.multiplex import CallBroken, Multiplexer
from twopc_pb import coordinator_pb2 as pb
from twopc_pb import coordinator_pb2_grpc as cgrpc


class SharedRuns(Multiplexer[tuple[pb.RunRequest, float], pb.RunItem, pb.OutcomeItem]):
    """Runs to one coordinator process over one RunStream call."""

    def __init__(self, stub: cgrpc.CoordinatorStub, limits: Limits | None = None) -> None:
        limits = limits or Limits()
        super().__init__(
            lambda: stub.RunStream(),
            lambda ref, run: pb.RunItem(
                ref=ref, request=run[0], timeout_ms=min(2**32 - 1, max(1, int(run[1] * 1000)))
            ),
            lambda items: pb.RunBatch(items=items),
            limits.max_stream_batch,
            limits.max_message_bytes,
            name="run",
        )

    async def run(self, request: pb.RunRequest, timeout: float) -> pb.TransactionOutcome:
        """Run's answer, or the AioRpcError Run would have raised."""
        try:
            async with asyncio.timeout(timeout):  # no task of its own, as wait_for makes
                answer = await self.call((request, timeout))
        except TimeoutError:
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except CallBroken as exc:
            raise _error(exc.code, exc.details, exc.trailers) from None
        if answer.code:
            raise _error(status_of(answer.code), answer.message, tuple(answer.trailers.items()))
        return answer.outcome


def _error(
    code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details=details
    )
