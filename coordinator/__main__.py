"""`twopc-coordinator`: run the coordinator daemon."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from coordinator import access, metrics
from coordinator.config import CoordinatorConfig
from coordinator.decision_log import DecisionLog, LogInUse
from coordinator.engine import Coordinator, LogBehind
from coordinator.heuristics import HeuristicWatch
from coordinator.lease import LeaseSettings
from coordinator.participants import ParticipantClient
from coordinator.pg_log import PostgresDecisionLog, is_postgres_log
from coordinator.service import CoordinatorService
from coordinator.standby import StandbyGate, gated
from twopc_common.auth import Authenticator, TokenFile, TokenFileError, token_main
from twopc_common.cli import (
    DAEMON_FLAG_NAMES,
    HelpFormatter,
    LogSettings,
    add_daemon_flags,
    add_statement_policy_flags,
    daemon_values,
    listen_address,
    log_level,
    named_addresses,
    non_negative,
    positive,
    run_daemon,
)
from twopc_common.dsn import read_dsn_file, refuse_password
from twopc_common.errors import TwoPCError, Unavailable
from twopc_common.flags import Flag, add_field_flags, field_values, flag_error
from twopc_common.health import Health
from twopc_common.ids import check_name
from twopc_common.log import EventLogger
from twopc_common.server import ListenError
from twopc_common.serving import Service, Serving, serve_grpc
from twopc_common.settings import describe_dsn
from twopc_common.tls import TlsError, daemon_tls
from twopc_pb import coordinator_pb2 as pb
from twopc_pb import coordinator_pb2_grpc as cgrpc


class StartupError(TwoPCError):
    """The daemon cannot start (port taken, log unwritable, ...)."""


class SteppedDown(StartupError):
    """Another process of this coordinator id took over: this one stopped."""


def open_decision_log(config: CoordinatorConfig) -> DecisionLog | PostgresDecisionLog:
    """The decision log `--log` names: a SQLite file, or a PostgreSQL database."""
    if config.log_dsn_file is None and not is_postgres_log(config.log_path):
        return DecisionLog(config.log_path, config.id, batch_max=config.log_batch_max)
    try:
        dsn = (
            read_dsn_file(config.log_dsn_file, "--log-dsn-file")
            if config.log_dsn_file is not None
            else config.log_path
        )
    except TwoPCError as exc:
        raise StartupError(str(exc)) from exc
    return PostgresDecisionLog(
        dsn,
        config.id,
        batch_max=config.log_batch_max,
        lease=config.lease,
        address=config.advertise or config.listen,
        reconnect_timeout=config.log_reconnect_timeout,
    )


def describe_log(decision_log: DecisionLog | PostgresDecisionLog, config: CoordinatorConfig) -> str:
    if isinstance(decision_log, PostgresDecisionLog):
        return describe_dsn(decision_log.dsn)
    return os.path.abspath(config.log_path)


@dataclass(frozen=True)
class Daemon:
    """What one coordinator process is made of, before it serves."""

    config: CoordinatorConfig
    decision_log: DecisionLog | PostgresDecisionLog
    clients: dict[str, ParticipantClient]
    engine: Coordinator
    gate: StandbyGate
    health: Health
    heuristics: HeuristicWatch
    registry: CollectorRegistry
    service: Service

    @property
    def pg_log(self) -> PostgresDecisionLog | None:
        return self.decision_log if isinstance(self.decision_log, PostgresDecisionLog) else None


def assemble(config: CoordinatorConfig) -> Daemon:
    """Every part, connected; nothing bound, opened or started yet."""
    log = EventLogger("coordinator", config.id)
    tokens = TokenFile(config.tokens_file, log) if config.tokens_file else None
    decision_log = open_decision_log(config)
    pg_log = decision_log if isinstance(decision_log, PostgresDecisionLog) else None
    gate = StandbyGate(config.id, lambda: pg_log.active_address if pg_log else None)
    clients = {
        name: ParticipantClient(
            name,
            address,
            config.rpc_timeout,
            config.limits.max_message_bytes,
            config.limits.max_phase2_batch,
            config.connect_probe_timeout,
            prepare_stream=config.prepare_calls == "stream",
            finish_stream=config.finish_calls == "stream",
            prepare_batch=config.limits.max_stream_batch,
            tls=config.tls,
            tls_reload_interval=config.tls_reload_interval,
            # Calls on a replaced channel finish first: none waits longer than this.
            drain=max(config.prepare_timeout, config.rpc_timeout, config.probe_timeout),
            log=log,
        )
        for name, address in config.participants.items()
    }
    engine = Coordinator(config, decision_log, clients)
    descriptor = pb.DESCRIPTOR.services_by_name["Coordinator"]
    health = Health(descriptor.full_name, engine.log)
    servicer = CoordinatorService(
        engine, access.Owners(config.owners_remembered, engine.owner_of), gate
    )
    service = Service(
        gated(servicer, descriptor, gate),
        cgrpc.add_CoordinatorServicer_to_server,
        descriptor,
        Authenticator(not config.tls.insecure, config.admins, tokens),
        access.rules(config),
    )
    heuristics = HeuristicWatch(engine)
    registry = CollectorRegistry()
    metrics.register(registry, engine, health, heuristics)
    return Daemon(
        config, decision_log, clients, engine, gate, health, heuristics, registry, service
    )


async def serve(config: CoordinatorConfig) -> None:
    daemon = assemble(config)
    engine = daemon.engine
    async with contextlib.AsyncExitStack() as stack:
        # Closed after the server stopped; also when its ports cannot be bound, which
        # happens before the log is touched: such a daemon leaves no trace (no new log
        # file, no epoch bumped).
        stack.callback(daemon.decision_log.close)
        stack.push_async_callback(engine.close)
        serving = await stack.enter_async_context(
            serve_grpc(
                config,
                daemon.service,
                daemon.health,
                engine.log,
                daemon.registry,
                token_listen=config.token_listen,
                on_hangup=lambda: reload_tls(engine.log, daemon.clients.values()),
            )
        )
        fenced = await take_log(daemon, serving)
        if fenced is None:
            return
        await recover(daemon, serving)
        run_background(daemon, serving)
        engine.log.info("serving", listen=config.listen, epoch=daemon.decision_log.epoch)
        ends: list[asyncio.Future[Any]] = [serving.terminated, fenced]
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
    if fenced.done():
        engine.log.error("stepped_down", reason=fenced.result())
        raise SteppedDown(f"stepped down: {fenced.result()} (start it again to run as a standby)")


def _give_up(serving: Serving, exc: Exception) -> StartupError:
    serving.abandon()
    return exc if isinstance(exc, StartupError) else StartupError(str(exc))


async def take_log(daemon: Daemon, serving: Serving) -> asyncio.Future[str] | None:
    """Take the decision log and begin a new epoch: the future that is set if another
    process fences this one later, or None if the daemon was told to stop first.

    A PostgreSQL log may be held by another process of this id: then this one is a
    standby, listening (UNAVAILABLE with the active's address, NOT_SERVING) while it
    waits for the lease. A SQLite log is taken at once or refused."""
    config, pg_log, decision_log = daemon.config, daemon.pg_log, daemon.decision_log
    stopping = threading.Event()
    if pg_log is not None:
        await daemon.health.update(False, "standby: waiting for the decision log's lease")
        await serving.start()
        daemon.engine.log.info("standby", listen=config.listen, log=describe_log(pg_log, config))
    acquiring = asyncio.create_task(
        asyncio.to_thread(pg_log.acquire, lambda: not stopping.is_set())
        if pg_log is not None
        else asyncio.to_thread(decision_log.acquire)
    )
    await asyncio.wait({acquiring, serving.terminated}, return_when=asyncio.FIRST_COMPLETED)
    if not acquiring.done():
        stopping.set()
        with contextlib.suppress(Exception):
            await acquiring
        serving.abandon()
        return None
    try:
        acquiring.result()
    except LogInUse as exc:
        raise _give_up(serving, exc) from exc
    except Exception as exc:
        raise _give_up(serving, StartupError(cannot_open(daemon, exc))) from exc
    try:
        await daemon.engine.check_log_is_current()
    except LogBehind as exc:
        raise _give_up(serving, exc) from exc
    fenced = watch_fencing(daemon)
    try:
        await asyncio.to_thread(decision_log.begin_epoch)
    except Exception as exc:
        raise _give_up(serving, StartupError(f"cannot start epoch: {exc}")) from exc
    return fenced


def cannot_open(daemon: Daemon, exc: Exception) -> str:
    folder = os.path.dirname(os.path.abspath(daemon.config.log_path))
    hint = (
        ""
        if daemon.pg_log is not None or os.path.isdir(folder)
        else f" (folder {folder} does not exist: create it)"
    )
    where = describe_log(daemon.decision_log, daemon.config)
    return f"cannot open decision log {where}: {exc}{hint}"


def watch_fencing(daemon: Daemon) -> asyncio.Future[str]:
    """A future set (with why) when another process takes the PostgreSQL log's lease
    from this one; never set for a SQLite log."""
    loop = asyncio.get_running_loop()
    fenced: asyncio.Future[str] = loop.create_future()
    if (pg_log := daemon.pg_log) is not None:

        def on_fenced(why: str) -> None:
            daemon.gate.stepped_down = why
            loop.call_soon_threadsafe(_settle, fenced, why)

        pg_log.on_fenced = on_fenced
    return fenced


async def recover(daemon: Daemon, serving: Serving) -> None:
    """Start-up recovery, listening, NOT_SERVING until it is done: probes and
    operators can tell "recovering" from "down". GetTransaction answers UNAVAILABLE
    until recovery made "unknown" safe; new transactions cannot race it (it leaves
    alone whatever is in memory)."""
    config, engine, epoch = daemon.config, daemon.engine, daemon.decision_log.epoch
    engine.log.info(
        "starting",
        epoch=epoch,
        log=describe_log(daemon.decision_log, config),
        listen=config.listen,
        participants=",".join(f"{n}={a}" for n, a in config.participants.items()) or "none",
    )
    if not config.participants:
        engine.log.warning(
            "no_participants",
            hint="every transaction will fail: add --participant NAME=HOST:PORT per agent",
        )
    await daemon.health.update(False, "start-up recovery")
    await serving.start()
    engine.log.info("listening", listen=config.listen, epoch=epoch)
    daemon.gate.active = True
    await engine.recover()


def run_background(daemon: Daemon, serving: Serving) -> None:
    """The loops of a serving coordinator, until it stops."""
    config, engine = daemon.config, daemon.engine

    async def healthy() -> None:
        """SERVING: it takes new transactions and its log can make a record durable."""
        if (why := engine.stopped) is not None:
            raise Unavailable(f"accepts no new transactions: {why}")
        await daemon.decision_log.probe()

    serving.spawn(check_participant_ids(engine, daemon.clients))
    serving.spawn(engine.recovery_loop())
    serving.spawn(engine.reap_idle_transactions())
    for participant in daemon.clients:
        serving.spawn(engine.probe_loop(participant))
    serving.spawn(daemon.health.watch(healthy, config.health_interval, config.health_timeout))
    serving.spawn(daemon.heuristics.run_forever(config.recovery_interval))
    if config.deadlock_interval > 0:
        serving.spawn(engine.deadlock_loop())


def _settle(future: asyncio.Future[str], value: str) -> None:
    if not future.done():
        future.set_result(value)


def reload_tls(log: EventLogger, clients: Iterable[ParticipantClient]) -> None:
    """SIGHUP: every outbound channel checks the TLS files now (the server does at its
    next handshake anyway)."""
    replaced = [c.name for c in clients if c.reload_tls()]
    log.info("sighup", tls_channels_replaced=",".join(replaced) or "none")


async def check_participant_ids(engine: Coordinator, clients: dict[str, ParticipantClient]) -> None:
    """Ask every agent its id once, so that a `--participant NAME=ADDRESS` pointing at
    an agent with another id (whose branches would never be found) is reported at
    start-up rather than discovered in the first in-doubt branch."""

    async def one(name: str, client: ParticipantClient) -> None:
        try:
            answered = await client.participant_id()
        except TwoPCError as exc:
            engine.log.warning("participant_unreachable", participant=name, error=str(exc))
            return
        if answered != name:
            engine.log.error(
                "participant_id_mismatch",
                participant=name,
                address=client.address,
                answers_as=answered,
                hint=f"the agent at {client.address} runs with --id {answered}: "
                f"use --participant {answered}={client.address} or fix the agent's --id",
            )

    await asyncio.gather(*(one(n, c) for n, c in clients.items()))


def stream_or_unary(text: str) -> str:
    if text not in ("stream", "unary"):
        raise argparse.ArgumentTypeError(f"expected stream or unary, not {text!r}")
    return text


COORDINATOR_FLAGS = (
    Flag("--listen", "listen", listen_address, "HOST:PORT"),
    Flag("--advertise", "advertise", listen_address, "HOST:PORT"),
    Flag("--log-dsn-file", "log_dsn_file", Path, "PATH"),
    Flag("--prepare-timeout", "prepare_timeout", positive, "SECONDS"),
    Flag("--rpc-timeout", "rpc_timeout", positive, "SECONDS"),
    Flag("--phase2-backoff-max", "phase2_backoff_max", positive, "SECONDS"),
    Flag("--transaction-idle-timeout", "transaction_idle_timeout", positive, "SECONDS"),
    Flag("--transaction-max-lifetime", "transaction_max_lifetime", positive, "SECONDS"),
    Flag("--max-in-flight", "max_in_flight", int, "N"),
    Flag("--admission-queue", "admission_queue", int, "N"),
    Flag("--admission-wait", "admission_wait", positive, "SECONDS"),
    Flag("--prepare-calls", "prepare_calls", stream_or_unary, "stream|unary"),
    Flag("--finish-calls", "finish_calls", stream_or_unary, "stream|unary"),
    Flag("--deadlock-interval", "deadlock_interval", non_negative, "SECONDS"),
    Flag("--deadlock-retries", "deadlock_retries", int, "N"),
    Flag("--probe-interval", "probe_interval", positive, "SECONDS"),
    Flag("--recovery-interval", "recovery_interval", positive, "SECONDS"),
    Flag("--token-listen", "token_listen", listen_address, "HOST:PORT"),
    Flag("--tokens-file", "tokens_file", Path, "PATH"),
)
"""The flags that set one `CoordinatorConfig` field each, help and default from it."""
LEASE_FLAGS = (
    Flag("--lease-duration", "duration", positive, "SECONDS"),
    Flag("--standby-poll-interval", "poll_interval", positive, "SECONDS"),
)
"""The same for `LeaseSettings` (a PostgreSQL decision log's lease)."""


def parser() -> argparse.ArgumentParser:
    """The command line, with every flag's help and default."""
    p = argparse.ArgumentParser(
        prog="twopc-coordinator",
        description="Two-phase-commit coordinator for PostgreSQL participant agents. "
        "Subcommands: `inspect` (the operator's view), `certs` (development "
        "certificates), `token` (issue a bearer token); each has --help.",
        formatter_class=HelpFormatter,
    )
    _add_own_flags(p)
    defaults = CoordinatorConfig(id="-", log_path="-")
    add_field_flags(p, defaults, COORDINATOR_FLAGS)
    add_field_flags(p.add_argument_group("PostgreSQL log"), defaults.lease, LEASE_FLAGS, "lease_")
    add_statement_policy_flags(p)
    add_daemon_flags(p, defaults)
    return p


def flag_names() -> dict[str, str]:
    """Config field -> the flag that sets it, for errors that name the field."""
    return {
        **{f.field: f.name for f in (*COORDINATOR_FLAGS, *LEASE_FLAGS)},
        **DAEMON_FLAG_NAMES,
        "participants": "--participant",
        "log_path": "--log",
    }


def _add_own_flags(p: argparse.ArgumentParser) -> None:
    """The flags whose values are parsed into more than one field's."""
    p.add_argument(
        "--id",
        required=True,
        metavar="NAME",
        help="this coordinator's name, 1-24 of [A-Za-z0-9_-]; part of every transaction "
        "id, and the decision log refuses another",
    )
    p.add_argument(
        "--log",
        metavar="PATH|URL",
        help="the decision log: a SQLite file (created if missing; its folder must exist), "
        "or a PostgreSQL database as postgresql://USER@HOST:PORT/DB?... without a password "
        "(several coordinators of one --id share it: one is active, the others stand by)",
    )
    p.add_argument(
        "--participant",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="a participant agent: its --id and its address (repeatable)",
    )
    p.add_argument(
        "--client-participants",
        action="append",
        default=[],
        metavar="NAME=P1,P2",
        help="client identity NAME may touch only these participants (repeatable; "
        "unnamed identities and admins may touch all)",
    )


def client_participants(items: list[str]) -> dict[str, frozenset[str]]:
    """Parse repeated `--client-participants NAME=P1,P2`."""
    out: dict[str, frozenset[str]] = {}
    for item in items:
        name, sep, listed = item.partition("=")
        allowed = frozenset(p.strip() for p in listed.split(",") if p.strip())
        if not sep or not name or not allowed:
            raise argparse.ArgumentTypeError(
                f"--client-participants {item!r}: expected NAME=PARTICIPANT[,PARTICIPANT...]"
            )
        if name in out:
            raise argparse.ArgumentTypeError(f"--client-participants {name!r} given twice")
        out[name] = allowed
    return out


def parse_args(argv: list[str] | None = None) -> tuple[CoordinatorConfig, LogSettings]:
    p = parser()
    a = p.parse_args(argv)
    if a.token_listen and not a.tokens_file:
        p.error("--token-listen needs --tokens-file")
    if a.token_listen and a.insecure:
        p.error("--token-listen needs TLS: bearer tokens are never sent in plaintext")
    if (a.log is None) == (a.log_dsn_file is None):
        p.error("give exactly one of --log and --log-dsn-file")
    tls = daemon_tls(p.prog, a, [a.listen, *([a.token_listen] if a.token_listen else [])])
    try:
        if a.log is not None and is_postgres_log(a.log):
            refuse_password(
                a.log, "--log", "put the URL in --log-dsn-file, or the password in PGPASSFILE"
            )
        lease = field_values(a, LEASE_FLAGS, "lease_")
        config = CoordinatorConfig(
            id=check_name("coordinator", a.id),
            log_path=a.log or "",
            lease=LeaseSettings(
                renew_interval=min(LeaseSettings().renew_interval, lease["duration"] / 3),
                **lease,
            ),
            participants=named_addresses(a.participant, "--participant"),
            probe_timeout=max(1.0, a.probe_interval),
            client_participants=client_participants(a.client_participants),
            **daemon_values(a, tls),
            **field_values(a, COORDINATOR_FLAGS),
        )
    except (TwoPCError, argparse.ArgumentTypeError) as exc:
        p.error(flag_error(exc, flag_names()))
    return config, LogSettings(log_level(p, a.log_level), a.log_format)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["inspect"]:
        from coordinator.inspect import main as inspect

        inspect(args[1:])
        return
    if args[:1] == ["certs"]:
        from twopc_common.certs import main as certs

        certs(args[1:])
        return
    if args[:1] == ["token"]:
        token_main(args[1:])
        return
    config, logs = parse_args(args)
    run_daemon(
        "twopc-coordinator",
        serve(config),
        logs,
        (StartupError, ListenError, TlsError, TokenFileError),
        config.allow_failpoints,
    )


if __name__ == "__main__":
    main()
