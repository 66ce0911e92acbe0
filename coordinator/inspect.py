"""`twopc-coordinator inspect`: the operator's view of unfinished transactions.

It reads the decision log directly (with sqlite-utils; safe while the coordinator runs,
the log is in WAL mode), and when given addresses, asks the live coordinator for its
in-flight transactions and every participant for this coordinator's prepared
(in-doubt) branches, with their age. Read-only: it decides nothing.

Agents answer ListPrepared only to their coordinators, so against a secure deployment
inspect runs where the coordinator runs, with the coordinator's own certificate
(`--tls-cert/--tls-key/--tls-ca`), which also lets it see every live transaction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import grpc
import sqlite_utils

from twopc_common.cli import named_addresses
from twopc_common.tls import TlsConfig, TlsError, add_tls_flags, channel, client_tls
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


def _from_coordinator(address: str, coordinator_id: str, tls: TlsConfig) -> list[dict[str, Any]]:
    with channel(address, tls, server_name=coordinator_id) as ch:
        reply = cgrpc.CoordinatorStub(ch).ListTransactions(cpb.ListTransactionsRequest(), timeout=5)
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
            out[name] = {"error": f"{exc.code().name}: {exc.details()}"}
            continue
        out[name] = [
            {"transaction_id": b.transaction_id, "age_seconds": round(b.age_seconds, 1)}
            for b in reply.branches
        ]
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
    add_tls_flags(p, daemon=False)
    a = p.parse_args(argv)
    try:
        participants = named_addresses(a.participant, "--participant")
        tls = client_tls(a)
    except (argparse.ArgumentTypeError, TlsError) as exc:
        p.error(str(exc))
    report = _from_log(a.log)
    if a.coordinator:
        try:
            report["in_flight"] = _from_coordinator(
                a.coordinator, report["coordinator_id"] or "", tls
            )
        except grpc.RpcError as exc:
            report["in_flight"] = {"error": f"{exc.code().name}: {exc.details()}"}
    if participants:
        report["in_doubt"] = _from_participants(report["coordinator_id"] or "", participants, tls)
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
