"""The coordinator epochs this agent has seen, kept durably in its shard.

A coordinator bumps its epoch durably at every start and puts it in every transaction
id. Before the agent opens a branch of an epoch newer than any it has seen of that
coordinator, it records the epoch in the shard (once per coordinator start, not per
branch). Two things follow:
- a branch of an older epoch is refused: it comes from an incarnation that has since
  restarted (a message delayed in the network), or from a coordinator running on an
  older copy of its log, whose transaction ids would repeat ones already used;
- ListPrepared reports the highest epoch, and a coordinator whose log is behind it
  refuses to start (or, noticed later, stops deciding) instead of presuming abort for
  branches that were committed under the lost log.
Phase 2 (Commit, Abort) is not fenced here: recovery legitimately finishes old epochs.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol

from twopc_common.errors import FailedPrecondition
from twopc_common.ids import TransactionId


class EpochStore(Protocol):
    async def load_epochs(self) -> dict[str, int]: ...

    async def raise_epoch(self, coordinator_id: str, epoch: int) -> None: ...


class StaleEpoch(FailedPrecondition):
    """A branch of a coordinator incarnation older than one already seen."""


class EpochFence:
    def __init__(self, store: EpochStore) -> None:
        self._store = store
        self._seen: dict[str, int] = {}
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )

    async def load(self) -> None:
        self._seen = await self._store.load_epochs()

    def highest(self, coordinator_id: str) -> int:
        return self._seen.get(coordinator_id, 0)

    async def admit(self, txid: TransactionId) -> None:
        """Let a new branch of `txid` open, or raise StaleEpoch."""
        seen = self._seen.get(txid.coordinator, 0)
        if txid.epoch == seen:
            return
        if txid.epoch < seen:
            raise StaleEpoch(
                f"transaction {txid} is from epoch {txid.epoch} of coordinator "
                f"{txid.coordinator}, which has since started epoch {seen}: refused (a "
                "message from an incarnation that restarted, or a coordinator running "
                "on an older copy of its decision log)"
            )
        async with self._locks[txid.coordinator]:
            if txid.epoch > self._seen.get(txid.coordinator, 0):
                await self._store.raise_epoch(txid.coordinator, txid.epoch)
                self._seen[txid.coordinator] = txid.epoch
        await self.admit(txid)  # another epoch may have won meanwhile
