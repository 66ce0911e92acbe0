"""The coordinator's end of PrepareStream: one long-lived call per agent carries every
Prepare, as `Finish` carries every phase-2 decision.

A unary call costs a Python gRPC process far more CPU than a message on an open
stream, and at any load several transactions' Prepares for the same agent are ready
together: they go in one message. Nothing waits for a batch to fill: a Prepare is
written at once unless a write is already in progress, in which case it rides with
the next one (the write in progress is the batching window). Answers come back as
each vote is known, so one slow branch (a lock wait) delays no other.

Guarantees:
- every Prepare gets exactly one outcome: its agent's answer, or the error that broke
  the call it travelled on (the caller turns that into a vote as it would a unary
  call's error: the branch may have prepared, and phase 2 sends it an Abort);
- a Prepare its caller stopped waiting for (timeout, cancellation) is not written if
  it has not been yet, and its answer is dropped if it comes;
- a message never carries more than `max_items` Prepares or more than `max_bytes`
  (a Prepare too large to travel alone fails with RESOURCE_EXHAUSTED, as the unary
  call would);
- a broken call is replaced by a new one at the next Prepare; `restart` moves new
  Prepares to a new call on the current channel (after a certificate rotation) while
  the old call delivers what it carries.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Callable
from typing import Any

import grpc

from twopc_pb import participant_pb2 as pb

OpenCall = Callable[[], Any]
"""Starts a PrepareStream call (a `grpc.aio.StreamStreamCall`) on the current channel."""

# Room for a PrepareBatch's own framing around its items.
_FRAMING = 1024


class CallBroken(Exception):
    """The call a Prepare travelled on ended before its answer came."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class PrepareStream:
    def __init__(
        self,
        open_call: OpenCall,
        max_items: int,
        max_bytes: int,
        on_answer: Callable[[], None] = lambda: None,
        stats: collections.Counter[str] | None = None,
    ) -> None:
        self._open_call = open_call
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._on_answer = on_answer
        self._call: Any = None
        self._queue: list[tuple[pb.PrepareItem, asyncio.Future[pb.VoteItem]]] = []
        self._waiting: dict[int, tuple[Any, asyncio.Future[pb.VoteItem]]] = {}
        self._refs = itertools.count(1)
        self._writer: asyncio.Task[None] | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self.stats = collections.Counter[str]() if stats is None else stats
        """prepare_streams opened, prepare_messages written, prepare_items they carried."""

    async def prepare(self, request: pb.PrepareRequest) -> pb.VoteItem:
        """The agent's answer to `request`; raises `CallBroken` if the call broke first."""
        answer: asyncio.Future[pb.VoteItem] = asyncio.get_running_loop().create_future()
        item = pb.PrepareItem(ref=next(self._refs), request=request)
        if item.ByteSize() + _FRAMING > self._max_bytes:
            raise CallBroken(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a Prepare of {item.ByteSize()} bytes exceeds the {self._max_bytes}-byte "
                "message limit",
            )
        self._queue.append((item, answer))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        try:
            return await answer
        finally:
            self._waiting.pop(item.ref, None)

    def restart(self) -> None:
        """New Prepares go on a new call; the current one finishes what it carries."""
        call, self._call = self._call, None
        if call is not None:
            self._spawn(call.done_writing())

    async def close(self) -> None:
        for task in (self._writer, *self._readers):
            if task is not None:
                task.cancel()
        if self._call is not None:
            self._call.cancel()
        self._broken(None, CallBroken(grpc.StatusCode.CANCELLED, "the coordinator is stopping"))

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    def _current(self) -> Any:
        if self._call is None:
            self.stats["prepare_streams"] += 1
            self._call = self._open_call()
            self._spawn(self._read(self._call))
        return self._call

    def _take(self) -> list[tuple[pb.PrepareItem, asyncio.Future[pb.VoteItem]]]:
        """The next message's Prepares: queued ones still awaited, within the limits."""
        batch: list[tuple[pb.PrepareItem, asyncio.Future[pb.VoteItem]]] = []
        size = _FRAMING
        while self._queue and len(batch) < self._max_items:
            item, answer = self._queue[0]
            if answer.done():  # its caller stopped waiting
                self._queue.pop(0)
                continue
            n = item.ByteSize() + 16
            if batch and size + n > self._max_bytes:
                break
            self._queue.pop(0)
            batch.append((item, answer))
            size += n
        return batch

    async def _write(self) -> None:
        while self._queue:
            batch = self._take()
            if not batch:
                continue
            call = self._current()
            for item, answer in batch:
                self._waiting[item.ref] = (call, answer)
            self.stats["prepare_messages"] += 1
            self.stats["prepare_items"] += len(batch)
            try:
                await call.write(pb.PrepareBatch(items=[item for item, _ in batch]))
            except Exception as exc:
                self._broken(call, await _why(call, exc))

    async def _read(self, call: Any) -> None:
        try:
            async for reply in call:
                self._on_answer()
                for vote in reply.items:
                    waiting = self._waiting.pop(vote.ref, None)
                    if waiting is not None and not waiting[1].done():
                        waiting[1].set_result(vote)
            error = CallBroken(grpc.StatusCode.UNAVAILABLE, "the agent ended the call")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = await _why(call, exc)
        self._broken(call, error)

    def _broken(self, call: Any, error: CallBroken) -> None:
        """Every Prepare on `call` (every one, if None) fails with `error`."""
        if call is None or self._call is call:
            self._call = None
        for ref, (on, answer) in list(self._waiting.items()):
            if call is None or on is call:
                del self._waiting[ref]
                if not answer.done():
                    answer.set_exception(error)


async def _why(call: Any, exc: BaseException) -> CallBroken:
    if isinstance(exc, grpc.aio.AioRpcError):
        return CallBroken(exc.code(), exc.details() or "")
    if not call.done():
        return CallBroken(grpc.StatusCode.UNAVAILABLE, repr(exc))
    try:
        code = await call.code()
        details = await call.details()
    except Exception:
        return CallBroken(grpc.StatusCode.UNAVAILABLE, repr(exc))
    return CallBroken(code, details or repr(exc))
