"""Work an RPC starts and its caller cannot interrupt: the one shielding helper of
both servicers.

gRPC cancels a handler whose caller went away or whose deadline expired. Some work
must not stop halfway (a transaction between its decision and its log record, a
one-phase COMMIT in PostgreSQL while the branch still looks open to the agent):
`shielded` runs it as a task of its own that the handler's cancellation does not
reach, so it finishes and its result stands (a retry, or recovery, learns it). The
task is held here until it ends, since the event loop keeps only weak references to
tasks and a shielded task nobody awaits any more could otherwise be collected
mid-flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

_running: set[asyncio.Future[Any]] = set()


async def shielded(work: Awaitable[T]) -> T:
    """`await work`, finished even if the caller is cancelled meanwhile."""
    task = asyncio.ensure_future(work)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return await asyncio.shield(task)
