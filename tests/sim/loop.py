"""Virtual time and simulated processes.

`VirtualLoop` is an asyncio event loop whose clock is virtual: when nothing is ready
to run it jumps straight to the next timer instead of waiting, so a schedule of
minutes runs in milliseconds, and the order of events depends only on the code and
the seed, never on the machine's speed. It has no real I/O: nothing in a simulation
may touch a socket, a file or a thread (a `select()` with nothing scheduled at all is
a deadlock of the simulated system, and raises).

A `Process` is one incarnation of a simulated daemon. Every task created while it
runs (directly or by its tasks) belongs to it; `kill()` cancels them all and marks it
dead, and the simulated network, log and database ignore anything a dead process
still tries to do (a crash runs no more code with effects).
"""

from __future__ import annotations

import asyncio
import contextvars
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any


class SimDeadlock(Exception):
    """Nothing is ready and nothing is scheduled: the simulated system hangs."""


class _NoIO(selectors.BaseSelector):
    """A selector that never waits: it advances virtual time to the next timer."""

    def __init__(self) -> None:
        self._keys: dict[int, selectors.SelectorKey] = {}
        self.loop: VirtualLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._keys.pop(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise SimDeadlock("nothing ready and no timer scheduled")
        assert self.loop is not None
        self.loop.now += timeout
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        selector = _NoIO()
        super().__init__(selector)
        selector.loop = self
        self.set_task_factory(_task_factory)  # type: ignore[arg-type]

    def time(self) -> float:
        return self.now


_current: contextvars.ContextVar[Process | None] = contextvars.ContextVar(
    "sim_process", default=None
)


def _task_factory(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, Any],
    context: contextvars.Context | None = None,
) -> asyncio.Task[Any]:
    task = asyncio.Task(coro, loop=loop, context=context)
    owner = (context or contextvars.copy_context()).get(_current)
    if owner is not None:
        owner.adopt(task)
    return task


class Process:
    def __init__(self, name: str, incarnation: int) -> None:
        self.name = name
        self.incarnation = incarnation
        self.alive = True
        self._tasks: list[asyncio.Task[Any]] = []

    def __repr__(self) -> str:
        return f"{self.name}#{self.incarnation}"

    def adopt(self, task: asyncio.Task[Any]) -> None:
        if not self.alive:  # made by the cleanup of a task the crash cancelled
            task.cancel()
            return
        if len(self._tasks) > 256:
            self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(task)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` as a task of this process."""
        context = contextvars.copy_context()
        context.run(_current.set, self)
        return asyncio.get_running_loop().create_task(coro, context=context)

    def kill(self) -> None:
        """Crash: no more effects, every task cancelled (their cleanup is ignored)."""
        self.alive = False
        for task in self._tasks:
            if not task.done():
                task.cancel()
        self._tasks = []


def current() -> Process | None:
    """The process the running code belongs to."""
    return _current.get()


class SimClock:
    """The `twopc_common.ports.Clock` of a simulation: the loop's virtual time."""

    def __init__(self, wall_start: float = 1_800_000_000.0) -> None:
        self._wall_start = wall_start

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    def time(self) -> float:
        return self._wall_start + asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
