"""The agent's end of PrepareStream: many Prepares over one long-lived call
(`twopc_common.multiplex`).

Each item is carried out exactly as a unary Prepare would be (the same function runs
it), concurrently with the others, and answered on its own: an error is answered with
the status code and message Prepare would have failed with. Each runs in a task of
its own, so a call that breaks never cancels a branch halfway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from twopc_common import multiplex
from twopc_common.grpc_errors import Context, answer_item
from twopc_pb import participant_pb2 as pb

PrepareOne = Callable[[pb.PrepareRequest], Awaitable[pb.PrepareResponse]]


async def answer(item: pb.PrepareItem, prepare: PrepareOne) -> pb.VoteItem:
    """One item's answer: its vote, or the status Prepare would have failed with."""
    return await answer_item(
        prepare(item.request),
        lambda response: pb.VoteItem(ref=item.ref, response=response),
        # Prepare's errors carry no trailers the coordinator reads.
        lambda code, message, _: pb.VoteItem(ref=item.ref, code=code, message=message),
        "PrepareStream",
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
