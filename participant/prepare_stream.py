"""The agent's end of PrepareStream: many Prepares over one long-lived call
(`twopc_common.multiplex`).

Each item is carried out exactly as a unary Prepare would be (the same function runs
it), concurrently with the others, and answered on its own: an error is answered with
the status code and message Prepare would have failed with. Each runs in a task of
its own, so a call that breaks never cancels a branch halfway.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from twopc_common import multiplex
from twopc_common.errors import TwoPCError
from twopc_common.grpc_errors import Context, status_for
from twopc_pb import participant_pb2 as pb

PrepareOne = Callable[[pb.PrepareRequest], Awaitable[pb.PrepareResponse]]


async def answer(item: pb.PrepareItem, prepare: PrepareOne) -> pb.VoteItem:
    """One item's answer: its vote, or the status Prepare would have failed with."""
    try:
        return pb.VoteItem(ref=item.ref, response=await prepare(item.request))
    except TwoPCError as exc:
        return pb.VoteItem(ref=item.ref, code=status_for(exc).value[0], message=str(exc))
    except Exception as exc:
        logging.getLogger("twopc").exception("internal error in PrepareStream")
        return pb.VoteItem(
            ref=item.ref,
            code=grpc.StatusCode.INTERNAL.value[0],
            message=f"internal error: {exc!r}",
        )


async def serve(
    requests: AsyncIterator[pb.PrepareBatch],
    context: Context,
    prepare: PrepareOne,
    max_items: int,
    max_bytes: int,
) -> None:
    """Run every Prepare the coordinator writes; write the votes as they come."""
    await multiplex.serve(
        requests,
        context,
        lambda item: answer(item, prepare),
        lambda answers: pb.VoteBatch(items=answers),
        max_items,
        max_bytes,
    )
