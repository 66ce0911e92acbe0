"""The simulated network, and the transports that use it.

Every call is a request message and a reply message, each delayed at random (so
messages reorder), dropped at random or by a partition of its directed link (any
link: client -> coordinator, coordinator -> agent, agent -> coordinator, and back),
and a request may be delivered twice (the copy's reply is lost). A call whose reply
does not come within its deadline fails like a gRPC DEADLINE_EXCEEDED. The handler
runs as a task of the receiving process, to completion (the daemons' servicers shield
engine and agent calls from the caller's deadline), unless that process crashes.

`SimParticipantClient` is the coordinator's `ParticipantTransport` and maps answers
exactly as `coordinator.participants.ParticipantClient` does: a failed Prepare by the
same rule (`coordinator.participant_phase1.failed_vote`), phase-2 outcomes as they
are, errors as the gRPC status codes they would travel as;
`SimCoordinators` is the agents' recovery port.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from coordinator.deadlock import Wait
from coordinator.participant_channel import UNREACHABLE
from coordinator.participant_phase1 import failed_vote
from coordinator.participants import HeuristicDecision, InDoubtBranch, InDoubtList, PrepareReply
from coordinator.protocol import Ballot, NoVote, Reported
from participant.ports import CoordinatorUnreachable
from tests.sim.loop import Process, SimClock
from tests.sim.trace import Trace
from twopc_common.errors import TwoPCError, Unavailable
from twopc_common.grpc_errors import error_for, status_for
from twopc_common.isolation import Isolation
from twopc_common.phase2_outcome import Phase2Outcome
from twopc_common.values import Statement, StatementResult

if TYPE_CHECKING:
    from coordinator.engine import Coordinator
    from participant.agent import Agent
    from tests.sim.world import World

T = TypeVar("T")


class Status(Exception):
    """A call failed with a gRPC status (as the caller's stub would raise it)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass
class NetFaults:
    max_delay: float = 0.004
    drop: float = 0.0
    duplicate: float = 0.0


class Network:
    def __init__(self, world: World, rng: random.Random, trace: Trace) -> None:
        self._world = world
        self._rng = rng
        self._trace = trace
        self.faults = NetFaults()
        self.cut: list[tuple[str, str]] = []
        """Directed links (from, to) that carry nothing."""

    def _lost(self, src: str, dst: str) -> bool:
        if (src, dst) in self.cut:
            return True
        return self.faults.drop > 0 and self._rng.random() < self.faults.drop

    def _delay(self) -> float:
        return self._rng.uniform(0, self.faults.max_delay)

    async def call(
        self,
        src: Process,
        dst: str,
        handler: Callable[[Any], Awaitable[T]],
        timeout: float,
        what: str,
        txid: str = "",
        idempotent: bool = True,
    ) -> T:
        """`idempotent`: the network may deliver the request twice. Not for Execute
        and unkeyed Runs: gRPC never duplicates a call, and those carry no request id
        that would let the receiver notice a repeat."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[T] = loop.create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if reply.done() or not src.alive:
                return
            if error is not None:
                reply.set_exception(error)
            else:
                reply.set_result(value)

        async def serve(proc: Process, node: Any, copy: bool) -> None:
            error: BaseException | None = None
            value: Any = None
            try:
                value = await handler(node)
            except TwoPCError as exc:
                error = Status(status_for(exc), str(exc))
            except Exception as exc:  # the servicer answers INTERNAL
                error = Status(grpc.StatusCode.INTERNAL, repr(exc))
            if copy or not proc.alive:
                return
            if self._lost(dst, src.name):
                self._trace.add("net", f"{what} reply {dst}->{src.name} lost", txid)
                return
            loop.call_later(self._delay(), settle, value, error)

        def deliver(copy: bool) -> None:
            if (src.name, dst) in self.cut:
                return
            node = self._world.node(dst)
            if node is None:
                return  # nobody listening: the connection is refused
            proc, obj = node
            proc.spawn(serve(proc, obj, copy))

        if self._lost(src.name, dst):
            self._trace.add("net", f"{what} {src.name}->{dst} lost", txid)
        else:
            loop.call_later(self._delay(), deliver, False)
            if (
                idempotent
                and self.faults.duplicate > 0
                and self._rng.random() < self.faults.duplicate
            ):
                self._trace.add("net", f"{what} {src.name}->{dst} duplicated", txid)
                loop.call_later(self._delay() * 3, deliver, True)
        try:
            return await asyncio.wait_for(reply, timeout)
        except TimeoutError:
            raise Status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None


_BATCH = 16


async def _finish(
    agent: Agent, decisions: list[tuple[str, bool]]
) -> list[Phase2Outcome | Exception]:
    return await agent.finish(decisions)


class SimParticipantClient:
    """`coordinator.ports.ParticipantTransport` over the simulated network."""

    def __init__(
        self, name: str, network: Network, world: World, owner: Process, clock: SimClock
    ) -> None:
        self.name = name
        self._net = network
        self._world = world
        self._owner = owner
        self._clock = clock
        self.last_answer = 0.0
        self.stats: collections.Counter[str] = collections.Counter()
        self._decisions: list[tuple[str, bool, asyncio.Future[Phase2Outcome]]] = []
        self._sender: asyncio.Future[None] | None = None

    @property
    def unreachable(self) -> str | None:
        if self._world.node(self.name) is None:
            return f"connection refused at {self.name}"
        return None

    def missing_vote(self) -> Ballot | None:
        why = self.unreachable
        return None if why is None else Ballot(NoVote.UNAVAILABLE, why)

    async def _call(
        self, handler: Callable[[Agent], Awaitable[T]], timeout: float, what: str, txid: str = ""
    ) -> T:
        value = await self._net.call(
            self._owner, self.name, handler, timeout, what, txid, idempotent=what != "execute"
        )
        self.last_answer = self._clock.monotonic()
        return value

    def _error(self, status: Status) -> Exception:
        if status.code in UNREACHABLE:
            return Unavailable(f"participant {self.name}: {self.unreachable or status.message}")
        return error_for(status.code, f"participant {self.name}: {status.message}")

    async def prepare(
        self,
        txid: str,
        statements: Sequence[Statement],
        one_phase: bool,
        timeout: float,
        incarnation: str = "",
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> PrepareReply:
        try:
            vote = await self._call(
                lambda agent: agent.prepare(txid, statements, one_phase, incarnation, isolation),
                timeout,
                "prepare",
                txid,
            )
        except Status as exc:
            return PrepareReply(failed_vote(exc.code, exc.message, self.missing_vote()))
        ballot = Ballot(vote.vote, vote.reason, vote.sqlstate)
        return PrepareReply(ballot, vote.results)

    async def _checked(
        self, handler: Callable[[Agent], Awaitable[T]], timeout: float, what: str, txid: str = ""
    ) -> T:
        try:
            return await self._call(handler, timeout, what, txid)
        except Status as exc:
            raise self._error(exc) from None

    async def execute(
        self,
        txid: str,
        statements: Sequence[Statement],
        incarnation: str,
        isolation: Isolation = Isolation.READ_COMMITTED,
    ) -> tuple[list[StatementResult], str]:
        async def run(agent: Agent) -> tuple[list[StatementResult], str]:
            results = await agent.execute(txid, statements, incarnation, isolation)
            answer = results, agent.incarnation
            self._world.executed(self.name)
            return answer

        return await self._checked(run, self._world.rpc_timeout, "execute", txid)

    async def finish(self, txid: str, commit: bool) -> Phase2Outcome:
        """Batched as `ParticipantClient.finish` batches: decisions queue while one
        Finish call is in flight and all go in the next."""
        answer: asyncio.Future[Phase2Outcome] = asyncio.get_running_loop().create_future()
        self._decisions.append((txid, commit, answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_decisions())
        return await answer

    async def _send_decisions(self) -> None:
        while self._decisions:
            batch = [d for d in self._decisions[:_BATCH] if not d[2].done()]
            del self._decisions[:_BATCH]
            if not batch:
                continue
            self.stats["phase2_calls"] += 1
            self.stats["phase2_decisions"] += len(batch)
            decisions = [(t, c) for t, c, _ in batch]
            answers: list[Phase2Outcome | Exception]
            try:
                answers = await self._checked(
                    functools.partial(_finish, decisions=decisions),
                    self._world.rpc_timeout,
                    "finish",
                    ",".join(t for t, _ in decisions),
                )
            except TwoPCError as exc:
                answers = [type(exc)(str(exc)) for _ in batch]
            for (_, _, future), outcome in zip(batch, answers, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    message = f"participant {self.name}: {outcome}"
                    future.set_exception(error_for(status_for(outcome), message))
                else:
                    future.set_result(outcome)

    async def commit(self, txid: str) -> Phase2Outcome:
        return await self._checked(
            lambda agent: agent.commit(txid), self._world.rpc_timeout, "commit", txid
        )

    async def abort(self, txid: str) -> Phase2Outcome:
        return await self._checked(
            lambda agent: agent.abort(txid), self._world.rpc_timeout, "abort", txid
        )

    async def waits_for(self, timeout: float) -> list[Wait]:
        edges = await self._checked(lambda agent: agent.waits_for(), timeout, "waits_for")
        return [Wait(self.name, e.waiter, e.holder, e.wait_started) for e in edges if e.holder]

    async def probe(self, timeout: float) -> None:
        async def status(agent: Agent) -> None:
            return None

        await self._checked(status, timeout, "probe")

    async def list_prepared(self, coordinator_id: str) -> InDoubtList:
        async def listed(agent: Agent) -> InDoubtList:
            now = agent.clock.time()
            branches = await agent.list_prepared(coordinator_id)
            return InDoubtList(
                tuple(
                    InDoubtBranch(
                        b.transaction_id,
                        now - b.prepared_at.timestamp() if b.prepared_at else 0.0,
                    )
                    for b in branches
                ),
                agent.epochs.highest(coordinator_id),
            )

        return await self._checked(listed, self._world.rpc_timeout, "list_prepared")

    async def list_heuristic(self, coordinator_id: str) -> list[HeuristicDecision]:
        return []  # the simulation has no operator making heuristic decisions

    async def close(self) -> None:
        return None


class SimCoordinators:
    """The agents' `participant.ports.Coordinators` over the simulated network."""

    def __init__(self, world: World, network: Network, owner: Process, timeout: float) -> None:
        self._world = world
        self._net = network
        self._owner = owner
        self._timeout = timeout

    def knows(self, coordinator_id: str) -> bool:
        return coordinator_id == self._world.coordinator_id

    def address(self, coordinator_id: str) -> str:
        return "coord"

    async def outcome(self, coordinator_id: str, transaction_id: str) -> bool | None:
        async def get(engine: Coordinator) -> Reported:
            return (await engine.get(transaction_id)).outcome

        try:
            answer = await self._net.call(
                self._owner, "coord", get, self._timeout, "get_transaction", transaction_id
            )
        except Status as exc:
            raise CoordinatorUnreachable(exc.code.name) from None
        self._world.saw_answer(transaction_id, answer)
        if answer is Reported.COMMITTED:
            return True
        if answer in (Reported.ABORTED, Reported.UNKNOWN):
            return False
        return None
