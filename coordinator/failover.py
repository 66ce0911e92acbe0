"""Client-side failover between the coordinator processes of one id.

A client given several addresses (the active process and its standbys) sends each
call to the one it believes active. When the answer says otherwise it moves:
- UNAVAILABLE with `twopc-active-address` in the trailing metadata is a standby's
  refusal: the call never ran, so any call is sent again, to the address named (or,
  while none is known, to the next one);
- any other UNAVAILABLE (the process died, its connection broke) leaves the call's
  fate unknown: only calls that are safe to repeat are sent again, to the next address:
  a Run with an idempotency key (the coordinator applies it once, whichever process
  answers), Begin (an unused transaction is rolled back by the idle timeout), and reads.
- DEADLINE_EXCEEDED (perhaps a paused active) is raised, and the next call goes to the
  next address.
Everything happens within the call's own deadline; pauses between attempts back off
(capped, jittered); a connection attempt is bounded (`CONNECT_TIMEOUT_MS`) so that a
paused process cannot take the whole deadline before the call is even sent. With one
address, only a standby's refusal is followed.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import grpc

from twopc_common.grpc_errors import active_hint

C = TypeVar("C")

BACKOFF_INITIAL = 0.05
"""Seconds before the second attempt of a call that failed over."""
BACKOFF_MAX = 0.5
"""Cap of the pause between attempts (a standby takes over within a few seconds)."""

CONNECT_TIMEOUT_MS = 2000
"""With several addresses: how long a connection attempt (TCP and TLS handshake) may
take, so that a paused process (whose kernel still accepts connections) costs a
bounded part of the call's deadline rather than all of it (gRPC's default is 20 s)."""

SAFE_TO_REPEAT = frozenset({"Begin", "GetTransaction", "ListTransactions", "Status"})
"""Calls that may be sent again when their first attempt's fate is unknown (besides a
keyed Run)."""


def addresses_of(address: str | Sequence[str]) -> list[str]:
    found = [address] if isinstance(address, str) else list(address)
    if not found or not all(found):
        raise ValueError("give at least one coordinator address")
    return found


def channel_options(addresses: Sequence[str]) -> list[tuple[str, int]]:
    """Channel options failover adds (none with a single address)."""
    if len(addresses) == 1:
        return []
    return [("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS)]


def backoff(attempt: int) -> float:
    return random.uniform(0.5, 1.0) * min(BACKOFF_MAX, BACKOFF_INITIAL * 2.0**attempt)


class Endpoints(Generic[C]):
    """The coordinator addresses a client knows, a connection (channel and stub) per
    address, made when first used, and which address is believed active."""

    def __init__(self, addresses: Sequence[str], connect: Callable[[str], C]) -> None:
        self.addresses = list(addresses)
        self._connect = connect
        self._connections: dict[str, C] = {}
        self.current = self.addresses[0]
        self._lock = threading.Lock()  # the blocking client is shared between threads

    def connection(self) -> C:
        with self._lock:
            if self.current not in self._connections:
                self._connections[self.current] = self._connect(self.current)
            return self._connections[self.current]

    def connections(self) -> list[C]:
        with self._lock:
            return list(self._connections.values())

    def should_retry(self, exc: grpc.RpcError, method: str, keyed: bool) -> bool:
        """Whether to send the call again after `exc`, having moved to the address to
        try next."""
        with self._lock:
            return self._should_retry(exc, method, keyed)

    def _should_retry(self, exc: grpc.RpcError, method: str, keyed: bool) -> bool:
        hint = active_hint(exc)
        if hint is not None:
            if hint and hint != self.current:
                if hint not in self.addresses:
                    self.addresses.append(hint)
                self.current = hint
            else:
                self._next()
            return True
        if len(self.addresses) == 1:
            return False
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            # Perhaps a paused active: the call's time is spent, the next goes elsewhere.
            self._next()
            return False
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            return False
        if not (keyed or method in SAFE_TO_REPEAT):
            self._next()  # the next call goes elsewhere; this one's fate is unknown
            return False
        self._next()
        return True

    def _next(self) -> None:
        i = self.addresses.index(self.current) if self.current in self.addresses else -1
        self.current = self.addresses[(i + 1) % len(self.addresses)]
