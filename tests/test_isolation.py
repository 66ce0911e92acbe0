"""Isolation levels, retryable aborts and the keyed retry helper, against real shards.

What applications built on us fear most is a lost update or a double booking. These
tests set up each anomaly deterministically across two shards (interleaved interactive
transactions, or a row lock held by an outside session), show that READ COMMITTED lets
it happen, that REPEATABLE READ / SERIALIZABLE turn it into an abort the client library
marks retryable, and that `run_with_retries` runs keyed work again to exactly one
commit.
"""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from collections.abc import Callable

import grpc
import psycopg
import pytest

from bank_demo import bank
from coordinator.client import (
    AsyncTransaction,
    CoordinatorClient,
    Isolation,
    Outcome,
    Retry,
    Statement,
    Transaction,
    TransactionAborted,
    TransportError,
    attempt_key,
    exactly,
    run_with_retries,
    run_with_retries_async,
    transact_with_retries,
    transact_with_retries_async,
)
from coordinator.protocol import AbortCause, Ballot, RetryPolicy, decide
from tests.conftest import SystemFactory, reset_bank, wait_no_prepared
from twopc_common.errors import AlreadyExists, InvalidArgument, ResourceExhausted
from twopc_common.votes import Vote
from twopc_harness.daemons import wait_until
from twopc_harness.postgres import PostgresCluster
from twopc_harness.system import LocalSystem
from twopc_pb import coordinator_pb2 as cpb
from twopc_pb import coordinator_pb2_grpc as cgrpc
from twopc_pb import participant_pb2 as ppb
from twopc_pb import participant_pb2_grpc as pgrpc
from twopc_pb import types_pb2 as tpb

BALANCE = 100  # reset_bank's opening balance


def account_on(system: LocalSystem, shard: str, nth: int = 0) -> int:
    return [a for a in range(1, 21) if bank.shard_of(a, system.shard_names) == shard][nth]


def balance(system: LocalSystem, shard: str, account: int) -> int:
    with system.connect(shard) as conn:
        row = conn.execute("SELECT balance FROM accounts WHERE id = %s", (account,)).fetchone()
    assert row is not None
    return int(row[0])


def ledger_legs(system: LocalSystem, transfer_id: str) -> int:
    legs = 0
    for shard in system.shard_names:
        with system.connect(shard) as conn:
            row = conn.execute(
                "SELECT count(*) FROM ledger WHERE transfer_id = %s", (transfer_id,)
            ).fetchone()
        assert row is not None
        legs += int(row[0])
    return legs


def total_money(system: LocalSystem) -> int:
    total = 0
    for shard in system.shard_names:
        with system.connect(shard) as conn:
            row = conn.execute("SELECT sum(balance) FROM accounts").fetchone()
        assert row is not None
        total += int(row[0])
    return total


def key() -> str:
    return f"iso-{uuid.uuid4().hex[:12]}"


# -- the level itself -------------------------------------------------------------------


def test_an_unknown_isolation_level_is_invalid_argument_and_opens_nothing(
    system: LocalSystem,
) -> None:
    with system.coordinator_channel() as channel:
        stub = cgrpc.CoordinatorStub(channel)
        branch = cpb.Branch(participant="shard1", statements=[tpb.Statement(sql="SELECT 1")])
        for call, request in (
            (stub.Run, cpb.RunRequest(branches=[branch], isolation=7)),  # type: ignore[arg-type]
            (stub.Begin, cpb.BeginRequest(isolation=42)),  # type: ignore[arg-type]
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unknown isolation level" in (caught.value.details() or "")
        listed = stub.ListTransactions(cpb.ListTransactionsRequest())
        assert list(listed.transactions) == []
    with system.participant_channel("shard1") as channel:
        agent = pgrpc.ParticipantStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            agent.Execute(
                ppb.BranchExecuteRequest(
                    transaction_id="isotest.1.1",
                    statements=[tpb.Statement(sql="SELECT 1")],
                    isolation=5,  # type: ignore[arg-type]
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = agent.Status(ppb.ParticipantStatusRequest())
        assert status.open_branches == 0
    with system.client() as client, pytest.raises(InvalidArgument, match="chaos"):
        client.run({"shard1": [Statement("SELECT 1")]}, isolation="chaos")


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        (None, "read committed"),
        ("read_committed", "read committed"),
        ("repeatable read", "repeatable read"),
        ("serializable", "serializable"),
    ],
)
def test_every_branch_runs_at_the_level_of_its_transaction(
    system: LocalSystem, level: str | None, shown: str
) -> None:
    show = [Statement("SHOW transaction_isolation")]
    with system.client() as client:
        kwargs = {} if level is None else {"isolation": level}
        outcome = client.run({"shard1": show, "shard2": show}, **kwargs)  # type: ignore[arg-type]
        assert outcome.committed
        assert outcome.results is not None
        assert {p: r[0].rows for p, r in outcome.results.items()} == {
            "shard1": ((shown,),),
            "shard2": ((shown,),),
        }
        with client.transaction(**kwargs) as tx:  # type: ignore[arg-type]
            assert tx.execute("shard1", show[0]).rows == ((shown,),)
            assert tx.execute("shard3", show[0]).rows == ((shown,),)
            assert tx.execute("shard1", show[0]).rows == ((shown,),)


def test_read_committed_is_applied_even_where_the_database_default_differs(
    clusters: list[PostgresCluster], make_system: SystemFactory
) -> None:
    """Agents whose connections open while the database defaults to SERIALIZABLE
    still run a READ COMMITTED transaction's branches at READ COMMITTED."""
    shard2 = clusters[1]
    with psycopg.connect(shard2.dsn, autocommit=True) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        database = row[0]
        conn.execute(
            f"ALTER DATABASE {database} SET default_transaction_isolation = 'serializable'"
        )
        try:
            system = make_system()
        finally:
            # Only connections opened meanwhile (this system's) keep that default.
            conn.execute(f"ALTER DATABASE {database} RESET default_transaction_isolation")
    show = [
        Statement("SHOW default_transaction_isolation"),
        Statement("SHOW transaction_isolation"),
    ]
    with system.client() as client:
        for _ in range(5):
            outcome = client.run({"shard2": show})
            assert outcome.results is not None
            assert [r.rows for r in outcome.results["shard2"]] == [
                (("serializable",),),
                (("read committed",),),
            ]


def test_an_execute_at_another_level_than_its_branch_is_invalid_argument(
    system: LocalSystem,
) -> None:
    txid = "isotest.1.2"  # no running coordinator of this id
    show = tpb.Statement(sql="SHOW transaction_isolation")
    with system.participant_channel("shard1") as channel:
        agent = pgrpc.ParticipantStub(channel)
        first = agent.Execute(
            ppb.BranchExecuteRequest(
                transaction_id=txid, statements=[show], isolation=tpb.REPEATABLE_READ
            )
        )
        for other in (tpb.SERIALIZABLE, tpb.READ_COMMITTED):
            with pytest.raises(grpc.RpcError) as caught:
                agent.Execute(
                    ppb.BranchExecuteRequest(
                        transaction_id=txid,
                        statements=[show],
                        incarnation=first.incarnation,
                        isolation=other,
                    )
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "repeatable_read" in (caught.value.details() or "")
        # The refusal changed nothing: the branch goes on at its own level.
        again = agent.Execute(
            ppb.BranchExecuteRequest(
                transaction_id=txid,
                statements=[show],
                incarnation=first.incarnation,
                isolation=tpb.REPEATABLE_READ,
            )
        )
        assert again.results[0].rows[0].values[0].text_value == "repeatable read"
        with pytest.raises(grpc.RpcError) as caught:
            agent.Prepare(
                ppb.PrepareRequest(
                    transaction_id=txid, incarnation=first.incarnation, isolation=tpb.SERIALIZABLE
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert agent.Abort(ppb.BranchRef(transaction_id=txid)).changed
        assert agent.Status(ppb.ParticipantStatusRequest()).open_branches == 0


# -- lost updates -----------------------------------------------------------------------


def read_modify_write(
    client: CoordinatorClient, level: str, source: int, target: int
) -> tuple[Callable[[], None], Callable[[], Outcome]]:
    """An interactive transfer of 10 that reads the source's balance, then writes the
    balance it computed (the pattern that loses updates): the read now, the writes
    and the commit when the returned step is called."""
    tx = client.begin(level)
    read = tx.execute("shard1", "SELECT balance FROM accounts WHERE id = %s", (source,))
    seen = int(str(read.rows[0][0]))

    def write() -> None:
        tx.execute(
            "shard1",
            "UPDATE accounts SET balance = %s WHERE id = %s",
            (seen - 10, source),
            exactly(1),
        )
        tx.execute(
            "shard2",
            "UPDATE accounts SET balance = balance + 10 WHERE id = %s",
            (target,),
            exactly(1),
        )

    # Answered after phase 2, so that the shards show the commit when it returns.
    return write, lambda: tx.commit(wait_for_completion=True)


def test_read_committed_loses_an_update_that_repeatable_read_refuses_retryably(
    system: LocalSystem,
) -> None:
    source, target = account_on(system, "shard1"), account_on(system, "shard2")
    with system.client() as client:
        # READ COMMITTED: both read 100, both write 90: one debit is lost.
        write1, commit1 = read_modify_write(client, "read_committed", source, target)
        write2, commit2 = read_modify_write(client, "read_committed", source, target)
        write1()
        assert commit1().committed
        write2()
        assert commit2().committed
        assert balance(system, "shard1", source) == BALANCE - 10  # lost: should be 80
        assert balance(system, "shard2", target) == BALANCE + 20

        reset_bank(system)
        # REPEATABLE READ: the second writer is told it lost, retryably.
        write1, commit1 = read_modify_write(client, "repeatable_read", source, target)
        write2, commit2 = read_modify_write(client, "repeatable_read", source, target)
        write1()
        assert commit1().committed
        with pytest.raises(TransactionAborted) as caught:
            write2()
        assert caught.value.cause == "SERIALIZATION_FAILURE"
        assert caught.value.retryable
        assert "40001" in str(caught.value)
        outcome = commit2()  # the transaction is over: its outcome says why
        assert not outcome.committed and outcome.abort_cause == "SERIALIZATION_FAILURE"
        assert outcome.retryable
    assert balance(system, "shard1", source) == BALANCE - 10
    assert balance(system, "shard2", target) == BALANCE + 10
    wait_no_prepared(system)


def snapshot_transfer(transfer_id: str, source: int, target: int) -> dict[str, list[Statement]]:
    """A one-shot transfer of 10 whose new balances are computed from values read in
    the statement's snapshot (a scalar subquery): under READ COMMITTED a concurrent
    update of the same row is overwritten, not added to."""
    return {
        "shard1": [
            Statement(
                "UPDATE accounts SET balance = (SELECT balance FROM accounts WHERE id = %s) - 10 "
                "WHERE id = %s",
                (source, source),
                exactly(1),
            ),
            Statement("INSERT INTO ledger VALUES (%s, 'debit', %s, 10)", (transfer_id, source)),
        ],
        "shard2": [
            Statement(
                "UPDATE accounts SET balance = (SELECT balance FROM accounts WHERE id = %s) + 10 "
                "WHERE id = %s",
                (target, target),
                exactly(1),
            ),
            Statement("INSERT INTO ledger VALUES (%s, 'credit', %s, 10)", (transfer_id, target)),
        ],
    }


def run_behind_an_outside_update(
    system: LocalSystem, source: int, run: Callable[[], Outcome]
) -> Outcome:
    """`run()` in a thread while an outside session holds the source row, moving 5 from
    it to another account of its shard; committed as soon as the run's debit waits for
    the row. Returns what `run` returned."""
    answer: list[Outcome] = []
    other = account_on(system, "shard1", 1)
    with system.connect("shard1") as outside:
        outside.execute("BEGIN")
        outside.execute("UPDATE accounts SET balance = balance - 5 WHERE id = %s", (source,))
        outside.execute("UPDATE accounts SET balance = balance + 5 WHERE id = %s", (other,))
        worker = threading.Thread(target=lambda: answer.append(run()))
        worker.start()

        def debit_waits() -> bool:
            with system.connect("shard1") as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%%UPDATE accounts SET balance = (SELECT%%'"
                ).fetchone()
            return row is not None and int(row[0]) > 0

        wait_until(debit_waits, 20, "the run's debit waiting for the outside session's row")
        outside.execute("COMMIT")
        worker.join(60)
    assert answer, "the run did not answer"
    return answer[0]


def test_run_with_retries_turns_a_serialization_failure_into_exactly_one_commit(
    make_system: SystemFactory,
) -> None:
    system = make_system(["--prepare-timeout", "20"], ["--lock-timeout", "20"])
    reset_bank(system)
    source, target = account_on(system, "shard1"), account_on(system, "shard2")
    with system.client() as client:
        # READ COMMITTED: the outside session's -5 is overwritten.
        outcome = run_behind_an_outside_update(
            system,
            source,
            lambda: client.run(snapshot_transfer("rc", source, target), wait_for_completion=True),
        )
        assert outcome.committed
        assert balance(system, "shard1", source) == BALANCE - 10  # lost: should be 85

        reset_bank(system)
        transfer_key = key()
        retry = Retry(attempts=5, backoff=RetryPolicy(initial=0.01, cap=0.1))
        outcome = run_behind_an_outside_update(
            system,
            source,
            lambda: run_with_retries(
                client,
                snapshot_transfer("rr", source, target),
                transfer_key,
                isolation="repeatable_read",
                retry=retry,
                wait_for_completion=True,
            ),
        )
        assert outcome.committed
        assert balance(system, "shard1", source) == BALANCE - 5 - 10
        assert balance(system, "shard2", target) == BALANCE + 10
        assert ledger_legs(system, "rr") == 2
        # The first attempt lost to the outside update; its key keeps that outcome,
        # and the second attempt's key the commit.
        first = client.run(
            snapshot_transfer("rr", source, target), transfer_key, isolation="repeatable_read"
        )
        assert not first.committed and first.abort_cause == "SERIALIZATION_FAILURE"
        assert first.retryable and first.abort_participant == "shard1"
        second = client.run(
            snapshot_transfer("rr", source, target),
            attempt_key(transfer_key, 1),
            isolation="repeatable_read",
        )
        assert second.committed and second.transaction_id == outcome.transaction_id
        # The helper run again with the same key (a client that restarted): it finds
        # the commit, and nothing is applied twice.
        again = run_with_retries(
            client,
            snapshot_transfer("rr", source, target),
            transfer_key,
            isolation="repeatable_read",
            retry=retry,
        )
        assert again.committed and again.transaction_id == outcome.transaction_id
    assert balance(system, "shard1", source) == BALANCE - 5 - 10
    assert ledger_legs(system, "rr") == 2
    assert total_money(system) == 20 * BALANCE  # nothing created or lost
    wait_no_prepared(system)


# -- double booking ---------------------------------------------------------------------

BOOKINGS = """CREATE TABLE IF NOT EXISTS bookings (
    resource text NOT NULL, slot int NOT NULL, who text NOT NULL
)"""
# "Book it if it is free", without a unique constraint: the rule lives in the query,
# which READ COMMITTED lets two transactions pass at once.
INSERT = "INSERT INTO bookings VALUES (%s, %s, %s)"
BOOK = (
    "INSERT INTO bookings SELECT %s, %s, %s WHERE NOT EXISTS "
    "(SELECT 1 FROM bookings WHERE resource = %s AND slot = %s)"
)


def prepare_bookings(system: LocalSystem) -> None:
    for shard in ("shard1", "shard2"):
        with system.connect(shard) as conn:
            conn.execute(BOOKINGS)
            conn.execute("TRUNCATE bookings")


def bookings(system: LocalSystem, slot: int) -> dict[str, list[str]]:
    found = {}
    for shard in ("shard1", "shard2"):
        with system.connect(shard) as conn:
            rows = conn.execute(
                "SELECT who FROM bookings WHERE slot = %s ORDER BY who", (slot,)
            ).fetchall()
        found[shard] = [str(r[0]) for r in rows]
    return found


def booking(who: str, slot: int) -> dict[str, list[Statement]]:
    """A flight seat on shard1 and a hotel room on shard2, for the same slot."""
    return {
        "shard1": [Statement(BOOK, ("seat", slot, who, "seat", slot), exactly(1))],
        "shard2": [Statement(BOOK, ("room", slot, who, "room", slot), exactly(1))],
    }


def test_read_committed_double_books_and_serializable_refuses_retryably(
    system: LocalSystem,
) -> None:
    prepare_bookings(system)
    check = "SELECT count(*) FROM bookings WHERE resource = %s AND slot = %s"
    for level, slot in (("read_committed", 1), ("serializable", 2)):
        with system.client() as client:
            txs = {"alice": client.begin(level), "bob": client.begin(level)}
            for tx in txs.values():  # both look: free everywhere
                assert tx.execute("shard1", check, ("seat", slot)).rows == ((0,),)
                assert tx.execute("shard2", check, ("room", slot)).rows == ((0,),)
            outcomes = []
            try:
                for who, tx in txs.items():  # both book what they saw free
                    tx.execute("shard1", INSERT, ("seat", slot, who))
                    tx.execute("shard2", INSERT, ("room", slot, who))
                for tx in txs.values():
                    outcomes.append(tx.commit(wait_for_completion=True))
            except TransactionAborted as exc:  # a conflict found at a statement
                assert exc.retryable, exc
                outcomes = [tx.outcome or tx.commit(True) for tx in txs.values()]
        if level == "read_committed":
            assert all(o.committed for o in outcomes)
            assert bookings(system, slot) == {
                "shard1": ["alice", "bob"],
                "shard2": ["alice", "bob"],
            }
        else:
            committed = [o for o in outcomes if o.committed]
            assert len(committed) == 1, outcomes
            (lost,) = (o for o in outcomes if not o.committed)
            assert lost.abort_cause == "SERIALIZATION_FAILURE" and lost.retryable
            winner = bookings(system, slot)["shard1"]
            assert len(winner) == 1 and bookings(system, slot)["shard2"] == winner
    wait_no_prepared(system)


def test_concurrent_keyed_bookings_under_serializable_never_double_book(
    system: LocalSystem,
) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    prepare_bookings(system)
    people = ["ann", "ben", "cat", "dan", "eve", "fay"]
    slots = list(range(10, 14))
    outcomes: dict[tuple[str, int], Outcome] = {}
    base = key()
    retry = Retry(attempts=20, backoff=RetryPolicy(initial=0.005, cap=0.1))
    with system.client() as client:
        barrier = threading.Barrier(len(people))

        def person(who: str) -> None:
            order = slots[:]
            random.Random(f"{seed}-{who}").shuffle(order)
            for slot in order:
                barrier.wait(30)
                outcomes[(who, slot)] = run_with_retries(
                    client,
                    booking(who, slot),
                    f"{base}-{who}-{slot}",
                    isolation="serializable",
                    retry=retry,
                    wait_for_completion=True,
                )

        threads = [threading.Thread(target=person, args=(p,)) for p in people]
        rng.shuffle(threads)
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(outcomes) == len(people) * len(slots)
    with system.client() as client:
        counters = client.status().counters
    print(f"serialization failures retried: {counters['aborted_serialization_failure']}")
    for slot in slots:
        found = bookings(system, slot)
        winners = [who for (who, s), o in outcomes.items() if s == slot and o.committed]
        # One booking per slot and resource, both by the one committed transaction.
        assert found == {"shard1": winners, "shard2": winners}, (seed, slot, outcomes)
        assert len(winners) == 1, (seed, slot)
        for (who, s), o in outcomes.items():
            if s == slot and not o.committed:
                # Every loser ends with "taken" (its expectation), never a conflict:
                # the helper retried each serialization failure until the answer was
                # final.
                assert not o.retryable and o.abort_cause == "VOTE_NO", (seed, who, o)
                assert "expected exactly 1" in o.abort_reason
    wait_no_prepared(system)


def test_a_deadlock_postgresql_breaks_on_one_shard_is_a_retryable_abort(
    make_system: SystemFactory,
) -> None:
    # The coordinator's detector off: PostgreSQL's own (deadlock_timeout, 1 s) acts.
    system = make_system(["--deadlock-interval", "0"], ["--lock-timeout", "20"])
    reset_bank(system)
    a, b = account_on(system, "shard1", 0), account_on(system, "shard1", 1)
    update = "UPDATE accounts SET balance = balance + 1 WHERE id = %s"
    failures: list[TransactionAborted] = []
    with system.client() as client:
        first, second = client.begin(), client.begin()
        first.execute("shard1", update, (a,))
        second.execute("shard1", update, (b,))

        def cross(tx: Transaction, account: int) -> None:
            try:
                tx.execute("shard1", update, (account,))
            except TransactionAborted as exc:
                failures.append(exc)

        waiter = threading.Thread(target=cross, args=(first, b))
        waiter.start()
        wait_until(lambda: system_waits(system, "shard1") > 0, 20, "the first transaction waiting")
        cross(second, a)
        waiter.join(30)
        assert len(failures) == 1, failures
        (failure,) = failures
        assert failure.cause == "DEADLOCK" and failure.retryable
        assert "40P01" in str(failure)
        survivor = first if second.outcome is not None else second
        assert survivor.commit().committed
    wait_no_prepared(system)


def system_waits(system: LocalSystem, shard: str) -> int:
    with system.connect(shard) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        ).fetchone()
    return 0 if row is None else int(row[0])


# -- the pure parts ---------------------------------------------------------------------


def test_a_no_vote_names_the_conflict_it_lost_unless_another_branch_failed_outright() -> None:
    parts = ("p1", "p2")
    yes = Ballot(Vote.YES)
    for sqlstate, cause in (
        ("40001", AbortCause.SERIALIZATION_FAILURE),
        ("40P01", AbortCause.DEADLOCK),
        ("55P03", AbortCause.LOCK_TIMEOUT),
        ("23505", AbortCause.VOTE_NO),
        ("", AbortCause.VOTE_NO),
    ):
        decision = decide(parts, {"p1": yes, "p2": Ballot(Vote.NO, "x", sqlstate)})
        assert (decision.commit, decision.cause, decision.culprit) == (False, cause, "p2")
    # Work that failed outright outweighs a lost conflict: not retryable.
    decision = decide(
        parts, {"p1": Ballot(Vote.NO, "conflict", "40001"), "p2": Ballot(Vote.NO, "bad", "22012")}
    )
    assert (decision.cause, decision.culprit) == (AbortCause.VOTE_NO, "p2")


class ScriptedClient:
    """Answers `run` from a script (an Outcome, or an exception to raise), recording
    the keys it was called with: the helper's loop without a coordinator."""

    def __init__(self, answers: list[Outcome | Exception]) -> None:
        self.answers = answers
        self.keys: list[str] = []

    def run(self, branches: object, key: str, wait: bool, isolation: object) -> Outcome:
        self.keys.append(key)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


FAST = Retry(attempts=4, backoff=RetryPolicy(initial=0.001, cap=0.002), refusals=3)


def conflict(txid: str) -> Outcome:
    return Outcome(txid, False, "SERIALIZATION_FAILURE", "shard1", "40001: could not serialize")


@pytest.mark.parametrize(
    ("answers", "keys", "final"),
    [
        # A retryable abort: the next attempt under the next key, until it commits.
        ([conflict("t1"), Outcome("t2", True)], ["k", "k#1"], "t2"),
        # A commit and a non-retryable abort are never retried.
        ([Outcome("t1", True)], ["k"], "t1"),
        ([Outcome("t1", False, "VOTE_NO", "shard1", "expected exactly 1")], ["k"], "t1"),
        ([Outcome("t1", False, "PARTICIPANT_UNAVAILABLE")], ["k"], "t1"),
        # An unanswered call: again under the same key (it learns the first outcome).
        (
            [TransportError("UNAVAILABLE"), conflict("t1"), Outcome("t2", True)],
            ["k", "k", "k#1"],
            "t2",
        ),
        # A refusal never ran: waited out under the same key, not counted as a run.
        (
            [
                ResourceExhausted("busy", 0.001),
                ResourceExhausted("busy", 0.001),
                Outcome("t1", True),
            ],
            ["k", "k", "k"],
            "t1",
        ),
        # Bounded: the last outcome stands, still retryable.
        ([conflict(f"t{i}") for i in range(4)], ["k", "k#1", "k#2", "k#3"], "t3"),
    ],
)
def test_run_with_retries_retries_only_what_may_succeed_and_only_so_often(
    answers: list[Outcome | Exception], keys: list[str], final: str
) -> None:
    client = ScriptedClient(list(answers))
    outcome = run_with_retries(client, {}, "k", retry=FAST)  # type: ignore[arg-type]
    assert client.keys == keys and outcome.transaction_id == final
    assert not client.answers


def test_run_with_retries_raises_what_it_cannot_answer() -> None:
    client = ScriptedClient([TransportError("UNAVAILABLE")] * 4)
    with pytest.raises(TransportError):
        run_with_retries(client, {}, "k", retry=FAST)  # type: ignore[arg-type]
    assert client.keys == ["k"] * 4
    refused = ScriptedClient([ResourceExhausted("busy", 0.001)] * 3)
    with pytest.raises(ResourceExhausted):
        run_with_retries(refused, {}, "k", retry=FAST)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="idempotency key"):
        run_with_retries(client, {}, "", retry=FAST)  # type: ignore[arg-type]


def test_run_with_retries_asks_the_work_function_once_per_attempt() -> None:
    asked: list[int] = []

    def work(attempt: int) -> dict[str, list[Statement]]:
        asked.append(attempt)
        return {}

    client = ScriptedClient(
        [conflict("t1"), TransportError("x"), conflict("t2"), Outcome("t3", True)]
    )
    assert run_with_retries(client, work, "k", retry=FAST).committed  # type: ignore[arg-type]
    assert asked == [0, 1, 2] and client.keys == ["k", "k#1", "k#1", "k#2"]


def test_the_asyncio_helper_commits_keyed_work_once(system: LocalSystem) -> None:
    source, target = account_on(system, "shard1"), account_on(system, "shard2")
    transfer_key = key()

    async def scenario() -> tuple[Outcome, Outcome]:
        async with system.async_client() as client:
            work = bank.transfer("async-rr", source, target, 7, system.shard_names)
            first = await run_with_retries_async(
                client, work, transfer_key, isolation=Isolation.SERIALIZABLE
            )
            again = await run_with_retries_async(
                client, work, transfer_key, isolation=Isolation.SERIALIZABLE
            )
            return first, again

    first, again = asyncio.run(scenario())
    assert first.committed and again.transaction_id == first.transaction_id
    wait_no_prepared(system)
    assert balance(system, "shard1", source) == BALANCE - 7
    assert ledger_legs(system, "async-rr") == 2


def test_an_idempotency_key_belongs_to_one_level(system: LocalSystem) -> None:
    source, target = account_on(system, "shard1"), account_on(system, "shard2")
    work = bank.transfer("keyed-level", source, target, 3, system.shard_names)
    level_key, default_key = key(), key()
    with system.client() as client:
        first = client.run(work, level_key, isolation="repeatable_read")
        assert first.committed
        with pytest.raises(AlreadyExists):
            client.run(work, level_key, isolation="serializable")
        with pytest.raises(AlreadyExists):
            client.run(work, level_key)
        assert client.run(work, level_key, isolation="repeatable_read").transaction_id == (
            first.transaction_id
        )
        # READ COMMITTED named or left out is the same request.
        work = bank.transfer("keyed-default", source, target, 3, system.shard_names)
        default = client.run(work, default_key)
        again = client.run(work, default_key, isolation=Isolation.READ_COMMITTED)
        assert default.committed and again.transaction_id == default.transaction_id
    wait_no_prepared(system)
    assert balance(system, "shard1", source) == BALANCE - 6


@pytest.mark.parametrize("level", ["read_committed", "repeatable_read"])
def test_transact_with_retries_runs_a_read_modify_write_again_until_no_update_is_lost(
    system: LocalSystem, level: str
) -> None:
    source, target = account_on(system, "shard1"), account_on(system, "shard2")
    elsewhere = account_on(system, "shard3")
    runs: list[str] = []
    with system.client() as client:

        def transfer(tx: Transaction) -> int:
            runs.append(tx.id)
            read = tx.execute("shard1", "SELECT balance FROM accounts WHERE id = %s", (source,))
            seen = int(str(read.rows[0][0]))
            if len(runs) == 1:  # another transfer from the same account commits meanwhile
                between = bank.transfer(
                    f"between-{level}", source, elsewhere, 10, system.shard_names
                )
                assert client.run(between, wait_for_completion=True).committed
            tx.execute(
                "shard1",
                "UPDATE accounts SET balance = %s WHERE id = %s",
                (seen - 10, source),
                exactly(1),
            )
            tx.execute(
                "shard2",
                "UPDATE accounts SET balance = balance + 10 WHERE id = %s",
                (target,),
                exactly(1),
            )
            return seen

        seen, outcome = transact_with_retries(client, transfer, isolation=level, retry=FAST)
    assert outcome.committed
    wait_no_prepared(system)
    if level == "read_committed":  # the other transfer's debit is overwritten
        assert len(runs) == 1 and seen == BALANCE
        assert balance(system, "shard1", source) == BALANCE - 10
    else:  # the first run lost the conflict; the second read the other transfer's debit
        assert len(runs) == 2 and seen == BALANCE - 10
        assert balance(system, "shard1", source) == BALANCE - 20
        assert total_money(system) == 20 * BALANCE


def test_transact_with_retries_never_retries_work_that_failed(system: LocalSystem) -> None:
    source = account_on(system, "shard1")
    runs: list[str] = []

    def overdraw(tx: Transaction) -> None:
        runs.append(tx.id)
        tx.execute(
            "shard1",
            "UPDATE accounts SET balance = balance - 1000 WHERE id = %s AND balance >= 1000",
            (source,),
            exactly(1),
        )

    with system.client() as client:
        with pytest.raises(TransactionAborted) as caught:
            transact_with_retries(client, overdraw, isolation="serializable", retry=FAST)
        assert not caught.value.retryable and caught.value.cause == "EXECUTE_FAILED"

        def rolls_back(tx: Transaction) -> None:
            runs.append(tx.id)
            tx.execute("shard1", "UPDATE accounts SET balance = 0 WHERE id = %s", (source,))
            raise KeyError("the application changed its mind")

        with pytest.raises(KeyError):
            transact_with_retries(client, rolls_back, retry=FAST)
        assert client.get_transaction(runs[-1]).outcome == "aborted"
    assert len(runs) == 2
    wait_no_prepared(system)
    assert balance(system, "shard1", source) == BALANCE


def test_the_asyncio_interactive_helper_retries_a_lost_conflict(system: LocalSystem) -> None:
    source, target = account_on(system, "shard1"), account_on(system, "shard2")
    runs: list[str] = []

    async def scenario() -> Outcome:
        async with system.async_client() as client:

            async def transfer(tx: AsyncTransaction) -> None:
                runs.append(tx.id)
                read = await tx.execute(
                    "shard1", "SELECT balance FROM accounts WHERE id = %s", (source,)
                )
                if len(runs) == 1:
                    between = bank.transfer("between-async", source, target, 5, system.shard_names)
                    assert (await client.run(between, wait_for_completion=True)).committed
                await tx.execute(
                    "shard1",
                    "UPDATE accounts SET balance = %s WHERE id = %s",
                    (int(str(read.rows[0][0])) - 10, source),
                    exactly(1),
                )
                await tx.execute(
                    "shard2", "UPDATE accounts SET balance = balance + 10 WHERE id = %s", (target,)
                )

            _, outcome = await transact_with_retries_async(
                client, transfer, isolation=Isolation.REPEATABLE_READ, retry=FAST
            )
            return outcome

    assert asyncio.run(scenario()).committed
    assert len(runs) == 2
    wait_no_prepared(system)
    assert balance(system, "shard1", source) == BALANCE - 15
    assert total_money(system) == 20 * BALANCE
