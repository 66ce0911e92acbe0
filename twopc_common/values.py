"""Statements and results as frozen domain objects, and their protobuf conversion.

Protobuf types stop at the servicers and the client library: everything else works
with `Statement` and `StatementResult`. Parameters travel typed and are bound by
PostgreSQL, never interpolated into SQL text.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

from twopc_common.errors import InvalidArgument
from twopc_common.limits import Limits
from twopc_pb import types_pb2 as pb

SqlValue = None | bool | int | float | str | bytes | decimal.Decimal
ExpectOp = Literal["exactly", "at_least", "at_most"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True, slots=True)
class Expectation:
    op: ExpectOp
    count: int

    def violation(self, rows_affected: int) -> str | None:
        """Why `rows_affected` breaks this rule, or None when it holds."""
        ok = {
            "exactly": rows_affected == self.count,
            "at_least": rows_affected >= self.count,
            "at_most": rows_affected <= self.count,
        }[self.op]
        if ok:
            return None
        return f"expected {self.op.replace('_', ' ')} {self.count} row(s), got {rows_affected}"


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: tuple[SqlValue, ...] = ()
    expect: Expectation | None = None
    wire: object = field(default=None, init=False, compare=False, repr=False)
    """The protobuf message it was decoded from (`statements_from_pb`), opaque to
    everything but `statement_to_pb`, which passes it on as it came: a coordinator
    forwards a client's statements to the agents without encoding them again. Not an
    init field, so `dataclasses.replace` never carries it to a changed statement."""


@dataclass(frozen=True, slots=True)
class StatementResult:
    rows_affected: int
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[object, ...], ...] = ()


def exactly(n: int) -> Expectation:
    return Expectation("exactly", n)


# -- protobuf -> domain -------------------------------------------------------------


_PLAIN_KINDS = frozenset({"bool_value", "int_value", "float_value", "bytes_value"})
"""Parameter kinds whose value needs no check: protobuf has already typed them."""


def _param_from_pb(value: pb.Value, where: str, number: int) -> SqlValue:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"{where} parameter {number} has no value; set is_null for SQL NULL")
    if kind == "is_null":
        return None
    if kind == "decimal_value":
        try:
            decimal_value = decimal.Decimal(value.decimal_value)
        except decimal.InvalidOperation:
            raise InvalidArgument(
                f"{where} parameter {number}: {value.decimal_value!r} is not a decimal"
            ) from None
        if not decimal_value.is_finite():
            raise InvalidArgument(f"{where} parameter {number}: decimal must be finite")
        return decimal_value
    if kind == "other_value":
        raise InvalidArgument(
            f"{where} parameter {number}: other_value is for results only; send a typed value"
        )
    result: SqlValue = getattr(value, kind)
    if kind == "text_value" and "\x00" in value.text_value:
        raise InvalidArgument(
            f"{where} parameter {number}: text contains a NUL character, which "
            "PostgreSQL text cannot hold; send bytes_value"
        )
    return result


def statements_from_pb(
    statements: Sequence[pb.Statement], limits: Limits, where: str
) -> tuple[Statement, ...]:
    """Validate and convert; `where` names the branch in error messages (formatted
    only on error: this runs for every statement of every branch)."""
    if len(statements) > limits.max_statements_per_branch:
        raise InvalidArgument(
            f"{where}: {len(statements)} statements, the limit is "
            f"{limits.max_statements_per_branch} per branch"
        )
    out = []
    for i, st in enumerate(statements, 1):
        sql = st.sql
        if not sql.strip():
            raise InvalidArgument(f"{where} statement {i}: empty SQL")
        if "\x00" in sql:
            # libpq sends SQL as a C string: everything after a NUL would vanish.
            raise InvalidArgument(f"{where} statement {i}: SQL contains a NUL character")
        # At most 4 bytes per character: short text needs no encoding to be measured.
        if len(sql) * 4 > limits.max_sql_bytes and len(sql.encode()) > limits.max_sql_bytes:
            raise InvalidArgument(
                f"{where} statement {i}: SQL longer than {limits.max_sql_bytes} bytes"
            )
        if len(st.params) > limits.max_params_per_statement:
            raise InvalidArgument(
                f"{where} statement {i}: {len(st.params)} parameters, the limit is "
                f"{limits.max_params_per_statement}"
            )
        params = tuple(_param(p, where, i, j) for j, p in enumerate(st.params, 1))
        expect = None
        if st.HasField("expect"):
            rule = st.expect.WhichOneof("rule")
            if rule is None:
                raise InvalidArgument(f"{where} statement {i}: expectation has no rule")
            expect = Expectation(rule, getattr(st.expect, rule))
        decoded = Statement(sql, params, expect)
        object.__setattr__(decoded, "wire", st)  # frozen: set once, here
        out.append(decoded)
    return tuple(out)


def _param(value: pb.Value, where: str, statement: int, number: int) -> SqlValue:
    """One parameter; the label of an error is formatted only if there is one."""
    kind = value.WhichOneof("kind")
    if kind in _PLAIN_KINDS:
        result: SqlValue = getattr(value, kind)
        return result
    if kind == "text_value" and "\x00" not in value.text_value:
        return value.text_value
    return _param_from_pb(value, f"{where} statement {statement}", number)


# -- sizes --------------------------------------------------------------------------

RESULT_OVERHEAD_BYTES = 16
"""Upper bound of a StatementResult's encoding without its columns and rows."""


def value_bytes(value: object) -> int:
    """An upper bound of `value_to_pb(value)`'s encoded size, cheap for the common
    types (the bound of results is checked against it, with room to spare)."""
    if isinstance(value, str):
        return len(value.encode()) + 8
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value) + 8
    if value is None or isinstance(value, bool | int | float):
        return 12
    if isinstance(value, dict | list):
        return len(json.dumps(value, default=str)) + 8
    return len(str(value)) + 8


def row_bytes(row: Sequence[object]) -> int:
    return 8 + sum(value_bytes(v) for v in row)


def result_bytes(result: StatementResult) -> int:
    return (
        RESULT_OVERHEAD_BYTES
        + sum(len(c) + 2 for c in result.columns)
        + sum(row_bytes(r) for r in result.rows)
    )


# -- domain -> protobuf -------------------------------------------------------------


def value_to_pb(value: object) -> pb.Value:
    """Any value psycopg loads; types without a field come back as text."""
    if value is None:
        return pb.Value(is_null=True)
    if isinstance(value, bool):
        return pb.Value(bool_value=value)
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            return pb.Value(int_value=value)
        return pb.Value(decimal_value=str(value))
    if isinstance(value, float):
        return pb.Value(float_value=value)
    if isinstance(value, decimal.Decimal):
        return pb.Value(decimal_value=str(value))
    if isinstance(value, str):
        return pb.Value(text_value=value)
    if isinstance(value, bytes | bytearray | memoryview):
        return pb.Value(bytes_value=bytes(value))
    if isinstance(value, dt.date | dt.time | dt.datetime):
        return pb.Value(other_value=value.isoformat())
    if isinstance(value, dict | list):
        return pb.Value(other_value=json.dumps(value, default=str))
    if isinstance(value, uuid.UUID | dt.timedelta):
        return pb.Value(other_value=str(value))
    return pb.Value(other_value=str(value))


def param_to_pb(value: SqlValue) -> pb.Value:
    """Client side: refuse what the server could not bind, before sending."""
    if value is not None and not isinstance(
        value, bool | int | float | str | bytes | decimal.Decimal
    ):
        raise InvalidArgument(f"unsupported parameter type {type(value).__name__}")
    return value_to_pb(value)


def statement_to_pb(st: Statement) -> pb.Statement:
    if st.wire is not None:  # validated as it came in, and unchanged since
        return cast(pb.Statement, st.wire)
    msg = pb.Statement(sql=st.sql, params=[param_to_pb(p) for p in st.params])
    if st.expect is not None:
        setattr(msg.expect, st.expect.op, st.expect.count)
    return msg


def result_to_pb(result: StatementResult) -> pb.StatementResult:
    return pb.StatementResult(
        rows_affected=result.rows_affected,
        columns=result.columns,
        rows=[pb.Row(values=[value_to_pb(v) for v in row]) for row in result.rows],
    )


def value_from_pb(value: pb.Value) -> object:
    kind = value.WhichOneof("kind")
    if kind is None or kind == "is_null":
        return None
    if kind == "decimal_value":
        return decimal.Decimal(value.decimal_value)
    return getattr(value, kind)


def result_from_pb(result: pb.StatementResult) -> StatementResult:
    return StatementResult(
        rows_affected=result.rows_affected,
        columns=tuple(result.columns),
        rows=tuple(tuple(value_from_pb(v) for v in row.values) for row in result.rows),
    )


def results_to_pb(results: Iterable[StatementResult]) -> list[pb.StatementResult]:
    return [result_to_pb(r) for r in results]
