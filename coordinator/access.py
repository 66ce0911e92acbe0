"""Who may call what on the coordinator, and whose transactions are whose.

Rules (per RPC, enforced by `twopc_common.auth.guard` before the servicer runs):
- Run, Begin, Execute, Commit, Rollback: clients.
- ListTransactions: clients, and this coordinator's own identity (`inspect` runs with
  the coordinator's certificate).
- GetTransaction: clients, this coordinator's own identity, and the configured
  participants' agents (their recovery asks for the outcome of in-doubt branches).
- Status: anyone authenticated. SetFailpoints: admins (and the daemon must run with
  --allow-failpoints).

Ownership: a transaction belongs to the client that began it (Begin or Run). Another
client gets PERMISSION_DENIED on Execute, Commit, Rollback or GetTransaction of it, and
nothing changes; admins, this coordinator's own identity and (for GetTransaction) the
agents may. Owners are remembered in memory for the most recent `owners_remembered`
transactions. When the owner of an id is not known (begun before this process started,
forgotten, never issued, or a one-shot Run still running, whose id is claimed when it
returns), a call that could change something is refused while the engine still holds
the transaction live, and otherwise answered by the engine, which has nothing left to
change: so no client can ever act on another's live transaction, and after a restart
a client can still learn the outcome of its own (GetTransaction, or Commit again).
That answer can tell a client the outcome of another client's finished transaction
whose id it guessed; it cannot change it.
ListTransactions shows a client its own transactions, an admin (or `inspect`) all.
Idempotency keys are scoped per client: `client/key` is what the engine and the
decision log see, so two clients cannot collide on, or learn about, each other's keys.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable

from coordinator.config import CoordinatorConfig
from twopc_common.auth import Principal, Rule
from twopc_common.errors import PermissionDenied
from twopc_common.ids import TransactionId


def rules(config: CoordinatorConfig) -> dict[str, Rule]:
    def client(p: Principal) -> bool:
        return p.is_("client")

    def itself(p: Principal) -> bool:
        return p.is_("coordinator", {config.id: config.listen})

    return {
        "Run": client,
        "Begin": client,
        "Execute": client,
        "Commit": client,
        "Rollback": client,
        "ListTransactions": lambda p: client(p) or itself(p),
        "GetTransaction": lambda p: (
            client(p) or itself(p) or p.is_("participant", config.participants)
        ),
        "Status": lambda p: True,
        "SetFailpoints": lambda p: p.admin,
    }


def scoped_key(caller: Principal, key: str) -> str:
    """The idempotency key as the engine sees it: per client."""
    return f"{caller.name}/{key}"


class Owners:
    """Transaction id -> the client that began it, for the most recent `capacity`."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._owner: collections.OrderedDict[str, str] = collections.OrderedDict()

    def claim(self, transaction_id: str, caller: Principal) -> None:
        self._owner[transaction_id] = caller.name
        self._owner.move_to_end(transaction_id)
        while len(self._owner) > self._capacity:
            self._owner.popitem(last=False)

    async def check(
        self,
        transaction_id: str,
        caller: Principal,
        live: Callable[[str], Awaitable[bool]],
        changes: bool = True,
    ) -> None:
        """Refuse a client acting on a transaction that is not its own (see above);
        `live` asks the engine whether it still holds the transaction."""
        TransactionId.parse(transaction_id)  # a malformed id is INVALID_ARGUMENT
        if caller.admin or caller.unrestricted or caller.kind != "client":
            return
        owner = self._owner.get(transaction_id)
        if owner == caller.name:
            return
        if owner is not None or (changes and await live(transaction_id)):
            raise PermissionDenied(f"transaction {transaction_id} belongs to another client")

    def visible(self, transaction_id: str, caller: Principal) -> bool:
        if caller.admin or caller.kind != "client":
            return True
        return self._owner.get(transaction_id) == caller.name
