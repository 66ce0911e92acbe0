"""`twopc-participant`: run one participant agent in front of one PostgreSQL database."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
from pathlib import Path

from participant import access
from participant.agent import Agent
from participant.config import ParticipantConfig
from participant.dsn import ENV_VAR, inline_dsn, read_dsn_file
from participant.recovery import Recovery
from participant.service import ParticipantService
from participant.store import ConfigurationError, Store
from twopc_common.auth import Authenticator, guard
from twopc_common.cli import (
    add_daemon_flags,
    named_addresses,
    positive,
    run_daemon,
    wait_for_termination,
)
from twopc_common.errors import InvalidArgument, TwoPCError
from twopc_common.ids import check_name
from twopc_common.server import ListenError, bind_grpc_server
from twopc_common.tls import TlsError, daemon_tls
from twopc_pb import participant_pb2 as pb
from twopc_pb import participant_pb2_grpc as pgrpc


async def serve(config: ParticipantConfig) -> None:
    if config.dsn_file is not None:
        try:
            config = dataclasses.replace(config, dsn=read_dsn_file(config.dsn_file))
        except InvalidArgument as exc:
            raise ConfigurationError(str(exc)) from None
    store = Store(config)
    await store.open()
    agent = Agent(config, store)
    await agent.epochs.load()
    recovery = Recovery(agent)
    server = bind_grpc_server(
        config.listen,
        config.limits.max_message_bytes,
        lambda s: pgrpc.add_ParticipantServicer_to_server(
            guard(
                ParticipantService(agent, recovery),
                pb.DESCRIPTOR.services_by_name["Participant"],
                Authenticator(not config.tls.insecure, config.admins),
                access.rules(config),
                agent.log,
            ),
            s,
        ),
        config.tls,
        agent.log,
    )
    await server.start()
    agent.log.info("serving", listen=config.listen)
    tasks = [
        asyncio.create_task(agent.reap_idle_branches()),
        asyncio.create_task(recovery.run_forever()),
    ]
    try:
        await wait_for_termination()
    finally:
        agent.log.info("stopping")
        await server.stop(config.shutdown_grace)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await agent.close()
        await recovery.close()
        await store.close()


def parse_args(argv: list[str] | None = None) -> tuple[ParticipantConfig, str]:
    d = ParticipantConfig(id="-", dsn="-")
    p = argparse.ArgumentParser(
        prog="twopc-participant",
        description="Participant agent: wraps one PostgreSQL database for the coordinator.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--id", required=True, help="this participant's name")
    p.add_argument(
        "--dsn",
        help=f"libpq connection string of the database, without a password "
        f"(that goes in --dsn-file, {ENV_VAR} or PGPASSFILE)",
    )
    p.add_argument(
        "--dsn-file",
        type=Path,
        metavar="PATH",
        help="file holding the connection string (may carry the password)",
    )
    p.add_argument("--listen", default=d.listen, help="HOST:PORT to serve gRPC on")
    p.add_argument(
        "--coordinator",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="a coordinator to ask about in-doubt branches (repeatable)",
    )
    p.add_argument(
        "--pool-min-size", type=int, default=d.pool_min_size, help="connections kept open"
    )
    p.add_argument(
        "--pool-max-size",
        type=int,
        default=d.pool_max_size,
        help="most connections: one per branch at work",
    )
    p.add_argument(
        "--interactive-reserve",
        type=int,
        default=d.interactive_reserve,
        metavar="N",
        help="pool connections interactive branches may never take (kept for one-shot "
        "work); one more interactive branch is refused at once",
    )
    p.add_argument(
        "--lock-timeout",
        type=positive,
        default=d.lock_timeout,
        metavar="SECONDS",
        help="a statement waiting this long on a row lock fails: NO vote (a safety "
        "net: the coordinator's detector breaks cross-shard deadlocks)",
    )
    p.add_argument(
        "--statement-timeout",
        type=positive,
        default=d.statement_timeout,
        metavar="SECONDS",
        help="PostgreSQL statement_timeout for branch statements",
    )
    p.add_argument(
        "--idle-branch-timeout",
        type=positive,
        default=d.idle_branch_timeout,
        metavar="SECONDS",
        help="an interactive branch idle this long before Prepare is rolled back",
    )
    p.add_argument(
        "--recovery-interval",
        type=positive,
        default=d.recovery_interval,
        metavar="SECONDS",
        help="period of the scan for in-doubt prepared branches",
    )
    p.add_argument(
        "--recovery-grace",
        type=float,
        default=d.recovery_grace,
        metavar="SECONDS",
        help="a prepared branch younger than this is left to the live protocol",
    )
    add_daemon_flags(p)
    a = p.parse_args(argv)
    tls = daemon_tls(p.prog, a, [a.listen])
    try:
        config = ParticipantConfig(
            id=check_name("participant", a.id),
            dsn=inline_dsn(a.dsn, a.dsn_file),
            dsn_file=a.dsn_file,
            listen=a.listen,
            coordinators=named_addresses(a.coordinator, "--coordinator"),
            pool_min_size=a.pool_min_size,
            pool_max_size=a.pool_max_size,
            interactive_reserve=a.interactive_reserve,
            lock_timeout=a.lock_timeout,
            statement_timeout=a.statement_timeout,
            idle_branch_timeout=a.idle_branch_timeout,
            recovery_interval=a.recovery_interval,
            recovery_grace=a.recovery_grace,
            allow_failpoints=a.allow_failpoints,
            tls=tls,
            admins=frozenset(a.admin),
        )
    except (TwoPCError, argparse.ArgumentTypeError) as exc:
        p.error(str(exc))
    return config, a.log_level


def main(argv: list[str] | None = None) -> None:
    config, level = parse_args(argv)
    run_daemon(
        "twopc-participant",
        serve(config),
        level,
        (ConfigurationError, ListenError, TlsError),
        config.allow_failpoints,
    )


if __name__ == "__main__":
    main()
