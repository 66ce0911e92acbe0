"""The bank: accounts placed on shards by a stable function of their id, transfers as
global transactions, and the invariants, read from the shards themselves.

Each shard has `accounts` (balance never negative, enforced by a CHECK) and `ledger`,
one row per applied transfer leg, keyed by (transfer id, leg). A transfer is one
global transaction: the debit leg (an UPDATE that must touch exactly one row, which it
does only when the balance suffices), the credit leg, and both ledger rows.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from twopc_common import ids
from twopc_common.values import Statement, exactly

# The demo's tables, each marked as the demo's by its comment: the demo drops and
# recreates a table only if it carries the mark (or the user asked for --reset), so
# a user's own `accounts` in the same database is never touched.
TABLES = ("bank_meta", "accounts", "ledger")
MARK = "bank-demo"
SCHEMA = [
    # What this shard was given at the start: the checker's reference for total money.
    "CREATE TABLE bank_meta (key text PRIMARY KEY, value bigint NOT NULL)",
    """CREATE TABLE accounts (
        id bigint PRIMARY KEY,
        balance bigint NOT NULL CHECK (balance >= 0)
    )""",
    """CREATE TABLE ledger (
        transfer_id text NOT NULL,
        leg text NOT NULL CHECK (leg IN ('debit', 'credit')),
        account bigint NOT NULL,
        amount bigint NOT NULL CHECK (amount > 0),
        PRIMARY KEY (transfer_id, leg)
    )""",
    *(f"COMMENT ON TABLE {table} IS '{MARK}'" for table in TABLES),
]


class NotTheDemosSchema(Exception):
    """A shard holds tables of the demo's names that the demo did not create, or lacks
    the demo's tables."""


BOTH_LEGS = frozenset({"debit", "credit"})


def shard_of(account: int, shards: Sequence[str]) -> str:
    """Stable placement: the same account lands on the same shard in every run."""
    return shards[zlib.crc32(str(account).encode()) % len(shards)]


def tables(conn: psycopg.Connection[Any]) -> dict[str, bool | None]:
    """Each demo table name -> True if it is the demo's (marked), False if it is
    someone else's, None if there is none (looked up on the search path, as the demo's
    statements resolve them)."""
    rows = conn.execute(
        "SELECT t, to_regclass(t) IS NOT NULL, obj_description(to_regclass(t), 'pg_class') "
        "FROM unnest(%s::text[]) AS t",
        (list(TABLES),),
    ).fetchall()
    return {str(t): (desc == MARK if exists else None) for t, exists, desc in rows}


def create_schema(dsns: Mapping[str, str], reset: bool = False) -> None:
    """(Re)create the demo's tables on every shard. A table of one of the demo's names
    that the demo did not create is dropped only with `reset`; otherwise nothing is
    touched on any shard and NotTheDemosSchema names the table."""
    foreign = []
    for shard, dsn in dsns.items():
        with psycopg.connect(dsn, autocommit=True) as conn:
            foreign += [f"{shard}: {t}" for t, ours in tables(conn).items() if ours is False]
    if foreign and not reset:
        raise NotTheDemosSchema(
            f"refusing to drop tables the demo did not create ({', '.join(foreign)}): "
            "point --shard at databases of their own, or pass --reset to drop them"
        )
    for dsn in dsns.values():
        with psycopg.connect(dsn, autocommit=True) as conn:
            # A leftover prepared transaction would block DROP TABLE forever.
            conn.execute("SET lock_timeout = '10s'")
            with conn.transaction():
                for table in reversed(TABLES):
                    conn.execute(f"DROP TABLE IF EXISTS {table}")
                for statement in SCHEMA:
                    conn.execute(statement)


def require_schema(dsns: Mapping[str, str]) -> None:
    """Raise NotTheDemosSchema unless every shard holds the demo's own tables."""
    for shard, dsn in dsns.items():
        with psycopg.connect(dsn, autocommit=True) as conn:
            found = tables(conn)
        missing = [t for t, ours in found.items() if ours is None]
        foreign = [t for t, ours in found.items() if ours is False]
        if missing:
            raise NotTheDemosSchema(
                f"shard {shard} has no bank-demo schema (no table {', '.join(missing)}): "
                "check the DSN, or run `bank-demo run` against it first"
            )
        if foreign:
            raise NotTheDemosSchema(
                f"shard {shard}: table {', '.join(foreign)} was not created by bank-demo "
                "(it has no bank-demo mark): check the DSN"
            )


def open_accounts(dsns: Mapping[str, str], accounts: int, balance: int) -> None:
    shards = list(dsns)
    placed: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for account in range(1, accounts + 1):
        placed[shard_of(account, shards)].append((account, balance))
    for shard, rows in placed.items():
        with psycopg.connect(dsns[shard]) as conn, conn.cursor() as cur:
            cur.executemany("INSERT INTO accounts (id, balance) VALUES (%s, %s)", rows)
            cur.execute(
                "INSERT INTO bank_meta (key, value) VALUES ('initial_total', %s)",
                (sum(b for _, b in rows),),
            )


def transfer(
    transfer_id: str, source: int, target: int, amount: int, shards: Sequence[str]
) -> dict[str, list[Statement]]:
    """The branches of one transfer. Both legs on one shard make a single branch,
    which the coordinator commits in one phase."""
    if amount <= 0:
        raise ValueError(f"amount must be positive, got {amount}")
    if source == target:
        raise ValueError("source and target must differ")
    debit = [
        Statement(
            "UPDATE accounts SET balance = balance - %s WHERE id = %s AND balance >= %s",
            (amount, source, amount),
            exactly(1),
        ),
        Statement(
            "INSERT INTO ledger (transfer_id, leg, account, amount) VALUES (%s, 'debit', %s, %s)",
            (transfer_id, source, amount),
        ),
    ]
    credit = [
        Statement(
            "UPDATE accounts SET balance = balance + %s WHERE id = %s",
            (amount, target),
            exactly(1),
        ),
        Statement(
            "INSERT INTO ledger (transfer_id, leg, account, amount) VALUES (%s, 'credit', %s, %s)",
            (transfer_id, target, amount),
        ),
    ]
    branches: dict[str, list[Statement]] = defaultdict(list)
    branches[shard_of(source, shards)] += debit
    branches[shard_of(target, shards)] += credit
    return dict(branches)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the shards hold, read in one pass."""

    total: int
    initial_total: int
    accounts: int
    negative: tuple[int, ...]
    legs: Mapping[str, frozenset[str]]
    prepared: Mapping[str, tuple[str, ...]]

    def half_applied(self) -> list[str]:
        return sorted(t for t, legs in self.legs.items() if legs != BOTH_LEGS)


def snapshot(dsns: Mapping[str, str]) -> Snapshot:
    total = count = initial = 0
    negative: list[int] = []
    legs: dict[str, set[str]] = defaultdict(set)
    prepared: dict[str, tuple[str, ...]] = {}
    for shard, dsn in dsns.items():
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(balance), 0), count(*) FROM accounts"
            ).fetchone()
            assert row is not None
            total += int(row[0])
            count += int(row[1])
            meta = conn.execute(
                "SELECT coalesce(sum(value), 0) FROM bank_meta WHERE key = 'initial_total'"
            ).fetchone()
            initial += int(meta[0]) if meta else 0
            negative += [
                int(r[0]) for r in conn.execute("SELECT id FROM accounts WHERE balance < 0")
            ]
            for transfer_id, leg in conn.execute("SELECT transfer_id, leg FROM ledger"):
                legs[str(transfer_id)].add(str(leg))
            prepared[shard] = tuple(str(x) for x in conn.tpc_recover() if ids.is_ours(x))
    return Snapshot(
        total=total,
        initial_total=initial,
        accounts=count,
        negative=tuple(sorted(negative)),
        legs={t: frozenset(v) for t, v in legs.items()},
        prepared=prepared,
    )


def applied(snap: Snapshot, transfer_ids: Iterable[str]) -> dict[str, bool]:
    return {t: snap.legs.get(t) == BOTH_LEGS for t in transfer_ids}
