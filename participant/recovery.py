"""Participant recovery: resolve in-doubt prepared branches by asking their coordinator.

Runs at start and then periodically. A prepared branch younger than the grace period is
left to the live protocol. An older one is resolved only on its coordinator's word:
COMMITTED -> COMMIT PREPARED; ABORTED or UNKNOWN (no record after the coordinator's own
recovery: presumed abort) -> ROLLBACK PREPARED. If the coordinator is unreachable,
still deciding, or not configured here, the branch keeps waiting and is reported (once
per `in_doubt_warning_interval`, not at every scan): a participant that voted YES never
decides alone.

Its channels to the coordinators follow the agent's TLS files
(`twopc_common.tls.ReloadingChannel`): rotated certificates are used without a restart.
"""

from __future__ import annotations

import datetime as dt

import grpc

from participant.agent import Agent
from participant.config import ParticipantConfig
from participant.control_sql import ForeignPrepared
from participant.ports import Coordinators, CoordinatorUnreachable
from twopc_common.errors import TwoPCError
from twopc_common.grpc_errors import active_hint
from twopc_common.ids import TransactionId
from twopc_common.log import EventLogger, RateLimit
from twopc_common.tls import ReloadingChannel
from twopc_pb import coordinator_pb2 as cpb
from twopc_pb import coordinator_pb2_grpc as cgrpc

_TRY_ANOTHER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""Failures after which another process of the same coordinator id is asked."""


class GrpcCoordinators:
    """The coordinators' GetTransaction over gRPC (the daemon's `Coordinators` port).

    A coordinator id may have several processes (an active one and its standbys,
    `--coordinator NAME=HOST:PORT,HOST:PORT`). A question goes first to the process
    that answered last; a standby's refusal names the active, which is asked next;
    an unreachable process passes the question to the next address. Only an answer
    from the active process (whose epoch is current) is taken: a standby never says
    "unknown" for a transaction it cannot see."""

    def __init__(self, config: ParticipantConfig, log: EventLogger) -> None:
        self._config = config
        self._log = log
        self._channels: dict[tuple[str, str], ReloadingChannel] = {}
        self._answered: dict[str, str] = {}
        """Coordinator id -> the address whose process answered last."""

    def knows(self, coordinator_id: str) -> bool:
        return coordinator_id in self._config.coordinators

    def address(self, coordinator_id: str) -> str:
        return ",".join(self._config.coordinators[coordinator_id])

    def answered(self, coordinator_id: str) -> str | None:
        """The address whose process answered last (the active one, as far as known)."""
        return self._answered.get(coordinator_id)

    def _stub(self, coordinator_id: str, address: str) -> cgrpc.CoordinatorStub:
        key = (coordinator_id, address)
        if key not in self._channels:
            # Authenticates as this agent; the coordinator must prove it is coordinator_id.
            self._channels[key] = ReloadingChannel(
                address,
                self._config.tls,
                server_name=coordinator_id,
                check_interval=self._config.tls_reload_interval,
                drain=self._config.coordinator_rpc_timeout,
                log=self._log,
            )
        # A stub is only a wrapper: one per call follows a replaced channel.
        return cgrpc.CoordinatorStub(self._channels[key].current())

    def reload_tls(self) -> list[str]:
        """SIGHUP: the channels check the TLS files now; the coordinators whose channel
        was replaced."""
        return sorted({name for (name, _), ch in self._channels.items() if ch.reload()})

    def _order(self, coordinator_id: str) -> list[str]:
        addresses = list(self._config.coordinators[coordinator_id])
        last = self._answered.get(coordinator_id)
        if last in addresses:
            addresses.remove(last)
            addresses.insert(0, last)
        return addresses

    async def outcome(self, coordinator_id: str, transaction_id: str) -> bool | None:
        to_ask, asked = self._order(coordinator_id), set()
        failure = ""
        while to_ask:
            address = to_ask.pop(0)
            if address in asked:
                continue
            asked.add(address)
            try:
                status = await self._stub(coordinator_id, address).GetTransaction(
                    cpb.GetTransactionRequest(transaction_id=transaction_id),
                    timeout=self._config.coordinator_rpc_timeout,
                )
            except grpc.aio.AioRpcError as exc:
                failure = exc.code().name
                if exc.code() not in _TRY_ANOTHER:
                    break
                active = active_hint(exc)
                if active:  # a standby: the active process is there
                    to_ask.insert(0, active)
                continue
            self._answered[coordinator_id] = address
            if status.outcome == cpb.COMMITTED:
                return True
            if status.outcome in (cpb.ABORTED, cpb.UNKNOWN):
                return False
            return None
        raise CoordinatorUnreachable(failure)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


class Recovery:
    def __init__(self, agent: Agent, coordinators: Coordinators | None = None) -> None:
        self._agent = agent
        self._config = agent.config
        self._grpc: GrpcCoordinators | None = None
        if coordinators is None:
            coordinators = self._grpc = GrpcCoordinators(agent.config, agent.log)
        self._coordinators = coordinators
        self._warn = RateLimit(self._config.in_doubt_warning_interval)
        self.prepared = 0
        """Prepared branches of this participant seen by the last scan."""
        self.waiting = 0
        """Of those, the ones past the grace period still waiting for their coordinator."""
        self.foreign: tuple[ForeignPrepared, ...] = ()
        """Prepared transactions in the database that are not this participant's
        branches, as of the last scan: reported, never touched."""

    def reload_tls(self) -> None:
        """SIGHUP: the channels to the coordinators check the TLS files now."""
        replaced = self._grpc.reload_tls() if self._grpc is not None else []
        self._agent.log.info("sighup", tls_channels_replaced=",".join(replaced) or "none")

    async def run_forever(self) -> None:
        next_prune = 0.0
        while True:
            try:
                await self.scan()
                if self._agent.clock.monotonic() >= next_prune:
                    pruned = await self._agent.store.control.prune_markers()
                    self._agent.log.info("markers_pruned", count=pruned)
                    next_prune = self._agent.clock.monotonic() + self._config.marker_prune_interval
            except Exception as exc:  # the database may be down: try again next period
                self._agent.log.warning("recovery_scan_failed", error=repr(exc))
            await self._agent.clock.sleep(self._config.recovery_interval)

    async def scan(self) -> None:
        log = self._agent.log
        scan = await self._agent.store.control.prepared_branches(self._config.id)
        self._report_foreign(scan.foreign)
        branches = scan.ours
        now = dt.datetime.fromtimestamp(self._agent.clock.time(), dt.UTC)
        waiting = 0
        for branch in branches:
            age = (now - branch.prepared_at).total_seconds() if branch.prepared_at else 0.0
            if age < self._config.recovery_grace:
                continue
            txid = branch.transaction_id
            coordinator = TransactionId.parse(txid).coordinator
            if not self._coordinators.knows(coordinator):
                waiting += 1
                if self._warn.due(f"unknown_coordinator {txid}"):
                    log.warning(
                        "in_doubt_unknown_coordinator",
                        txid=txid,
                        coordinator=coordinator,
                        age=round(age, 1),
                        hint=f"start this agent with --coordinator {coordinator}=HOST:PORT "
                        "so it can ask for the outcome",
                    )
                continue
            try:
                committed = await self._coordinators.outcome(coordinator, txid)
            except CoordinatorUnreachable as exc:
                waiting += 1
                if self._warn.due(f"coordinator_unreachable {txid}"):
                    log.warning(
                        "in_doubt_coordinator_unreachable",
                        txid=txid,
                        age=round(age, 1),
                        coordinator=coordinator,
                        address=self._coordinators.address(coordinator),
                        code=exc.code,
                    )
                continue
            if committed is None:
                waiting += 1
                log.info("in_doubt_in_progress", txid=txid, age=round(age, 1))
                continue
            try:
                if committed:
                    outcome = await self._agent.commit(txid)
                else:
                    outcome = await self._agent.abort(txid, "recovery: coordinator says aborted")
            except TwoPCError as exc:
                waiting += 1
                if self._warn.due(f"resolve_failed {txid}"):
                    log.warning("in_doubt_resolve_failed", txid=txid, error=str(exc))
                continue
            if outcome.committed is not committed:
                # Finished the other way since the scan (an operator's heuristic
                # decision): nothing left to wait for, and nothing to undo it with.
                log.warning("in_doubt_other_state", txid=txid, outcome=outcome.value)
                continue
            self._agent.counters["recovered_commits" if committed else "recovered_aborts"] += 1
        self.prepared, self.waiting = len(branches), waiting

    def _report_foreign(self, foreign: tuple[ForeignPrepared, ...]) -> None:
        """Log each foreign prepared transaction once, when first seen: it holds its
        locks (and holds back VACUUM) until whoever prepared it resolves it."""
        known = {f.gid for f in self.foreign}
        for f in foreign:
            if f.gid not in known:
                self._agent.log.warning(
                    "foreign_prepared_transaction",
                    gid=f.gid,
                    owner=f.owner,
                    locks=f.locks,
                    prepared_at=f.prepared_at.isoformat() if f.prepared_at else "",
                    why=f.why,
                )
        self.foreign = foreign
        self._agent.counters["foreign_prepared"] = len(foreign)

    async def close(self) -> None:
        if self._grpc is not None:
            await self._grpc.close()
