"""The writer thread every decision log has: group commit and fail-stop.

Guarantees:
- one thread writes: a caller's record waits in a queue, and the thread takes every
  record queued while the previous batch was being written (up to `batch_max`) and
  commits them together, so concurrent records share one commit (and one fsync);
- every caller is answered exactly once (`settle`: on the caller's own event loop,
  one hand-off per batch), whatever happens to the thread meanwhile: its record is
  durable when `_write` returns, or `_write` raises;
- fail-stop: once the log cannot write, `failure` says why, the batch and every
  record still queued fail, and every later write fails at once; no caller ever
  waits forever.

Each log says how it writes one batch (`_write_batch`) and closes its connection
(`_close_writer`), and may say what its failure is (`_failed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, NamedTuple, TypeVar

from coordinator.log_records import LogFailed

Conn = TypeVar("Conn")
"""The writer thread's connection to the log's database."""
Write = TypeVar("Write")
"""One queued write, in the form the log executes it."""


class Reply:
    """Where a writer's caller waits: a future on the caller's event loop, answered
    from the writer thread through `call_soon_threadsafe` (a batch's replies on one
    loop take one hand-off between them, `settle_all`)."""

    __slots__ = ("future", "loop")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[None] = self.loop.create_future()


def _answer(replies: Sequence[Reply], error: BaseException | None) -> None:
    """On the callers' loop: answer each reply not answered yet."""
    for reply in replies:
        if reply.future.done():
            continue
        if error is None:
            reply.future.set_result(None)
        else:
            reply.future.set_exception(error)


def settle_all(replies: Sequence[Reply], error: BaseException | None = None) -> None:
    """Answer writers' callers, exactly once each whatever happened to them meanwhile;
    callable from any thread. A loop that is closed has nobody left to answer."""
    loops: dict[asyncio.AbstractEventLoop, list[Reply]] = {}
    for reply in replies:
        loops.setdefault(reply.loop, []).append(reply)
    for loop, waiting in loops.items():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_answer, waiting, error)


def settle(reply: Reply, error: BaseException | None = None) -> None:
    settle_all((reply,), error)


class Queued(NamedTuple, Generic[Write]):
    write: Write
    forced: bool
    """Whether the record must be on disk (fsynced, replicated) before `done`."""
    done: Reply


class _Stop:
    """Queued by `_stop_writer`: the writer finishes the batches before it and stops."""


def one_by_one(
    batch: Sequence[Queued[Write]],
    commit: Callable[[Queued[Write]], None],
    rejected: tuple[type[Exception], ...],
) -> None:
    """One bad record (say, a duplicate idempotency key) must not fail the records
    it happened to share a batch with: write them one by one, failing a record
    only with an error of `rejected`."""
    for item in batch:
        try:
            commit(item)
        except rejected as exc:
            settle(item.done, exc)
        else:
            settle(item.done)


class GroupCommit(Generic[Conn, Write]):
    def __init__(self, batch_max: int) -> None:
        self._batch_max = batch_max
        self._queue: queue.SimpleQueue[Queued[Write] | _Stop] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self.failure: str | None = None
        """Why the log cannot write, once it cannot (fail-stop)."""
        self.stats = {"log_batches": 0, "log_records": 0, "log_fsync_batches": 0}
        self.on_batch: Callable[[int, bool, float], None] = lambda records, forced, secs: None
        """Called by the writer thread after each batch it committed (metrics)."""

    def _write_batch(self, conn: Conn, batch: list[Queued[Write]]) -> bool:
        """Write one batch and answer its callers; False: the writer must stop."""
        raise NotImplementedError

    def _close_writer(self, conn: Conn) -> None:
        raise NotImplementedError

    def _failed(self) -> LogFailed:
        """The error a write gets once the log has failed."""
        return LogFailed(self.failure or "decision log closed")

    def _start_writer(self, conn: Conn) -> None:
        self._writer = threading.Thread(
            target=self._write_loop, args=(conn,), name="decision-log", daemon=True
        )
        self._writer.start()

    def _stop_writer(self) -> bool:
        """Let the writer write what is queued, then stop it; whether one was running."""
        if self._writer is None:
            return False
        self._queue.put(_Stop())
        self._writer.join()
        self._writer = None
        return True

    def _write_loop(self, conn: Conn) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                if not self._write_batch(conn, batch):
                    return
        except BaseException as exc:  # never die silently: callers would wait forever
            self._fail(f"the writer stopped: {exc!r}")
        finally:
            self._close_writer(conn)

    def _next_batch(self) -> list[Queued[Write]] | None:
        """The next record and those queued behind it, up to `batch_max`; None: stop."""
        first = self._queue.get()
        if isinstance(first, _Stop):
            return None
        batch = [first]
        while len(batch) < self._batch_max:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Stop):
                self._queue.put(item)
                break
            batch.append(item)
        return batch

    def _committed(self, batch: Sequence[Queued[Write]], forced: bool, started: float) -> None:
        """Count a batch that is now durable (`started`: perf_counter) and answer it."""
        self.stats["log_batches"] += 1
        self.stats["log_records"] += len(batch)
        self.stats["log_fsync_batches"] += forced
        self.on_batch(len(batch), forced, time.perf_counter() - started)
        settle_all([item.done for item in batch])

    def _fail(self, why: str, batch: Sequence[Queued[Write]] = ()) -> None:
        """Fail-stop: remember why (the first reason), fail this batch and everything
        still queued."""
        if self.failure is None:
            self.failure = why
        for item in batch:
            settle(item.done, self._failed())
        self._drain()

    def _drain(self, error: LogFailed | None = None) -> None:
        """Fail every record still queued (none of them was written)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Stop):
                self._queue.put(item)
                return
            settle(item.done, error or self._failed())

    def _check_open(self) -> None:
        if self._writer is None:
            raise RuntimeError("decision log is not open")

    def _check_writable(self) -> None:
        """Refuse a new write at once when it could not become durable."""
        self._check_open()
        if self.failure is not None:
            raise self._failed()

    async def _write(self, write: Write, forced: bool) -> None:
        """Queue one write; return once it is durable (raise if it cannot be)."""
        self._check_writable()
        done = Reply()
        self._queue.put(Queued(write, forced, done))
        if self.failure is not None:  # the writer failed meanwhile: nobody else answers
            self._drain()
        # Shielded: a cancelled caller must not cancel the write under the writer (the
        # record may be durable already; the caller's caller decides what that means).
        await asyncio.shield(done.future)
