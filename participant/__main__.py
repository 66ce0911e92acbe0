"""`twopc-participant`: run one participant agent in front of one PostgreSQL database."""

from __future__ import annotations

import argparse
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
from twopc_common.auth import Authenticator
from twopc_common.cli import (
    DAEMON_FLAG_NAMES,
    HelpFormatter,
    LogSettings,
    add_daemon_flags,
    add_statement_policy_flags,
    at_least_one,
    daemon_values,
    dsn,
    listen_address,
    log_level,
    named_address_lists,
    non_negative,
    positive,
    run_daemon,
)
from twopc_common.errors import InvalidArgument, TwoPCError
from twopc_common.flags import Flag, add_field_flags, field_values, flag_error
from twopc_common.health import Health
from twopc_common.ids import check_name
from twopc_common.server import ListenError
from twopc_common.serving import Service, serve_grpc
from twopc_common.settings import describe_dsn
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
    log_start(agent)
    recovery = Recovery(agent)
    health = Health(pb.DESCRIPTOR.services_by_name["Participant"].full_name, agent.log)
    probe = DatabaseProbe(config.dsn, config.id, config.health_timeout)
    registry = CollectorRegistry()
    metrics.register(registry, agent, recovery, probe, health, store)
    service = Service(
        ParticipantService(agent, recovery, store),
        pgrpc.add_ParticipantServicer_to_server,
        pb.DESCRIPTOR.services_by_name["Participant"],
        Authenticator(not config.tls.insecure, config.admins),
        access.rules(config),
    )
    async with contextlib.AsyncExitStack() as stack:
        # Closed in this order once the server has stopped.
        for close in (store.close, probe.close, recovery.close, agent.close):
            stack.push_async_callback(close)
        serving = await stack.enter_async_context(
            serve_grpc(config, service, health, agent.log, registry, on_hangup=recovery.reload_tls)
        )
        await health.update(False, "first database probe")
        await serving.start()
        agent.log.info("serving", listen=config.listen)
        serving.spawn(agent.reap_idle_branches())
        serving.spawn(recovery.run_forever())
        serving.spawn(health.watch(probe.check, config.health_interval, config.health_timeout))
        await serving.terminated


def log_start(agent: Agent) -> None:
    config = agent.config
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


PARTICIPANT_FLAGS = (
    Flag("--dsn-file", "dsn_file", Path, "PATH"),
    Flag("--listen", "listen", listen_address, "HOST:PORT"),
    Flag("--pool-min-size", "pool_min_size", at_least_one, "N"),
    Flag("--pool-max-size", "pool_max_size", at_least_one, "N"),
    Flag("--interactive-reserve", "interactive_reserve", int, "N"),
    Flag("--lock-timeout", "lock_timeout", positive, "SECONDS"),
    Flag("--statement-timeout", "statement_timeout", positive, "SECONDS"),
    Flag("--idle-branch-timeout", "idle_branch_timeout", positive, "SECONDS"),
    Flag("--recovery-interval", "recovery_interval", positive, "SECONDS"),
    Flag("--recovery-grace", "recovery_grace", non_negative, "SECONDS"),
    Flag("--branch-role", "branch_role", str, "ROLE"),
)
"""The flags that set one `ParticipantConfig` field each, help and default from it."""


def parser() -> argparse.ArgumentParser:
    """The command line, with every flag's help and default."""
    p = argparse.ArgumentParser(
        prog="twopc-participant",
        description="Participant agent: wraps one PostgreSQL database for the coordinator.",
        formatter_class=HelpFormatter,
    )
    _add_own_flags(p)
    defaults = ParticipantConfig(id="-", dsn="")
    add_field_flags(p, defaults, PARTICIPANT_FLAGS)
    add_statement_policy_flags(p)
    add_daemon_flags(p, defaults)
    return p


def flag_names() -> dict[str, str]:
    """Config field -> the flag that sets it, for errors that name the field."""
    return {
        **{f.field: f.name for f in PARTICIPANT_FLAGS},
        **DAEMON_FLAG_NAMES,
        "dsn": "--dsn",
        "coordinators": "--coordinator",
    }


def _add_own_flags(p: argparse.ArgumentParser) -> None:
    """The flags whose values are parsed before they are a field's."""
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
        "--coordinator",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT[,HOST:PORT...]",
        help="a coordinator (its --id and the addresses of its processes: the active one "
        "and its standbys) to ask about in-doubt branches; without one, in-doubt branches "
        "wait for an operator (repeatable)",
    )


def parse_args(argv: list[str] | None = None) -> tuple[ParticipantConfig, LogSettings]:
    p = parser()
    a = p.parse_args(argv)
    tls = daemon_tls(p.prog, a, [a.listen])
    try:
        config = ParticipantConfig(
            id=check_name("participant", a.id),
            dsn=inline_dsn(a.dsn, a.dsn_file),
            coordinators=named_address_lists(a.coordinator, "--coordinator"),
            **daemon_values(a, tls),
            **field_values(a, PARTICIPANT_FLAGS),
        )
    except (TwoPCError, argparse.ArgumentTypeError) as exc:
        p.error(flag_error(exc, flag_names()))
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
