"""`twopc-coordinator`: run the coordinator daemon."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

from coordinator import access
from coordinator.config import CoordinatorConfig
from coordinator.decision_log import DecisionLog, LogInUse
from coordinator.engine import Coordinator, LogBehind
from coordinator.participants import ParticipantClient
from coordinator.service import CoordinatorService
from twopc_common.auth import Authenticator, TokenFile, TokenFileError, guard, token_main
from twopc_common.cli import (
    add_daemon_flags,
    named_addresses,
    positive,
    run_daemon,
    wait_for_termination,
)
from twopc_common.errors import TwoPCError
from twopc_common.ids import check_name
from twopc_common.log import EventLogger
from twopc_common.server import ListenError, bind_grpc_server
from twopc_common.tls import TlsError, daemon_tls
from twopc_pb import coordinator_pb2 as pb
from twopc_pb import coordinator_pb2_grpc as cgrpc


class StartupError(TwoPCError):
    """The daemon cannot start (port taken, log unwritable, ...)."""


async def serve(config: CoordinatorConfig) -> None:
    log = EventLogger("coordinator", config.id)
    tokens = TokenFile(config.tokens_file, log) if config.tokens_file else None
    authenticator = Authenticator(not config.tls.insecure, config.admins, tokens)
    decision_log = DecisionLog(config.log_path, config.id, batch_max=config.log_batch_max)
    try:
        decision_log.acquire()
    except LogInUse as exc:
        raise StartupError(str(exc)) from exc
    except Exception as exc:
        raise StartupError(f"cannot open decision log {config.log_path}: {exc}") from exc
    clients = {
        name: ParticipantClient(
            name,
            address,
            config.rpc_timeout,
            config.limits.max_message_bytes,
            config.limits.max_phase2_batch,
            tls=config.tls,
        )
        for name, address in config.participants.items()
    }
    engine = Coordinator(config, decision_log, clients)
    try:
        await engine.check_log_is_current()
    except LogBehind as exc:
        await engine.close()
        decision_log.close()
        raise StartupError(str(exc)) from exc
    decision_log.begin_epoch()
    engine.log.info("starting", epoch=decision_log.epoch, participants=len(clients))
    await engine.recover()
    server = bind_grpc_server(
        config.listen,
        config.limits.max_message_bytes,
        lambda s: cgrpc.add_CoordinatorServicer_to_server(
            guard(
                CoordinatorService(engine, access.Owners(config.owners_remembered)),
                pb.DESCRIPTOR.services_by_name["Coordinator"],
                authenticator,
                access.rules(config),
                log,
            ),
            s,
        ),
        config.tls,
        log,
        config.token_listen,
    )
    await server.start()
    engine.log.info("serving", listen=config.listen, epoch=decision_log.epoch)
    tasks = [
        asyncio.create_task(engine.recovery_loop()),
        asyncio.create_task(engine.reap_idle_transactions()),
        *(asyncio.create_task(engine.probe_loop(p)) for p in clients),
    ]
    if config.deadlock_interval > 0:
        tasks.append(asyncio.create_task(engine.deadlock_loop()))
    try:
        await wait_for_termination()
    finally:
        engine.log.info("stopping")
        await server.stop(config.shutdown_grace)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await engine.close()
        decision_log.close()


def parse_args(argv: list[str] | None = None) -> tuple[CoordinatorConfig, str]:
    d = CoordinatorConfig(id="-", log_path="-")
    p = argparse.ArgumentParser(
        prog="twopc-coordinator",
        description="Two-phase-commit coordinator for PostgreSQL participant agents. "
        "Subcommands: `inspect` (the operator's view), `certs` (development "
        "certificates), `token` (issue a bearer token); each has --help.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--id", required=True, help="this coordinator's name (in every txid)")
    p.add_argument("--log", required=True, metavar="PATH", help="SQLite decision log")
    p.add_argument("--listen", default=d.listen, help="HOST:PORT to serve gRPC on")
    p.add_argument(
        "--participant",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="a participant agent (repeatable)",
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
        help="cap of the phase-2 retry backoff",
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
        "--deadlock-interval",
        type=float,
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
        metavar="HOST:PORT",
        help="a second port, TLS without client certificates, for clients with bearer tokens",
    )
    p.add_argument(
        "--tokens-file",
        type=Path,
        metavar="PATH",
        help="hashed bearer tokens (`twopc-coordinator token --help` issues them)",
    )
    add_daemon_flags(p)
    a = p.parse_args(argv)
    if a.token_listen and not a.tokens_file:
        p.error("--token-listen needs --tokens-file")
    if a.token_listen and a.insecure:
        p.error("--token-listen needs TLS: bearer tokens are never sent in plaintext")
    tls = daemon_tls(p.prog, a, [a.listen, *([a.token_listen] if a.token_listen else [])])
    try:
        config = CoordinatorConfig(
            id=check_name("coordinator", a.id),
            log_path=a.log,
            listen=a.listen,
            participants=named_addresses(a.participant, "--participant"),
            prepare_timeout=a.prepare_timeout,
            rpc_timeout=a.rpc_timeout,
            phase2_backoff_max=a.phase2_backoff_max,
            transaction_idle_timeout=a.transaction_idle_timeout,
            transaction_max_lifetime=a.transaction_max_lifetime,
            max_in_flight=a.max_in_flight,
            deadlock_interval=a.deadlock_interval,
            deadlock_retries=a.deadlock_retries,
            probe_interval=a.probe_interval,
            probe_timeout=a.probe_interval,
            recovery_interval=a.recovery_interval,
            allow_failpoints=a.allow_failpoints,
            tls=tls,
            token_listen=a.token_listen,
            tokens_file=a.tokens_file,
            admins=frozenset(a.admin),
        )
    except (TwoPCError, argparse.ArgumentTypeError) as exc:
        p.error(str(exc))
    return config, a.log_level


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
    config, level = parse_args(args)
    run_daemon(
        "twopc-coordinator",
        serve(config),
        level,
        (StartupError, ListenError, TlsError, TokenFileError),
        config.allow_failpoints,
    )


if __name__ == "__main__":
    main()
