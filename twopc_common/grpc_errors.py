"""The one place where project errors become gRPC status codes (and back).

Servicer methods are wrapped with `translate_errors`: a TwoPCError becomes its status
code with the error's message; anything unexpected becomes INTERNAL and is logged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc

from twopc_common import errors

_CODES: list[tuple[type[errors.TwoPCError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Aborted, grpc.StatusCode.ABORTED),
]

_ERRORS = {code: cls for cls, code in _CODES}

# Trailing metadata of a RESOURCE_EXHAUSTED answer from a daemon at a limit: when to
# try again, in milliseconds.
RETRY_AFTER_MS = "retry-after-ms"
# Trailing metadata of an UNAVAILABLE answer from a standby coordinator: the address of
# the active process of its id, where the client should go instead.
ACTIVE_ADDRESS = "twopc-active-address"
# Trailing metadata of an ABORTED answer (errors.Aborted): the SQLSTATE that failed the
# branch (agent to coordinator), and the abort cause's name (coordinator to client),
# so that a serialization failure is recognised without reading message text.
SQLSTATE = "twopc-sqlstate"
ABORT_CAUSE = "twopc-abort-cause"


def active_hint(exc: grpc.RpcError) -> str | None:
    """A standby's refusal: the active's address ("" if it does not know); None if
    `exc` is not a standby's refusal."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    trailers: Any = exc.trailing_metadata()
    for key, value in trailers or ():
        if key == ACTIVE_ADDRESS:
            return str(value)
    return None


R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]


_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_of(number: int) -> grpc.StatusCode:
    """The status code a number on the wire stands for (UNKNOWN if none)."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_for(
    code: grpc.StatusCode, message: str, trailers: Iterable[tuple[str, Any]] | None = None
) -> errors.TwoPCError:
    """A status received from a peer, as the project error it stands for (with what
    its trailing metadata says about an abort)."""
    cls = _ERRORS.get(code)
    if cls is None:
        return errors.Unavailable(f"{code.name}: {message}")
    if cls is errors.Aborted:
        meta = {k: v for k, v in trailers or () if isinstance(v, str)}
        return errors.Aborted(
            message, sqlstate=meta.get(SQLSTATE, ""), cause=meta.get(ABORT_CAUSE, "")
        )
    return cls(message)


def answer_for(exc: errors.TwoPCError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """What a call failing with `exc` answers: its status code, message and trailing
    metadata (for one item of a multiplexed stream, `twopc_common.multiplex`)."""
    return status_for(exc), str(exc), dict(_trailers(exc))


A = TypeVar("A")


async def answer_item(
    work: Awaitable[R],
    ok: Callable[[R], A],
    failed: Callable[[int, str, dict[str, str]], A],
    what: str,
) -> A:
    """One item of a multiplexed stream (`twopc_common.multiplex`), answered as its
    unary call would be: `ok(result)`, or `failed(code, message, trailers)` with what
    `translate_errors` would have answered (INTERNAL, logged, for the unexpected)."""
    try:
        return ok(await work)
    except errors.TwoPCError as exc:
        code, message, trailers = answer_for(exc)
        return failed(code.value[0], message, trailers)
    except Exception as exc:
        logging.getLogger("twopc").exception("internal error in %s", what)
        return failed(grpc.StatusCode.INTERNAL.value[0], f"internal error: {exc!r}", {})


def _trailers(exc: errors.TwoPCError) -> tuple[tuple[str, str], ...]:
    if isinstance(exc, errors.ResourceExhausted) and exc.retry_after is not None:
        return ((RETRY_AFTER_MS, str(max(1, round(exc.retry_after * 1000)))),)
    if isinstance(exc, errors.Aborted):
        return tuple(
            (key, value)
            for key, value in ((SQLSTATE, exc.sqlstate), (ABORT_CAUSE, exc.cause))
            if value
        )
    return ()


def translate_errors(
    method: Callable[..., Awaitable[R]],
) -> Callable[..., Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> R:
        try:
            return await method(self, request, context)
        except errors.TwoPCError as exc:
            if trailers := _trailers(exc):
                context.set_trailing_metadata(trailers)
            await context.abort(status_for(exc), str(exc))
        except Exception as exc:
            logging.getLogger("twopc").exception("internal error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper
