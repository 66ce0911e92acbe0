"""The project's exceptions: one root, one class per gRPC status we answer with.

Both daemons raise these from their logic; the servicers translate them to gRPC
status codes in one place (`twopc_common.grpc_errors`).
"""

from __future__ import annotations


class TwoPCError(Exception):
    """Root of every error this project raises on purpose."""


class InvalidArgument(TwoPCError):
    """The request is malformed or breaks a documented limit."""


class NotFound(TwoPCError):
    """An unknown participant, transaction or branch."""


class AlreadyExists(TwoPCError):
    """An idempotency key reused with a different request."""


class ResourceExhausted(TwoPCError):
    """The request is larger than the receiver accepts, or the receiver is at one of
    its limits; `retry_after` (seconds), when known, says when to try again."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FailedPrecondition(TwoPCError):
    """The request is well-formed but the transaction is in the wrong state for it."""


class PermissionDenied(TwoPCError):
    """The daemon is not configured to allow this call, or the caller may not make it."""


class Unauthenticated(TwoPCError):
    """The caller presented no valid credentials."""


class Unavailable(TwoPCError):
    """A dependency (PostgreSQL, a peer daemon) cannot be reached; retrying may help."""


class Aborted(TwoPCError):
    """The transaction was aborted while serving the request. `sqlstate`: the
    PostgreSQL error that failed a branch, if one did (agent to coordinator); `cause`:
    why the transaction aborted, by its name in the protocol (coordinator to client);
    both travel as trailing metadata."""

    def __init__(self, message: str, *, sqlstate: str = "", cause: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.cause = cause
