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
from typing import Any

from coordinator.memory import BranchResults, Part, Tx
from coordinator.participants import PrepareReply
from coordinator.protocol import Ballot
from twopc_common import failpoints
from twopc_common.values import Statement, StatementResult
from twopc_common.votes import Vote


class VoteCollector(Part):
    """The votes of one transaction's participants, and their read results."""

    async def collect(
        self, tx: Tx, work: Mapping[str, tuple[Statement, ...]]
    ) -> tuple[dict[str, Ballot], BranchResults]:
        timeout = self.config.prepare_timeout
        calls = {
            asyncio.create_task(
                self.clients[p].prepare(
                    tx.id, work[p], False, timeout, tx.incarnations.get(p, ""), tx.isolation
                )
            ): p
            for p in work
        }
        ballots: dict[str, Ballot] = {}
        results: dict[str, tuple[StatementResult, ...]] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending: set[asyncio.Task[PrepareReply]] = set(calls)
        interrupted: asyncio.Future[bool] = asyncio.ensure_future(tx.interrupted.wait())
        try:
            while pending and (remaining := deadline - loop.time()) > 0:
                tx.awaiting = frozenset(calls[t] for t in pending)
                waiting: set[asyncio.Future[Any]] = {*pending, interrupted}
                done, _ = await asyncio.wait(
                    waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in pending & done:
                    reply = task.result()
                    ballots[calls[task]] = reply.ballot
                    results[calls[task]] = reply.results
                pending -= done
                if interrupted.done():
                    break  # a deadlock victim, or a participant went down
                if any(b.vote is Vote.NO for b in ballots.values()):
                    break  # the outcome is known: do not wait for the slow ones
                if pending and ballots:
                    await failpoints.hit("coordinator.after_some_votes")
        finally:
            tx.awaiting = frozenset()
            interrupted.cancel()
            for task in pending:
                task.cancel()
                # A vote missing because the agent cannot be reached says why.
                missing = self.clients[calls[task]].missing_vote()
                if missing is not None:
                    ballots[calls[task]] = missing
        return ballots, tuple((p, results[p]) for p in work if p in results)
