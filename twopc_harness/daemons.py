"""The coordinator and participant daemons as real child processes: started from their
console entry points, probed for readiness over gRPC, stopped with SIGTERM or killed
with SIGKILL, and restarted with the same flags.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twopc_common.cli import EXIT_WITH_PARENT
from twopc_common.tls import TlsConfig, channel
from twopc_harness.postgres import HarnessError
from twopc_pb import coordinator_pb2_grpc, participant_pb2_grpc, types_pb2


class _NotServing(Exception):
    """The daemon answers, but its health says NOT_SERVING yet."""


@dataclass
class Daemon:
    name: str
    argv: list[str]
    address: str
    logfile: Path
    env: dict[str, str] = field(default_factory=dict)
    admin_tls: TlsConfig = field(default_factory=TlsConfig)
    """The harness's own credentials (an admin client) for probes and failpoints."""
    process: subprocess.Popen[bytes] | None = None

    def start(
        self, wait: bool = True, timeout: float = 60.0, env: dict[str, str] | None = None
    ) -> None:
        """Start (again). `env` adds variables for this start only (e.g. failpoints)."""
        if self.running:
            raise HarnessError(f"{self.name} is already running")
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        full_env = {
            **os.environ,
            **self.env,
            **(env or {}),
            EXIT_WITH_PARENT: str(os.getpid()),  # no daemon outlives the harness
        }
        with open(self.logfile, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
        if wait:
            self.wait_ready(timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _probe(self, channel: grpc.Channel) -> None:
        """Ready means SERVING in the gRPC health protocol: for the coordinator, its
        start-up recovery is done; for an agent, its database answers."""
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=1.0
        )
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise _NotServing()

    def _set_failpoints(self, channel: grpc.Channel, spec: str) -> dict[str, str]:
        raise NotImplementedError

    def set_failpoints(self, spec: str) -> dict[str, str]:
        """Switch failpoints in the running daemon (it must run with --allow-failpoints)."""
        with self.admin_channel() as ch:
            return self._set_failpoints(ch, spec)

    def admin_channel(self) -> grpc.Channel:
        """A channel to the daemon as the harness's admin client."""
        return channel(self.address, self.admin_tls, server_name=self.name)

    def wait_ready(self, timeout: float = 60.0, serving: bool = True) -> None:
        """Until the daemon is SERVING (or, without `serving`, answers its health
        at all: a standby coordinator is NOT_SERVING until it takes over)."""
        deadline = time.monotonic() + timeout
        with self.admin_channel() as ch:
            while time.monotonic() < deadline:
                if not self.running:
                    raise HarnessError(f"{self.name} exited at start:\n{self.log_tail()}")
                try:
                    self._probe(ch)
                    return
                except _NotServing:
                    if not serving:
                        return
                    time.sleep(0.05)
                except grpc.RpcError:
                    time.sleep(0.05)
        raise HarnessError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def serving(self) -> bool:
        """Whether the daemon's health says SERVING right now."""
        if not self.running:
            return False
        with self.admin_channel() as ch:
            try:
                self._probe(ch)
            except (grpc.RpcError, _NotServing):
                return False
        return True

    def pause(self) -> None:
        """SIGSTOP: the process and its connections stay, it does nothing."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush: a crash."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


class CoordinatorDaemon(Daemon):
    def _set_failpoints(self, channel: grpc.Channel, spec: str) -> dict[str, str]:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        reply = stub.SetFailpoints(types_pb2.FailpointsRequest(spec=spec), timeout=5.0)
        return dict(reply.active)


class ParticipantDaemon(Daemon):
    def _set_failpoints(self, channel: grpc.Channel, spec: str) -> dict[str, str]:
        stub = participant_pb2_grpc.ParticipantStub(channel)
        reply = stub.SetFailpoints(types_pb2.FailpointsRequest(spec=spec), timeout=5.0)
        return dict(reply.active)


@dataclass(frozen=True)
class DaemonTls:
    """A daemon's own credentials, and the admin client identity it trusts."""

    own: TlsConfig
    admin: TlsConfig
    admin_name: str


def tls_flags(tls: DaemonTls | None) -> list[str]:
    """The daemon's TLS flags (`--insecure` when the system runs without TLS)."""
    if tls is None:
        return ["--insecure"]
    own = tls.own
    return [
        "--tls-cert",
        str(own.cert),
        "--tls-key",
        str(own.key),
        "--tls-ca",
        str(own.ca),
        "--admin",
        tls.admin_name,
    ]


def coordinator_daemon(
    name: str,
    listen: str,
    log_path: Path | str,
    participants: dict[str, str],
    logfile: Path,
    extra: list[str] | None = None,
    tls: DaemonTls | None = None,
) -> CoordinatorDaemon:
    argv = [
        sys.executable,
        "-m",
        "coordinator",
        "--id",
        name,
        "--listen",
        listen,
        "--log",
        str(log_path),
    ]
    for participant, address in participants.items():
        argv += ["--participant", f"{participant}={address}"]
    argv += tls_flags(tls)
    admin = tls.admin if tls else TlsConfig()
    return CoordinatorDaemon(name, argv + (extra or []), listen, logfile, admin_tls=admin)


def participant_daemon(
    name: str,
    listen: str,
    dsn: str,
    coordinators: dict[str, str],
    logfile: Path,
    extra: list[str] | None = None,
    tls: DaemonTls | None = None,
) -> ParticipantDaemon:
    argv = [sys.executable, "-m", "participant", "--id", name, "--listen", listen, "--dsn", dsn]
    for coordinator, address in coordinators.items():
        argv += ["--coordinator", f"{coordinator}={address}"]
    argv += tls_flags(tls)
    admin = tls.admin if tls else TlsConfig()
    return ParticipantDaemon(name, argv + (extra or []), listen, logfile, admin_tls=admin)


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    if not condition():
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
