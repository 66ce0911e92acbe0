"""Idempotency keys of one-shot Runs.

Guarantees:
- a retry of a keyed Run joins the live transaction under its key, or returns the
  outcome logged for it; the same key with another request is ALREADY_EXISTS;
- the key is in memory (`Memory.keys`) from the moment it is first seen until its
  record is durable, so that two retries racing each other join one transaction;
- a key whose one-phase commit is still being resolved after a restart is
  UNAVAILABLE (retry), never answered with a guess.
"""

from __future__ import annotations

from coordinator.log_records import LogRecord, LogState
from coordinator.memory import Memory, Outcome, Part, Tx
from twopc_common.errors import AlreadyExists, InvalidArgument, Unavailable


class IdempotencyKeys(Part):
    """The transaction of a keyed Run: a new one, or the one that ran under the key."""

    async def join(
        self, key: str, request_hash: str | None, owner: str | None, wait: bool
    ) -> Tx | Outcome:
        """A new transaction under `key`, or the outcome of the one that already ran
        under it (still in memory, or in the log)."""
        if len(key.encode()) > self.config.limits.max_idempotency_key_bytes:
            raise InvalidArgument(
                f"idempotency key longer than {self.config.limits.max_idempotency_key_bytes} bytes"
            )
        joined = self.memory.keys.get(key)
        if joined is not None:
            if joined.request_hash != request_hash:
                raise AlreadyExists(f"idempotency key {key!r} was used for another request")
            self.counters["idempotent_replays"] += 1
            return await joined.answer(wait)
        tx = self.memory.new_tx()
        tx.key, tx.request_hash, tx.owner = key, request_hash, owner
        self.memory.keys[key] = tx
        record = await self.decision_log.by_key(key)
        if record is None:
            return tx
        return _replay(self.memory, tx, key, request_hash, record)


def _replay(
    memory: Memory, tx: Tx, key: str, request_hash: str | None, record: LogRecord
) -> Outcome:
    """The logged outcome of `key`'s transaction, for a retry that found it in the
    log. `tx`, registered under the key meanwhile (later retries may be waiting
    on it), is forgotten and answers the same."""
    memory.forget(tx)
    if record.request_hash != request_hash:
        error = AlreadyExists(f"idempotency key {key!r} was used for another request")
        tx.outcome.set_exception(error)
        tx.outcome.exception()  # retrieved: waiters re-raise it themselves
        raise error
    if record.state is LogState.ONE_PHASE:
        unresolved = Unavailable(
            f"the outcome of {record.transaction_id} (key {key!r}) is being "
            "resolved after a restart; retry"
        )
        tx.outcome.set_exception(unresolved)
        tx.outcome.exception()
        raise unresolved
    outcome = Outcome.from_record(record)
    tx.outcome.set_result(outcome)
    memory.counters["idempotent_replays"] += 1
    return outcome
