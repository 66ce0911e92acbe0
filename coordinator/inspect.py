"""`twopc-coordinator inspect`: the operator's view of unfinished transactions.

It reads the decision log directly (a SQLite log opened read-only, with sqlite-utils;
safe while the coordinator runs, the log is in WAL mode; a PostgreSQL log in a
read-only session, `coordinator.pg_inspect`), and when given addresses, asks the live
coordinator for its in-flight transactions and every participant for this
coordinator's prepared (in-doubt) branches, with their age. Read-only: it decides
nothing, and it never creates a file. Exit status 1 if a source it was given could not
be reached (the report says which), 2 for a usage error or a log it cannot read.
With participants, it also lists the operators' heuristic decisions on this
coordinator's branches (`twopc-participant resolve`), each judged against the log: a
contradiction is a heuristic hazard.

Agents answer ListPrepared and ListHeuristic only to their coordinators (and
ListHeuristic to admins), so against a secure deployment inspect runs where the
coordinator runs, with the coordinator's own certificate
(`--tls-cert/--tls-key/--tls-ca`), which also lets it see every live transaction.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import sqlite_utils

from coordinator.heuristics import is_hazard
from coordinator.pg_inspect import PgLogUnreadable, PgLogView
from coordinator.pg_log import is_postgres_log
from coordinator.protocol import TxState, reported, reported_without_record
from coordinator.wire import status_from_pb
from twopc_common.auth import add_token_flag, read_token_file
from twopc_common.cli import HelpFormatter, add_version_flag, named_addresses
from twopc_common.dsn import refuse_password
from twopc_common.errors import TwoPCError
from twopc_common.ids import TransactionId
from twopc_common.tls import TlsConfig, add_tls_flags, channel, client_tls
from twopc_pb import coordinator_pb2 as cpb
from twopc_pb import coordinator_pb2_grpc as cgrpc
from twopc_pb import participant_pb2 as ppb
from twopc_pb import participant_pb2_grpc as pgrpc

PROG = "twopc-coordinator inspect"


class LogUnreadable(Exception):
    """The --log path is missing or not a decision log."""


def _open_read_only(path: str) -> sqlite_utils.Database:
    if not os.path.exists(path):
        folder = os.path.dirname(os.path.abspath(path))
        where = "" if os.path.isdir(folder) else f" (folder {folder} does not exist either)"
        raise LogUnreadable(f"no decision log at {path}{where}: pass the coordinator's --log PATH")
    try:
        conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise LogUnreadable(f"cannot read {path} as SQLite: {exc}") from None
    return sqlite_utils.Database(conn)


def _from_log(path: str) -> dict[str, Any]:
    db = _open_read_only(path)
    try:
        return _read_log(db, path)
    finally:
        db.conn.close()


def _read_log(db: sqlite_utils.Database, path: str) -> dict[str, Any]:
    if "transactions" not in db.table_names() or "meta" not in db.table_names():
        raise LogUnreadable(f"{path} is not a decision log (no transactions and meta tables)")
    meta = {row["key"]: row["value"] for row in db["meta"].rows}
    now = time.time()
    counts = {
        row["state"]: row["n"]
        for row in db.query("SELECT state, count(*) AS n FROM transactions GROUP BY state")
    }
    committing = [
        {
            "transaction_id": row["id"],
            "state": row["state"],
            "participants": json.loads(row["participants"]),
            "age_seconds": round(now - row["created_at"], 1),
        }
        for row in db.query(
            "SELECT * FROM transactions WHERE state = 'committing' ORDER BY created_at"
        )
    ]
    return {
        "coordinator_id": meta.get("coordinator_id"),
        "epoch": int(meta["epoch"]) if meta.get("epoch") is not None else None,
        "log_counts": counts,
        "committing_in_log": committing,
    }


def _from_coordinator(
    address: str, coordinator_id: str, tls: TlsConfig, token: str | None
) -> list[dict[str, Any]]:
    with channel(address, tls, server_name=coordinator_id, token=token) as ch:
        reply = cgrpc.CoordinatorStub(ch).ListTransactions(cpb.ListTransactionsRequest(), timeout=5)
    return [
        {
            "transaction_id": t.transaction_id,
            "state": t.state,
            "participants": list(t.participants),
            "age_seconds": round(t.age_seconds, 1),
            "pending_acks": list(t.pending_acks),
        }
        for t in map(status_from_pb, reply.transactions)
    ]


def _from_participants(
    coordinator_id: str, participants: dict[str, str], tls: TlsConfig
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, address in participants.items():
        try:
            with channel(address, tls, server_name=name) as ch:
                reply = pgrpc.ParticipantStub(ch).ListPrepared(
                    ppb.ListPreparedRequest(coordinator_id=coordinator_id), timeout=5
                )
        except grpc.RpcError as exc:
            out[name] = _unreachable(exc, address)
            continue
        out[name] = [
            {"transaction_id": b.transaction_id, "age_seconds": round(b.age_seconds, 1)}
            for b in reply.branches
        ]
    return out


def _logged_outcome(db: sqlite_utils.Database, transaction_id: str) -> str:
    """The log's answer for a transaction, as GetTransaction would give it after
    recovery (`coordinator.protocol.Reported`)."""
    rows = list(db.query("SELECT state FROM transactions WHERE id = ?", [transaction_id]))
    if rows:
        state = rows[0]["state"]
        return reported(TxState(state)).value if state != "one_phase" else "in_progress"
    epoch = TransactionId.parse(transaction_id).epoch
    started = (
        [
            r["started_at"]
            for r in db.query("SELECT started_at FROM epochs WHERE epoch = ?", [epoch])
        ]
        if "epochs" in db.table_names()
        else []
    )
    meta = {row["key"]: row["value"] for row in db["meta"].rows}
    pruned = float(meta["pruned_before"]) if "pruned_before" in meta else None
    return reported_without_record(started[0] if started else None, pruned).value


def _heuristic(
    outcome: Callable[[str], str],
    coordinator_id: str,
    participants: dict[str, str],
    tls: TlsConfig,
) -> dict[str, Any]:
    """Every agent's heuristic decisions on this coordinator's branches, each judged
    against the log's `outcome` (a contradiction is a heuristic hazard)."""
    out: dict[str, Any] = {}
    for name, address in participants.items():
        try:
            with channel(address, tls, server_name=name) as ch:
                reply = pgrpc.ParticipantStub(ch).ListHeuristic(
                    ppb.ListHeuristicRequest(coordinator_id=coordinator_id), timeout=5
                )
        except grpc.RpcError as exc:
            out[name] = {"error": f"{exc.code().name}: {exc.details()}"}
            continue
        decisions = []
        for d in reply.decisions:
            logged = outcome(d.transaction_id)
            decisions.append(
                {
                    "transaction_id": d.transaction_id,
                    "decision": "commit" if d.commit else "abort",
                    "operator": d.operator,
                    "reason": d.reason,
                    "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d.decided_at)),
                    "coordinator_check": d.coordinator_check,
                    "logged": logged,
                    "hazard": is_hazard(d.commit, logged),
                }
            )
        out[name] = decisions
    return out


def _unreachable(exc: grpc.RpcError, address: str) -> dict[str, Any]:
    return {"error": f"{exc.code().name} at {address}: {exc.details()}"}


def _render(report: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(report["log_counts"].items()))
    lines = [
        f"coordinator {report['coordinator_id']}, epoch {report['epoch']}; "
        f"log holds {counts or 'no transactions'}",
        f"commits awaiting phase 2 (log): {len(report['committing_in_log'])}",
    ]
    if "active_address" in report:  # a PostgreSQL log: its lease names the active one
        lines.insert(1, f"active process (lease): {report['active_address'] or 'none yet'}")
    lines += [
        f"  {t['transaction_id']:<32} age {t['age_seconds']:>8}s  {','.join(t['participants'])}"
        for t in report["committing_in_log"]
    ]
    if "in_flight" in report:
        flights = report["in_flight"]
        if isinstance(flights, dict):
            lines.append(f"in flight (coordinator): unreachable ({flights['error']})")
        else:
            lines.append(f"in flight (coordinator): {len(flights)}")
            lines += [
                f"  {t['transaction_id']:<32} {t['state']:<10} age {t['age_seconds']:>8}s  "
                f"{','.join(t['participants'])}  pending {','.join(t['pending_acks']) or '-'}"
                for t in flights
            ]
    for name, branches in report.get("in_doubt", {}).items():
        if isinstance(branches, dict):
            lines.append(f"in doubt on {name}: unreachable ({branches['error']})")
            continue
        lines.append(f"in doubt on {name}: {len(branches)}")
        lines += [
            f"  {b['transaction_id']:<32} prepared {b['age_seconds']:>8}s ago" for b in branches
        ]
    for name, decisions in report.get("heuristic", {}).items():
        if isinstance(decisions, dict):
            lines.append(f"heuristic decisions on {name}: unreachable ({decisions['error']})")
            continue
        hazards = sum(d["hazard"] for d in decisions)
        lines.append(f"heuristic decisions on {name}: {len(decisions)} ({hazards} HAZARD)")
        lines += [
            f"  {d['transaction_id']:<32} {d['decision']:<6} "
            f"{'HAZARD' if d['hazard'] else 'ok':<6} log: {d['logged']:<10} "
            f"by {d['operator']} at {d['decided_at']}: {d['reason']}"
            for d in decisions
        ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--log",
        required=True,
        metavar="PATH|URL",
        help="the decision log (read-only): a SQLite file, or a PostgreSQL one as "
        "postgresql://... without a password (PGPASSFILE), with --id",
    )
    p.add_argument(
        "--id", metavar="NAME", help="the coordinator id (a PostgreSQL log holds several)"
    )
    p.add_argument("--coordinator", metavar="HOST:PORT", help="the live coordinator")
    p.add_argument(
        "--participant",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="a participant to ask for in-doubt branches (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_tls_flags(p, daemon=False)
    add_token_flag(p)
    add_version_flag(p)
    return p


def main(argv: list[str]) -> None:
    p = parser()
    a = p.parse_args(argv)
    try:
        participants = named_addresses(a.participant, "--participant")
        tls = client_tls(a)
        token = read_token_file(a.token_file)
        if token is not None and tls.insecure:
            raise TwoPCError("--token-file needs --tls-ca: a token is only sent over TLS")
    except (argparse.ArgumentTypeError, TwoPCError) as exc:
        p.error(str(exc))
    outcome: Callable[[str], str]
    try:
        if is_postgres_log(a.log):
            if not a.id:
                p.error("a PostgreSQL --log needs the coordinator's --id")
            refuse_password(a.log, "--log", "put the password in PGPASSFILE")
            view = PgLogView(a.log, a.id)
            report, outcome = view.report(), view.outcome
        else:
            report = _from_log(a.log)
            db = _open_read_only(a.log)
            outcome = functools.partial(_logged_outcome, db)
    except (LogUnreadable, PgLogUnreadable, TwoPCError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        sys.exit(2)
    if a.coordinator:
        try:
            report["in_flight"] = _from_coordinator(
                a.coordinator, report["coordinator_id"] or "", tls, token
            )
        except grpc.RpcError as exc:
            report["in_flight"] = _unreachable(exc, a.coordinator)
    if participants:
        report["in_doubt"] = _from_participants(report["coordinator_id"] or "", participants, tls)
        report["heuristic"] = _heuristic(outcome, report["coordinator_id"] or "", participants, tls)
    if a.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(_render(report))
    failed = [
        source
        for source, value in [("coordinator", report.get("in_flight"))]
        + [(f"participant {n}", v) for n, v in report.get("in_doubt", {}).items()]
        if isinstance(value, dict)
    ]
    if failed:
        print(f"{PROG}: could not reach {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
