"""Atomic commit and abort across real shards, through the real daemons."""

from __future__ import annotations

import decimal

import pytest

from bank_demo import bank
from coordinator.client import Statement, TransactionAborted, exactly
from tests.conftest import dsns
from twopc_harness.system import LocalSystem


def account_on(system: LocalSystem, shard: str) -> int:
    """The first of the 20 accounts that the bank places on `shard`."""
    return next(a for a in range(1, 21) if bank.shard_of(a, system.shard_names) == shard)


def balance(system: LocalSystem, shard: str, account: int) -> int:
    with system.connect(shard) as conn:
        row = conn.execute("SELECT balance FROM accounts WHERE id = %s", (account,)).fetchone()
    assert row is not None
    return int(row[0])


def insert(shard_rows: dict[str, int], tag: str) -> dict[str, list[Statement]]:
    return {
        shard: [Statement("INSERT INTO ledger VALUES (%s, 'credit', %s, 1)", (tag, account))]
        for shard, account in shard_rows.items()
    }


def ledger_rows(system: LocalSystem, tag: str) -> dict[str, int]:
    out = {}
    for shard in system.shard_names:
        with system.connect(shard) as conn:
            row = conn.execute(
                "SELECT count(*) FROM ledger WHERE transfer_id = %s", (tag,)
            ).fetchone()
            assert row is not None
            out[shard] = int(row[0])
    return out


def test_transaction_over_three_shards_commits_everywhere(system: LocalSystem) -> None:
    with system.client() as client:
        # Answered once the decision is durable; wait for phase 2 before reading shards.
        outcome = client.run(
            insert({"shard1": 1, "shard2": 2, "shard3": 3}, "t3"), wait_for_completion=True
        )
    assert outcome.committed and not outcome.one_phase
    assert ledger_rows(system, "t3") == {"shard1": 1, "shard2": 1, "shard3": 1}
    assert system.prepared_transactions() == {"shard1": [], "shard2": [], "shard3": []}


def test_wait_for_completion_answers_after_phase_two(system: LocalSystem) -> None:
    with system.client() as client:
        outcome = client.run(insert({"shard1": 1, "shard2": 2}, "w"), wait_for_completion=True)
        assert outcome.committed and outcome.completed
        status = client.get_transaction(outcome.transaction_id)
    assert status.outcome == "committed" and status.state == "committed"
    assert system.prepared_transactions() == {"shard1": [], "shard2": [], "shard3": []}


@pytest.mark.parametrize(
    ("statement", "reason"),
    [
        (
            Statement(
                "UPDATE accounts SET balance = balance - 1000 WHERE id = 1 AND balance >= 1000",
                (),
                exactly(1),
            ),
            "expected exactly 1 row(s), got 0",
        ),
        (Statement("UPDATE accounts SET balance = balance - 1000"), "accounts_balance_check"),
        (Statement("UPDATE no_such_table SET balance = 0"), "does not exist"),
    ],
    ids=["expectation", "check-constraint", "undefined-table"],
)
def test_failing_branch_aborts_everywhere_and_names_the_culprit(
    system: LocalSystem, statement: Statement, reason: str
) -> None:
    before = bank.snapshot(dsns(system))
    branches = insert({"shard1": 1, "shard3": 3}, "bad")
    branches["shard2"] = [statement]
    with system.client() as client:
        outcome = client.run(branches)
    assert not outcome.committed
    assert outcome.abort_cause == "VOTE_NO"
    assert outcome.abort_participant == "shard2"
    assert reason in outcome.abort_reason
    assert ledger_rows(system, "bad") == {"shard1": 0, "shard2": 0, "shard3": 0}
    assert bank.snapshot(dsns(system)).total == before.total


def test_interactive_transaction_reads_then_writes_two_shards(system: LocalSystem) -> None:
    with system.client() as client, client.transaction(wait_for_completion=True) as tx:
        a1, a2, a3 = (account_on(system, s) for s in ("shard1", "shard2", "shard3"))
        read = tx.execute("shard1", "SELECT balance FROM accounts WHERE id = %s", (a1,))
        assert read.columns == ("balance",)
        assert read.rows == ((100,),)
        tx.execute(
            "shard2",
            "UPDATE accounts SET balance = balance + %s WHERE id = %s",
            (5, a2),
            exactly(1),
        )
        tx.execute(
            "shard3",
            "UPDATE accounts SET balance = balance + %s WHERE id = %s",
            (7, a3),
            exactly(1),
        )
    assert tx.outcome is not None and tx.outcome.committed
    assert balance(system, "shard2", a2) == 105
    assert balance(system, "shard3", a3) == 107


def test_interactive_rollback_leaves_nothing(system: LocalSystem) -> None:
    with system.client() as client:
        tx = client.begin()
        tx.execute("shard1", "UPDATE accounts SET balance = 0", expect=exactly(9))
        tx.execute("shard2", "UPDATE accounts SET balance = 0")
        outcome = tx.rollback()
        assert not outcome.committed and outcome.abort_cause == "CLIENT_ROLLBACK"
        with pytest.raises(ValueError), client.transaction() as tx2:
            tx2.execute("shard3", "UPDATE accounts SET balance = 0")
            raise ValueError("application error")
    assert tx2.outcome is not None and not tx2.outcome.committed
    snap = bank.snapshot(dsns(system))
    assert snap.total == 2000 and not snap.negative


def test_failed_interactive_statement_aborts_the_transaction(system: LocalSystem) -> None:
    with system.client() as client:
        tx = client.begin()
        tx.execute("shard1", "UPDATE accounts SET balance = 0")
        with pytest.raises(TransactionAborted, match="division by zero"):
            tx.execute("shard2", "SELECT 1 / 0")
        outcome = tx.commit()
    assert not outcome.committed and outcome.abort_participant == "shard2"
    assert bank.snapshot(dsns(system)).total == 2000


def test_single_participant_commits_in_one_phase(system: LocalSystem) -> None:
    with system.client() as client:
        before = client.status().counters
        outcome = client.run(insert({"shard2": 2}, "one"))
        after = client.status().counters
    assert outcome.committed and outcome.one_phase and outcome.completed
    assert after["committed_one_phase"] == before.get("committed_one_phase", 0) + 1
    assert after.get("committed_two_phase", 0) == before.get("committed_two_phase", 0)
    # One forced record, its intent (so that it can never commit unrecorded), and
    # one unforced update with its outcome; no PREPARE, no phase 2.
    assert after["log_fsync_batches"] == before.get("log_fsync_batches", 0) + 1
    assert after["log_records"] == before.get("log_records", 0) + 2
    assert ledger_rows(system, "one")["shard2"] == 1


def test_read_only_branch_votes_read_only_and_skips_phase_two(system: LocalSystem) -> None:
    branches = insert({"shard1": 1}, "ro")
    account = account_on(system, "shard2")
    branches["shard2"] = [Statement("SELECT balance FROM accounts WHERE id = %s", (account,))]
    with system.client() as client:
        outcome = client.run(branches, wait_for_completion=True)
        assert client.get_transaction(outcome.transaction_id).participants == ("shard1",)
    assert outcome.committed
    assert outcome.results is not None
    assert outcome.results["shard2"][0].rows == ((100,),)


def test_every_statement_result_comes_back_typed(system: LocalSystem) -> None:
    sql = (
        "SELECT %s::int AS i, %s::numeric AS n, %s::text AS t, %s::bytea AS b, "
        "%s::bool AS f, NULL::int AS z, %s::float8 AS d, DATE '2024-02-29' AS day"
    )
    params = (7, decimal.Decimal("12.50"), "x", b"\x00\x01", True, 2.5)
    with system.client() as client:
        outcome = client.run({"shard1": [Statement(sql, params)]})
    assert outcome.results is not None
    result = outcome.results["shard1"][0]
    assert result.columns == ("i", "n", "t", "b", "f", "z", "d", "day")
    assert result.rows == (
        (7, decimal.Decimal("12.50"), "x", b"\x00\x01", True, None, 2.5, "2024-02-29"),
    )


HOSTILE_TEXTS = (
    "'); COMMIT; --",
    "\\'; ROLLBACK; SELECT '",
    "$$; COMMIT; $$",
    "-- a comment\n; PREPARE TRANSACTION 'x'",
    "/* unclosed",
    "%s %% %(name)s",
)


def test_parameters_stay_values_of_their_own_type(system: LocalSystem) -> None:
    """A branch's statements and PREPARE travel as one string with the parameters bound
    by the client (participant.branch_batch): every value must stay one literal of the
    type server-side binding would give it, whatever its text says."""
    floats = (0.1, -2.5, float("inf"))
    sql = (
        "SELECT %s AS a, pg_typeof(%s)::text AS t, %s AS b, %s AS c, 5-%s AS d, "
        "%s::bytea AS e, %s AS n"
    )
    params = (0.1, 0.1, -2.5, float("inf"), -3, b"'\\\x00;", None)
    echo = [Statement(sql, params)]
    echo += [Statement("SELECT %s AS s", (text,)) for text in HOSTILE_TEXTS]
    ledger = [
        Statement("INSERT INTO ledger VALUES (%s, 'credit', 1, 1)", (f"hostile-{i}:{text}",))
        for i, text in enumerate(HOSTILE_TEXTS)
    ]
    with system.client() as client:
        outcome = client.run({"shard1": echo, "shard2": ledger}, wait_for_completion=True)
    assert outcome.committed and outcome.results is not None
    first, *echoed = outcome.results["shard1"]
    assert first.rows == ((0.1, "double precision", -2.5, float("inf"), 8, b"'\\\x00;", None),)
    assert all(isinstance(v, float) for v in first.rows[0][:1]) and floats[0] == 0.1
    assert [r.rows for r in echoed] == [((text,),) for text in HOSTILE_TEXTS]
    with system.connect("shard2") as conn:
        rows = conn.execute(
            "SELECT transfer_id FROM ledger WHERE transfer_id LIKE 'hostile-%%' ORDER BY 1"
        ).fetchall()
    assert [r[0] for r in rows] == sorted(f"hostile-{i}:{t}" for i, t in enumerate(HOSTILE_TEXTS))


def test_a_statement_ending_in_a_line_comment_does_not_swallow_the_next(
    system: LocalSystem,
) -> None:
    """Each statement ends on a line of its own in the branch's query string: a trailing
    `--` comment must not hide what follows (the next statement, the marker, PREPARE)."""
    a, b = account_on(system, "shard1"), account_on(system, "shard2")
    before = balance(system, "shard1", a), balance(system, "shard2", b)
    branches = {
        "shard1": [
            Statement("UPDATE accounts SET balance = balance - 1 WHERE id = %s -- debit", (a,)),
            Statement("UPDATE accounts SET balance = balance + 1 WHERE id = %s -- undo", (a,)),
            Statement("UPDATE accounts SET balance = balance - 1 WHERE id = %s -- again", (a,)),
        ],
        "shard2": [
            Statement(
                "UPDATE accounts SET balance = balance + 1 WHERE id = %s -- credit",
                (b,),
                expect=exactly(1),
            )
        ],
    }
    with system.client() as client:
        outcome = client.run(branches, wait_for_completion=True)
    assert outcome.committed
    assert outcome.results is not None
    assert [r.rows_affected for r in outcome.results["shard1"]] == [1, 1, 1]
    assert (balance(system, "shard1", a), balance(system, "shard2", b)) == (
        before[0] - 1,
        before[1] + 1,
    )


@pytest.mark.parametrize("interactive", [False, True], ids=["one-shot", "interactive"])
def test_standard_conforming_strings_off_does_not_change_what_parameters_mean(
    system: LocalSystem, interactive: bool
) -> None:
    """Branch SQL may turn standard_conforming_strings off for its transaction (a
    function can do it where the policy cannot see). Client-bound parameters must
    still be exactly their values, in the same string or a later Execute: a quote or a
    backslash in one must never end its literal."""
    texts = ("\\'; COMMIT; SELECT '", "a\\b", "''\\''")
    blobs = (b"\\'x", b"\\x41", bytes(range(256)))
    turn_off = Statement("SELECT set_config('standard_conforming_strings', 'off', true)")
    echo = Statement(
        "SELECT %s AS a, %s AS b, %s AS c, %s AS x, %s AS y, %s AS z, "
        "current_setting('standard_conforming_strings') AS scs",
        (*texts, *blobs),
    )
    with system.client() as client:
        if interactive:
            tx = client.begin()
            tx.execute("shard1", turn_off)
            rows = tx.execute("shard1", echo).rows
            tx.execute("shard2", "SELECT 1")
            assert tx.commit().committed
        else:
            outcome = client.run({"shard1": [turn_off, echo]})
            assert outcome.committed and outcome.results is not None
            rows = outcome.results["shard1"][1].rows
    assert rows == ((*texts, *blobs, "off"),)
