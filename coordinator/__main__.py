"""`twopc-coordinator`: run the coordinator daemon."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Iterable
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
from twopc_common.auth import Authenticator, TokenFile, TokenFileError, guard, token_main
from twopc_common.cli import (
    HelpFormatter,
    LogSettings,
    add_daemon_flags,
    add_statement_policy_flags,
    listen_address,
    log_level,
    named_addresses,
    non_negative,
    positive,
    run_daemon,
    wait_for_termination,
)
from twopc_common.dsn import read_dsn_file, refuse_password
from twopc_common.errors import TwoPCError, Unavailable
from twopc_common.health import Health
from twopc_common.ids import check_name
from twopc_common.log import EventLogger
from twopc_common.metrics import RpcMetrics, serve_metrics
from twopc_common.server import ListenError, bind_grpc_server
from twopc_common.settings import describe_dsn
from twopc_common.statements import policy_kinds
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


async def serve(config: CoordinatorConfig) -> None:
    log = EventLogger("coordinator", config.id)
    tokens = TokenFile(config.tokens_file, log) if config.tokens_file else None
    authenticator = Authenticator(not config.tls.insecure, config.admins, tokens)
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
            prepare_stream=config.prepare_stream,
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
    health = Health(pb.DESCRIPTOR.services_by_name["Coordinator"].full_name, engine.log)
    registry = CollectorRegistry()
    # Both ports are bound before the log is touched: a daemon that cannot get its
    # ports must leave no trace (no new log file, no epoch bumped).
    try:
        server = bind_grpc_server(
            config.listen,
            config.limits.max_message_bytes,
            lambda s: cgrpc.add_CoordinatorServicer_to_server(
                guard(
                    gated(
                        CoordinatorService(
                            engine,
                            access.Owners(config.owners_remembered, engine.owner_of),
                            gate,
                        ),
                        pb.DESCRIPTOR.services_by_name["Coordinator"],
                        gate,
                    ),
                    pb.DESCRIPTOR.services_by_name["Coordinator"],
                    authenticator,
                    access.rules(config),
                    log,
                ),
                s,
            ),
            health,
            config.tls,
            log,
            [RpcMetrics(registry)],
            config.token_listen,
        )
    except ListenError:
        await engine.close()
        raise
    heuristics = HeuristicWatch(engine)
    metrics.register(registry, engine, health, heuristics)
    metrics_server = (
        await serve_metrics(config.metrics_listen, registry, engine.log)
        if config.metrics_listen
        else None
    )

    async def give_up(exc: Exception) -> StartupError:
        if metrics_server is not None:
            metrics_server.close()
        await server.stop(None)
        await engine.close()
        decision_log.close()
        return exc if isinstance(exc, StartupError) else StartupError(str(exc))

    # A PostgreSQL log may be held by another process of this id: then this one is a
    # standby, listening (UNAVAILABLE with the active's address, NOT_SERVING) while it
    # waits for the lease. A SQLite log is taken at once or refused.
    loop = asyncio.get_running_loop()
    terminated = asyncio.create_task(
        wait_for_termination(lambda: reload_tls(engine.log, clients.values()))
    )
    stopping = threading.Event()
    if pg_log is not None:
        await health.update(False, "standby: waiting for the decision log's lease")
        await server.start()
        engine.log.info("standby", listen=config.listen, log=describe_log(pg_log, config))
    acquiring = asyncio.create_task(
        asyncio.to_thread(pg_log.acquire, lambda: not stopping.is_set())
        if pg_log is not None
        else asyncio.to_thread(decision_log.acquire)
    )
    await asyncio.wait({acquiring, terminated}, return_when=asyncio.FIRST_COMPLETED)
    if not acquiring.done():
        stopping.set()
        with contextlib.suppress(Exception):
            await acquiring
        await give_up(StartupError("stopped"))
        return
    try:
        acquiring.result()
    except LogInUse as exc:
        raise await give_up(exc) from exc
    except Exception as exc:
        folder = os.path.dirname(os.path.abspath(config.log_path))
        hint = (
            ""
            if pg_log is not None or os.path.isdir(folder)
            else f" (folder {folder} does not exist: create it)"
        )
        where = describe_log(decision_log, config)
        raise await give_up(StartupError(f"cannot open decision log {where}: {exc}{hint}")) from exc
    try:
        await engine.check_log_is_current()
    except LogBehind as exc:
        raise await give_up(exc) from exc
    fenced: asyncio.Future[str] = loop.create_future()
    if pg_log is not None:

        def on_fenced(why: str) -> None:
            gate.stepped_down = why
            loop.call_soon_threadsafe(_settle, fenced, why)

        pg_log.on_fenced = on_fenced
    try:
        await asyncio.to_thread(decision_log.begin_epoch)
    except Exception as exc:
        raise await give_up(StartupError(f"cannot start epoch: {exc}")) from exc
    engine.log.info(
        "starting",
        epoch=decision_log.epoch,
        log=describe_log(decision_log, config),
        listen=config.listen,
        participants=",".join(f"{n}={a}" for n, a in config.participants.items()) or "none",
    )
    if not config.participants:
        engine.log.warning(
            "no_participants",
            hint="every transaction will fail: add --participant NAME=HOST:PORT per agent",
        )
    # Listening during recovery, NOT_SERVING until it is done: probes and operators
    # can tell "recovering" from "down". GetTransaction answers UNAVAILABLE until
    # recovery made "unknown" safe; new transactions cannot race it (it leaves alone
    # whatever is in memory).
    await health.update(False, "start-up recovery")
    if pg_log is None:
        await server.start()
    engine.log.info("listening", listen=config.listen, epoch=decision_log.epoch)
    gate.active = True
    await engine.recover()

    async def healthy() -> None:
        """SERVING: it takes new transactions and its log can make a record durable."""
        if (why := engine.stopped) is not None:
            raise Unavailable(f"accepts no new transactions: {why}")
        await decision_log.probe()

    tasks = [
        asyncio.create_task(check_participant_ids(engine, clients)),
        asyncio.create_task(engine.recovery_loop()),
        asyncio.create_task(engine.reap_idle_transactions()),
        *(asyncio.create_task(engine.probe_loop(p)) for p in clients),
        asyncio.create_task(health.watch(healthy, config.health_interval, config.health_timeout)),
        asyncio.create_task(heuristics.run_forever(config.recovery_interval)),
    ]
    if config.deadlock_interval > 0:
        tasks.append(asyncio.create_task(engine.deadlock_loop()))
    engine.log.info("serving", listen=config.listen, epoch=decision_log.epoch)
    try:
        ends: list[asyncio.Future[Any]] = [terminated, fenced]
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
    finally:
        engine.log.info("stopping")
        await health.shutdown()
        if metrics_server is not None:
            metrics_server.close()
        await server.stop(config.shutdown_grace)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await engine.close()
        decision_log.close()
        terminated.cancel()
    if fenced.done():
        engine.log.error("stepped_down", reason=fenced.result())
        raise SteppedDown(f"stepped down: {fenced.result()} (start it again to run as a standby)")


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


def parser() -> argparse.ArgumentParser:
    """The command line, with every flag's help and default."""
    d = CoordinatorConfig(id="-", log_path="-")
    p = argparse.ArgumentParser(
        prog="twopc-coordinator",
        description="Two-phase-commit coordinator for PostgreSQL participant agents. "
        "Subcommands: `inspect` (the operator's view), `certs` (development "
        "certificates), `token` (issue a bearer token); each has --help.",
        formatter_class=HelpFormatter,
    )
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
        "--log-dsn-file",
        type=Path,
        metavar="PATH",
        help="instead of --log: a file holding the PostgreSQL decision log's connection "
        "string, which may carry a password (or put it in PGPASSFILE)",
    )
    p.add_argument(
        "--advertise",
        type=listen_address,
        metavar="HOST:PORT",
        help="the address clients are sent to while this process is the active one "
        "(standbys name it in their answers; default: --listen)",
    )
    p.add_argument(
        "--lease-duration",
        type=positive,
        default=d.lease.duration,
        metavar="SECONDS",
        help="PostgreSQL log: a paused or cut-off active is taken over after this long "
        "without renewing its lease (a crashed one at once)",
    )
    p.add_argument(
        "--standby-poll-interval",
        type=positive,
        default=d.lease.poll_interval,
        metavar="SECONDS",
        help="PostgreSQL log: how often a standby tries to take over",
    )
    p.add_argument(
        "--listen", type=listen_address, default=d.listen, metavar="HOST:PORT", help="gRPC address"
    )
    p.add_argument(
        "--participant",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="a participant agent: its --id and its address (repeatable)",
    )
    p.add_argument(
        "--prepare-timeout",
        type=positive,
        default=d.prepare_timeout,
        metavar="SECONDS",
        help="votes missing after it mean abort",
    )
    p.add_argument(
        "--rpc-timeout",
        type=positive,
        default=d.rpc_timeout,
        metavar="SECONDS",
        help="deadline of every other call to a participant",
    )
    p.add_argument(
        "--phase2-backoff-max",
        type=positive,
        default=d.phase2_backoff_max,
        metavar="SECONDS",
        help="cap of the phase-2 retry backoff (phase 2 is retried forever)",
    )
    p.add_argument(
        "--transaction-idle-timeout",
        type=positive,
        default=d.transaction_idle_timeout,
        metavar="SECONDS",
        help="an interactive transaction idle this long is rolled back",
    )
    p.add_argument(
        "--transaction-max-lifetime",
        type=positive,
        default=d.transaction_max_lifetime,
        metavar="SECONDS",
        help="an interactive transaction older than this is rolled back, busy or not",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=d.max_in_flight,
        metavar="N",
        help="transactions preparing at once; beyond it new ones are refused at once "
        "(RESOURCE_EXHAUSTED with a retry hint)",
    )
    p.add_argument(
        "--prepare-calls",
        choices=("stream", "unary"),
        default="stream" if d.prepare_stream else "unary",
        help="stream: every Prepare to an agent over one long-lived call, several in one "
        "message when they queue; unary: one call each",
    )
    p.add_argument(
        "--deadlock-interval",
        type=non_negative,
        default=d.deadlock_interval,
        metavar="SECONDS",
        help="period of the cross-shard deadlock detector (0: off)",
    )
    p.add_argument(
        "--deadlock-retries",
        type=int,
        default=d.deadlock_retries,
        metavar="N",
        help="times a one-shot transaction that lost a deadlock is run again before "
        "its client is told DEADLOCK",
    )
    p.add_argument(
        "--probe-interval",
        type=positive,
        default=d.probe_interval,
        metavar="SECONDS",
        help="period of each participant's health probe; two unanswered mark it down",
    )
    p.add_argument(
        "--recovery-interval",
        type=positive,
        default=d.recovery_interval,
        metavar="SECONDS",
        help="period of the in-doubt branch scan",
    )
    p.add_argument(
        "--token-listen",
        type=listen_address,
        metavar="HOST:PORT",
        help="a second port, TLS without client certificates, for clients with bearer tokens",
    )
    p.add_argument(
        "--tokens-file",
        type=Path,
        metavar="PATH",
        help="hashed bearer tokens (`twopc-coordinator token --help` issues them)",
    )
    p.add_argument(
        "--client-participants",
        action="append",
        default=[],
        metavar="NAME=P1,P2",
        help="client identity NAME may touch only these participants (repeatable; "
        "unnamed identities and admins may touch all)",
    )
    add_statement_policy_flags(p)
    add_daemon_flags(p)
    return p


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
        config = CoordinatorConfig(
            id=check_name("coordinator", a.id),
            log_path=a.log or "",
            log_dsn_file=a.log_dsn_file,
            advertise=a.advertise,
            lease=LeaseSettings(
                duration=a.lease_duration,
                renew_interval=min(LeaseSettings().renew_interval, a.lease_duration / 3),
                poll_interval=a.standby_poll_interval,
            ),
            listen=a.listen,
            participants=named_addresses(a.participant, "--participant"),
            prepare_timeout=a.prepare_timeout,
            rpc_timeout=a.rpc_timeout,
            phase2_backoff_max=a.phase2_backoff_max,
            transaction_idle_timeout=a.transaction_idle_timeout,
            transaction_max_lifetime=a.transaction_max_lifetime,
            max_in_flight=a.max_in_flight,
            prepare_stream=a.prepare_calls == "stream",
            deadlock_interval=a.deadlock_interval,
            deadlock_retries=a.deadlock_retries,
            probe_interval=a.probe_interval,
            probe_timeout=max(1.0, a.probe_interval),
            recovery_interval=a.recovery_interval,
            metrics_listen=a.metrics,
            allow_failpoints=a.allow_failpoints,
            tls=tls,
            tls_reload_interval=a.tls_reload_interval,
            token_listen=a.token_listen,
            tokens_file=a.tokens_file,
            admins=frozenset(a.admin),
            client_participants=client_participants(a.client_participants),
            statement_kinds=policy_kinds(a.allow_statement, a.refuse_statement),
        )
    except (TwoPCError, argparse.ArgumentTypeError) as exc:
        p.error(str(exc))
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
