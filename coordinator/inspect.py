"""`twopc-coordinator inspect`: the operator's view of unfinished transactions.

It reads the decision log directly (with sqlite-utils; safe while the coordinator runs,
the log is in WAL mode), and when given addresses, asks the live coordinator for its
in-flight transactions and every participant for this coordinator's prepared
(in-doubt) branches, with their age, and for the operators' heuristic decisions on
them (`twopc-participant resolve`), each judged against the log: a contradiction is
a heuristic hazard. Read-only: it decides nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import grpc
import sqlite_utils

from coordinator.heuristics import is_hazard
from coordinator.protocol import TxState, reported, reported_without_record
from twopc_common.cli import named_addresses
from twopc_common.ids import TransactionId
from twopc_pb import coordinator_pb2 as cpb
from twopc_pb import coordinator_pb2_grpc as cgrpc
from twopc_pb import participant_pb2 as ppb
from twopc_pb import participant_pb2_grpc as pgrpc


def _from_log(path: str) -> dict[str, Any]:
    db = sqlite_utils.Database(path)
    if "transactions" not in db.table_names():
        raise SystemExit(f"inspect: {path} is not a decision log")
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
        "epoch": meta.get("epoch"),
        "log_counts": counts,
        "committing_in_log": committing,
    }


def _from_coordinator(address: str) -> list[dict[str, Any]]:
    with grpc.insecure_channel(address) as channel:
        reply = cgrpc.CoordinatorStub(channel).ListTransactions(
            cpb.ListTransactionsRequest(), timeout=5
        )
    return [
        {
            "transaction_id": t.transaction_id,
            "state": cpb.TransactionState.Name(t.state).removeprefix("STATE_").lower(),
            "participants": list(t.participants),
            "age_seconds": round(t.age_seconds, 1),
            "pending_acks": list(t.pending_acks),
        }
        for t in reply.transactions
    ]


def _from_participants(coordinator_id: str, participants: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, address in participants.items():
        try:
            with grpc.insecure_channel(address) as channel:
                reply = pgrpc.ParticipantStub(channel).ListPrepared(
                    ppb.ListPreparedRequest(coordinator_id=coordinator_id), timeout=5
                )
        except grpc.RpcError as exc:
            out[name] = {"error": f"{exc.code().name}: {exc.details()}"}
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


def _heuristic(path: str, coordinator_id: str, participants: dict[str, str]) -> dict[str, Any]:
    """Every agent's heuristic decisions on this coordinator's branches, each judged
    against the log (a contradiction is a heuristic hazard)."""
    db = sqlite_utils.Database(path)
    out: dict[str, Any] = {}
    for name, address in participants.items():
        try:
            with grpc.insecure_channel(address) as channel:
                reply = pgrpc.ParticipantStub(channel).ListHeuristic(
                    ppb.ListHeuristicRequest(coordinator_id=coordinator_id), timeout=5
                )
        except grpc.RpcError as exc:
            out[name] = {"error": f"{exc.code().name}: {exc.details()}"}
            continue
        decisions = []
        for d in reply.decisions:
            logged = _logged_outcome(db, d.transaction_id)
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


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="twopc-coordinator inspect", description=__doc__)
    p.add_argument("--log", required=True, metavar="PATH", help="the decision log")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="the live coordinator")
    p.add_argument(
        "--participant",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="a participant to ask for in-doubt branches (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    a = p.parse_args(argv)
    try:
        participants = named_addresses(a.participant, "--participant")
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    report = _from_log(a.log)
    if a.coordinator:
        try:
            report["in_flight"] = _from_coordinator(a.coordinator)
        except grpc.RpcError as exc:
            report["in_flight"] = {"error": f"{exc.code().name}: {exc.details()}"}
    if participants:
        report["in_doubt"] = _from_participants(report["coordinator_id"] or "", participants)
        report["heuristic"] = _heuristic(a.log, report["coordinator_id"] or "", participants)
    if a.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return
    print(
        f"coordinator {report['coordinator_id']} epoch {report['epoch']}  "
        f"log: {report['log_counts']}"
    )
    print(f"commits awaiting phase 2 (log): {len(report['committing_in_log'])}")
    for t in report["committing_in_log"]:
        print(
            f"  {t['transaction_id']:<32} age {t['age_seconds']:>8}s  {','.join(t['participants'])}"
        )
    if "in_flight" in report:
        flights = report["in_flight"]
        print(f"in flight (coordinator): {flights if isinstance(flights, dict) else len(flights)}")
        for t in flights if isinstance(flights, list) else []:
            print(
                f"  {t['transaction_id']:<32} {t['state']:<10} age {t['age_seconds']:>8}s  "
                f"{','.join(t['participants'])}  pending {','.join(t['pending_acks']) or '-'}"
            )
    for name, branches in report.get("in_doubt", {}).items():
        if isinstance(branches, dict):
            print(f"in doubt on {name}: unreachable ({branches['error']})")
            continue
        print(f"in doubt on {name}: {len(branches)}")
        for b in branches:
            print(f"  {b['transaction_id']:<32} prepared {b['age_seconds']:>8}s ago")
    for name, decisions in report.get("heuristic", {}).items():
        if isinstance(decisions, dict):
            print(f"heuristic decisions on {name}: unreachable ({decisions['error']})")
            continue
        hazards = sum(d["hazard"] for d in decisions)
        print(f"heuristic decisions on {name}: {len(decisions)} ({hazards} HAZARD)")
        for d in decisions:
            flag = "HAZARD" if d["hazard"] else "ok"
            print(
                f"  {d['transaction_id']:<32} {d['decision']:<6} {flag:<6} log: {d['logged']:<10} "
                f"by {d['operator']} at {d['decided_at']}: {d['reason']}"
            )
