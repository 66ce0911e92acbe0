"""`twopc-coordinator inspect --log postgresql://... --id ID`: the operator's view read
from a PostgreSQL decision log (`coordinator.pg_log`), the same report as for a SQLite
log (`coordinator.inspect`). Read-only: the session is read-only, and it creates
nothing (a database without the log's schema is an error)."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from coordinator.pg_schema import SCHEMA
from coordinator.protocol import TxState, reported, reported_without_record
from twopc_common.ids import TransactionId
from twopc_common.settings import describe_dsn


class PgLogUnreadable(Exception):
    """The database cannot be read, or holds no decision log of this coordinator."""


class PgLogView:
    def __init__(self, dsn: str, coordinator_id: str) -> None:
        self.coordinator_id = coordinator_id
        where = describe_dsn(dsn)
        try:
            self._conn = psycopg.connect(
                dsn,
                autocommit=True,
                options="-c default_transaction_read_only=on",
                application_name="twopc-coordinator inspect",
            )
            row = self._conn.execute(
                f"SELECT epoch, pruned_before, holder_address FROM {SCHEMA}.coordinators "
                "WHERE coordinator_id = %s",
                (coordinator_id,),
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            raise PgLogUnreadable(f"{where} holds no decision log (no schema {SCHEMA})") from None
        except psycopg.Error as exc:
            raise PgLogUnreadable(f"cannot read the decision log at {where}: {exc}") from None
        if row is None:
            self._conn.close()
            raise PgLogUnreadable(f"{where} holds no decision log of coordinator {coordinator_id}")
        self.epoch = int(row[0])
        self.pruned_before = None if row[1] is None else float(row[1])
        self.active_address = row[2]

    def close(self) -> None:
        self._conn.close()

    def report(self) -> dict[str, Any]:
        now = time.time()
        counts = {
            str(state): int(n)
            for state, n in self._conn.execute(
                f"SELECT state, count(*) FROM {SCHEMA}.transactions "
                "WHERE coordinator_id = %s GROUP BY state",
                (self.coordinator_id,),
            )
        }
        committing = [
            {
                "transaction_id": txid,
                "state": "committing",
                "participants": list(participants),
                "age_seconds": round(now - created, 1),
            }
            for txid, participants, created in self._conn.execute(
                f"SELECT id, participants, created_at FROM {SCHEMA}.transactions "
                "WHERE coordinator_id = %s AND state = 'committing' ORDER BY created_at",
                (self.coordinator_id,),
            )
        ]
        return {
            "coordinator_id": self.coordinator_id,
            "epoch": self.epoch,
            "active_address": self.active_address,
            "log_counts": counts,
            "committing_in_log": committing,
        }

    def outcome(self, transaction_id: str) -> str:
        """The log's answer, as GetTransaction would give it after recovery."""
        row = self._conn.execute(
            f"SELECT state FROM {SCHEMA}.transactions WHERE id = %s", (transaction_id,)
        ).fetchone()
        if row is not None:
            state = str(row[0])
            return reported(TxState(state)).value if state != "one_phase" else "in_progress"
        started = self._conn.execute(
            f"SELECT started_at FROM {SCHEMA}.epochs WHERE coordinator_id = %s AND epoch = %s",
            (self.coordinator_id, TransactionId.parse(transaction_id).epoch),
        ).fetchone()
        return reported_without_record(
            None if started is None else float(started[0]), self.pruned_before
        ).value
