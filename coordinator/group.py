"""Several coordinators, one client: how a deployment uses more cores than one
coordinator process has.

A coordinator is one Python process (one event loop), and under load it is the
process that runs out of CPU first (`bench/workers.py`). Run N of them on the host,
each with an id and a decision log of its own (`--id orders-1 --log orders-1.sqlite`,
`--id orders-2 --log orders-2.sqlite`, ...), list every one on each agent
(`--coordinator orders-1=HOST:PORT --coordinator orders-2=HOST:PORT`), and give the
client library the group. A transaction belongs to the coordinator that began it (its
id carries that coordinator's id), so the coordinators share nothing: no lock, no
log, no failure (one crashing leaves the others' transactions alone; its own are
recovered by it, as always).

Routing, per call:
- a Run without an idempotency key, and Begin, go to the members in turn;
- a keyed Run always goes to the member its key hashes to: that member's log is where
  the key is remembered, so a retry finds it (a Run is never sent to another member
  when its own is down: the work might then be applied twice);
- a call about a transaction goes to the member whose id the transaction id carries.

Each member is an `AsyncCoordinatorClient`, with its own failover between the
processes of its id (a standby per member, `coordinator.standby`).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from coordinator.client import (
    AsyncCoordinatorClient,
    AsyncTransaction,
    Branches,
    IsolationArg,
    Outcome,
    TransactionStatus,
)
from twopc_common.errors import InvalidArgument, NotFound
from twopc_common.ids import TransactionId
from twopc_common.isolation import Isolation
from twopc_pb import coordinator_pb2 as pb


class AsyncCoordinatorGroup:
    """`members`: coordinator id -> its address (or the addresses of its processes);
    the other arguments are every member client's (`AsyncCoordinatorClient`)."""

    def __init__(self, members: Mapping[str, str | Sequence[str]], **client: Any) -> None:
        if not members:
            raise InvalidArgument("a coordinator group needs at least one member")
        self._ids = sorted(members)
        self._members = {m: AsyncCoordinatorClient(members[m], **client) for m in self._ids}
        self._turn = itertools.cycle(self._ids)

    async def __aenter__(self) -> AsyncCoordinatorGroup:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for member in self._members.values():
            await member.close()

    def member_for_key(self, idempotency_key: str) -> str:
        """The member a keyed Run goes to, the same for the same key and members."""
        digest = hashlib.sha256(idempotency_key.encode()).digest()
        return self._ids[int.from_bytes(digest[:8], "big") % len(self._ids)]

    def member_of(self, transaction_id: str) -> AsyncCoordinatorClient:
        """The member that began `transaction_id`."""
        owner = TransactionId.parse(transaction_id).coordinator
        member = self._members.get(owner)
        if member is None:
            raise NotFound(f"transaction {transaction_id} is not of this group's coordinators")
        return member

    async def run(
        self,
        branches: Branches,
        idempotency_key: str | None = None,
        wait_for_completion: bool = False,
        timeout: float | None = None,
        isolation: IsolationArg = Isolation.READ_COMMITTED,
    ) -> Outcome:
        member = self.member_for_key(idempotency_key) if idempotency_key else next(self._turn)
        return await self._members[member].run(
            branches, idempotency_key, wait_for_completion, timeout, isolation
        )

    async def begin(self, isolation: IsolationArg = Isolation.READ_COMMITTED) -> AsyncTransaction:
        return await self._members[next(self._turn)].begin(isolation)

    def transaction(
        self,
        wait_for_completion: bool = False,
        isolation: IsolationArg = Isolation.READ_COMMITTED,
    ) -> Any:
        """`AsyncCoordinatorClient.transaction` on the next member."""
        return self._members[next(self._turn)].transaction(wait_for_completion, isolation)

    async def get_transaction(self, transaction_id: str) -> TransactionStatus:
        return await self.member_of(transaction_id).get_transaction(transaction_id)

    async def status(self, timeout: float | None = None) -> dict[str, pb.CoordinatorStatus]:
        """Every member's status, by coordinator id."""
        return {m: await c.status(timeout) for m, c in self._members.items()}
