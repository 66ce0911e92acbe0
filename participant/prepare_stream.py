"""The agent's end of PrepareStream: many Prepares over one long-lived call.

Guarantees:
- each item is carried out exactly as a unary Prepare would be (the same function
  runs it), concurrently with the others, and answered on its own: one failing item
  does not fail the rest, and an error is answered with the status code and message
  Prepare would have failed with;
- each item runs in a task of its own, so that a call that breaks (the coordinator
  went away, a partition) never cancels a branch halfway; its vote is then lost, as a
  unary Prepare's answer would be, and the coordinator treats it so;
- answers that finish together travel in one message, never larger than the message
  limit (a vote's results are bounded below it, see `Limits.max_result_bytes`);
- the call ends when the coordinator has stopped writing and every item is answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from twopc_common.errors import InvalidArgument, TwoPCError
from twopc_common.grpc_errors import Context, status_for
from twopc_pb import participant_pb2 as pb

PrepareOne = Callable[[pb.PrepareRequest], Awaitable[pb.PrepareResponse]]

# Room for a VoteBatch's own framing around its items.
_FRAMING = 1024


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


def pack(answers: list[pb.VoteItem], max_bytes: int) -> list[pb.VoteBatch]:
    """`answers` in as few messages as fit under `max_bytes` each."""
    batches: list[pb.VoteBatch] = []
    items: list[pb.VoteItem] = []
    size = _FRAMING
    for a in answers:
        n = a.ByteSize() + 16
        if items and size + n > max_bytes:
            batches.append(pb.VoteBatch(items=items))
            items, size = [], _FRAMING
        items.append(a)
        size += n
    if items:
        batches.append(pb.VoteBatch(items=items))
    return batches


async def serve(
    requests: AsyncIterator[pb.PrepareBatch],
    context: Context,
    prepare: PrepareOne,
    max_items: int,
    max_bytes: int,
) -> None:
    """Run every item the coordinator writes; write the answers as they come."""
    done: list[pb.VoteItem] = []
    wake = asyncio.Event()
    running: set[asyncio.Task[Any]] = set()

    async def run(item: pb.PrepareItem) -> None:
        try:
            done.append(await answer(item, prepare))
        finally:
            if (me := asyncio.current_task()) is not None:
                running.discard(me)
            wake.set()

    async def read() -> None:
        try:
            async for batch in requests:
                if len(batch.items) > max_items:
                    raise InvalidArgument(
                        f"{len(batch.items)} prepares in one message, the limit is {max_items}"
                    )
                for item in batch.items:
                    running.add(asyncio.create_task(run(item)))
        finally:
            wake.set()

    reader = asyncio.create_task(read())
    try:
        while not (reader.done() and not running and not done):
            await wake.wait()
            wake.clear()
            if done:
                answers = done[:]
                done.clear()
                for message in pack(answers, max_bytes):
                    await context.write(message)
        if (exc := reader.exception()) is not None:
            raise exc
    finally:
        reader.cancel()
