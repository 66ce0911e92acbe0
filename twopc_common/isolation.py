"""Isolation levels of global transactions, and their protobuf conversion.

A global transaction has one level, chosen at Run or Begin; every branch runs at it.
The agent applies it when the branch's PostgreSQL transaction begins (`BEGIN
ISOLATION LEVEL ...` in the same query string as the branch's first statements, so it
costs no round trip: `participant.branch_batch`); branch SQL cannot change it (`SET
TRANSACTION` is refused by the statement policy). READ COMMITTED is the default, set
explicitly, so a database whose default_transaction_isolation differs does not change
what a client asked for.

Guarantees: every value on the wire maps to exactly one level or is refused with
InvalidArgument naming the value; unspecified (0) is READ COMMITTED.
"""

from __future__ import annotations

from enum import Enum

from psycopg import IsolationLevel as PgIsolation

from twopc_common.errors import InvalidArgument
from twopc_pb import types_pb2 as pb


class Isolation(Enum):
    READ_COMMITTED = "read_committed"
    REPEATABLE_READ = "repeatable_read"
    SERIALIZABLE = "serializable"

    @property
    def psycopg(self) -> PgIsolation:
        return _PSYCOPG[self]


_PSYCOPG = {
    Isolation.READ_COMMITTED: PgIsolation.READ_COMMITTED,
    Isolation.REPEATABLE_READ: PgIsolation.REPEATABLE_READ,
    Isolation.SERIALIZABLE: PgIsolation.SERIALIZABLE,
}
_FROM_PB = {
    pb.ISOLATION_LEVEL_UNSPECIFIED: Isolation.READ_COMMITTED,
    pb.READ_COMMITTED: Isolation.READ_COMMITTED,
    pb.REPEATABLE_READ: Isolation.REPEATABLE_READ,
    pb.SERIALIZABLE: Isolation.SERIALIZABLE,
}
_TO_PB = {
    Isolation.READ_COMMITTED: pb.READ_COMMITTED,
    Isolation.REPEATABLE_READ: pb.REPEATABLE_READ,
    Isolation.SERIALIZABLE: pb.SERIALIZABLE,
}


def isolation_from_pb(value: int) -> Isolation:
    """The level a request names; InvalidArgument for a value outside the enum (a
    client built against a newer or a broken proto)."""
    try:
        return _FROM_PB[value]  # type: ignore[index]
    except KeyError:
        known = ", ".join(f"{pb.IsolationLevel.Name(v)} ({v})" for v in sorted(_FROM_PB))
        raise InvalidArgument(f"unknown isolation level {value}; known: {known}") from None


def isolation_to_pb(level: Isolation) -> pb.IsolationLevel:
    return _TO_PB[level]


def parse_isolation(name: str) -> Isolation:
    """A level by name, as a client library user writes it ("serializable",
    "REPEATABLE READ", "repeatable_read")."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    try:
        return Isolation(key)
    except ValueError:
        known = ", ".join(level.value for level in Isolation)
        raise InvalidArgument(f"unknown isolation level {name!r}; known: {known}") from None
