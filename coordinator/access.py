"""Who may call what on the coordinator, and whose transactions are whose.

Rules (per RPC, enforced by `twopc_common.auth.guard` before the servicer runs):
- Run, RunStream, Begin, Execute, Commit, Rollback: clients.
- ListTransactions: clients, and this coordinator's own identity (`inspect` runs with
  the coordinator's certificate).
- GetTransaction: clients, this coordinator's own identity, and the configured
  participants' agents (their recovery asks for the outcome of in-doubt branches).
- Status: anyone authenticated. SetFailpoints: admins (and the daemon must run with
  --allow-failpoints).

Ownership: a transaction belongs to the client that began it (Begin or Run). The owner
is known while the transaction is live (the engine holds it), for the most recent
`owners_remembered` transactions (in memory), and for every transaction the decision
log has a record of (each record names its owner, so this survives a restart).

A client may Execute, Commit, Rollback or GetTransaction only a transaction known to be
its own; admins, this coordinator's own identity and (for GetTransaction) the agents
may touch any. Every other call gets the same NOT_FOUND, `no transaction ID of yours`,
whether the id is another client's (live or finished, before or after a restart), was
never issued, or ended without a record before a restart: so the answer tells nothing
about other clients' transactions, not even whether a guessed id exists or committed
(PERMISSION_DENIED would say that it exists; an outcome would say how it ended). The
price: after a coordinator restart, a client's own transaction that left no record
(an abort without an idempotency key) is not known to be its own either. Use an
idempotency key where the outcome must be learnt after any crash: a keyed Run is
answered from its record.
ListTransactions shows a client its own transactions, an admin (or `inspect`) all.
A client named by `--client-participants NAME=P1,P2` may touch only those participants:
a Run with a branch elsewhere, or an Execute on another participant, is PERMISSION_DENIED
before anything runs (it concerns the caller's own rights, so it tells nothing about
anyone else).
Idempotency keys are scoped per client: `client/key` is what the engine and the
decision log see (identity names cannot contain `/`, see `twopc_common.auth`), so two
clients cannot collide on, or learn about, each other's keys, before or after a restart.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Iterable

from coordinator.config import CoordinatorConfig
from twopc_common.auth import Principal, Rule
from twopc_common.errors import NotFound, PermissionDenied
from twopc_common.ids import TransactionId


def rules(config: CoordinatorConfig) -> dict[str, Rule]:
    def client(p: Principal) -> bool:
        return p.is_("client")

    def itself(p: Principal) -> bool:
        return p.is_("coordinator", {config.id: config.listen})

    return {
        "Run": client,
        "RunStream": client,
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


def may_touch(config: CoordinatorConfig, caller: Principal, participants: Iterable[str]) -> None:
    """Refuse a client restricted to some participants touching another."""
    allowed = None if _privileged(caller) else config.client_participants.get(caller.name)
    if allowed is None:
        return
    refused = sorted(set(participants) - allowed)
    if refused:
        raise PermissionDenied(
            f"client {caller.name} may not touch participant {', '.join(refused)} "
            f"(--client-participants allows {', '.join(sorted(allowed))})"
        )


def not_yours(transaction_id: str) -> NotFound:
    """The one answer to a client about a transaction not known to be its own."""
    return NotFound(
        f"no transaction {transaction_id} of yours (transactions of other clients, and "
        "your own that ended without a record before a coordinator restart, are not shown)"
    )


class Owners:
    """Transaction id -> the client that began it: the most recent `capacity` in memory,
    the others from `lookup` (the engine: live transactions and the log's records)."""

    def __init__(self, capacity: int, lookup: Callable[[str], Awaitable[str | None]]) -> None:
        self._capacity = capacity
        self._lookup = lookup
        self._owner: collections.OrderedDict[str, str] = collections.OrderedDict()

    def claim(self, transaction_id: str, caller: Principal) -> None:
        self._owner[transaction_id] = caller.name
        self._owner.move_to_end(transaction_id)
        while len(self._owner) > self._capacity:
            self._owner.popitem(last=False)

    async def check(self, transaction_id: str, caller: Principal) -> None:
        """Refuse a client acting on, or asking about, a transaction that is not known
        to be its own (see above)."""
        TransactionId.parse(transaction_id)  # a malformed id is INVALID_ARGUMENT
        if _privileged(caller):
            return
        owner = self._owner.get(transaction_id)
        if owner is None:
            owner = await self._lookup(transaction_id)
        if owner != caller.name:
            raise not_yours(transaction_id)

    def visible(self, transaction_id: str, owner: str | None, caller: Principal) -> bool:
        """Whether ListTransactions shows `caller` this transaction (`owner` as the
        engine knows it)."""
        if _privileged(caller):
            return True
        return (owner or self._owner.get(transaction_id)) == caller.name


def owner_name(caller: Principal) -> str | None:
    """What the engine and the log record as a transaction's owner."""
    return caller.name if caller.kind == "client" and not caller.unrestricted else None


def _privileged(caller: Principal) -> bool:
    return caller.admin or caller.unrestricted or caller.kind != "client"
