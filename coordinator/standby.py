"""A coordinator process that is not (yet) the active one of its id: its gRPC server
runs, but every call is answered UNAVAILABLE with the active process's address in the
trailing metadata (`twopc-active-address`), so that clients given several addresses go
there (`coordinator.client`). Health says NOT_SERVING until it takes over. A standby
holds no transactions and writes nothing: it only waits for the lease
(`coordinator.lease`)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from twopc_common.grpc_errors import ACTIVE_ADDRESS

EXEMPT = frozenset({"SetFailpoints"})
"""Calls a standby answers itself (test hooks)."""


class StandbyGate:
    def __init__(self, coordinator_id: str, active_address: Callable[[], str | None]) -> None:
        self.coordinator_id = coordinator_id
        self._active_address = active_address
        self.active = False
        """Set once this process took over and finished its start-up recovery."""
        self.stepped_down: str | None = None
        """Why this process stopped being the active one, once it did."""

    @property
    def serving(self) -> bool:
        """Whether this process answers calls (it is the active one, not stepped down)."""
        return self.active and self.stepped_down is None

    def refusal(self) -> tuple[str, str | None]:
        """What a standby answers: the message and the active's address, if known."""
        address = self._active_address()
        if self.stepped_down is not None:
            why = f"this process stepped down ({self.stepped_down})"
        else:
            why = "this process is a standby"
        where = f"the active one is at {address}" if address else "no active one is known yet"
        return f"coordinator {self.coordinator_id}: {why}; {where}", address


def gated(servicer: Any, service: Any, gate: StandbyGate) -> Any:
    """`servicer` with every method of `service` (a ServiceDescriptor) refused while
    `gate` is not active."""
    wrapped = _Gated()
    for method in service.methods:
        inner = getattr(servicer, method.name)
        setattr(wrapped, method.name, inner if method.name in EXEMPT else _gate(inner, gate))
    return wrapped


class _Gated:
    """The object gRPC's generated `add_*Servicer_to_server` reads methods from."""


def _gate(
    method: Callable[[Any, Any], Awaitable[Any]], gate: StandbyGate
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    @functools.wraps(method)
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if gate.serving:
            return await method(request, context)
        message, address = gate.refusal()
        # Always present (empty while the active one is unknown): it tells the client
        # that this call never ran, so that any call is safe to send elsewhere.
        context.set_trailing_metadata(((ACTIVE_ADDRESS, address or ""),))
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)

    return call
