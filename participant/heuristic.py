"""Heuristic resolution: the operator's one audited way out when a prepared branch's
coordinator is gone for good (its decision log lost), which would otherwise block it
forever (the blocking problem of two-phase commit).

`twopc-participant resolve --dsn DSN --txid ID --commit|--abort --reason TEXT
--coordinator NAME=HOST:PORT` works on the shard directly, so it also works while the
agent is down. It

1. finds the branch among the database's prepared transactions;
2. asks the owning coordinator, and refuses if it answers at all: one that knows the
   outcome (committed, aborted, or unknown = presumed abort) will have it applied by
   the agent's recovery, and one that is still deciding or recovering must be left
   to finish. Only a coordinator that cannot be reached lets the operator decide.
   Against a secure deployment the check runs over mutual TLS
   (`--tls-cert/--tls-key/--tls-ca`, an admin client's or the agent's own
   certificate), verifying the coordinator by its id. A check that fails while
   something still accepts TCP connections at the address (a TLS handshake without
   or with the wrong flags, a frozen process) is refused too: only an address where
   nothing listens counts as unreachable;
3. records who, when, why, what and what the coordinator check found in the audit
   table `twopc_heuristic_decision` on the shard, committed *before* acting;
4. runs COMMIT PREPARED or ROLLBACK PREPARED, and records whether it was applied.

A heuristic decision may contradict what the coordinator had decided (a heuristic
hazard: atomicity is broken for that transaction). The coordinator, when it returns,
compares every applied decision with its log and reports each contradiction (logs,
metrics, `twopc-coordinator inspect`), so that the operator can repair the data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import socket
import sys
from dataclasses import dataclass

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import Xid
from psycopg_pool import PoolTimeout

from participant.schema import AsyncConn
from participant.store import Store
from twopc_common import ids
from twopc_common.cli import named_address_lists
from twopc_common.errors import TwoPCError, Unavailable
from twopc_common.tls import TlsConfig, add_tls_flags, channel, client_tls
from twopc_pb import coordinator_pb2 as cpb
from twopc_pb import coordinator_pb2_grpc as cgrpc

AUDIT_TABLE = "twopc_heuristic_decision"

# One row per attempt (an attempt that failed stays recorded, and a retry adds a row).
_CREATE_AUDIT = f"""
CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (
    id bigserial PRIMARY KEY,
    gid text NOT NULL,
    transaction_id text NOT NULL,
    coordinator_id text NOT NULL,
    participant_id text NOT NULL,
    decision text NOT NULL CHECK (decision IN ('commit', 'abort')),
    reason text NOT NULL CHECK (reason <> ''),
    operator text NOT NULL,
    coordinator_check text NOT NULL,
    state text NOT NULL DEFAULT 'intended' CHECK (state IN ('intended', 'applied', 'failed')),
    error text,
    decided_at timestamptz NOT NULL DEFAULT now(),
    applied_at timestamptz
)"""

_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class Refused(TwoPCError):
    """The heuristic decision is not allowed now; the message says why."""


@dataclass(frozen=True, slots=True)
class HeuristicDecision:
    transaction_id: str
    commit: bool
    reason: str
    operator: str
    decided_at: dt.datetime
    coordinator_check: str


def check_coordinator(
    address: str, transaction_id: str, timeout: float, tls: TlsConfig, coordinator: str
) -> str:
    """What the owning coordinator at `address` says, if it cannot be reached (the
    text goes into the audit row). Raises Refused if it answers."""
    with channel(address, tls, server_name=coordinator) as ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() in _UNREACHABLE:
                why = f"{exc.code().name}: {exc.details()}"
                _refuse_if_listening(address, timeout, why)
                return f"unreachable at {address}: {why}"
            # It answered, even if only to say it has no health service.
        try:
            status = cgrpc.CoordinatorStub(ch).GetTransaction(
                cpb.GetTransactionRequest(transaction_id=transaction_id), timeout=timeout
            )
        except grpc.RpcError as exc:
            if exc.code() in _UNREACHABLE:
                raise Refused(
                    f"the coordinator at {address} answers but cannot tell the outcome of "
                    f"{transaction_id} yet ({exc.code().name}: {exc.details()}); retry later"
                ) from exc
            raise Refused(
                f"the coordinator at {address} answered {exc.code().name}: {exc.details()}"
            ) from exc
    outcome = cpb.Outcome.Name(status.outcome)
    if status.outcome == cpb.IN_PROGRESS:
        raise Refused(f"the coordinator at {address} is still deciding {transaction_id}")
    raise Refused(
        f"the coordinator at {address} is reachable and knows the outcome of "
        f"{transaction_id}: {outcome}"
        + (" (presumed abort)" if status.outcome == cpb.UNKNOWN else "")
        + "; the agent's recovery applies it, no heuristic decision is needed"
    )


def _refuse_if_listening(address: str, timeout: float, why: str) -> None:
    """A failed gRPC check is not proof that the coordinator is gone: a TLS handshake
    that fails (no or wrong --tls-* flags, another CA) or a frozen process look the
    same. Only an address where nothing accepts a TCP connection counts as gone."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError:
        return
    raise Refused(
        f"something accepts connections at {address} but the coordinator check failed "
        f"({why}): it may be alive; check --tls-cert/--tls-key/--tls-ca (a coordinator "
        "serving TLS cannot be asked without them), and decide only once it is down"
    )


def _find_branch(
    conn: psycopg.Connection[tuple[object, ...]], transaction_id: str, participant: str | None
) -> Xid:
    found = [
        x
        for x in conn.tpc_recover()
        if ids.is_ours(x)
        and x.gtrid == transaction_id
        and (participant is None or x.bqual == participant)
    ]
    if not found:
        raise Refused(f"no prepared branch of {transaction_id} in this database")
    if len(found) > 1:
        names = ", ".join(str(x.bqual) for x in found)
        raise Refused(
            f"{transaction_id} has branches of several participants here ({names}): give --id"
        )
    return found[0]


def _record(
    conn: psycopg.Connection[tuple[object, ...]],
    xid: Xid,
    coordinator: str,
    commit: bool,
    reason: str,
    operator: str,
    check: str,
) -> int:
    """The audit row of a decision about to be applied (committed before it is)."""
    conn.execute(_CREATE_AUDIT)
    row = conn.execute(
        f"INSERT INTO {AUDIT_TABLE} (gid, transaction_id, coordinator_id, participant_id, "
        "decision, reason, operator, coordinator_check) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (
            str(xid),
            xid.gtrid,
            coordinator,
            str(xid.bqual),
            "commit" if commit else "abort",
            reason,
            operator,
            check,
        ),
    ).fetchone()
    assert row is not None
    return int(str(row[0]))


def _apply(
    conn: psycopg.Connection[tuple[object, ...]], xid: Xid, commit: bool, audit_id: int
) -> None:
    """COMMIT or ROLLBACK PREPARED, and whether it was applied, in the audit row."""
    try:
        if commit:
            conn.tpc_commit(xid)
        else:
            conn.tpc_rollback(xid)
    except psycopg.Error as exc:
        conn.execute(
            f"UPDATE {AUDIT_TABLE} SET state = 'failed', error = %s WHERE id = %s",
            (str(exc).strip(), audit_id),
        )
        raise TwoPCError(f"the heuristic decision was recorded but failed: {exc}") from exc
    conn.execute(
        f"UPDATE {AUDIT_TABLE} SET state = 'applied', applied_at = now() WHERE id = %s",
        (audit_id,),
    )


def resolve(
    dsn: str,
    transaction_id: str,
    commit: bool,
    reason: str,
    operator: str,
    coordinators: dict[str, tuple[str, ...]],
    participant: str | None,
    timeout: float,
    tls: TlsConfig,
) -> str:
    """Apply a heuristic decision (see the module docstring). Returns what was done;
    raises Refused (nothing changed) or TwoPCError (recorded as failed)."""
    if not reason.strip():
        raise Refused("--reason must say why")
    coordinator = ids.TransactionId.parse(transaction_id).coordinator
    addresses = coordinators.get(coordinator)
    if not addresses:
        raise Refused(
            f"{transaction_id} belongs to coordinator {coordinator}: give its (last known) "
            f"addresses with --coordinator {coordinator}=HOST:PORT[,HOST:PORT...], so that "
            "resolve can check that it is really gone"
        )
    with psycopg.connect(dsn, autocommit=True) as conn:
        xid = _find_branch(conn, transaction_id, participant)
        # Every process of the coordinator (an active one and its standbys) must be gone:
        # any of them that answers refuses the decision.
        check = "; ".join(
            check_coordinator(address, transaction_id, timeout, tls, coordinator)
            for address in addresses
        )
        audit_id = _record(conn, xid, coordinator, commit, reason, operator, check)
        _apply(conn, xid, commit, audit_id)
    done = "committed" if commit else "rolled back"
    return f"{transaction_id} on {xid.bqual} {done} heuristically ({check})"


async def list_applied(
    store: Store, coordinator_id: str, participant_id: str
) -> list[HeuristicDecision]:
    """The heuristic decisions applied to `coordinator_id`'s branches of this
    participant (none if resolve was never used here)."""
    try:
        async with store.pool.connection() as conn:
            return await _list_applied(conn, coordinator_id, participant_id)
    except (PoolTimeout, psycopg.OperationalError) as exc:
        raise Unavailable(f"database unavailable: {exc}") from exc


async def _list_applied(
    conn: AsyncConn, coordinator_id: str, participant_id: str
) -> list[HeuristicDecision]:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (AUDIT_TABLE,))
    exists = await cur.fetchone()
    if not exists or not exists[0]:
        await conn.rollback()
        return []
    cur = await conn.execute(
        f"SELECT transaction_id, decision, reason, operator, decided_at, coordinator_check "
        f"FROM {AUDIT_TABLE} WHERE coordinator_id = %s AND participant_id = %s "
        "AND state = 'applied' ORDER BY decided_at",
        (coordinator_id, participant_id),
    )
    rows = await cur.fetchall()
    await conn.rollback()
    return [
        HeuristicDecision(
            transaction_id=str(txid),
            commit=decision == "commit",
            reason=str(why),
            operator=str(who),
            decided_at=when,
            coordinator_check=str(check),
        )
        for txid, decision, why, who, when, check in rows
        if isinstance(when, dt.datetime)
    ]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="twopc-participant resolve",
        description="Commit or roll back an in-doubt branch by hand, with an audit record, "
        "when its coordinator is gone for good. Refused while the coordinator answers.",
    )
    p.add_argument("--dsn", required=True, help="libpq connection string of the shard")
    p.add_argument("--txid", required=True, help="the transaction id of the branch")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--commit", action="store_true", help="COMMIT PREPARED the branch")
    what.add_argument("--abort", action="store_true", help="ROLLBACK PREPARED the branch")
    p.add_argument("--reason", required=True, help="why (kept in the audit table)")
    p.add_argument(
        "--coordinator",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT[,HOST:PORT...]",
        help="the owning coordinator's (last known) addresses, its standbys' included: "
        "every one is checked to be unreachable",
    )
    p.add_argument("--id", default=None, help="participant id, if the database hosts several")
    p.add_argument(
        "--operator",
        default=f"{getpass.getuser()}@{socket.gethostname()}",
        help="who decides (kept in the audit table)",
    )
    p.add_argument(
        "--timeout", type=float, default=3.0, metavar="SECONDS", help="deadline of each check"
    )
    add_tls_flags(p, daemon=False)
    a = p.parse_args(argv)
    try:
        coordinators = named_address_lists(a.coordinator, "--coordinator")
        tls = client_tls(a)
        print(
            resolve(
                a.dsn,
                a.txid,
                a.commit,
                a.reason,
                a.operator,
                coordinators,
                a.id,
                a.timeout,
                tls,
            )
        )
    except (TwoPCError, argparse.ArgumentTypeError, psycopg.Error) as exc:
        sys.exit(f"twopc-participant resolve: {exc}")
