"""Heuristic hazards: an operator's heuristic decision on a branch (recorded by
`twopc-participant resolve` in the shard's audit table) that contradicts what this
coordinator decided. Atomicity is broken for that transaction and only a person can
repair the data, so the coordinator looks for them and says so loudly.

The coordinator asks every agent for the heuristic decisions on its branches, at
start and every recovery interval, and compares each with its own answer for the
transaction (the live transaction, else the log, else presumed abort): a heuristic
commit of a transaction it aborted (or has no record of), or a heuristic abort of
one it committed, is a hazard, logged once as an error (`event=heuristic_hazard`),
counted in the metrics, and listed by `twopc-coordinator inspect`. A decision that
agrees with the log is harmless. A transaction still being decided is judged again
at the next scan; one whose record is past the retention (FORGOTTEN) cannot be
judged any more.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from coordinator.engine import Coordinator
from coordinator.participants import HeuristicDecision
from coordinator.protocol import Reported
from twopc_common.errors import TwoPCError


@dataclass(frozen=True, slots=True)
class Verdict:
    participant: str
    decision: HeuristicDecision
    logged: str
    """The coordinator's answer (GetTransaction's, `Reported`): committed, aborted,
    unknown (never committed), in_progress or forgotten."""

    @property
    def hazard(self) -> bool:
        return is_hazard(self.decision.commit, self.logged)


def is_hazard(heuristic_commit: bool, logged: str) -> bool:
    """Does a heuristic commit (or abort) contradict the coordinator's outcome? Not
    while it is still deciding (judged again later), nor once its record is past the
    retention (forgotten: nothing left to contradict)."""
    if logged in (Reported.IN_PROGRESS.value, Reported.FORGOTTEN.value):
        return False
    return heuristic_commit != (logged == Reported.COMMITTED.value)


class HeuristicWatch:
    def __init__(self, engine: Coordinator) -> None:
        self._engine = engine
        self.verdicts: dict[tuple[str, str], Verdict] = {}
        """(participant, transaction id) -> what the last scan found."""

    @property
    def hazards(self) -> list[Verdict]:
        return [v for v in self.verdicts.values() if v.hazard]

    async def scan(self) -> None:
        await asyncio.gather(*(self._scan(p) for p in self._engine.clients))

    async def _scan(self, participant: str) -> None:
        engine = self._engine
        try:
            decisions = await engine.clients[participant].list_heuristic(engine.id)
        except TwoPCError as exc:
            engine.log.warning("heuristic_scan_failed", participant=participant, error=str(exc))
            return
        for decision in decisions:
            try:
                logged = (await engine.get(decision.transaction_id)).outcome.value
            except TwoPCError:
                continue  # recovery not finished: ask again next time
            verdict = Verdict(participant, decision, logged)
            key = (participant, decision.transaction_id)
            known = self.verdicts.get(key)
            self.verdicts[key] = verdict
            if verdict.hazard and (known is None or not known.hazard):
                engine.log.error(
                    "heuristic_hazard",
                    txid=decision.transaction_id,
                    participant=participant,
                    heuristic="commit" if decision.commit else "abort",
                    coordinator=logged,
                    operator=decision.operator,
                    reason=decision.reason,
                )

    async def run_forever(self, interval: float) -> None:
        while True:
            try:
                await self.scan()
            except Exception as exc:
                self._engine.log.error("heuristic_scan_failed", error=repr(exc))
            await asyncio.sleep(interval)
