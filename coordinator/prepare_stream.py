"""The coordinator's end of PrepareStream: one long-lived call per agent carries every
Prepare, as `Finish` carries every phase-2 decision (`twopc_common.multiplex`).

A Prepare whose call breaks before its answer gets `CallBroken`; the caller turns it
into a vote as it would a unary call's error (the branch may have prepared: phase 2
then sends it an Abort).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from twopc_common.multiplex import CallBroken, Multiplexer
from twopc_pb import participant_pb2 as pb

__all__ = ["CallBroken", "PrepareStream"]


class PrepareStream(Multiplexer[pb.PrepareRequest, pb.PrepareItem, pb.VoteItem]):
    def __init__(
        self,
        open_call: Callable[[], Any],
        max_items: int,
        max_bytes: int,
        on_answer: Callable[[], None] = lambda: None,
        stats: collections.Counter[str] | None = None,
    ) -> None:
        super().__init__(
            open_call,
            lambda ref, request: pb.PrepareItem(ref=ref, request=request),
            lambda items: pb.PrepareBatch(items=items),
            max_items,
            max_bytes,
            name="prepare",
            on_answer=on_answer,
            stats=stats,
        )

    async def prepare(self, request: pb.PrepareRequest) -> pb.VoteItem:
        """The agent's answer to `request`; raises `CallBroken` if the call broke first."""
        return await self.call(request)
