"""A private asyncio event loop in a daemon thread, for blocking callers in any thread.

This is how the blocking `CoordinatorClient` runs the asyncio client's coroutines, so
that every call, its failover and its error mapping exist once. Guarantees:
- `run` may be called from any number of threads at once; each call blocks its own
  thread only, and an interrupt (KeyboardInterrupt) in the waiting thread cancels the
  coroutine rather than leaving it running unobserved;
- `close` runs a last coroutine (closing the channels), cancels whatever is still
  running (a caller blocked in `run` then gets `CancelledError`), stops the loop and
  joins its thread; it is idempotent, and callable from the loop's own thread (as a
  garbage collector's finalizer may be), where it cannot wait and so only schedules
  the same steps;
- after `close`, `run` raises `ValueError`, as a call on a closed gRPC channel does.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CLOSE_TIMEOUT = 10.0
"""Seconds `close` waits for the last coroutine and for the thread to end (closing
gRPC channels cancels their calls at once; this only bounds a loop that is stuck)."""


class LoopThread:
    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._closing = False
        self._lock = threading.Lock()
        self._thread.start()

    def run(self, call: Coroutine[Any, Any, T]) -> T:
        """`await call` on the loop; its result or its exception, in this thread."""
        if threading.current_thread() is self._thread:
            call.close()
            raise RuntimeError("a blocking client call from its own event loop would deadlock")
        with self._lock:
            if self._closing:
                call.close()  # never started: close it, or Python warns it was never awaited
                raise ValueError("the client is closed")
            future = asyncio.run_coroutine_threadsafe(call, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self, last: Callable[[], Coroutine[Any, Any, None]]) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
        shutdown = asyncio.run_coroutine_threadsafe(_shutdown(last), self._loop)
        if threading.current_thread() is self._thread:
            # Cannot wait for itself: the loop stops once the shutdown is done.
            shutdown.add_done_callback(lambda _: self._loop.call_soon_threadsafe(self._loop.stop))
            return
        try:
            shutdown.result(CLOSE_TIMEOUT)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CLOSE_TIMEOUT)
            if not self._thread.is_alive():
                self._loop.close()


async def _shutdown(last: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        await last()
    finally:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
