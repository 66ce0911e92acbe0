"""Contention and availability: breaking cross-shard deadlocks, and marking
participants down and up.

Guarantees:
- a victim is chosen only from a wait-for cycle seen twice (see coordinator.deadlock),
  and only among our own undecided transactions;
- a participant marked down fails new transactions fast, and transactions waiting for
  its vote stop waiting; phase 2 and recovery go on retrying it as always.
"""

from __future__ import annotations

import asyncio

from coordinator.deadlock import Victim, Wait, confirmed, find_victims
from coordinator.memory import Memory, Part, Tx
from coordinator.phase2 import Phase2
from coordinator.protocol import AbortCause, TxState
from twopc_common.errors import TwoPCError


class Contention(Part):
    """Deadlocks broken, participants probed."""

    def __init__(self, memory: Memory, phase2: Phase2) -> None:
        super().__init__(memory)
        self.phase2 = phase2

    async def deadlock_loop(self) -> None:
        """Break cross-shard deadlocks (see coordinator.deadlock)."""
        while True:
            await self.clock.sleep(self.config.deadlock_interval)
            try:
                await self.break_deadlocks()
            except Exception as exc:
                self.log.error("deadlock_scan_failed", error=repr(exc))

    async def break_deadlocks(self) -> list[Victim]:
        # Nobody waits for a lock longer than one period unless someone is still at
        # work (preparing, or an Execute) a period after it began.
        since = self.clock.monotonic() - self.config.deadlock_interval
        if not any(
            tx.work_started < since
            and (tx.state is TxState.PREPARING or (tx.state is TxState.ACTIVE and tx.busy))
            for tx in self.memory.live.values()
        ):
            return []
        first = await self._wait_snapshot(list(self.clients))
        if not find_victims(first, self._may_be_victim):
            return []
        second = await self._wait_snapshot(sorted({w.participant for w in first}))
        victims = find_victims(confirmed(first, second), self._may_be_victim)
        for victim in victims:
            self._break(victim)
        return victims

    async def _wait_snapshot(self, participants: list[str]) -> list[Wait]:
        timeout = min(1.0, self.config.rpc_timeout)

        async def one(participant: str) -> list[Wait]:
            if participant in self.memory.down_because:
                return []
            try:
                return await self.clients[participant].waits_for(timeout)
            except TwoPCError:
                return []  # a shard we cannot see cannot prove a cycle

        return [w for waits in await asyncio.gather(*map(one, participants)) for w in waits]

    def _may_be_victim(self, txid: str) -> bool:
        """Ours, undecided, and not a one-phase commit in flight (whose outcome only the
        fence could tell: a cycle through it has a two-phase member to break)."""
        tx = self.memory.live.get(txid)
        if tx is None or tx.outcome.done():
            return False
        return tx.state is TxState.ACTIVE or (
            tx.state is TxState.PREPARING and len(tx.participants) > 1
        )

    def _break(self, victim: Victim) -> None:
        tx = self.memory.live.get(victim.transaction_id)
        if tx is None or not self._may_be_victim(tx.id):
            return
        self.counters["deadlocks_broken"] += 1
        self.log.info(
            "deadlock_broken",
            txid=tx.id,
            participant=victim.participant,
            cycle=",".join(victim.cycle),
        )
        if tx.state is TxState.ACTIVE:
            reason = victim.describe()
            self.phase2.abort(
                tx, AbortCause.DEADLOCK, victim.participant, reason, tuple(tx.participants)
            )
        else:  # its vote collection decides the abort
            self._interrupt(tx, AbortCause.DEADLOCK, victim.participant, victim.describe())

    @staticmethod
    def _interrupt(tx: Tx, cause: AbortCause, culprit: str, reason: str) -> None:
        if tx.interruption is None:
            tx.interruption = (cause, culprit, reason)
            if tx.on_interrupt is not None:
                tx.on_interrupt()

    async def probe_loop(self, participant: str) -> None:
        """Mark a participant down after consecutive failed probes, up at the first
        answer. Down, it fails new transactions fast; phase 2 and recovery go on
        retrying it as always."""
        client = self.clients[participant]
        failures = 0
        window = self.config.probe_interval * self.config.probe_failures + self.config.probe_timeout
        while True:
            down = participant in self.memory.down_because
            # Down, it is probed more often: a restarted agent is back within moments.
            await self.clock.sleep(self.config.probe_interval / (5 if down else 1))
            try:
                await client.probe(self.config.probe_timeout)
            except TwoPCError as exc:
                failures += 1
                # Any other answer within the window proves it alive: a slow probe on a
                # loaded machine must not turn a working agent's transactions away.
                silent = self.clock.monotonic() - client.last_answer > window
                if failures >= self.config.probe_failures and silent and not down:
                    self._mark_down(participant, f"{failures} health probes unanswered ({exc})")
                continue
            failures = 0
            if self.memory.down_because.pop(participant, None) is not None:
                self.log.info("participant_up", participant=participant)

    def _mark_down(self, participant: str, why: str) -> None:
        """New transactions touching it fail fast; those waiting for its vote stop
        waiting (their clients move on instead of sitting out the prepare timeout)."""
        reason = self.memory.down_because[participant] = f"participant {participant} is down: {why}"
        self.counters["participants_marked_down"] += 1
        self.log.warning("participant_down", participant=participant, error=why)
        for tx in list(self.memory.live.values()):
            if participant in tx.awaiting:
                self._interrupt(tx, AbortCause.PARTICIPANT_UNAVAILABLE, participant, reason)
