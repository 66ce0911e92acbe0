"""Admission control: at most `max_in_flight` transactions in flight at once.

A transaction takes a slot from its start (a Run, an interactive Commit) to its
answer. Beyond the limit a new one waits, in order of arrival, before any of its work
is done: at most `admission_queue` wait, each for at most `admission_wait` seconds.
One that cannot wait (the queue is full, or its wait ran out) is refused
(RESOURCE_EXHAUSTED) with a hint of when to retry, about as long as a transaction
takes to its answer, jittered.

Why a queue and not only refusals: under overload a refused client comes back after
its hint, and every refusal costs the coordinator a decoded request and an answer.
At 1,024 clients against 256 slots that retry storm took a fifth of a CPU-bound
coordinator's goodput. A waiter costs nothing until its turn, and it holds no row
locks and no open branch while it waits, which queueing behind the prepare timeout
(the state before admission control) did. The wait is bounded well below the prepare
timeout, and never outlasts the caller's own deadline: a unary call's, or the one a
RunStream item carries.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from coordinator.memory import Memory, Part
from twopc_common.errors import ResourceExhausted


class Admission(Part):
    def __init__(self, memory: Memory) -> None:
        super().__init__(memory)
        self._in_flight = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._answer_seconds = 0.01
        """A running mean of how long a transaction takes to its answer: the hint."""

    @contextlib.asynccontextmanager
    async def slot(self, patience: float | None = None) -> AsyncIterator[None]:
        """One transaction in flight, until it has its answer; waits for its turn
        beyond `max_in_flight`, or raises ResourceExhausted (nothing done yet).
        `patience`: the caller's time left, if it has a deadline; a wait never outlasts
        it, so no work starts for a caller that has gone."""
        await self._take(patience)
        began = self.clock.monotonic()
        try:
            yield
        finally:
            self._answer_seconds += 0.05 * (self.clock.monotonic() - began - self._answer_seconds)
            self._give_back()

    async def _take(self, patience: float | None) -> None:
        if self._in_flight < self.config.max_in_flight and not self._waiting:
            self._in_flight += 1
            return
        if len(self._waiting) >= self.config.admission_queue:
            raise self._refusal("and its queue is full (--admission-queue)")
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        self.counters["admission_queued"] += 1
        bound = self.config.admission_wait
        waited = asyncio.ensure_future(
            self.clock.sleep(bound if patience is None else min(bound, patience))
        )
        try:
            await asyncio.wait((turn, waited), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._leave_queue(turn)  # cancelled by the caller's deadline
            raise
        finally:
            waited.cancel()
        if not turn.done():
            self._leave_queue(turn)
            raise self._refusal(
                f"and it waited {bound:g} s for a turn (--admission-wait)"
                if patience is None or patience >= bound
                else f"and its caller's deadline ({patience:.3g} s) passed before its turn"
            )

    def _leave_queue(self, turn: asyncio.Future[None]) -> None:
        """Drop a waiter that stops waiting; a turn handed to it just now goes on."""
        if turn.done() and not turn.cancelled():
            self._give_back()
        else:
            turn.cancel()
            self._waiting.remove(turn)

    def _give_back(self) -> None:
        """A slot freed: straight to the longest waiter (its count goes on), else free."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._in_flight -= 1

    def _refusal(self, why: str) -> ResourceExhausted:
        self.counters["refused_in_flight_limit"] += 1
        retry_after = max(0.001, self._answer_seconds) * self.memory.rng.uniform(0.5, 1.5)
        return ResourceExhausted(
            f"coordinator {self.id} has {self._in_flight} transactions in flight, its "
            f"limit (--max-in-flight), {why}: retry in about {retry_after * 1000:.0f} ms",
            retry_after,
        )
