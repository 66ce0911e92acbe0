"""A branch's round trip to PostgreSQL: BEGIN, its settings, its statements, the marker
and PREPARE sent as one query string (the simple query protocol), and its results
read back one by one.

Why one string: psycopg's pipeline mode costs Python work per statement (a cursor, a
send, a wait on the socket each), which was a third of the agent's CPU; one string is
one send and one wait, whatever the number of statements (README "Performance").

Guarantees:
- the parameters are bound on the client by psycopg (`ClientCursor.mogrify`: the
  connection's own quoting, the same adapters), so a value can only ever be a literal,
  quoted for the session's standard_conforming_strings (PostgreSQL reports it to
  libpq; PostgreSQL parses a whole string before it runs any of it, so a statement
  that changes it cannot change how the rest of its string reads); a float keeps its
  type (`'1.5'::float8`, as server-side binding sends it, not the numeric `1.5`);
- every text joined here is one whole statement: the statement policy (PostgreSQL's
  own parser) refuses several statements in one string, an empty one and anything
  that does not parse (an unterminated quote or comment), and the separator starts on
  a line of its own, so a trailing `--` comment cannot swallow it;
- PostgreSQL stops at the first error in the string, so a failing statement leaves
  nothing after it run: no marker, no PREPARE.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from psycopg import IsolationLevel
from psycopg.types.numeric import FloatDumper

from participant.schema import AsyncConn, Cursor
from twopc_common.values import RESULT_OVERHEAD_BYTES, Statement, StatementResult, row_bytes

Part = tuple[str, tuple[object, ...] | None]

_SEPARATOR = "\n;\n"
_ROWS_PER_CHUNK = 1000
_BEGIN = {
    level: f"BEGIN ISOLATION LEVEL {level.name.replace('_', ' ')}" for level in IsolationLevel
}


class _TypedFloat(FloatDumper):
    """A float as a quoted literal, so psycopg adds its type (`'1.5'::float8`)."""

    def quote(self, obj: float) -> bytes:
        return b"'" + bytes(self.dump(obj) or b"") + b"'"


async def configure(conn: AsyncConn) -> None:
    """Adapters of every branch connection (the pool's `configure`)."""
    conn.adapters.register_dumper(float, _TypedFloat)


def begin(conn: AsyncConn) -> Part:
    """The BEGIN that opens a branch's transaction, at the level `connect_branch` set
    (the connections are autocommit: psycopg would send its own BEGIN as a separate
    round trip)."""
    return (_BEGIN[conn.isolation_level or IsolationLevel.READ_COMMITTED], None)


async def send(conn: AsyncConn, parts: Sequence[Part]) -> Cursor:
    """Run `parts` as one query string; the cursor is on the first result. One
    template (psycopg caches its parsing) and one list of parameters, bound at once; a
    part without parameters keeps its `%` signs (they are doubled for the template)."""
    texts: list[str] = []
    params: list[object] = []
    for query, args in parts:
        if args is None:
            texts.append(query.replace("%", "%%"))
        else:
            texts.append(query)
            params.extend(args)
    cur = psycopg.AsyncClientCursor(conn)
    await cur.execute(_SEPARATOR.join(texts), params)
    return cur


class Results:
    """The statements' results of a sent batch, then what its tail parts answered."""

    def __init__(self, cur: Cursor, head: int) -> None:
        self._cur = cur
        self._at = 0  # the part whose result the cursor is on
        self._missing = False  # a part had no result: none after it is read
        self._head = head
        self.statements: list[StatementResult] = []
        self.broken: str | None = None  # the first broken expectation or limit
        self.tails: list[tuple[str | None, int]] = []  # (command tag, rows) each

    def _goto(self, part: int) -> bool:
        """Move to `part`'s result; False if there is none. One missing means the
        string did not split into the parts sent: nothing after it may be trusted, and
        a tail (PREPARE) reads as not having run."""
        while not self._missing and self._at < part:
            if not self._cur.nextset():
                self.broken = self.broken or "the database answered fewer results than sent"
                self._missing = True
            self._at += 1
        return not self._missing

    async def read(self, statements: Sequence[Statement], max_bytes: int, tail: int) -> Results:
        """Read the statements' results, counted as they are read: results larger than
        `max_bytes` (`Limits.max_result_bytes`) break the branch, because its answer
        could not be delivered. Then the tags of the `tail` parts after them."""
        size = 0
        for i, st in enumerate(statements, 1):
            if self._goto(self._head + i - 1) and self.broken is None:
                size, self.broken = await self._one(i, st, size, max_bytes)
        if self.broken is None and size > max_bytes:
            self.broken = f"results larger than {max_bytes} bytes (the max_result_bytes limit)"
        for k in range(tail):
            there = self._goto(self._head + len(statements) + k)
            self.tails.append((self._cur.statusmessage, self._cur.rowcount) if there else (None, 0))
        return self

    async def _one(
        self, i: int, st: Statement, size: int, max_bytes: int
    ) -> tuple[int, str | None]:
        cur = self._cur
        if st.expect is not None and (why := st.expect.violation(cur.rowcount)):
            return size, f"statement {i}: {why}"
        if cur.description is None:
            self.statements.append(StatementResult(cur.rowcount))
            return size + RESULT_OVERHEAD_BYTES, None
        columns = tuple(c.name for c in cur.description)
        size += RESULT_OVERHEAD_BYTES + sum(len(c) + 2 for c in columns)
        rows: list[tuple[object, ...]] = []
        while chunk := await cur.fetchmany(_ROWS_PER_CHUNK):
            size += sum(row_bytes(row) for row in chunk)
            if size > max_bytes:
                return size, (
                    f"statement {i}: results larger than {max_bytes} bytes (the "
                    "max_result_bytes limit): the answer could not be delivered"
                )
            rows.extend(chunk)
        self.statements.append(StatementResult(cur.rowcount, columns, tuple(rows)))
        return size, None
