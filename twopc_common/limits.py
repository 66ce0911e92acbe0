"""Documented request limits, shared by both daemons and checked before any work.

A request over a limit is refused with INVALID_ARGUMENT and a message naming the limit;
a request over the gRPC message size is refused by gRPC with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from twopc_common.errors import InvalidArgument

RESULT_RESERVE = 64 * 1024
"""Bytes of a message kept for the rest of an answer besides its result rows."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_branches: int = 32
    """Participants one transaction may enlist."""
    max_statements_per_branch: int = 1000
    """Statements one Run branch or one Execute call may carry."""
    max_sql_bytes: int = 65536
    """Length of one statement's SQL text."""
    max_params_per_statement: int = 1000
    """Parameters one statement may bind."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message either daemon accepts (gRPC answers RESOURCE_EXHAUSTED)."""
    max_idempotency_key_bytes: int = 200
    """Length of an idempotency key."""
    max_phase2_batch: int = 1000
    """Decisions one Finish call (the coordinator's batched phase 2) may carry."""
    max_stream_batch: int = 1000
    """Requests one message of a multiplexed stream (PrepareStream, FinishStream,
    RunStream) may carry."""

    @property
    def max_result_bytes(self) -> int:
        """Result rows one answer (a Run outcome, an Execute, a branch's vote) may
        carry, counted as the agent reads them: the message limit less room for the
        rest of the answer, so that work whose results cannot be delivered is failed
        before it commits."""
        return self.max_message_bytes - RESULT_RESERVE

    def __post_init__(self) -> None:
        for field in fields(self):
            if getattr(self, field.name) < 1:
                raise InvalidArgument(
                    f"limit {field.name} must be at least 1, not {getattr(self, field.name)}"
                )
        if self.max_message_bytes <= RESULT_RESERVE + self.max_sql_bytes:
            raise InvalidArgument(
                f"limit max_message_bytes ({self.max_message_bytes}) leaves no room: a "
                f"message must hold a statement of max_sql_bytes ({self.max_sql_bytes}) "
                f"and result rows besides the {RESULT_RESERVE} bytes kept for the rest"
            )
