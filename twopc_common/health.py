"""The daemons' health in the standard gRPC health protocol (`grpc.health.v1.Health`),
so that `grpc_health_probe`, Kubernetes gRPC probes and load balancers can ask.

The whole server ("") and the daemon's own service (by its full name) always report
the same status. A daemon starts NOT_SERVING and turns SERVING only once it says so;
`watch` then keeps it up to date from a cheap periodic probe (the coordinator's
decision log can write, the agent's database answers). A probe that fails or does not
answer within its timeout means NOT_SERVING until one succeeds again. Every change is
logged with its reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from twopc_common.log import EventLogger
from twopc_common.tls import TlsConfig, TlsError, add_tls_flags, channel, client_tls

SERVICE_NAME: str = health.SERVICE_NAME

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    def __init__(self, service: str, log: EventLogger) -> None:
        self.servicer = health.aio.HealthServicer()
        self.service = service
        self._log = log
        self.serving = False
        self.reason = "starting"
        self._stopped = False

    async def update(self, serving: bool, reason: str = "") -> None:
        """Report SERVING or NOT_SERVING (with why, for the log and the metrics);
        ignored once the daemon is stopping."""
        if self._stopped:
            return
        changed = serving != self.serving or reason != self.reason
        self.serving, self.reason = serving, reason
        status = _SERVING if serving else _NOT_SERVING
        for name in ("", self.service):
            await self.servicer.set(name, status)
        if changed:
            log = self._log.info if serving else self._log.warning
            log("health", status="serving" if serving else "not_serving", reason=reason)

    async def shutdown(self) -> None:
        """NOT_SERVING for good: the daemon is stopping."""
        self._stopped = True
        self.serving, self.reason = False, "stopping"
        await self.servicer.enter_graceful_shutdown()

    async def watch(
        self, probe: Callable[[], Awaitable[None]], interval: float, timeout: float
    ) -> None:
        """Run `probe` now and every `interval` seconds, forever; SERVING while it
        succeeds within `timeout`. A probe still running when it times out is not
        started again until it ends (a stuck disk must not pile up probes)."""
        running: asyncio.Task[None] | None = None
        try:
            while True:
                if running is None or running.done():
                    running = asyncio.ensure_future(probe())
                try:
                    await asyncio.wait_for(asyncio.shield(running), timeout)
                except TimeoutError:
                    await self.update(False, f"health probe did not answer within {timeout}s")
                except Exception as exc:
                    await self.update(False, f"health probe failed: {exc}")
                else:
                    await self.update(True, "")
                await asyncio.sleep(interval)
        finally:
            if running is not None and not running.done():
                running.cancel()
                with contextlib.suppress(BaseException):
                    await running


def probe(address: str, tls: TlsConfig, server_name: str | None, timeout: float = 2.0) -> str:
    """One health Check of the daemon at `address`: its status name, or why it did not
    answer. The health service sits behind the daemon's mutual TLS like every RPC, so
    against a secure daemon `tls` must hold a certificate from its CA; `server_name`
    is the name the daemon's certificate must carry (its id). (`python -m
    twopc_common.health HOST:PORT [--server-name ID --tls-cert ... --tls-key ...
    --tls-ca ...]` exits 0 only if SERVING; for container health checks in images that
    have no `grpc_health_probe`.)"""
    with channel(address, tls, server_name=server_name) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m twopc_common.health",
        description="Exit 0 if the daemon at HOST:PORT answers SERVING, 1 otherwise.",
    )
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--server-name", metavar="ID", help="the name the daemon's certificate carries")
    p.add_argument(
        "--answering",
        action="store_true",
        help="exit 0 if the daemon answers at all, SERVING or NOT_SERVING (a standby "
        "coordinator is NOT_SERVING until it takes over, and is healthy as a standby)",
    )
    add_tls_flags(p, daemon=False)
    a = p.parse_args(argv)
    try:
        tls = client_tls(a)
    except TlsError as exc:
        p.error(str(exc))
    answer = probe(a.address, tls, a.server_name)
    print(answer)
    answered = answer in ("SERVING", "NOT_SERVING") if a.answering else answer == "SERVING"
    sys.exit(0 if answered else 1)


if __name__ == "__main__":
    main()
