"""Many unary requests over one long-lived bidirectional gRPC call, both ends.

A unary call costs a Python gRPC process far more CPU than a message on an open
stream (bench/levers.py), and a busy sender often has several requests for the same
peer ready together. So the sender (`Multiplexer`) writes each request on one open
call as it comes, several in a message when they queue behind a write in progress,
and the receiver (`serve`) runs each in a task of its own and answers each as soon
as it is done, several in a message when they finish together. Nothing waits for a
batch to fill; a slow request delays no other.

The protocol's streams (PrepareStream to the agents, RunStream to the coordinator)
carry items `{ref, request}` and answers `{ref, code, message, <answer>}`: `ref` is
the sender's, unique within the call; a non-zero `code` is the gRPC status code the
unary call would have failed with.

Guarantees, sender:
- every request gets exactly one outcome: its answer, or `CallBroken` with the status
  of the call it travelled on, if that call ended first (the caller treats it as the
  unary call's failure: the request may or may not have been carried out);
- a request its caller stopped waiting for (timeout, cancellation) is not written if
  it has not been yet, and its answer is dropped if it comes;
- a message never carries more than `max_items` requests or `max_bytes` (a request
  too large to travel alone fails with RESOURCE_EXHAUSTED, as the unary call would);
- a broken call is replaced by a new one at the next request; `restart` moves new
  requests to a new call on the current channel (after a certificate rotation) while
  the old call delivers what it carries.

Guarantees, receiver:
- each item runs in a task of its own: a call that breaks never cancels one halfway
  (its answer is then lost, as a unary answer would be);
- answers never exceed the message limit, and the call ends once the sender has
  stopped writing and every item is answered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import itertools
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import grpc

from twopc_common.errors import InvalidArgument

# Room for a batch message's own framing around its items.
_FRAMING = 1024
_PER_ITEM = 16


class Message(Protocol):
    def ByteSize(self) -> int: ...


class Answer(Message, Protocol):
    ref: int
    code: int


Req = TypeVar("Req")  # what a caller asks; only its Item is measured
Item = TypeVar("Item", bound=Message)
Ans = TypeVar("Ans", bound=Answer)


class CallBroken(Exception):
    """The call a request travelled on ended before its answer came: its status code,
    details and trailing metadata (a standby's refusal names the active process)."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailers = trailers


@dataclass(frozen=True, slots=True)
class _Queued(Generic[Item, Ans]):
    """A request waiting to be written: its item, its caller's answer, its size on the
    wire (measured once)."""

    ref: int
    item: Item
    answer: asyncio.Future[Ans]
    size: int


class Multiplexer(Generic[Req, Item, Ans]):
    """The sending end. `open_call` starts the call (a `grpc.aio.StreamStreamCall`) on
    the current channel; `item(ref, request)` and `batch(items)` build its messages."""

    def __init__(
        self,
        open_call: Callable[[], Any],
        item: Callable[[int, Req], Item],
        batch: Callable[[list[Item]], Any],
        max_items: int,
        max_bytes: int,
        *,
        name: str,
        on_answer: Callable[[], None] = lambda: None,
        stats: collections.Counter[str] | None = None,
    ) -> None:
        self._open_call = open_call
        self._item = item
        self._batch = batch
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._on_answer = on_answer
        self._call: Any = None
        self._queue: collections.deque[_Queued[Item, Ans]] = collections.deque()
        self._waiting: dict[int, tuple[Any, asyncio.Future[Ans]]] = {}
        self._refs = itertools.count(1)
        self._accepted: weakref.WeakSet[Any] = weakref.WeakSet()
        """Calls the receiver has accepted (`_opened`)."""
        self._writer: asyncio.Task[None] | None = None
        self._readers: set[asyncio.Future[Any]] = set()
        self.stats = collections.Counter[str]() if stats is None else stats
        """`<name>_streams` opened, `<name>_messages` written, `<name>_items` carried."""
        self._names = (f"{name}_streams", f"{name}_messages", f"{name}_items")

    async def call(self, request: Req) -> Ans:
        """The answer to `request`; raises `CallBroken` if its call ended first."""
        answer: asyncio.Future[Ans] = asyncio.get_running_loop().create_future()
        ref = next(self._refs)
        item = self._item(ref, request)
        size = item.ByteSize()
        if size + _FRAMING > self._max_bytes:
            raise CallBroken(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a request of {size} bytes exceeds the {self._max_bytes}-byte message limit",
            )
        self._queue.append(_Queued(ref, item, answer, size + _PER_ITEM))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        try:
            return await answer
        finally:
            self._waiting.pop(ref, None)

    def restart(self) -> None:
        """New requests go on a new call; the current one finishes what it carries."""
        call, self._call = self._call, None
        if call is not None:
            self._spawn(call.done_writing())

    async def close(self) -> None:
        for task in (self._writer, *self._readers):
            if task is not None:
                task.cancel()
        if self._call is not None:
            self._call.cancel()
        self._broken(None, CallBroken(grpc.StatusCode.CANCELLED, "the client is closing"))

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    def _current(self) -> Any:
        if self._call is None:
            self.stats[self._names[0]] += 1
            self._call = self._open_call()
            self._spawn(self._read(self._call))
        return self._call

    def _take(self) -> list[_Queued[Item, Ans]]:
        """The next message's items: queued ones still awaited, within the limits."""
        batch: list[_Queued[Item, Ans]] = []
        size = _FRAMING
        while self._queue and len(batch) < self._max_items:
            head = self._queue[0]
            if head.answer.done():  # its caller stopped waiting
                self._queue.popleft()
                continue
            if batch and size + head.size > self._max_bytes:
                break
            batch.append(self._queue.popleft())
            size += head.size
        return batch

    async def _write(self) -> None:
        while self._queue:
            batch = self._take()
            if not batch:
                continue
            try:
                call = self._current()
            except Exception as exc:  # the channel is closed or unusable: nothing was sent
                broken = CallBroken(grpc.StatusCode.UNAVAILABLE, f"cannot start a call: {exc!r}")
                for queued in batch:
                    if not queued.answer.done():
                        queued.answer.set_exception(broken)
                continue
            if call not in self._accepted:
                await self._opened(call)
            for queued in batch:
                self._waiting[queued.ref] = (call, queued.answer)
            self.stats[self._names[1]] += 1
            self.stats[self._names[2]] += len(batch)
            try:
                await call.write(self._batch([queued.item for queued in batch]))
            except Exception as exc:
                self._broken(call, await _why(call, exc))

    async def _opened(self, call: Any) -> None:
        """Wait until the receiver has accepted `call` (its initial metadata came) or
        ended it, before the first write. A write racing a refusal (a bad token, a
        caller not allowed) fails with gRPC's own INTERNAL, which then replaces the
        refusal as the call's status; unwritten, the requests get the real one.
        A receiver that sends no initial metadata first (older than this) gets the
        write after `_ACCEPT_WAIT`."""
        with contextlib.suppress(Exception):  # the reader reports a broken call
            await asyncio.wait_for(call.initial_metadata(), _ACCEPT_WAIT)
        self._accepted.add(call)

    async def _read(self, call: Any) -> None:
        try:
            async for reply in call:
                self._on_answer()
                for answer in reply.items:
                    waiting = self._waiting.pop(answer.ref, None)
                    if waiting is not None and not waiting[1].done():
                        waiting[1].set_result(answer)
            error = CallBroken(grpc.StatusCode.UNAVAILABLE, "the peer ended the call")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = await _why(call, exc)
        self._broken(call, error)

    def _broken(self, call: Any, error: CallBroken) -> None:
        """Every request on `call` (every one, if None) fails with `error`."""
        if call is None or self._call is call:
            self._call = None
        for ref, (on, answer) in list(self._waiting.items()):
            if call is None or on is call:
                del self._waiting[ref]
                if not answer.done():
                    answer.set_exception(error)


async def _why(call: Any, exc: BaseException) -> CallBroken:
    """What broke `call`: its own final status when it has one (a write to a call
    that ended fails with gRPC's INTERNAL "Internal error from Core", which says
    nothing), else UNAVAILABLE: the connection failed and the requests' fate is
    unknown, as for a unary call cut off."""
    try:
        code = await asyncio.wait_for(call.code(), _STATUS_WAIT)
        if code != grpc.StatusCode.OK and not _from_core(code, await call.details()):
            trailers = tuple((str(k), str(v)) for k, v in await call.trailing_metadata() or ())
            return CallBroken(code, await call.details() or "", trailers)
    except asyncio.CancelledError:
        raise
    except Exception:  # no status within the wait (TimeoutError), or none to read
        pass
    if isinstance(exc, grpc.aio.AioRpcError) and not _from_core(exc.code(), exc.details()):
        trailers = tuple((str(k), str(v)) for k, v in exc.trailing_metadata() or ())
        return CallBroken(exc.code(), exc.details() or "", trailers)
    return CallBroken(grpc.StatusCode.UNAVAILABLE, f"the call broke: {exc!r}")


def _from_core(code: grpc.StatusCode, details: str | None) -> bool:
    """gRPC's own INTERNAL for a stream whose connection broke (a unary call cut off
    the same way gets UNAVAILABLE); the peer's INTERNAL answers say more."""
    return code == grpc.StatusCode.INTERNAL and (details or "") == "Internal error from Core"


# How long a broken call gets to report its final status.
_STATUS_WAIT = 2.0
# How long a new call waits to be accepted before it is written anyway.
_ACCEPT_WAIT = 5.0


item_observer: contextvars.ContextVar[Callable[[int, float], None] | None] = contextvars.ContextVar(
    "item_observer", default=None
)
"""Set by the RPC metrics for the call being served: told each item's answer code and
how long it took (`twopc_common.metrics.RpcMetrics`)."""


async def serve(
    requests: AsyncIterator[Any],
    context: grpc.aio.ServicerContext[Any, Any],
    answer: Callable[[Any], Awaitable[Ans]],
    batch: Callable[[list[Ans]], Any],
    max_items: int,
    max_bytes: int,
) -> None:
    """The receiving end: run `answer(item)` for every item of every message read from
    `requests` (at most `max_items` a message, else INVALID_ARGUMENT ends the call),
    and write the answers as they come, in messages of at most `max_bytes`.

    The call is accepted first with its (empty) initial metadata, which the sender
    waits for: see `Multiplexer._opened`."""
    await context.send_initial_metadata(())
    done: list[Ans] = []
    wake = asyncio.Event()
    running: set[asyncio.Task[Any]] = set()
    observe = item_observer.get()

    async def run(item: Any) -> None:
        started = time.perf_counter()
        try:
            reply = await answer(item)
            done.append(reply)
            if observe is not None:
                observe(reply.code, time.perf_counter() - started)
        finally:
            if (me := asyncio.current_task()) is not None:
                running.discard(me)
            wake.set()

    async def read() -> None:
        try:
            async for message in requests:
                if len(message.items) > max_items:
                    raise InvalidArgument(
                        f"{len(message.items)} requests in one message, the limit is {max_items}"
                    )
                for item in message.items:
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
                for message in pack(answers, batch, max_bytes):
                    await context.write(message)
        if (exc := reader.exception()) is not None:
            raise exc
    finally:
        reader.cancel()


def pack(answers: list[Ans], batch: Callable[[list[Ans]], Any], max_bytes: int) -> list[Any]:
    """`answers` in as few messages as fit under `max_bytes` each."""
    messages: list[Any] = []
    items: list[Ans] = []
    size = _FRAMING
    for a in answers:
        n = a.ByteSize() + _PER_ITEM
        if items and size + n > max_bytes:
            messages.append(batch(items))
            items, size = [], _FRAMING
        items.append(a)
        size += n
    if items:
        messages.append(batch(items))
    return messages
