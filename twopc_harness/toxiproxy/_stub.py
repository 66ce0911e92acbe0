"""One stage of a toxic chain: the task that runs a toxic between two channels and can be
interrupted (to change the chain) without losing the data it holds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ._channel import Channel, Chunk

log = logging.getLogger(__name__)

Pipe = Callable[["Stub"], Awaitable[None]]


class Stub:
    def __init__(self, input: Channel, output: Channel) -> None:
        self.input = input
        self.output = output
        # Bytes this stage has let through; limit_data counts against it across restarts.
        self.forwarded = 0
        # Data taken from input but not yet fully written to output; flushed on interrupt.
        self.pending: Chunk | None = None
        self.closed = False
        self._task: asyncio.Task[None] | None = None
        self._interrupting = False

    def run(self, pipe: Pipe) -> None:
        self._interrupting = False
        self._task = asyncio.get_running_loop().create_task(self._run(pipe))

    async def _run(self, pipe: Pipe) -> None:
        try:
            await pipe(self)
        except asyncio.CancelledError:
            if not self._interrupting:
                raise
            if self.pending is not None:
                self.output.push(self.pending)
                self.pending = None
        except Exception:
            log.exception("toxic failed; closing its stream")
            self.close()

    async def recv(self) -> Chunk | None:
        chunk = await self.input.get()
        self.pending = chunk
        return chunk

    async def send(self, chunk: Chunk, rest: Chunk | None = None) -> None:
        """Forward chunk; rest is what this stage still holds afterwards (when splitting one)."""
        await self.output.put(chunk)
        self.pending = rest

    def drop(self) -> None:
        self.pending = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.output.close()

    async def interrupt(self) -> bool:
        """Stop the running toxic, flushing what it holds; False if the stage has already closed."""
        if self._task is not None and not self.closed:
            self._interrupting = True
            self._task.cancel()
            await asyncio.wait({self._task})
        return not self.closed

    def kill(self) -> None:
        """Cancel without flushing: the connection is gone."""
        if self._task is not None:
            self._interrupting = False
            self._task.cancel()
