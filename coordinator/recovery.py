"""Recovery: at start, re-drive the logged commits and settle the one-phase
commits whose answer was lost; then, at start and periodically, resolve the
participants' in-doubt branches.

Guarantees:
- a branch of a transaction logged as committing or committed is committed; any other
  in-doubt branch of ours that is not live is rolled back (presumed abort);
- a decision log older than what a participant has seen (a restored backup) is
  refused at start, and stops this coordinator from deciding if found later;
- a later incarnation's branches are never ended here.
"""

from __future__ import annotations

import asyncio
import contextlib

from coordinator.log_records import LogRecord, LogState
from coordinator.memory import Memory, Outcome, Part
from coordinator.one_phase import OnePhase
from coordinator.phase2 import Phase2
from coordinator.protocol import AbortCause, TxState, delivered
from twopc_common.errors import TwoPCError
from twopc_common.ids import TransactionId


class LogBehind(TwoPCError):
    """The decision log is older than what a participant has seen of this coordinator."""


def _log_behind(coordinator: str, participant: str, seen: int, log_epoch: int) -> str:
    return (
        f"participant {participant} has seen epoch {seen} of coordinator {coordinator}, "
        f"but the decision log is at epoch {log_epoch}: the log was replaced by an older "
        "copy (a restored backup?) and decisions made since are missing. Not deciding "
        "anything: find the current log; to see what waits, run `twopc-coordinator "
        "inspect --participant NAME=HOST:PORT ...` (in-doubt branches per shard)"
    )


class InDoubt(Part):
    """The participants' in-doubt branches of ours, resolved from the log: commit if
    it says committing or committed, else roll back (presumed abort)."""

    async def resolve_in_doubt(self) -> None:
        """One pass over every participant's in-doubt branches."""
        await asyncio.gather(*(self._resolve_on(p) for p in self.clients))

    async def _resolve_on(self, participant: str) -> None:
        client = self.clients[participant]
        try:
            listed = await client.list_prepared(self.id)
        except TwoPCError as exc:
            self.log.warning("in_doubt_scan_failed", participant=participant, error=str(exc))
            return
        if listed.highest_epoch > self.decision_log.epoch:
            # Deciding now could presume abort for a branch committed under the lost
            # log: stop deciding, and say why.
            why = _log_behind(self.id, participant, listed.highest_epoch, self.decision_log.epoch)
            if self.memory.stopped_because is None:
                self.memory.stopped_because = why
                self.log.error("log_behind_participants", participant=participant, error=why)
            return
        if self.memory.stopped_because is not None:
            return
        for branch in listed.branches:
            txid = branch.transaction_id
            if txid in self.memory.live:
                continue  # a live transaction: the protocol itself will finish it
            if TransactionId.parse(txid).epoch > self.decision_log.epoch:
                continue  # a later incarnation's (it took over from us): never ours to end
            record = await self.decision_log.get(txid)
            commit = record is not None and record.state in (
                LogState.COMMITTING,
                LogState.COMMITTED,
            )
            try:
                outcome = await (client.commit(txid) if commit else client.abort(txid))
            except TwoPCError as exc:
                self.log.warning(
                    "in_doubt_resolve_failed", txid=txid, participant=participant, error=str(exc)
                )
                continue
            if not delivered(commit, outcome):
                # Finished the other way since the listing (an operator's heuristic
                # decision, which coordinator.heuristics reports).
                self.log.warning(
                    "in_doubt_other_state",
                    txid=txid,
                    participant=participant,
                    outcome=outcome.value,
                )
                continue
            self.counters["in_doubt_committed" if commit else "in_doubt_aborted"] += 1
            self.log.info(
                "in_doubt_resolved",
                txid=txid,
                participant=participant,
                outcome="commit" if commit else "abort",
            )


class Recovery(InDoubt):
    """Start-up and periodic recovery."""

    def __init__(self, memory: Memory, phase2: Phase2, one_phase: OnePhase) -> None:
        super().__init__(memory)
        self.phase2 = phase2
        self.one_phase = one_phase

    async def recover(self) -> None:
        """Start-up recovery, before serving: re-drive logged commits, then resolve the
        participants' in-doubt branches (bounded wait; the periodic scan finishes)."""
        for record in self.decision_log.incomplete_commits():
            tx = self.memory.tx(record.transaction_id, TxState.COMMITTING, record.created_at)
            tx.participants = list(record.participants)
            tx.owner = record.owner
            tx.outcome.set_result(Outcome.from_record(record))
            self.memory.live[tx.id] = tx
            self.counters["recovered_commits"] += 1
            self.log.info("recovering_commit", txid=tx.id)
            self.memory.spawn(self.phase2.deliver(tx, record.participants, commit=True))
        for record in self.decision_log.unresolved_one_phase():
            self.memory.spawn(self._resolve_one_phase(record))
        # Everything not logged as committed by now can never commit: safe to say so.
        self.memory.recovered = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self.resolve_in_doubt(), timeout=self.config.startup_recovery_timeout
            )

    async def _resolve_one_phase(self, record: LogRecord) -> None:
        """A keyed one-phase commit whose answer died with the previous incarnation:
        the Abort fence tells whether it committed, and makes sure it never will if
        it did not."""
        (participant,) = record.participants
        tx = self.memory.tx(record.transaction_id, TxState.PREPARING, record.created_at)
        committed = await self.one_phase.fence(tx, participant)
        if committed:
            outcome = Outcome(tx.id, True, one_phase=True, completed=True)
        else:
            outcome = Outcome(
                tx.id,
                False,
                AbortCause.COORDINATOR_RESTART,
                participant,
                "coordinator restarted before the answer",
                one_phase=True,
            )
        await self.one_phase.resolve(tx, outcome)
        self.log.info("one_phase_resolved", txid=tx.id, committed=committed)

    async def check_log_is_current(self) -> None:
        """Before the epoch is bumped: refuse a decision log that is behind what the
        participants have seen (a restored backup, a copy from another machine). Its
        ids would repeat, and presumed abort would roll back branches committed under
        the lost log. Participants that do not answer in time are checked by the
        periodic scan, which then stops this coordinator from deciding."""
        last = self.decision_log.last_epoch

        async def highest(participant: str) -> int | None:
            try:
                listed = await self.clients[participant].list_prepared(self.id)
            except TwoPCError as exc:
                self.log.warning("log_check_unverified", participant=participant, error=str(exc))
                return None
            return listed.highest_epoch

        names = list(self.clients)
        try:
            seen = await asyncio.wait_for(
                asyncio.gather(*(highest(p) for p in names)),
                timeout=self.config.startup_recovery_timeout,
            )
        except TimeoutError:
            self.log.warning("log_check_unverified", participants=",".join(names))
            return
        for participant, epoch in zip(names, seen, strict=True):
            if epoch is not None and epoch > last:
                raise LogBehind(_log_behind(self.id, participant, epoch, last))

    async def recovery_loop(self) -> None:
        while True:
            await self.clock.sleep(self.config.recovery_interval)
            try:
                await self.resolve_in_doubt()
                await self.decision_log.prune(self.clock.time() - self.config.retention)
            except Exception as exc:
                self.log.error("recovery_scan_failed", error=repr(exc))
