"""Ports shared by both daemons: the clock and the source of randomness.

Protocol code (the coordinator's engine, the participant's agent and recovery) takes
these as injected objects instead of calling `time`, `asyncio.sleep` or the global
`random` itself, so that the same code runs in the daemons (`SYSTEM_CLOCK`,
`system_random()`) and in the deterministic simulator (`tests/sim`), where one seed
drives every random choice and time is virtual.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (intervals, deadlines)."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch (record timestamps, ages)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` on this clock."""
        ...


class Random(Protocol):
    def uniform(self, a: float, b: float, /) -> float: ...

    def getrandbits(self, k: int, /) -> int: ...


class SystemClock:
    """The daemons' clock: the operating system's."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


def system_random() -> Random:
    """The daemons' randomness: the operating system's, unseeded (an agent's
    incarnation id must differ from every earlier one's)."""
    return random.SystemRandom()
