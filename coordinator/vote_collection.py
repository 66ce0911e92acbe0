"""Phase 1's round trip: Prepare sent to every participant, their votes collected.

Guarantees:
- Prepare goes to every participant in parallel, and the collection ends when every
  vote is in, on the first NO, when the prepare timeout expires, or when the
  transaction is interrupted (a deadlock victim, a participant marked down), whichever
  is first; the Prepares still out are then cancelled;
- a vote missing because its agent cannot be reached says why (the client's
  `missing_vote`); any other missing vote is absent, which
  `coordinator.protocol.decide` reads as the prepare timeout (or the interruption).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from coordinator.memory import BranchResults, Part, Tx
from coordinator.participants import PrepareReply
from coordinator.protocol import Ballot
from twopc_common import failpoints
from twopc_common.values import Statement, StatementResult
from twopc_common.votes import Vote


class _Wake:
    """The collection's one waiter, woken by whichever comes first: a vote, an
    interruption, the deadline. Cheaper than `asyncio.wait` per vote, which adds and
    removes a callback on every pending call each time."""

    __slots__ = ("_future", "_loop", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] | None = None
        self.expired = False

    def __call__(self, *_: object) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def expire(self) -> None:
        self.expired = True
        self()

    async def wait(self) -> None:
        self._future = self._loop.create_future()
        try:
            await self._future
        finally:
            self._future = None


class VoteCollector(Part):
    """The votes of one transaction's participants, and their read results."""

    async def collect(
        self, tx: Tx, work: Mapping[str, tuple[Statement, ...]]
    ) -> tuple[dict[str, Ballot], BranchResults]:
        timeout = self.config.prepare_timeout
        loop = asyncio.get_running_loop()
        wake = _Wake(loop)
        pending: dict[asyncio.Task[PrepareReply], str] = {}  # the calls still out
        for p in work:
            call = asyncio.create_task(
                self.clients[p].prepare(
                    tx.id, work[p], False, timeout, tx.incarnations.get(p, ""), tx.isolation
                )
            )
            call.add_done_callback(wake)
            pending[call] = p
        ballots: dict[str, Ballot] = {}
        results: dict[str, tuple[StatementResult, ...]] = {}
        deadline = loop.call_later(timeout, wake.expire)
        tx.on_interrupt = wake
        try:
            while pending:
                tx.awaiting = frozenset(pending.values())
                idle = not any(call.done() for call in pending)
                if idle and tx.interruption is None and not wake.expired:
                    await wake.wait()
                for call in [c for c in pending if c.done()]:
                    p, reply = pending.pop(call), call.result()
                    ballots[p], results[p] = reply.ballot, reply.results
                if tx.interruption is not None or wake.expired:
                    break  # a deadlock victim, a participant down, or the prepare timeout
                if any(b.vote is Vote.NO for b in ballots.values()):
                    break  # the outcome is known: do not wait for the slow ones
                if pending and ballots:
                    await failpoints.hit("coordinator.after_some_votes")
        finally:
            deadline.cancel()
            tx.on_interrupt = None
            tx.awaiting = frozenset()
            for call, p in pending.items():
                call.cancel()
                # A vote missing because the agent cannot be reached says why.
                missing = self.clients[p].missing_vote()
                if missing is not None:
                    ballots[p] = missing
        return ballots, tuple((p, results[p]) for p in work if p in results)
