"""What SQL a branch may run, decided by PostgreSQL's own grammar.

A branch runs client SQL inside the agent's open transaction, so that SQL must not end,
prepare or reshape that transaction, change the pooled connection it runs on, or touch
the agent's own schema (the markers that make phase 2 exact). Each statement's text is
parsed with `pglast` (libpg_query: the real PostgreSQL parser, not a tokenizer of
ours) and given one `StatementKind`; a `StatementPolicy` says which kinds may run.

Guarantees:
- a statement is refused (InvalidArgument naming its index and kind) before anything
  runs: the caller checks a whole request before it opens a branch;
- the text classified is the text PostgreSQL will see: with parameters, psycopg's own
  placeholder conversion (`%s` -> `$1`) runs first, exactly as when it executes; the
  number of placeholders must match the parameters;
- one string is one statement (several would break the per-statement results, and a
  `COMMIT` could hide behind a harmless first one);
- some kinds are refused whatever the operator says (`ALWAYS_REFUSED`): they break
  atomicity or the agent's containment of the branch;
- classification is cached per distinct text (parsing costs ~10-70 us, a hit ~0.3 us),
  so the policy costs next to nothing on a workload's repeated statements.

What a parser cannot see (the body of a function, a trigger, `EXECUTE` inside
PL/pgSQL, `dblink`) is contained by the agent instead: branch statements run under a
least-privilege role and every branch starts from settings the agent sets itself.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import psycopg
from pglast import parser as pg_parser
from psycopg import _queries

from twopc_common.errors import InvalidArgument
from twopc_common.values import Statement

AGENT_SCHEMA = "twopc"
"""The schema that holds the agent's own tables (the branch markers)."""
LEGACY_TABLES = ("twopc_branch_marker", "twopc_coordinator_epoch")
"""Where older versions kept the agent's tables (in the database's default schema)."""

CACHE_ENTRIES = 10_000
"""Distinct SQL texts whose classification is cached (one cache per process)."""
# Texts up to this size are cached; longer ones (rare, up to the 64 KiB SQL limit) are
# parsed each time, so a stream of distinct huge texts cannot fill memory.
_CACHEABLE_SQL_CHARS = 8192


class StatementKind(Enum):
    QUERY = "query"
    SET_LOCAL = "set_local"
    SAVEPOINT = "savepoint"
    DDL = "ddl"
    LOCK = "lock"
    CALL = "call"
    DO = "do"
    TRANSACTION_CONTROL = "transaction_control"
    SET_TRANSACTION = "set_transaction"
    SESSION_SET = "session_set"
    SET_ROLE = "set_role"
    AGENT_SETTING = "agent_setting"
    SET_CONFIG = "set_config"
    DISCARD = "discard"
    LISTEN_NOTIFY = "listen_notify"
    LOAD = "load"
    COPY_FILE = "copy_file"
    COPY_STDIO = "copy_stdio"
    PREPARED_STATEMENT = "prepared_statement"
    CURSOR = "cursor"
    NON_TRANSACTIONAL = "non_transactional"
    AGENT_SCHEMA = "agent_schema"
    MULTIPLE = "multiple"
    EMPTY = "empty"
    SYNTAX_ERROR = "syntax_error"
    OTHER = "other"


K = StatementKind

# Why each refused kind is refused: the message a client sees, and what the default
# protects (the README's policy table says the same).
WHY_REFUSED: dict[StatementKind, str] = {
    K.TRANSACTION_CONTROL: "it would end or prepare the branch's transaction behind the "
    "protocol's back (committed work reported aborted, a foreign prepared transaction)",
    K.SET_TRANSACTION: "the branch's isolation is chosen with the transaction "
    "(isolation level of Run or Begin)",
    K.SESSION_SET: "a session setting outlives the branch on the pooled connection and "
    "changes later clients' branches; use SET LOCAL",
    K.SET_ROLE: "it would leave the role branch statements run under",
    K.AGENT_SETTING: "the agent sets this for every branch (lock_timeout breaks "
    "cross-shard deadlocks); ask the operator to change it",
    K.SET_CONFIG: "set_config() with is_local=false or a computed name is a session "
    "setting; use SET LOCAL or set_config(name, value, true)",
    K.DISCARD: "it resets session state the agent relies on",
    K.LISTEN_NOTIFY: "listening is session state; a notification is sent at commit by "
    "whichever connection runs it",
    K.LOAD: "it loads a shared library into the agent's database session",
    K.COPY_FILE: "it reads or writes files or runs programs on the database server",
    K.COPY_STDIO: "the agent does not stream COPY data",
    K.PREPARED_STATEMENT: "prepared statements are session state on a pooled connection",
    K.CURSOR: "the agent returns results, not cursors (a WITH HOLD cursor outlives the branch)",
    K.DO: "anonymous code blocks are refused by default; allow with --allow-statement do",
    K.NON_TRANSACTIONAL: "it cannot run inside a transaction, or acts on the whole cluster",
    K.AGENT_SCHEMA: f"it names the agent's own schema {AGENT_SCHEMA!r} "
    "(the markers that make phase 2 exact)",
    K.MULTIPLE: "one statement per string (each gets its own result and expectation)",
    K.EMPTY: "it contains no statement",
    K.SYNTAX_ERROR: "PostgreSQL's grammar does not accept it",
    K.OTHER: "the agent does not know this kind of statement",
}

DEFAULT_ALLOWED: frozenset[StatementKind] = frozenset(
    {K.QUERY, K.SET_LOCAL, K.SAVEPOINT, K.DDL, K.LOCK, K.CALL}
)
ALWAYS_REFUSED: frozenset[StatementKind] = frozenset(
    {K.TRANSACTION_CONTROL, K.SET_ROLE, K.AGENT_SCHEMA, K.MULTIPLE, K.EMPTY, K.SYNTAX_ERROR}
)

_TRANSACTION_KINDS_ALLOWED = {
    "TRANS_STMT_SAVEPOINT",
    "TRANS_STMT_RELEASE",
    "TRANS_STMT_ROLLBACK_TO",
}
_ROLE_SETTINGS = {"role", "session_authorization"}
# Settings the agent sets at the start of every branch and relies on.
_AGENT_SETTINGS = {
    "lock_timeout",
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "default_transaction_deferrable",
    "session_replication_role",
}
_BY_NODE: dict[str, StatementKind] = {
    **dict.fromkeys(
        [
            "SelectStmt",
            "InsertStmt",
            "UpdateStmt",
            "DeleteStmt",
            "MergeStmt",
            "ExplainStmt",
            "VariableShowStmt",
        ],
        K.QUERY,
    ),
    **dict.fromkeys(
        [
            "CreateStmt",
            "CreateTableAsStmt",
            "AlterTableStmt",
            "DropStmt",
            "TruncateStmt",
            "IndexStmt",
            "ViewStmt",
            "CreateSeqStmt",
            "AlterSeqStmt",
            "CreateFunctionStmt",
            "AlterFunctionStmt",
            "CreateSchemaStmt",
            "RenameStmt",
            "AlterObjectSchemaStmt",
            "AlterOwnerStmt",
            "CommentStmt",
            "GrantStmt",
            "AlterDefaultPrivilegesStmt",
            "CreateDomainStmt",
            "AlterDomainStmt",
            "CompositeTypeStmt",
            "CreateEnumStmt",
            "AlterEnumStmt",
            "CreateRangeStmt",
            "DefineStmt",
            "CreateTrigStmt",
            "CreatePolicyStmt",
            "AlterPolicyStmt",
            "RuleStmt",
            "RefreshMatViewStmt",
            "CreateStatsStmt",
            "AlterStatsStmt",
            "CreateCastStmt",
        ],
        K.DDL,
    ),
    "LockStmt": K.LOCK,
    "CallStmt": K.CALL,
    "DoStmt": K.DO,
    "DiscardStmt": K.DISCARD,
    "ListenStmt": K.LISTEN_NOTIFY,
    "UnlistenStmt": K.LISTEN_NOTIFY,
    "NotifyStmt": K.LISTEN_NOTIFY,
    "LoadStmt": K.LOAD,
    "PrepareStmt": K.PREPARED_STATEMENT,
    "ExecuteStmt": K.PREPARED_STATEMENT,
    "DeallocateStmt": K.PREPARED_STATEMENT,
    "DeclareCursorStmt": K.CURSOR,
    "FetchStmt": K.CURSOR,
    "ClosePortalStmt": K.CURSOR,
    **dict.fromkeys(
        [
            "VacuumStmt",
            "CreatedbStmt",
            "DropdbStmt",
            "AlterDatabaseStmt",
            "AlterDatabaseSetStmt",
            "AlterDatabaseRefreshCollStmt",
            "AlterSystemStmt",
            "CreateTableSpaceStmt",
            "DropTableSpaceStmt",
            "AlterTableSpaceOptionsStmt",
            "CheckPointStmt",
            "ReindexStmt",
            "ClusterStmt",
            "CreateSubscriptionStmt",
            "AlterSubscriptionStmt",
            "DropSubscriptionStmt",
            "CreateRoleStmt",
            "AlterRoleStmt",
            "AlterRoleSetStmt",
            "DropRoleStmt",
            "GrantRoleStmt",
            "ReassignOwnedStmt",
            "DropOwnedStmt",
            "CreateEventTrigStmt",
            "AlterEventTrigStmt",
        ],
        K.NON_TRANSACTIONAL,
    ),
}
_SCHEMA_IN_LITERAL = re.compile(rf'(^|[^A-Za-z0-9_$])"?{AGENT_SCHEMA}"?\s*\.')


@dataclass(frozen=True, slots=True)
class Classified:
    """One SQL text as PostgreSQL's grammar sees it."""

    kind: StatementKind
    detail: str
    """What in the text decided the kind (for messages), e.g. "COMMIT"."""
    placeholders: int = 0
    session_safe: bool = False
    """Whether running it cannot change session state: a query, SET LOCAL, savepoint
    or LOCK calling no function (a trigger still can: see participant.containment)."""
    writes: bool = False
    """Whether it is meant to write: DML, DDL, CALL, DO, or a SELECT with FOR
    UPDATE/SHARE, INTO or a data-modifying WITH. (A function a SELECT calls may write
    too; only an optimisation rests on this: the agent's store writes the marker of a
    branch with a writing statement first, in one statement with its settings.)"""


def parse_kinds(names: Iterable[str]) -> set[StatementKind]:
    kinds = set()
    for name in names:
        try:
            kinds.add(StatementKind(name))
        except ValueError:
            known = ", ".join(k.value for k in StatementKind)
            raise InvalidArgument(f"unknown statement kind {name!r}; known: {known}") from None
    return kinds


def policy_kinds(allow: Iterable[str] = (), refuse: Iterable[str] = ()) -> frozenset[StatementKind]:
    """The default policy widened by `allow` and narrowed by `refuse` (operator flags)."""
    widened = parse_kinds(allow)
    if forbidden := widened & ALWAYS_REFUSED:
        names = ", ".join(sorted(k.value for k in forbidden))
        raise InvalidArgument(f"statement kinds {names} can never be allowed in a branch")
    return frozenset((DEFAULT_ALLOWED | widened) - parse_kinds(refuse))


def classified(st: Statement) -> Classified:
    """`classify`, cached per distinct text."""
    if len(st.sql) <= _CACHEABLE_SQL_CHARS:
        return _cached_classify(st.sql, bool(st.params))
    return classify(st.sql, bool(st.params))


def session_safe(statements: Sequence[Statement]) -> bool:
    return all(classified(st).session_safe for st in statements)


def writes(statements: Sequence[Statement]) -> bool:
    return any(classified(st).writes for st in statements)


class StatementPolicy:
    """Checks requests against a set of allowed kinds."""

    def __init__(self, allowed: frozenset[StatementKind]) -> None:
        self.allowed = allowed - ALWAYS_REFUSED

    def check(self, statements: Sequence[Statement], where: str) -> None:
        """InvalidArgument for the first statement the policy refuses."""
        for i, st in enumerate(statements, 1):
            found = classified(st)
            if found.kind not in self.allowed:
                raise InvalidArgument(
                    f"{where} statement {i}: {found.kind.value} ({found.detail}) is not "
                    f"allowed in a branch: {WHY_REFUSED.get(found.kind, 'refused by policy')}"
                )
            if found.placeholders != len(st.params):
                raise InvalidArgument(
                    f"{where} statement {i}: {found.placeholders} placeholder(s) for "
                    f"{len(st.params)} parameter(s)"
                )


def classify(sql: str, with_params: bool) -> Classified:
    """The kind of one SQL text; `with_params` says whether psycopg will convert its
    placeholders (it does so only when parameters are given). Pure and uncached."""
    text, placeholders = sql, 0
    if with_params:
        try:
            converted, formats, names, _ = _queries._query2pg(sql.encode(), "utf-8")
        except psycopg.ProgrammingError as exc:
            return Classified(K.SYNTAX_ERROR, f"bad placeholder: {exc}")
        if names is not None:
            return Classified(K.SYNTAX_ERROR, "named placeholders %(name)s; use %s")
        text, placeholders = converted.decode(), len(formats)
    try:
        tree = json.loads(pg_parser.parse_sql_json(text))
    except pg_parser.ParseError as exc:
        # PostgreSQL would refuse it too; say so now, with the parser's own words.
        return Classified(K.SYNTAX_ERROR, str(exc), placeholders)
    stmts = tree.get("stmts", [])
    if not stmts:
        return Classified(K.EMPTY, "no statement", placeholders)
    if len(stmts) > 1:
        return Classified(K.MULTIPLE, f"{len(stmts)} statements", placeholders)
    ((node_name, node),) = stmts[0]["stmt"].items()
    if _names_agent_schema(node):
        return Classified(K.AGENT_SCHEMA, AGENT_SCHEMA, placeholders)
    kind, detail = _kind_of(node_name, node)
    calls_functions = any(True for _ in _nodes(node, "FuncCall"))
    if calls_functions and (call := _refused_set_config(node)):
        kind, detail = call
    safe = kind in _SESSION_SAFE and not calls_functions
    reads = node_name in ("SelectStmt", "VariableShowStmt") and not _mentions(node, _WRITING_NODES)
    return Classified(kind, detail, placeholders, safe, kind in _WRITING_KINDS and not reads)


_SESSION_SAFE = {K.QUERY, K.SET_LOCAL, K.SAVEPOINT, K.LOCK}
_WRITING_KINDS = {K.QUERY, K.DDL, K.CALL, K.DO}
# In a SELECT, what writes or locks rows: a data-modifying WITH, FOR UPDATE/SHARE, or
# SELECT INTO (which creates a table).
_WRITING_NODES = frozenset(
    {"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "lockingClause", "intoClause"}
)


_cached_classify = functools.lru_cache(maxsize=CACHE_ENTRIES)(classify)


def _kind_of(name: str, node: dict[str, Any]) -> tuple[StatementKind, str]:
    if name == "TransactionStmt":
        what = node["kind"].removeprefix("TRANS_STMT_")
        if node["kind"] in _TRANSACTION_KINDS_ALLOWED:
            return K.SAVEPOINT, what
        what = what.replace("_", " ")
        return K.TRANSACTION_CONTROL, "PREPARE TRANSACTION" if what == "PREPARE" else what
    if name == "VariableSetStmt":
        return _kind_of_set(node)
    if name == "CopyStmt":
        if "filename" in node or node.get("is_program"):
            return K.COPY_FILE, "COPY PROGRAM" if node.get("is_program") else "COPY file"
        return K.COPY_STDIO, "COPY STDIN/STDOUT"
    return _BY_NODE.get(name, K.OTHER), _words(name.removesuffix("Stmt"))


def _words(node_name: str) -> str:
    """ "CreateTableAs" -> "CREATE TABLE AS": the statement as a reader knows it."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", node_name).upper()


def _kind_of_set(node: dict[str, Any]) -> tuple[StatementKind, str]:
    kind = node["kind"]
    setting = str(node.get("name", "")).lower()
    local = bool(node.get("is_local"))
    if kind == "VAR_SET_MULTI":
        if setting == "transaction":
            return K.SET_TRANSACTION, "SET TRANSACTION"
        return K.SESSION_SET, f"SET {setting.upper()}"
    if kind == "VAR_RESET_ALL":
        return K.SESSION_SET, "RESET ALL"
    verb = "RESET" if kind == "VAR_RESET" else ("SET LOCAL" if local else "SET")
    detail = f"{verb} {setting}"
    if setting in _ROLE_SETTINGS:
        return K.SET_ROLE, detail
    if setting in _AGENT_SETTINGS:
        return K.AGENT_SETTING, detail
    if kind == "VAR_RESET" or not local:
        return K.SESSION_SET, detail
    return K.SET_LOCAL, detail


def _refused_set_config(node: Any) -> tuple[StatementKind, str] | None:
    """A direct set_config() call that is not the function form of an allowed SET
    LOCAL (constant name, is_local true)."""
    for call in _nodes(node, "FuncCall"):
        names = [n["String"]["sval"] for n in call.get("funcname", []) if "String" in n]
        if names[-1:] != ["set_config"] or names[:-1] not in ([], ["pg_catalog"]):
            continue
        args = call.get("args", [])
        setting = _const(args[0], "sval") if args else None
        is_local = _const(args[2], "boolval") if len(args) == 3 else None
        if not isinstance(setting, str) or is_local is not True:
            return K.SET_CONFIG, "set_config(..., false)"
        setting = setting.lower()
        if setting in _ROLE_SETTINGS:
            return K.SET_ROLE, f"set_config({setting!r})"
        if setting in _AGENT_SETTINGS:
            return K.AGENT_SETTING, f"set_config({setting!r})"
    return None


def _const(node: dict[str, Any], field: str) -> object:
    value = node.get("A_Const", {}).get(field)
    if not isinstance(value, dict):
        return None
    return value.get(field, False if field == "boolval" else None)


def _mentions(tree: Any, names: frozenset[str]) -> bool:
    if isinstance(tree, dict):
        return any(key in names or _mentions(value, names) for key, value in tree.items())
    if isinstance(tree, list):
        return any(_mentions(item, names) for item in tree)
    return False


def _nodes(tree: Any, name: str) -> Iterator[dict[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == name and isinstance(value, dict):
                yield value
            yield from _nodes(value, name)
    elif isinstance(tree, list):
        for item in tree:
            yield from _nodes(item, name)


def _names_agent_schema(tree: Any) -> bool:
    """Whether any identifier (or a literal that reads like a qualified name, as in
    'twopc.x'::regclass) names the agent's schema or one of its legacy tables."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "A_Const" and isinstance(value, dict):
                literal = value.get("sval", {}).get("sval") if "sval" in value else None
                if isinstance(literal, str) and (
                    _SCHEMA_IN_LITERAL.search(literal) or any(t in literal for t in LEGACY_TABLES)
                ):
                    return True
                continue
            if isinstance(value, str):
                if value == AGENT_SCHEMA or value in LEGACY_TABLES:
                    return True
            elif _names_agent_schema(value):
                return True
    elif isinstance(tree, list):
        return any(_names_agent_schema(item) for item in tree)
    return False
