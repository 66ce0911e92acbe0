"""`serve_grpc`: the one way both daemons bind, start and stop their gRPC server.

It binds the server (`twopc_common.server.bind_grpc_server`: TLS, limits, health,
reflection) before the daemon does anything durable (the coordinator bumps its epoch
only after its port is secured), puts the daemon's own service behind authentication
and its per-RPC rules (`twopc_common.auth.guard`), records RPC metrics and serves
them, and installs the signal handlers (SIGTERM/SIGINT end the daemon, SIGHUP
reloads). The daemon starts the server once it is ready to answer (`Serving.start`)
and hands it its background tasks. When the daemon's block ends the server stops:
health NOT_SERVING, in-flight RPCs given the shutdown grace, background tasks
cancelled; at once and without the grace for a daemon that gave up while starting
(`Serving.abandon`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from prometheus_client import CollectorRegistry

from twopc_common.auth import Authenticator, Rule, guard
from twopc_common.health import Health
from twopc_common.limits import Limits
from twopc_common.log import EventLogger
from twopc_common.metrics import RpcMetrics, serve_metrics
from twopc_common.server import bind_grpc_server
from twopc_common.tls import TlsConfig


class ServerConfig(Protocol):
    """What `serve_grpc` reads of a daemon's configuration (both config dataclasses
    have these fields)."""

    @property
    def listen(self) -> str: ...
    @property
    def tls(self) -> TlsConfig: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def shutdown_grace(self) -> float: ...
    @property
    def metrics_listen(self) -> str | None: ...


@dataclass(frozen=True)
class Service:
    """The daemon's own gRPC service: its servicer, the generated function that adds
    it to a server, its ServiceDescriptor, and who may call which method."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    descriptor: Any
    authenticator: Authenticator
    rules: Mapping[str, Rule]


async def wait_for_termination(on_hangup: Callable[[], None] = lambda: None) -> None:
    """Return on SIGTERM or SIGINT; call `on_hangup` on each SIGHUP (reload)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await stop.wait()


class Serving:
    """A daemon's bound server while `serve_grpc` holds it."""

    def __init__(self, server: grpc.aio.Server, terminated: asyncio.Task[None]) -> None:
        self.server = server
        self.terminated = terminated
        """Done on SIGTERM or SIGINT."""
        self.abandoned = False
        self._started = False
        self._tasks: list[asyncio.Task[Any]] = [terminated]

    async def start(self) -> None:
        """Start answering calls (again: nothing)."""
        if not self._started:
            self._started = True
            await self.server.start()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` in the background until the server stops."""
        self._tasks.append(asyncio.create_task(work))

    def abandon(self) -> None:
        """The daemon gives up before serving: stop at once, without the grace."""
        self.abandoned = True

    async def _stop(
        self, health: Health, metrics: asyncio.Server | None, grace: float, log: EventLogger
    ) -> None:
        if not self.abandoned:
            log.info("stopping")
            await health.shutdown()
        if metrics is not None:
            metrics.close()
        await self.server.stop(None if self.abandoned else grace)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def serve_grpc(
    config: ServerConfig,
    service: Service,
    health: Health,
    log: EventLogger,
    registry: CollectorRegistry,
    *,
    token_listen: str | None = None,
    on_hangup: Callable[[], None] = lambda: None,
) -> AsyncIterator[Serving]:
    """The daemon's server, bound (ListenError if it cannot be) but not started, with
    `registry` served on `config.metrics_listen` and RPC metrics recorded in it; stopped
    when the block ends."""
    server = bind_grpc_server(
        config.listen,
        config.limits.max_message_bytes,
        lambda s: service.add_to_server(
            guard(service.servicer, service.descriptor, service.authenticator, service.rules, log),
            s,
        ),
        health,
        config.tls,
        log,
        [RpcMetrics(registry)],
        token_listen,
    )
    try:
        metrics = (
            await serve_metrics(config.metrics_listen, registry, log)
            if config.metrics_listen
            else None
        )
    except BaseException:
        await server.stop(None)
        raise
    serving = Serving(server, asyncio.create_task(wait_for_termination(on_hangup)))
    try:
        yield serving
    finally:
        await serving._stop(health, metrics, config.shutdown_grace, log)
