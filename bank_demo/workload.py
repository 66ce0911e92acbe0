"""Concurrent transfers through the coordinator, with a per-second timeline and a live
progress line.

Every transfer carries its id as idempotency key; a transfer whose answer is lost
(coordinator killed or cut off) is retried with the same key until it is answered,
as a real payment system would, or recorded as `unknown` after `answer_deadline`.
"""

from __future__ import annotations

import asyncio
import collections
import random
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import psycopg

from bank_demo import bank
from coordinator.client import AsyncCoordinatorClient, TransportError
from twopc_common import ids
from twopc_common.errors import TwoPCError
from twopc_common.tls import TlsConfig


@dataclass(frozen=True, slots=True)
class TransferRecord:
    id: str
    source: int
    target: int
    amount: int
    cross_shard: bool
    outcome: str  # committed | aborted | unknown
    cause: str
    reason: str
    one_phase: bool
    started: float  # seconds since the run started
    latency: float
    attempts: int


@dataclass
class Second:
    t: int
    committed: int = 0
    aborted: int = 0
    unknown: int = 0
    in_doubt: int | None = None
    fault: str = ""
    aborts_by_cause: dict[str, int] = field(default_factory=dict)
    deadlocks: int | None = None
    """Cross-shard deadlocks the coordinator broke this second (None: no answer)."""
    unaffected: int = 0
    """Commits this second of transfers that touch no shard the current fault names:
    what a failed shard must not take from the others."""


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    accounts: int
    concurrency: int
    duration: float
    max_amount: int = 50
    hot_accounts: int = 0
    """With hot_accounts > 0, `hot_fraction` of the transfers pick both accounts
    among the first `hot_accounts` ids (contention on a few rows)."""
    hot_fraction: float = 0.8
    answer_deadline: float = 30.0
    client_timeout: float = 10.0
    run_id: str = ""
    """Prefix of every transfer id, which is also its idempotency key: keys outlive a
    run in the coordinator's log (its retention), and the same key sent again with
    another transfer is ALREADY_EXISTS, so each run needs its own."""


def in_doubt(dsns: Mapping[str, str]) -> int | None:
    """Prepared branches of this system on every shard now (None if a shard is down)."""
    total = 0
    try:
        for dsn in dsns.values():
            with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
                total += sum(1 for x in conn.tpc_recover() if ids.is_ours(x))
    except psycopg.Error:
        return None
    return total


def _progress_line(second: Second, totals: collections.Counter[str]) -> str:
    deadlocks = "" if second.deadlocks is None else f"  deadlocks broken {second.deadlocks}/s"
    aborts = {k.split(":", 1)[1]: v for k, v in totals.items() if k.startswith("aborted:")}
    causes = ", ".join(f"{cause or '?'} {n}" for cause, n in sorted(aborts.items()))
    in_doubt_now = "?" if second.in_doubt is None else second.in_doubt
    return (
        f"[{second.t:>4}s] {second.committed + second.aborted:>5} tx/s  "
        f"committed {totals['committed']}  aborted {sum(aborts.values())}"
        f"{f' ({causes})' if causes else ''}  in-doubt {in_doubt_now}{deadlocks}  "
        f"fault: {second.fault or '-'}"
    )


class Workload:
    def __init__(
        self,
        address: str,
        tls: TlsConfig,
        shards: Sequence[str],
        dsns: Mapping[str, str],
        config: WorkloadConfig,
        rng: random.Random,
        current_fault: Callable[[], str],
        token: str | None = None,
    ) -> None:
        self._address = address
        self._tls = tls
        self._token = token
        self._shards = list(shards)
        self._dsns = dsns
        self._config = config
        self._rng = rng
        self._fault = current_fault
        self.records: list[TransferRecord] = []
        self.timeline: list[Second] = []
        self._started = 0.0

    def _pick(self) -> tuple[int, int]:
        c = self._config
        if c.hot_accounts >= 2 and self._rng.random() < c.hot_fraction:
            pool = range(1, c.hot_accounts + 1)
        else:
            pool = range(1, c.accounts + 1)
        source, target = self._rng.sample(pool, 2)
        return source, target

    async def _worker(self, client: AsyncCoordinatorClient, worker: int, until: float) -> None:
        n = 0
        while time.monotonic() < until:
            n += 1
            tid = f"{self._config.run_id}t{worker}-{n}"
            source, target = self._pick()
            amount = self._rng.randint(1, self._config.max_amount)
            branches = bank.transfer(tid, source, target, amount, self._shards)
            began = time.monotonic()
            deadline = began + self._config.answer_deadline
            attempts = 0
            outcome, cause, reason, one_phase = "unknown", "", "", False
            while time.monotonic() < deadline:
                attempts += 1
                try:
                    result = await client.run(branches, idempotency_key=tid)
                except TransportError:
                    await asyncio.sleep(0.25)
                    continue
                outcome = "committed" if result.committed else "aborted"
                cause, one_phase = result.abort_cause.lower(), result.one_phase
                reason = f"{result.abort_participant}: {result.abort_reason}" if cause else ""
                break
            self.records.append(
                TransferRecord(
                    id=tid,
                    source=source,
                    target=target,
                    amount=amount,
                    cross_shard=len(branches) > 1,
                    outcome=outcome,
                    cause=cause,
                    reason=reason,
                    one_phase=one_phase,
                    started=round(began - self._started, 3),
                    latency=round(time.monotonic() - began, 4),
                    attempts=attempts,
                )
            )

    @staticmethod
    async def _deadlocks_broken(client: AsyncCoordinatorClient) -> int | None:
        try:
            status = await client.status(timeout=1.0)
        except TwoPCError:
            return None
        return int(status.counters.get("deadlocks_broken", 0))

    async def _monitor(self, client: AsyncCoordinatorClient, until: float, progress: bool) -> None:
        seen = 0
        deadlocks_before = await self._deadlocks_broken(client)
        totals: collections.Counter[str] = collections.Counter()
        tty = sys.stderr.isatty()
        while True:
            await asyncio.sleep(1.0)
            second = Second(len(self.timeline) + 1, fault=self._fault())
            faulted = set(re.split(r"[^A-Za-z0-9-]+", second.fault)) & set(self._shards)
            broken = await self._deadlocks_broken(client)
            if broken is not None and deadlocks_before is not None:
                second.deadlocks = broken - deadlocks_before
            deadlocks_before = broken if broken is not None else deadlocks_before
            for record in self.records[seen:]:
                if record.outcome == "committed" and not faulted & {
                    bank.shard_of(record.source, self._shards),
                    bank.shard_of(record.target, self._shards),
                }:
                    second.unaffected += 1
                if record.outcome == "aborted":
                    second.aborted += 1
                    second.aborts_by_cause[record.cause] = (
                        second.aborts_by_cause.get(record.cause, 0) + 1
                    )
                    totals[f"aborted:{record.cause}"] += 1
                else:
                    setattr(second, record.outcome, getattr(second, record.outcome) + 1)
                totals[record.outcome] += 1
            seen = len(self.records)
            second.in_doubt = await asyncio.to_thread(in_doubt, self._dsns)
            self.timeline.append(second)
            if progress and (tty or second.t % 5 == 0):
                line = _progress_line(second, totals)
                print(
                    ("\r\033[K" if tty else "") + line,
                    end="" if tty else "\n",
                    file=sys.stderr,
                    flush=True,
                )
            if time.monotonic() >= until and seen == len(self.records):
                if progress and tty:
                    print(file=sys.stderr)
                return

    async def run(self, progress: bool = True) -> None:
        self._started = time.monotonic()
        until = self._started + self._config.duration
        async with AsyncCoordinatorClient(
            self._address, self._config.client_timeout, tls=self._tls, token=self._token
        ) as client:
            workers = [self._worker(client, w, until) for w in range(self._config.concurrency)]
            monitor = asyncio.create_task(self._monitor(client, until, progress))
            await asyncio.gather(*workers)
            await monitor

    @property
    def started(self) -> float:
        return self._started
