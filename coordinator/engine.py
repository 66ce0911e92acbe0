"""The coordinator's engine: runs global transactions through the protocol in
`coordinator.protocol`, with the decision log and the participant clients as effects.

`Coordinator` is the facade the service, the daemon and the simulator use; the work
is done by its collaborators, one concern each, over the shared `coordinator.memory`:
- `coordinator.running`: one-shot Run, admission, deadlock retries, and the
  prepare-to-answer path of every commit (`coordinator.idempotency`: keyed Runs);
- `coordinator.interactive`: Begin, Execute, Commit, Rollback, the idle reaper
  (`coordinator.branches`: Execute on one branch);
- `coordinator.voting`: phase 1, the decision, and logging it
  (`coordinator.vote_collection`: Prepares out, votes in);
- `coordinator.one_phase`: a single branch committed without PREPARE, its fence;
- `coordinator.phase2`: announcing a decision and completing its phase 2
  (`coordinator.delivery`: to one participant);
- `coordinator.recovery`: start-up and periodic recovery;
- `coordinator.contention`: deadlocks, participants marked down;
- `coordinator.status`: GetTransaction, owners, what is in flight.

Guarantees (each collaborator's module states its own):
- a COMMIT decision is durable in the decision log before any Commit is sent;
- phase 2 is retried with capped exponential backoff until every participant
  acknowledged; only then is the transaction forgotten from memory;
- a transaction stays in memory from its first id to its completion, so recovery,
  which only aborts branches of transactions that are neither in memory nor logged as
  committed, never races a live one;
- idempotency keys: a retry of a keyed Run joins the live transaction or returns the
  logged outcome; the key is in memory until its record is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from coordinator.config import CoordinatorConfig
from coordinator.contention import Contention
from coordinator.deadlock import Victim
from coordinator.interactive import Interactive
from coordinator.log_port import DecisionLogPort
from coordinator.memory import BranchResults, Memory, Outcome, Part, TransactionInfo
from coordinator.one_phase import OnePhase
from coordinator.phase2 import Phase2
from coordinator.ports import ParticipantTransport
from coordinator.recovery import LogBehind, Recovery
from coordinator.running import Runner
from coordinator.status import Status
from coordinator.voting import Voting
from twopc_common.isolation import Isolation
from twopc_common.ports import SYSTEM_CLOCK, Clock, Random, system_random
from twopc_common.values import Statement, StatementResult

__all__ = ["BranchResults", "Coordinator", "LogBehind", "Outcome", "TransactionInfo"]


class Coordinator(Part):
    """The engine's one entry point; its shortcuts (`Part`) are the daemon's too."""

    def __init__(
        self,
        config: CoordinatorConfig,
        log: DecisionLogPort,
        clients: Mapping[str, ParticipantTransport],
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: Random | None = None,
    ) -> None:
        memory = Memory(config, log, clients, clock, rng if rng is not None else system_random())
        super().__init__(memory)
        phase2 = Phase2(memory)
        one_phase = OnePhase(memory, phase2)
        self._runner = Runner(memory, phase2, Voting(memory, phase2), one_phase)
        self._interactive = Interactive(memory, phase2, self._runner)
        self._contention = Contention(memory, phase2)
        self._status = Status(memory)
        self._recovery = Recovery(memory, phase2, one_phase)

    @property
    def stopped(self) -> str | None:
        """Why this coordinator accepts no new transactions (fail-stop), if it does not."""
        return self.memory.stopped

    @property
    def recovered(self) -> bool:
        """Whether start-up recovery has re-driven the logged commits (from then on,
        what is not logged as committed can never commit)."""
        return self.memory.recovered

    @recovered.setter
    def recovered(self, value: bool) -> None:
        self.memory.recovered = value

    # -- transactions ---------------------------------------------------------------

    async def run(
        self,
        branches: Sequence[tuple[str, Sequence[Statement]]],
        key: str | None = None,
        request_hash: str | None = None,
        wait: bool = False,
        owner: str | None = None,
        isolation: Isolation = Isolation.READ_COMMITTED,
        *,
        patience: float | None = None,
    ) -> Outcome:
        """`patience`: how long the caller waits for the answer (its deadline), which
        bounds a wait for an admission turn (`coordinator.admission`)."""
        return await self._runner.run(
            branches, key, request_hash, wait, owner, isolation, patience=patience
        )

    def begin(
        self, owner: str | None = None, isolation: Isolation = Isolation.READ_COMMITTED
    ) -> str:
        return self._interactive.begin(owner, isolation)

    async def execute(
        self, txid: str, participant: str, statements: Sequence[Statement]
    ) -> list[StatementResult]:
        return await self._interactive.execute(txid, participant, statements)

    async def commit(self, txid: str, wait: bool, *, patience: float | None = None) -> Outcome:
        return await self._interactive.commit(txid, wait, patience=patience)

    async def rollback(self, txid: str) -> Outcome:
        return await self._interactive.rollback(txid)

    async def reap_idle_transactions(self) -> None:
        await self._interactive.reap_idle_transactions()

    # -- contention and availability ------------------------------------------------

    async def deadlock_loop(self) -> None:
        await self._contention.deadlock_loop()

    async def break_deadlocks(self) -> list[Victim]:
        return await self._contention.break_deadlocks()

    async def probe_loop(self, participant: str) -> None:
        await self._contention.probe_loop(participant)

    def down(self, participants: Sequence[str]) -> tuple[str, str] | None:
        return self.memory.down(participants)

    # -- status ---------------------------------------------------------------------

    async def get(self, txid: str) -> TransactionInfo:
        return await self._status.get(txid)

    async def owner_of(self, txid: str) -> str | None:
        return await self._status.owner_of(txid)

    def in_flight(self) -> list[TransactionInfo]:
        return self._status.in_flight()

    # -- recovery -------------------------------------------------------------------

    async def recover(self) -> None:
        await self._recovery.recover()

    async def resolve_in_doubt(self) -> None:
        await self._recovery.resolve_in_doubt()

    async def check_log_is_current(self) -> None:
        await self._recovery.check_log_is_current()

    async def recovery_loop(self) -> None:
        await self._recovery.recovery_loop()

    async def close(self) -> None:
        for task in list(self.memory.background):
            task.cancel()
        await asyncio.gather(*self.memory.background, return_exceptions=True)
        for client in self.clients.values():
            await client.close()
