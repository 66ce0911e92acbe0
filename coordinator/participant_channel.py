"""The coordinator's channel to one agent (for `coordinator.participants.ParticipantClient`):
one long-lived gRPC channel, what its calls' failures are, and whether the agent can
be reached at all.

The channel follows the coordinator's TLS files (`twopc_common.tls.ReloadingChannel`):
after a certificate rotation new calls use the new credentials, calls under way finish
on the old channel. The agent must prove it is `name` (a DNS SAN of its certificate),
whatever address or proxy it is dialled through.

An agent that cannot be reached is reported as what it is: a watcher follows the
channel's connectivity and, when connecting fails, finds out why with one plain TCP
connect (`connection refused at 127.0.0.1:7001`), so that abort reasons and log lines
say that instead of gRPC's "Deadline Exceeded".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc

from coordinator.protocol import Ballot, NoVote
from twopc_common.errors import Unavailable
from twopc_common.grpc_errors import error_for
from twopc_common.log import EventLogger
from twopc_common.tls import ReloadingChannel, TlsConfig
from twopc_pb import participant_pb2_grpc as pgrpc

UNREACHABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)
"""Codes with which a call failed to reach the agent, or its answer failed to come."""


async def why_unreachable(address: str, timeout: float) -> str:
    """Why `address` cannot be reached, from one TCP connect (closed at once)."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), timeout
        )
    except ConnectionRefusedError:
        return f"connection refused at {address}"
    except TimeoutError:
        return f"no TCP answer from {address} within {timeout:g}s"
    except OSError as exc:
        return f"cannot connect to {address}: {exc.strerror or exc}"
    writer.close()
    return f"{address} accepts TCP connections but does not speak gRPC (is it the agent?)"


def _options(max_message: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        # Notice a dead peer on an idle channel rather than at the next call.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        # Reconnect quickly after a partition heals.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


class _Answered:
    """The stub, noting in `channel.last_answer` when each call was answered."""

    def __init__(self, stub: pgrpc.ParticipantStub, channel: ParticipantChannel) -> None:
        self._stub = stub
        self._channel = channel

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            reply = await method(*args, **kwargs)
            self._channel.alive()
            return reply

        return call


class ParticipantChannel:
    def __init__(
        self,
        name: str,
        address: str,
        max_message: int,
        *,
        tls: TlsConfig,
        tls_reload_interval: float,
        drain: float,
        probe_timeout: float,
        log: EventLogger,
        on_change: Callable[[], None],
    ) -> None:
        """`on_change` runs after a certificate rotation replaced the channel."""
        self.name = name
        self.address = address
        self.unreachable: str | None = None
        """Why the last attempt to connect failed; None once connected."""
        self.last_answer = 0.0
        """When the agent last answered any call (monotonic): proof of life, so that a
        probe that times out on a loaded machine does not mark a working agent down."""
        self._probe_timeout = probe_timeout
        self._watcher: asyncio.Task[None] | None = None
        self._on_change = on_change
        self._channels = ReloadingChannel(
            address,
            tls,
            server_name=name,
            check_interval=tls_reload_interval,
            drain=drain,
            log=log,
            on_change=self._channel_changed,
            options=_options(max_message),
        )
        self._answered = _Answered(pgrpc.ParticipantStub(self._channels.current()), self)

    def alive(self) -> None:
        self.last_answer = time.monotonic()

    @property
    def stub(self) -> _Answered:
        """The stub for the next call (on a new channel after a certificate rotation)."""
        self._channels.current()
        return self._answered

    def open_prepare_stream(self) -> Any:
        return pgrpc.ParticipantStub(self._channels.current()).PrepareStream(wait_for_ready=True)

    def open_finish_stream(self) -> Any:
        return pgrpc.ParticipantStub(self._channels.current()).FinishStream(wait_for_ready=True)

    async def call(
        self, method: str, request: Any, timeout: float, wait_for_ready: bool | None = True
    ) -> Any:
        """One unary call; a failure raises as the error it is (`error`)."""
        try:
            return await getattr(self.stub, method)(
                request, timeout=timeout, wait_for_ready=wait_for_ready
            )
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc) from exc

    def _channel_changed(self) -> None:
        self._answered = _Answered(pgrpc.ParticipantStub(self._channels.current()), self)
        self._on_change()
        if self._watcher is not None:  # it follows the old channel: the next call restarts it
            self._watcher.cancel()
            self._watcher = None

    def reload_tls(self) -> bool:
        """Check the TLS files now (SIGHUP); True if the channel was replaced."""
        return self._channels.reload()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await self._channels.close()

    def watch(self) -> None:
        """Follow the channel's connectivity from now on (once; every call asks)."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._follow_connectivity())

    async def _follow_connectivity(self) -> None:
        channel = self._channels.current()
        state = channel.get_state(try_to_connect=False)
        while True:
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=False)
            if state is grpc.ChannelConnectivity.READY:
                self.unreachable = None
            elif state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                self.unreachable = await why_unreachable(self.address, self._probe_timeout)

    def missing_vote(self) -> Ballot | None:
        """What a vote that did not come is, if the agent cannot be reached at all."""
        if self.unreachable is None:
            return None
        return Ballot(NoVote.UNAVAILABLE, self.unreachable)

    def error(self, exc: grpc.aio.AioRpcError) -> Exception:
        """A failed call as the project's error: `Unavailable` if it did not reach the
        agent (saying why, when the watcher knows), else the agent's own error."""
        return self.status_error(exc.code(), exc.details() or "", exc.trailing_metadata())

    def status_error(self, code: grpc.StatusCode, details: str, trailers: Any = ()) -> Exception:
        """A call that ended with `code` (a unary call's, or a stream's that broke)."""
        if code in UNREACHABLE:
            return Unavailable(
                f"participant {self.name}: {self.unreachable or details or code.name}"
            )
        return error_for(code, f"participant {self.name}: {details or code.name}", trailers)
