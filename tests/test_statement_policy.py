"""Branch SQL cannot break the protocol: every hostile statement kind is refused with
INVALID_ARGUMENT before anything runs, in one-shot, one-phase and interactive
transactions and at the agent itself, and leaves no trace: no balance changed, no
prepared transaction, no open branch, the marker table intact, the next transfer
commits."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterator

import grpc
import pytest

from bank_demo import bank
from coordinator.client import CoordinatorClient, Statement, TransactionAborted
from participant.schema import MARKER_TABLE
from tests.conftest import dsns
from twopc_common.errors import InvalidArgument
from twopc_common.statements import (
    ALWAYS_REFUSED,
    DEFAULT_ALLOWED,
    LEGACY_TABLES,
    StatementKind,
    StatementPolicy,
    classify,
    policy_kinds,
)
from twopc_common.values import statement_to_pb
from twopc_harness.daemons import wait_until
from twopc_harness.system import LocalSystem
from twopc_pb import participant_pb2 as ppb
from twopc_pb import participant_pb2_grpc as pgrpc

K = StatementKind

# (test id, SQL, the kind it must be classified as)
HOSTILE: list[tuple[str, str, StatementKind]] = [
    ("commit", "COMMIT", K.TRANSACTION_CONTROL),
    ("end", "END", K.TRANSACTION_CONTROL),
    ("rollback", "ROLLBACK", K.TRANSACTION_CONTROL),
    ("abort", "ABORT", K.TRANSACTION_CONTROL),
    ("begin-isolation", "BEGIN ISOLATION LEVEL SERIALIZABLE", K.TRANSACTION_CONTROL),
    ("start-transaction", "START TRANSACTION", K.TRANSACTION_CONTROL),
    ("prepare-transaction", "PREPARE TRANSACTION 'smuggled'", K.TRANSACTION_CONTROL),
    ("commit-prepared", "COMMIT PREPARED 'smuggled'", K.TRANSACTION_CONTROL),
    ("rollback-prepared", "ROLLBACK PREPARED 'smuggled'", K.TRANSACTION_CONTROL),
    ("set-session", "SET search_path = pg_catalog", K.SESSION_SET),
    (
        "set-session-characteristics",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        K.SESSION_SET,
    ),
    ("reset-all", "RESET ALL", K.SESSION_SET),
    ("set-transaction", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", K.SET_TRANSACTION),
    ("set-role", "SET ROLE postgres", K.SET_ROLE),
    ("set-local-role-none", "SET LOCAL ROLE NONE", K.SET_ROLE),
    ("reset-role", "RESET ROLE", K.SET_ROLE),
    ("session-authorization", "SET SESSION AUTHORIZATION postgres", K.SET_ROLE),
    ("set-local-lock-timeout", "SET LOCAL lock_timeout = 0", K.AGENT_SETTING),
    ("set-config-session", "SELECT set_config('search_path', 'pg_catalog', false)", K.SET_CONFIG),
    ("set-config-role", "SELECT pg_catalog.set_config('role', 'postgres', true)", K.SET_ROLE),
    ("discard", "DISCARD ALL", K.DISCARD),
    ("listen", "LISTEN channel", K.LISTEN_NOTIFY),
    ("unlisten", "UNLISTEN *", K.LISTEN_NOTIFY),
    ("notify", "NOTIFY channel", K.LISTEN_NOTIFY),
    ("load", "LOAD 'plpgsql'", K.LOAD),
    ("copy-to-file", "COPY accounts TO '/tmp/twopc-accounts'", K.COPY_FILE),
    ("copy-from-program", "COPY accounts FROM PROGRAM 'true'", K.COPY_FILE),
    ("copy-stdin", "COPY accounts FROM STDIN", K.COPY_STDIO),
    ("two-statements", "UPDATE accounts SET balance = balance + 1; COMMIT", K.MULTIPLE),
    ("two-harmless-statements", "SELECT 1; SELECT 2", K.MULTIPLE),
    ("delete-markers", f"DELETE FROM {MARKER_TABLE}", K.AGENT_SCHEMA),
    ("drop-legacy-markers", f"DROP TABLE {LEGACY_TABLES[0]}", K.AGENT_SCHEMA),
    ("update-legacy-epochs", f"UPDATE {LEGACY_TABLES[1]} SET epoch = 0", K.AGENT_SCHEMA),
    ("drop-agent-schema", "DROP SCHEMA twopc CASCADE", K.AGENT_SCHEMA),
    ("agent-schema-literal", "SELECT 'twopc.branch_marker'::regclass", K.AGENT_SCHEMA),
    ("prepared-statement", "PREPARE p AS SELECT 1", K.PREPARED_STATEMENT),
    ("hold-cursor", "DECLARE c CURSOR WITH HOLD FOR SELECT 1", K.CURSOR),
    ("do-block", "DO $$ BEGIN PERFORM 1; END $$", K.DO),
    ("vacuum", "VACUUM accounts", K.NON_TRANSACTIONAL),
    ("create-database", "CREATE DATABASE smuggled", K.NON_TRANSACTIONAL),
    ("comment-only", "-- nothing here", K.EMPTY),
    ("syntax-error", "UPDAET accounts SET balance = 0", K.SYNTAX_ERROR),
]

ALLOWED: list[tuple[str, StatementKind]] = [
    ("SELECT balance FROM accounts WHERE id = 1", K.QUERY),
    ("VALUES (1), (2)", K.QUERY),
    ("WITH d AS (DELETE FROM ledger WHERE false RETURNING *) SELECT count(*) FROM d", K.QUERY),
    ("INSERT INTO ledger SELECT * FROM ledger WHERE false", K.QUERY),
    (
        "MERGE INTO accounts a USING (VALUES (1)) v(id) ON a.id = v.id "
        "WHEN MATCHED THEN UPDATE SET balance = a.balance",
        K.QUERY,
    ),
    ("SELECT 1;", K.QUERY),
    ("SET LOCAL work_mem = '8MB'", K.SET_LOCAL),
    ("SELECT set_config('app.user', '42', true)", K.QUERY),
    ("SAVEPOINT s1", K.SAVEPOINT),
    ("ROLLBACK TO SAVEPOINT s1", K.SAVEPOINT),
    ("RELEASE SAVEPOINT s1", K.SAVEPOINT),
    ("CREATE TABLE IF NOT EXISTS scratch (id int)", K.DDL),
    ("LOCK TABLE accounts IN ROW EXCLUSIVE MODE", K.LOCK),
]


# -- the classification, alone -------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "kind"), [(s, k) for _, s, k in HOSTILE], ids=[i for i, *_ in HOSTILE]
)
def test_hostile_statement_is_classified_and_refused(sql: str, kind: StatementKind) -> None:
    assert classify(sql, with_params=False).kind is kind
    assert kind not in DEFAULT_ALLOWED


@pytest.mark.parametrize(("sql", "kind"), ALLOWED)
def test_ordinary_statement_is_allowed(sql: str, kind: StatementKind) -> None:
    assert classify(sql, with_params=False).kind is kind
    assert kind in DEFAULT_ALLOWED


def test_placeholders_are_converted_as_psycopg_does_and_counted() -> None:
    policy = StatementPolicy(DEFAULT_ALLOWED)
    # psycopg replaces %s even inside a literal: what PostgreSQL sees has $1 there.
    assert classify("SELECT '%s'", with_params=True).placeholders == 1
    assert classify("SELECT %s %% 2", with_params=True).placeholders == 1
    with pytest.raises(InvalidArgument, match="2 placeholder"):
        policy.check([Statement("SELECT %s, %s", (1,))], "Run")
    with pytest.raises(InvalidArgument, match="named placeholders"):
        policy.check([Statement("SELECT %(a)s", (1,))], "Run")


def test_refusal_names_index_and_kind() -> None:
    policy = StatementPolicy(DEFAULT_ALLOWED)
    statements = [Statement("SELECT 1"), Statement("UPDATE accounts SET balance = 0; COMMIT")]
    with pytest.raises(InvalidArgument, match=r"branch 'shard1' statement 2: multiple"):
        policy.check(statements, "branch 'shard1'")


def test_operator_widens_and_narrows_but_never_past_the_protocol() -> None:
    kinds = policy_kinds(allow=["do"], refuse=["ddl"])
    assert K.DO in kinds and K.DDL not in kinds and K.QUERY in kinds
    for kind in ALWAYS_REFUSED:
        with pytest.raises(InvalidArgument, match="never be allowed"):
            policy_kinds(allow=[kind.value])
    with pytest.raises(InvalidArgument, match="unknown statement kind"):
        policy_kinds(allow=["everything"])


# -- against the running system -------------------------------------------------------


def _pairs() -> tuple[tuple[int, int], tuple[int, int]]:
    """(source, target) on two shards, and on one shard (a one-phase transfer)."""
    shards = ["shard1", "shard2", "shard3"]
    accounts = range(1, 21)
    two = next(
        (a, b)
        for a, b in itertools.permutations(accounts, 2)
        if bank.shard_of(a, shards) != bank.shard_of(b, shards)
    )
    one = next(
        (a, b)
        for a, b in itertools.permutations(accounts, 2)
        if bank.shard_of(a, shards) == bank.shard_of(b, shards)
    )
    return two, one


_transfer_ids = itertools.count(1)


def _transfer(system: LocalSystem, source: int, target: int) -> dict[str, list[Statement]]:
    return bank.transfer(f"p{next(_transfer_ids)}", source, target, 1, system.shard_names)


def _markers(system: LocalSystem) -> dict[str, int]:
    out = {}
    for shard in system.shard_names:
        with system.connect(shard) as conn:
            row = conn.execute(f"SELECT count(*) FROM {MARKER_TABLE}").fetchone()
        assert row is not None
        out[shard] = int(row[0])
    return out


def _open_branches(system: LocalSystem) -> dict[str, int]:
    out = {}
    for name in system.participants:
        with system.participant_channel(name) as channel:
            status = pgrpc.ParticipantStub(channel).Status(ppb.ParticipantStatusRequest())
        out[name] = status.open_branches
    return out


def _agent_refuses(system: LocalSystem, shard: str, statements: list[Statement]) -> str:
    """The agent's own check, without the coordinator's: Prepare and Execute directly."""
    txid = f"shared.0.{900_000 + next(_transfer_ids)}"
    msgs = [statement_to_pb(s) for s in statements]
    details = []
    with system.participant_channel(shard) as channel:
        stub = pgrpc.ParticipantStub(channel)
        calls: list[Callable[[], object]] = [
            lambda: stub.Prepare(ppb.PrepareRequest(transaction_id=txid, statements=msgs)),
            lambda: stub.Prepare(
                ppb.PrepareRequest(transaction_id=txid, statements=msgs, one_phase=True)
            ),
            lambda: stub.Execute(ppb.BranchExecuteRequest(transaction_id=txid, statements=msgs)),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            details.append(caught.value.details() or "")
    return details[0]


@pytest.fixture
def client(system: LocalSystem) -> Iterator[CoordinatorClient]:
    with system.client() as c:
        yield c


@pytest.mark.parametrize(
    ("sql", "kind"), [(s, k) for _, s, k in HOSTILE], ids=[i for i, *_ in HOSTILE]
)
def test_hostile_statement_changes_nothing_anywhere(
    system: LocalSystem, client: CoordinatorClient, sql: str, kind: StatementKind
) -> None:
    (a, b), (c, d) = _pairs()
    hostile = Statement(sql)
    before = bank.snapshot(dsns(system))
    markers = _markers(system)

    # One-shot, two branches: the hostile statement mixed between valid ones.
    branches = _transfer(system, a, b)
    first = next(iter(branches))
    branches[first] = [branches[first][0], hostile, *branches[first][1:]]
    with pytest.raises(InvalidArgument) as refused:
        client.run(branches)
    assert "statement 2" in str(refused.value) and kind.value in str(refused.value)

    # One-shot, alone, one phase (a single branch).
    with pytest.raises(InvalidArgument, match=kind.value):
        client.run({"shard1": [hostile]})

    # One phase, mixed: both legs on one shard.
    ((shard, statements),) = _transfer(system, c, d).items()
    with pytest.raises(InvalidArgument, match=kind.value):
        client.run({shard: [*statements[:2], hostile, *statements[2:]]})

    # Interactive: valid work first; the refused Execute runs nothing, and the
    # transaction is still the client's to roll back.
    tx = client.begin()
    tx.execute_many(first, branches[first][:1])
    with pytest.raises(InvalidArgument, match=kind.value):
        tx.execute(first, hostile)
    assert not tx.rollback().committed

    # The agent refuses it too when asked directly (a coordinator with a wider policy).
    assert kind.value in _agent_refuses(system, "shard1", [Statement("SELECT 1"), hostile])

    after = bank.snapshot(dsns(system))
    assert after.total == before.total and after.legs == before.legs
    assert not any(after.prepared.values())
    assert system.prepared_transactions() == {s: [] for s in system.shard_names}
    wait_until(lambda: not any(_open_branches(system).values()), 10, "no open branch")
    assert _markers(system) == markers
    outcome = client.run(_transfer(system, a, b), wait_for_completion=True)
    assert outcome.committed, outcome


def test_random_mixes_of_valid_and_hostile_statements(
    system: LocalSystem, client: CoordinatorClient
) -> None:
    """Every balance change is explained by a reported commit and every reported commit
    is applied, whatever hostile statements the transfers carried."""
    seed = int(os.environ.get("TWOPC_SEED", random.randrange(2**32)))
    print(f"seed={seed} (TWOPC_SEED={seed} replays this run)")
    rng = random.Random(seed)
    accounts = list(range(1, 21))
    balances = {a: 100 for a in accounts}
    committed: set[str] = set()
    seen: set[str] = set()
    for n in range(60):
        source, target = rng.sample(accounts, 2)
        amount = rng.randint(1, 30)
        transfer_id = f"r{seed}-{n}"
        seen.add(transfer_id)
        branches = bank.transfer(transfer_id, source, target, amount, system.shard_names)
        hostile = rng.random() < 0.6
        if hostile:
            shard = rng.choice(list(branches))
            at = rng.randint(0, len(branches[shard]))
            branches[shard].insert(at, Statement(rng.choice(HOSTILE)[1]))
        mode = rng.choice(["run", "interactive"])
        outcome_committed = False
        try:
            if mode == "run":
                outcome_committed = client.run(branches).committed
            else:
                tx = client.begin()
                try:
                    for shard, statements in branches.items():
                        tx.execute_many(shard, statements)
                except InvalidArgument:
                    tx.rollback()
                    raise
                outcome_committed = tx.commit().committed
        except InvalidArgument:
            assert hostile, f"seed={seed} transfer {n}: a valid transfer was refused"
        except TransactionAborted:
            pass  # a failed debit expectation in an interactive transfer
        if outcome_committed:
            assert not hostile, f"seed={seed} transfer {n} committed with a hostile statement"
            committed.add(transfer_id)
            balances[source] -= amount
            balances[target] += amount
    wait_until(lambda: not any(system.prepared_transactions().values()), 30, "phase 2 finished")
    snapshot = bank.snapshot(dsns(system))
    applied = {t for t, legs in snapshot.legs.items() if t in seen}
    assert applied == committed, f"seed={seed}"
    assert all(snapshot.legs[t] == bank.BOTH_LEGS for t in applied), f"seed={seed}"
    for shard in system.shard_names:
        with system.connect(shard) as conn:
            for account, balance in conn.execute("SELECT id, balance FROM accounts"):
                assert balances[int(account)] == int(balance), f"seed={seed} account {account}"
