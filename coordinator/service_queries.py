"""The Coordinator service's read-only calls: GetTransaction, ListTransactions and
Status, a servicer base of `coordinator.service.CoordinatorService`.

They change nothing, so unlike the transaction calls they need no shielding from
the caller's cancellation. Who may ask about which transaction is `coordinator.access`
(`Owners`): a client its own, an admin (and `inspect`) all.
"""

from __future__ import annotations

from coordinator.access import Owners
from coordinator.engine import Coordinator
from coordinator.wire import info_to_pb
from twopc_common.auth import caller
from twopc_common.grpc_errors import Context, translate_errors
from twopc_pb import coordinator_pb2 as pb


class Queries:
    """A servicer base whose subclass sets `_engine` and `_owners`."""

    _engine: Coordinator
    _owners: Owners

    @translate_errors
    async def GetTransaction(
        self, request: pb.GetTransactionRequest, context: Context
    ) -> pb.TransactionStatus:
        await self._owners.check(request.transaction_id, caller())
        return info_to_pb(await self._engine.get(request.transaction_id))

    @translate_errors
    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, context: Context
    ) -> pb.ListTransactionsResponse:
        who = caller()
        return pb.ListTransactionsResponse(
            transactions=[
                info_to_pb(i)
                for i in self._engine.in_flight()
                if self._owners.visible(i.transaction_id, i.owner, who)
            ]
        )

    @translate_errors
    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.CoordinatorStatus:
        counters = dict(self._engine.counters)
        counters.update(self._engine.decision_log.stats)
        counters["live_transactions"] = len(self._engine.in_flight())
        for client in self._engine.clients.values():
            for name, value in client.stats.items():
                counters[f"{name}.{client.name}"] = value
        return pb.CoordinatorStatus(
            coordinator_id=self._engine.id,
            epoch=self._engine.decision_log.epoch,
            recovered=self._engine.recovered,
            counters=counters,
        )
