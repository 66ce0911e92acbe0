"""Admission control: at most `max_in_flight` transactions prepare at once.

Beyond it a new one is refused at once (RESOURCE_EXHAUSTED), with a hint of when to
retry (about as long as a transaction takes to its answer, jittered), instead of
queueing behind the others until the prepare timeout throws its work away.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from coordinator.memory import Memory, Part
from twopc_common.errors import ResourceExhausted


class Admission(Part):
    def __init__(self, memory: Memory) -> None:
        super().__init__(memory)
        self._preparing = 0
        self._prepare_seconds = 0.01
        """A running mean of how long a transaction takes to its answer: the hint."""

    def admit(self) -> None:
        """Refuse a new transaction if `max_in_flight` are preparing already."""
        if self._preparing < self.config.max_in_flight:
            return
        self.counters["refused_in_flight_limit"] += 1
        retry_after = max(0.001, self._prepare_seconds) * self.memory.rng.uniform(0.5, 1.5)
        raise ResourceExhausted(
            f"coordinator {self.id} is preparing {self._preparing} transactions, its limit "
            f"(--max-in-flight): retry in about {retry_after * 1000:.0f} ms",
            retry_after,
        )

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """One transaction preparing, until it has its answer."""
        self._preparing += 1
        began = self.clock.monotonic()
        try:
            yield
        finally:
            self._preparing -= 1
            self._prepare_seconds += 0.05 * (self.clock.monotonic() - began - self._prepare_seconds)
