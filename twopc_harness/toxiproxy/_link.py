"""One direction of one proxied connection: socket reader -> chain of toxic stages -> socket writer,
plus the edits (add, update, remove a toxic) applied to it while data flows."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ._channel import Channel, Chunk
from ._stub import Stub
from ._toxics import Toxic, pipe_for

READ_SIZE = 32 * 1024


@dataclass(eq=False)
class _Stage:
    stub: Stub
    toxic: Toxic | None  # None for the fixed head, which lets every toxic have a predecessor


class Link:
    def __init__(
        self, toxics: list[Toxic], source: asyncio.StreamReader, dest: asyncio.StreamWriter
    ) -> None:
        self._source = source
        self._dest = dest
        channels = [Channel() for _ in range(len(toxics) + 2)]
        self._input = channels[0]
        self._output = channels[-1]
        self._stages = [
            _Stage(Stub(channels[i], channels[i + 1]), toxic)
            for i, toxic in enumerate([None, *toxics])
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self.dead = False

    def start(self) -> asyncio.Task[None]:
        """Start moving data; the returned task ends once the destination is closed."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._write())]
        for stage in self._stages:
            self._run(stage)
        return self._tasks[1]

    def kill(self) -> None:
        self.dead = True
        for task in self._tasks:
            task.cancel()
        for stage in self._stages:
            stage.stub.kill()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await self._source.read(READ_SIZE):
                await self._input.put(Chunk(data, loop.time()))
        except OSError:
            pass
        finally:
            self._input.close()

    async def _write(self) -> None:
        try:
            while (chunk := await self._output.get()) is not None:
                self._dest.write(chunk.data)
                await self._dest.drain()
        except OSError:
            pass
        finally:
            # A full close, not a half-close: the other direction then sees EOF and ends too.
            self._dest.close()

    def _run(self, stage: _Stage) -> None:
        if not self.dead:
            stage.stub.run(pipe_for(stage.toxic))

    def _index(self, toxic: Toxic) -> int | None:
        for i, stage in enumerate(self._stages):
            if stage.toxic is toxic:
                return i
        return None

    async def add(self, toxic: Toxic) -> None:
        last = self._stages[-1]
        # A closed chain has nothing left to poison; later edits find no stage and skip.
        if not await last.stub.interrupt() or self.dead:
            return
        channel = Channel()
        stage = _Stage(Stub(channel, last.stub.output), toxic)
        last.stub.output = channel
        self._stages.append(stage)
        self._run(stage)
        self._run(last)

    async def update(self, toxic: Toxic) -> None:
        i = self._index(toxic)
        if i is not None and await self._stages[i].stub.interrupt():
            self._run(self._stages[i])

    async def remove(self, toxic: Toxic) -> None:
        i = self._index(toxic)
        if i is None:
            return
        stub = self._stages[i].stub
        if not await stub.interrupt() or self.dead:
            return
        if toxic.type == "timeout":
            # The real server's timeout cleanup closes the stream, so removing the
            # toxic ends every connection it was attached to.
            stub.close()
            return
        previous = self._stages[i - 1]
        previous_open = await previous.stub.interrupt()
        if self.dead:
            return
        for chunk in stub.input.take_all():
            stub.output.push(chunk)
        if not previous_open:
            # Upstream of here already ended: deliver what was buffered, then end too.
            stub.close()
            return
        previous.stub.output = stub.output
        del self._stages[i]
        self._run(previous)
