"""The agent's end of PrepareStream and FinishStream: many Prepares (or Finish
requests) over one long-lived call each (`twopc_common.multiplex`).

Each item is carried out exactly as the unary call would be (the same function runs
it), concurrently with the others, and answered on its own: an error is answered with
the status code and message the unary call would have failed with. Each runs in a
task of its own, so a call that breaks never cancels a branch halfway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from twopc_common import multiplex
from twopc_common.grpc_errors import Context, answer_item
from twopc_common.limits import Limits


async def serve(
    requests: AsyncIterator[Any],
    context: Context,
    run: Callable[[Any], Awaitable[Any]],
    reply: Callable[..., Any],
    batch: Callable[..., Any],
    method: str,
    limits: Limits,
) -> None:
    """Run `run(item.request)` for every item the coordinator writes (at most
    `limits.max_stream_batch` a message) and write each answer as it comes:
    `reply(ref=, response=)`, or `reply(ref=, code=, message=)` with the status the
    unary call would have failed with; `batch(items=)` a message."""

    async def answer(item: Any) -> Any:
        return await answer_item(
            run(item.request),
            lambda response: reply(ref=item.ref, response=response),
            # Prepare's and Finish's errors carry no trailers the coordinator reads.
            lambda code, message, _: reply(ref=item.ref, code=code, message=message),
            method,
        )

    await multiplex.serve(
        requests,
        context,
        answer,
        lambda answers: batch(items=answers),
        limits.max_stream_batch,
        limits.max_message_bytes,
    )
