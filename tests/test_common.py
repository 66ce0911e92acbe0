"""Identifiers, value conversion and the failpoint grammar."""

from __future__ import annotations

import asyncio
import decimal

import pytest

from twopc_common import failpoints
from twopc_common.errors import InvalidArgument
from twopc_common.ids import FORMAT_ID, TransactionId, branch_xid, check_name
from twopc_common.limits import Limits
from twopc_common.values import (
    Expectation,
    Statement,
    StatementResult,
    result_from_pb,
    result_to_pb,
    statement_to_pb,
    statements_from_pb,
)


def test_transaction_id_round_trips_and_names_its_coordinator() -> None:
    tid = TransactionId("coord-1", 7, 123)
    assert TransactionId.parse(str(tid)) == tid
    for bad in ["", "x", "a.b.c", "a.1", "bad name.1.2", "a.-1.2"]:
        with pytest.raises(InvalidArgument):
            TransactionId.parse(bad)


def test_branch_gid_fits_postgres_and_parses_back() -> None:
    from psycopg import Xid

    longest = str(TransactionId("c" * 24, 2**63 - 1, 2**63 - 1))
    xid = branch_xid(longest, "p" * 32)
    assert len(str(xid)) <= 200
    parsed = Xid.from_string(str(xid))
    assert (parsed.format_id, parsed.gtrid, parsed.bqual) == (FORMAT_ID, longest, "p" * 32)
    with pytest.raises(InvalidArgument):
        check_name("participant", "p" * 33)
    with pytest.raises(InvalidArgument):
        check_name("coordinator", "c" * 25)


def test_statements_round_trip_with_typed_parameters() -> None:
    original = Statement(
        "SELECT %s, %s, %s, %s, %s, %s",
        (None, True, -(2**63), 1.5, "é", decimal.Decimal("0.10")),
        Expectation("at_least", 2),
    )
    (back,) = statements_from_pb([statement_to_pb(original)], Limits(), "b")
    assert back == original


def test_a_decoded_statement_is_passed_on_as_it_came_and_a_changed_one_is_encoded() -> None:
    """A coordinator forwards a client's statements without encoding them again; a
    statement derived with `dataclasses.replace` must not carry the old message."""
    import dataclasses

    sent = statement_to_pb(Statement("UPDATE t SET v = %s", (decimal.Decimal("1e3"),)))
    (decoded,) = statements_from_pb([sent], Limits(), "b")
    assert statement_to_pb(decoded) is sent
    changed = dataclasses.replace(decoded, sql="UPDATE u SET v = %s")
    assert statement_to_pb(changed).sql == "UPDATE u SET v = %s"
    assert statement_to_pb(changed).params[0].decimal_value == "1E+3"


def test_result_round_trip() -> None:
    result = StatementResult(2, ("a", "b"), ((1, b"x"), (None, decimal.Decimal("2.5"))))
    assert result_from_pb(result_to_pb(result)) == result


def test_expectations() -> None:
    assert Expectation("exactly", 1).violation(1) is None
    assert Expectation("exactly", 1).violation(0) == "expected exactly 1 row(s), got 0"
    assert Expectation("at_most", 3).violation(4) is not None
    assert Expectation("at_least", 3).violation(3) is None


def test_failpoint_grammar() -> None:
    points = failpoints.parse("a=crash; b=25%sleep(100) ;c=3*error(boom);d=off")
    assert points["a"].task == "crash" and points["a"].probability == 1.0
    assert points["b"].task == "sleep" and points["b"].probability == 0.25
    assert points["c"].remaining == 3 and points["c"].arg == "boom"
    for bad in ["a", "a=explode", "a=sleep(x)", "=crash"]:
        with pytest.raises(ValueError):
            failpoints.parse(bad)


def test_failpoint_fires_its_count_then_stops() -> None:
    failpoints.configure("t.point=2*error(boom)")
    try:
        for _ in range(2):
            with pytest.raises(failpoints.FailpointError, match="boom"):
                asyncio.run(failpoints.hit("t.point"))
        asyncio.run(failpoints.hit("t.point"))  # the third time passes
    finally:
        failpoints.configure("t.point=off")
    assert "t.point" not in failpoints.active()
