"""Chunks of stream data and the bounded, closable queues that join the stages of a toxic chain."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

# The real server buffers this many chunks between toxics; it bounds memory per stage.
CAPACITY = 1024


@dataclass(slots=True)
class Chunk:
    """One socket read, stamped with the loop time it arrived (latency toxics move the stamp on)."""

    data: bytes
    timestamp: float


class Channel:
    """A FIFO of chunks with Go channel semantics: closing never blocks, and a closed,
    drained channel yields None on every read so a restarted stage sees the end again."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._items: deque[Chunk] = deque()
        self._capacity = capacity
        self._closed = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    def __len__(self) -> int:
        return len(self._items)

    async def get(self) -> Chunk | None:
        while not self._items:
            if self._closed:
                return None
            self._readable.clear()
            await self._readable.wait()
        chunk = self._items.popleft()
        if len(self._items) < self._capacity:
            self._writable.set()
        return chunk

    async def put(self, chunk: Chunk) -> None:
        while len(self._items) >= self._capacity:
            self._writable.clear()
            await self._writable.wait()
        self.push(chunk)

    def push(self, chunk: Chunk) -> None:
        """Append regardless of capacity, so an interrupted stage can hand over what it
        holds without blocking the API request that interrupted it."""
        self._items.append(chunk)
        self._readable.set()

    def take_all(self) -> list[Chunk]:
        items = list(self._items)
        self._items.clear()
        self._writable.set()
        return items

    def close(self) -> None:
        self._closed = True
        self._readable.set()
