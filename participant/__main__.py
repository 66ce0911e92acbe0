"""`twopc-participant`: run one participant agent in front of one PostgreSQL database."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from participant import access, metrics
from participant.agent import Agent
from participant.config import ParticipantConfig
from participant.dsn import ENV_VAR, inline_dsn, read_dsn_file
from participant.probe import DatabaseProbe
from participant.recovery import Recovery
from participant.service import ParticipantService
from participant.store import ConfigurationError, Store
from twopc_common.auth import Authenticator, guard
from twopc_common.cli import (
    HelpFormatter,
    LogSettings,
    add_daemon_flags,
    add_statement_policy_flags,
    at_least_one,
    dsn,
    listen_address,
    log_level,
    named_address_lists,
    non_negative,
    positive,
    run_daemon,
    wait_for_termination,
)
from twopc_common.errors import InvalidArgument, TwoPCError
from twopc_common.health import Health
from twopc_common.ids import check_name
from twopc_common.metrics import RpcMetrics, serve_metrics
from twopc_common.server import ListenError, bind_grpc_server
from twopc_common.settings import describe_dsn
from twopc_common.statements import policy_kinds
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
    agent.log.info(
        "starting",
        database=describe_dsn(config.dsn),
        listen=config.listen,
        coordinators=" ".join(f"{n}={','.join(a)}" for n, a in config.coordinators.items())
        or "none",
    )
    if not config.coordinators:
        agent.log.warning(
            "no_coordinator",
            hint="in-doubt branches cannot be resolved: add --coordinator NAME=HOST:PORT "
            "for every coordinator that uses this agent",
        )
    recovery = Recovery(agent)
    health = Health(pb.DESCRIPTOR.services_by_name["Participant"].full_name, agent.log)
    probe = DatabaseProbe(config.dsn, config.id, config.health_timeout)
    registry = CollectorRegistry()
    server = bind_grpc_server(
        config.listen,
        config.limits.max_message_bytes,
        lambda s: pgrpc.add_ParticipantServicer_to_server(
            guard(
                ParticipantService(agent, recovery, store),
                pb.DESCRIPTOR.services_by_name["Participant"],
                Authenticator(not config.tls.insecure, config.admins),
                access.rules(config),
                agent.log,
            ),
            s,
        ),
        health,
        config.tls,
        agent.log,
        [RpcMetrics(registry)],
    )
    metrics.register(registry, agent, recovery, probe, health, store)
    metrics_server = (
        await serve_metrics(config.metrics_listen, registry, agent.log)
        if config.metrics_listen
        else None
    )
    await health.update(False, "first database probe")
    await server.start()
    agent.log.info("serving", listen=config.listen)
    tasks = [
        asyncio.create_task(agent.reap_idle_branches()),
        asyncio.create_task(recovery.run_forever()),
        asyncio.create_task(
            health.watch(probe.check, config.health_interval, config.health_timeout)
        ),
    ]
    try:
        await wait_for_termination(recovery.reload_tls)
    finally:
        agent.log.info("stopping")
        await health.shutdown()
        if metrics_server is not None:
            metrics_server.close()
        await server.stop(config.shutdown_grace)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await agent.close()
        await recovery.close()
        await probe.close()
        await store.close()


def parser() -> argparse.ArgumentParser:
    """The command line, with every flag's help and default."""
    d = ParticipantConfig(id="-", dsn="")
    p = argparse.ArgumentParser(
        prog="twopc-participant",
        description="Participant agent: wraps one PostgreSQL database for the coordinator.",
        formatter_class=HelpFormatter,
    )
    _add_identity_flags(p, d)
    _add_tuning_flags(p, d)
    add_statement_policy_flags(p)
    add_daemon_flags(p)
    return p


def _add_identity_flags(p: argparse.ArgumentParser, d: ParticipantConfig) -> None:
    """Who the agent is, its database, its address and its coordinators."""
    p.add_argument(
        "--id",
        required=True,
        metavar="NAME",
        help="this participant's name, 1-32 of [A-Za-z0-9_-]; the coordinator's "
        "--participant NAME=... must use the same name",
    )
    p.add_argument(
        "--dsn",
        type=dsn,
        metavar="DSN",
        help="libpq connection string of the database, e.g. 'host=db1 dbname=bank user=app', "
        f"without a password (that goes in --dsn-file, {ENV_VAR} or PGPASSFILE); "
        "the database needs max_prepared_transactions > 0, and the role its own schema "
        "twopc (created if the role may CREATE on the database)",
    )
    p.add_argument(
        "--dsn-file",
        type=Path,
        metavar="PATH",
        help="file holding the connection string (may carry the password)",
    )
    p.add_argument(
        "--listen", type=listen_address, default=d.listen, metavar="HOST:PORT", help="gRPC address"
    )
    p.add_argument(
        "--coordinator",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT[,HOST:PORT...]",
        help="a coordinator (its --id and the addresses of its processes: the active one "
        "and its standbys) to ask about in-doubt branches; without one, in-doubt branches "
        "wait for an operator (repeatable)",
    )


def _add_tuning_flags(p: argparse.ArgumentParser, d: ParticipantConfig) -> None:
    """The pool, the branches' timeouts and roles, and recovery: each with its default."""
    p.add_argument(
        "--pool-min-size",
        type=at_least_one,
        default=d.pool_min_size,
        metavar="N",
        help="database connections kept open",
    )
    p.add_argument(
        "--pool-max-size",
        type=at_least_one,
        default=d.pool_max_size,
        metavar="N",
        help="most database connections: one per branch at work",
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
        type=non_negative,
        default=d.recovery_grace,
        metavar="SECONDS",
        help="a prepared branch younger than this is left to the live protocol",
    )
    p.add_argument(
        "--branch-role",
        default=d.branch_role,
        metavar="ROLE",
        help="PostgreSQL role branch statements run as (no superuser, no rights on "
        "schema twopc); default: the agent's own role",
    )


def parse_args(argv: list[str] | None = None) -> tuple[ParticipantConfig, LogSettings]:
    p = parser()
    a = p.parse_args(argv)
    tls = daemon_tls(p.prog, a, [a.listen])
    try:
        config = ParticipantConfig(
            id=check_name("participant", a.id),
            dsn=inline_dsn(a.dsn, a.dsn_file),
            dsn_file=a.dsn_file,
            listen=a.listen,
            coordinators=named_address_lists(a.coordinator, "--coordinator"),
            pool_min_size=a.pool_min_size,
            pool_max_size=a.pool_max_size,
            interactive_reserve=a.interactive_reserve,
            lock_timeout=a.lock_timeout,
            statement_timeout=a.statement_timeout,
            idle_branch_timeout=a.idle_branch_timeout,
            recovery_interval=a.recovery_interval,
            recovery_grace=a.recovery_grace,
            metrics_listen=a.metrics,
            allow_failpoints=a.allow_failpoints,
            tls=tls,
            tls_reload_interval=a.tls_reload_interval,
            admins=frozenset(a.admin),
            branch_role=a.branch_role,
            statement_kinds=policy_kinds(a.allow_statement, a.refuse_statement),
        )
    except (TwoPCError, argparse.ArgumentTypeError) as exc:
        p.error(str(exc))
    return config, LogSettings(log_level(p, a.log_level), a.log_format)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["resolve"]:
        from participant.heuristic import main as resolve

        resolve(args[1:])
        return
    config, logs = parse_args(args)
    run_daemon(
        "twopc-participant",
        serve(config),
        logs,
        (ConfigurationError, ListenError, TlsError),
        config.allow_failpoints,
    )


if __name__ == "__main__":
    main()
