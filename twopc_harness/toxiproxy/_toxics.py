"""The toxic types: their integer attributes, their JSON form, and how each one
transforms a one-way stream of chunks."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ._channel import Chunk
from ._stub import Pipe, Stub

UPSTREAM = "upstream"
DOWNSTREAM = "downstream"

Attributes = dict[str, int]


@dataclass(eq=False)
class Toxic:
    name: str
    type: str
    stream: str  # as the client spelled it; direction is the normalised form
    direction: str
    toxicity: float
    attributes: Attributes = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "attributes": dict(self.attributes),
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
        }


async def _noop(stub: Stub, attrs: Attributes) -> None:
    while (chunk := await stub.recv()) is not None:
        await stub.send(chunk)
    stub.close()


async def _latency(stub: Stub, attrs: Attributes) -> None:
    loop = asyncio.get_running_loop()
    while (chunk := await stub.recv()) is not None:
        delay = attrs["latency"]
        jitter = attrs["jitter"]
        if jitter > 0:
            delay += random.randrange(-jitter, jitter)
        # Measured from arrival, not from now, so a queued stream is delayed once in
        # total; the stamp moves on so that chained latency toxics add up.
        release = chunk.timestamp + delay / 1000
        await asyncio.sleep(max(release - loop.time(), 0))
        chunk.timestamp = release
        await stub.send(chunk)
    stub.close()


async def _bandwidth(stub: Stub, attrs: Attributes) -> None:
    loop = asyncio.get_running_loop()
    debt = 0.0  # seconds still owed; oversleeping is paid back on later chunks
    while (chunk := await stub.recv()) is not None:
        rate = attrs["rate"]
        if rate <= 0:
            # The real server stalls here; the data moves on when the toxic changes.
            await loop.create_future()
        data = chunk.data
        debt += len(data) / (rate * 1000)
        piece = rate * 100
        while len(data) > piece:
            await asyncio.sleep(0.1)
            rest = Chunk(data[piece:], chunk.timestamp)
            await stub.send(Chunk(data[:piece], chunk.timestamp), rest)
            data = rest.data
            debt -= 0.1
        started = loop.time()
        await asyncio.sleep(max(debt, 0))
        debt -= loop.time() - started
        await stub.send(Chunk(data, chunk.timestamp))
    stub.close()


async def _slow_close(stub: Stub, attrs: Attributes) -> None:
    while (chunk := await stub.recv()) is not None:
        await stub.send(chunk)
    await asyncio.sleep(attrs["delay"] / 1000)
    stub.close()


async def _timeout(stub: Stub, attrs: Attributes) -> None:
    while True:
        timeout = attrs["timeout"]
        try:
            async with asyncio.timeout(timeout / 1000 if timeout > 0 else None):
                chunk = await stub.recv()
        except TimeoutError:
            break
        if chunk is None:
            break
        stub.drop()
    stub.close()


async def _reset_peer(stub: Stub, attrs: Attributes) -> None:
    await stub.recv()
    stub.drop()
    await asyncio.sleep(attrs["timeout"] / 1000)
    stub.close()


def slice_bounds(size: int, average: int, variation: int) -> list[int]:
    """Cut points splitting size bytes into pieces of about average +/- variation,
    by recursive halving as the real server does, but iterative and always terminating."""
    bounds = [0]
    if average <= 0:
        # The real server recurses without end here; pass the chunk whole instead.
        bounds.append(size)
        return bounds
    todo = [(0, size)]
    while todo:
        start, end = todo.pop()
        if end - start <= max(average + variation, 1):
            bounds.append(end)
            continue
        mid = start + (end - start) // 2
        if variation > 0:
            mid += random.randrange(-variation, variation)
        mid = min(max(mid, start + 1), end - 1)
        todo.append((mid, end))
        todo.append((start, mid))
    return bounds


async def _slicer(stub: Stub, attrs: Attributes) -> None:
    while (chunk := await stub.recv()) is not None:
        data = chunk.data
        bounds = slice_bounds(len(data), attrs["average_size"], attrs["size_variation"])
        for start, end in itertools.pairwise(bounds):
            rest = Chunk(data[end:], chunk.timestamp) if end < len(data) else None
            await stub.send(Chunk(data[start:end], chunk.timestamp), rest)
            await asyncio.sleep(attrs["delay"] / 1_000_000)
    stub.close()


async def _limit_data(stub: Stub, attrs: Attributes) -> None:
    while (chunk := await stub.recv()) is not None:
        allowed = max(attrs["bytes"] - stub.forwarded, 0)
        if allowed:
            chunk = Chunk(chunk.data[:allowed], chunk.timestamp)
            # Counted before sending: an interrupt flushes the held chunk anyway.
            stub.pending = chunk
            stub.forwarded += len(chunk.data)
            await stub.send(chunk)
        else:
            stub.drop()
        if stub.forwarded >= attrs["bytes"]:
            break
    stub.close()


_Impl = Callable[[Stub, Attributes], Awaitable[None]]


@dataclass(frozen=True)
class ToxicType:
    impl: _Impl
    attributes: tuple[str, ...]
    go_name: str  # the real server's struct name, used in decode error messages


TYPES: dict[str, ToxicType] = {
    "latency": ToxicType(_latency, ("latency", "jitter"), "LatencyToxic"),
    "bandwidth": ToxicType(_bandwidth, ("rate",), "BandwidthToxic"),
    "slow_close": ToxicType(_slow_close, ("delay",), "SlowCloseToxic"),
    "timeout": ToxicType(_timeout, ("timeout",), "TimeoutToxic"),
    "reset_peer": ToxicType(_reset_peer, ("timeout",), "ResetToxic"),
    "slicer": ToxicType(_slicer, ("average_size", "size_variation", "delay"), "SlicerToxic"),
    "limit_data": ToxicType(_limit_data, ("bytes",), "LimitDataToxic"),
    "noop": ToxicType(_noop, (), "NoopToxic"),
}


def pipe_for(toxic: Toxic | None) -> Pipe:
    """What a stage runs this time it starts: the toxic, or a pass-through when the
    toxicity draw says inactive (or for the chain's fixed head stage)."""
    if toxic is not None and random.random() < toxic.toxicity:
        impl, attrs = TYPES[toxic.type].impl, toxic.attributes
    else:
        impl, attrs = _noop, {}

    async def pipe(stub: Stub) -> None:
        await impl(stub, attrs)

    return pipe
