"""`bank-demo`: cross-shard bank transfers that stay correct while partitions and
crashes hit them, proved from the shards themselves.

    bank-demo [run]   start everything on this machine (PostgreSQL shards, Toxiproxy on
                      every path, agents, coordinator), transfer money concurrently while
                      a fault schedule plays, heal, wait for recovery, check, report
    bank-demo run --coordinator HOST:PORT --shard shard1=DSN ... [--toxiproxy-url URL]
                      the same against an existing deployment (e.g. docker compose)
    bank-demo check --shard shard1=DSN ... [--transfers FILE]
                      the invariant checker alone; exit status 1 on any FAIL

Against existing databases the demo creates its tables (accounts, ledger, bank_meta)
and marks them as its own; it drops and recreates only tables that carry its mark. A
table of one of those names that it did not create is never touched: the run stops
and names it, unless you pass --reset. Every option is checked before anything starts.
Exit status: 0 all checks passed, 1 a check failed or the deployment is unusable, 2 a
usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import psycopg

from bank_demo import bank, checker, report
from bank_demo.faults import (
    PRESETS,
    FaultEvent,
    FaultPlayer,
    ScheduleError,
    load_schedule,
    make_schedule,
    schedule_json,
)
from bank_demo.workload import Workload, WorkloadConfig, in_doubt
from coordinator.client import CoordinatorClient
from twopc_common import settings
from twopc_common.auth import TokenFileError, add_token_flag, read_token_file
from twopc_common.cli import HelpFormatter, add_version_flag
from twopc_common.errors import TwoPCError
from twopc_common.ids import check_name
from twopc_common.tls import TlsConfig, TlsError, add_tls_flags, client_tls
from twopc_harness.network import FaultNetwork, attach_network
from twopc_harness.postgres import HarnessError
from twopc_harness.system import LocalSystem, local_proxy_names, start_system

# The local deployment runs with short timeouts so that faults resolve within seconds.
LOCAL_COORDINATOR_ARGS = [
    "--prepare-timeout",
    "2",
    "--rpc-timeout",
    "2",
    "--recovery-interval",
    "1",
    "--phase2-backoff-max",
    "1",
]
LOCAL_PARTICIPANT_ARGS = [
    "--lock-timeout",
    "5",
    "--recovery-interval",
    "1",
    "--recovery-grace",
    "1",
    "--idle-branch-timeout",
    "10",
]
RECOVERY_DEADLINE = 90.0


class DemoError(Exception):
    """Bad options or an unusable deployment: one clear line, non-zero exit."""


class UsageError(DemoError):
    """A bad option, found before anything started (exit status 2)."""


def _shard_dsns(items: Sequence[str], files: Sequence[str] = ()) -> dict[str, str]:
    """The shards of --shard NAME=DSN and --shard-dsn-file NAME=PATH (the DSN, password
    included, read from a file: a password in argv is visible to every local user)."""
    dsns: dict[str, str] = {}
    read = []
    for item in files:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise UsageError(f"--shard-dsn-file {item!r}: expected NAME=PATH")
        try:
            read.append(f"{name}={Path(path).read_text().strip()}")
        except OSError as exc:
            raise UsageError(f"--shard-dsn-file {name}: cannot read {path}: {exc}") from None
    for item in [*items, *read]:
        name, sep, dsn = item.partition("=")
        if not sep or not dsn:
            raise UsageError(f"--shard {settings.redact(item)!r}: expected NAME=DSN")
        try:
            check_name("participant", name)
            settings.dsn(f"--shard {name}", dsn)
        except TwoPCError as exc:
            raise UsageError(str(exc)) from None
        if name in dsns:
            raise UsageError(f"--shard {name!r} given twice")
        dsns[name] = dsn
    return dsns


def _check_shards(dsns: dict[str, str]) -> None:
    for name, dsn in dsns.items():
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                row = conn.execute("SHOW max_prepared_transactions").fetchone()
        except psycopg.Error as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise DemoError(
                f"shard {name} does not answer ({settings.redact(message)}) at "
                f"{settings.describe_dsn(dsn)}"
            ) from None
        if row is None or int(str(row[0])) == 0:
            raise DemoError(
                f"shard {name} has max_prepared_transactions = 0: it cannot "
                "take part in two-phase commit"
            )


def _check_coordinator(address: str, tls: TlsConfig, token: str | None) -> None:
    try:
        with CoordinatorClient(address, timeout=5, tls=tls, token=token) as client:
            client.status(timeout=5)
    except TwoPCError as exc:
        raise DemoError(f"the coordinator at {address} does not answer ({exc})") from None


def _schedule(
    args: argparse.Namespace,
    seed: int,
    shards: list[str],
    proxies: list[str] | None,
    can_kill: bool,
) -> list[FaultEvent]:
    """The fault schedule; `proxies` None means there is no fault network."""
    network = proxies is not None
    proxies = proxies or []
    faults = args.faults or ("mixed" if can_kill else "network" if network else "none")
    try:
        if faults in PRESETS:
            if faults == "mixed" and not can_kill:
                raise ScheduleError(
                    "the mixed preset kills processes: only for the local "
                    "deployment (use --faults network)"
                )
            if faults == "network" and not network:
                raise ScheduleError("--faults network needs a Toxiproxy (--toxiproxy-url)")
            return make_schedule(faults, seed, args.duration, shards, proxies)
        if not Path(faults).exists():
            raise ScheduleError(
                f"--faults {faults!r} is neither a preset ({', '.join(PRESETS)}) "
                "nor an existing schedule file (FILE.json)"
            )
        return load_schedule(Path(faults), shards, proxies, can_kill)
    except ScheduleError as exc:
        raise DemoError(str(exc)) from None


def _out_dir(args: argparse.Namespace, seed: int) -> Path:
    out = Path(args.out or f"out/bank-demo-{seed}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _wait_for_recovery(dsns: dict[str, str]) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < RECOVERY_DEADLINE:
        if in_doubt(dsns) == 0:
            return time.monotonic() - started
        time.sleep(0.25)
    return None


def play(
    args: argparse.Namespace,
    address: str,
    tls: TlsConfig,
    dsns: dict[str, str],
    network: FaultNetwork | None,
    system: LocalSystem | None,
    seed: int,
    token: str | None = None,
) -> int:
    shards = list(dsns)
    proxies = sorted(network.proxies) if network is not None else None
    schedule = _schedule(args, seed, shards, proxies, system is not None)
    out = _out_dir(args, seed)
    print(
        f"bank-demo: {len(shards)} shards, {args.accounts} accounts of {args.balance}, "
        f"{args.concurrency} clients for {args.duration:g}s, seed {seed}",
        file=sys.stderr,
    )
    for event in schedule:
        print(
            f"  fault at {event.at:>5.1f}s for {event.duration:.1f}s: {event.label}",
            file=sys.stderr,
        )
    try:
        bank.create_schema(dsns, reset=args.reset)
    except bank.NotTheDemosSchema as exc:
        raise DemoError(str(exc)) from None
    bank.open_accounts(dsns, args.accounts, args.balance)

    player = FaultPlayer(network, system)
    workload = Workload(
        address,
        tls,
        shards,
        dsns,
        WorkloadConfig(
            accounts=args.accounts,
            concurrency=args.concurrency,
            duration=args.duration,
            hot_accounts=args.hot_accounts,
            hot_fraction=args.hot_fraction,
            # Unique per run: the coordinator keeps keys (its retention), and this
            # run's transfers are not the last run's.
            run_id=f"{uuid.uuid4().hex[:8]}-",
        ),
        random.Random(seed),
        lambda: player.current,
        token,
    )
    started = time.monotonic()
    stop_at = started + args.duration
    faults = threading.Thread(
        target=player.play, args=(schedule, started, stop_at), name="faults", daemon=True
    )
    faults.start()
    asyncio.run(workload.run(progress=not args.quiet))
    faults.join()
    if network is not None:
        network.heal()
    recovery = _wait_for_recovery(dsns)

    records = workload.records
    outcomes = {r.id: r.outcome for r in records}
    checks = checker.run_checks(dsns, outcomes)
    figs = report.figures(records, args.duration, workload.timeline)
    ok = all(c.ok for c in checks)
    report.write_transfers(out / "transfers.jsonl", records)
    report.write_chart(
        out / "chart.png",
        workload.timeline,
        schedule,
        f"bank-demo: {len(shards)} shards, seed {seed}",
    )
    report.write_json(
        out / "report.json",
        {
            "seed": seed,
            "config": {
                k: [settings.redact(shard) for shard in v] if k == "shard" else v
                for k, v in vars(args).items()
                if k != "command"
            },
            "deployment": "local" if system is not None else address,
            "fault_network": network.kind if network is not None else None,
            "schedule": schedule_json(schedule),
            "figures": figs,
            "recovery_seconds": recovery,
            "checks": [
                asdict(c)
                | {"offending": list(c.offending[:100]), "offending_count": len(c.offending)}
                for c in checks
            ],
            "passed": ok,
            "timeline": [asdict(s) for s in workload.timeline],
        },
    )
    print(report.render(figs, checks, recovery))
    print(checker.render(checks))
    print(
        f"report: {out / 'report.json'}, chart: {out / 'chart.png'}, "
        f"transfers: {out / 'transfers.jsonl'}"
    )
    return 0 if ok else 1


def _check_run_options(args: argparse.Namespace, seed: int) -> None:
    """Everything that can be checked without a deployment, before one is started or
    touched: a bad option costs a second, not a cluster start-up."""
    if args.token_file is not None and not args.coordinator:
        raise UsageError("--token-file is for an existing deployment: give --coordinator too")
    if args.coordinator:
        try:
            settings.host_port("--coordinator", args.coordinator)
        except TwoPCError as exc:
            raise UsageError(str(exc)) from None
        dsns = _shard_dsns(args.shard, args.shard_dsn_file)
        if not dsns:
            raise UsageError(
                "--coordinator needs the shards' DSNs: --shard NAME=DSN or "
                "--shard-dsn-file NAME=PATH ..."
            )
        # The proxies of an existing Toxiproxy are known only once it answers; the
        # schedule is checked against them then.
        proxies: list[str] | None = [] if args.toxiproxy_url else None
        if args.faults in PRESETS or proxies is None:
            _schedule_usage(args, seed, list(dsns), proxies, can_kill=False)
        return
    if args.shard or args.shard_dsn_file or args.toxiproxy_url:
        raise UsageError(
            "--shard, --shard-dsn-file and --toxiproxy-url go with --coordinator (an existing "
            "deployment); without it the demo starts its own"
        )
    if args.reset:
        raise UsageError(
            "--reset goes with --coordinator and --shard (the local demo starts empty)"
        )
    shards = [f"shard{i}" for i in range(1, args.shards + 1)]
    _schedule_usage(args, seed, shards, local_proxy_names(shards), can_kill=True)


def _schedule_usage(
    args: argparse.Namespace,
    seed: int,
    shards: list[str],
    proxies: list[str] | None,
    can_kill: bool,
) -> None:
    try:
        _schedule(args, seed, shards, proxies, can_kill)
    except DemoError as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    _check_run_options(args, seed)
    if args.coordinator:
        dsns = _shard_dsns(args.shard, args.shard_dsn_file)
        _check_shards(dsns)
        try:
            tls = client_tls(args)
            token = read_token_file(args.token_file)
        except (TlsError, TokenFileError) as exc:
            raise DemoError(str(exc)) from None
        _check_coordinator(args.coordinator, tls, token)
        try:
            network = attach_network(args.toxiproxy_url) if args.toxiproxy_url else None
        except HarnessError as exc:
            raise DemoError(str(exc)) from None
        try:
            return play(args, args.coordinator, tls, dsns, network, None, seed, token)
        finally:
            if network is not None:
                network.stop()
    print(
        f"bank-demo: starting {args.shards} PostgreSQL shards, Toxiproxy, agents and the "
        "coordinator...",
        file=sys.stderr,
    )
    t0 = time.monotonic()
    system = start_system(
        args.shards,
        coordinator_args=LOCAL_COORDINATOR_ARGS,
        participant_args=LOCAL_PARTICIPANT_ARGS,
        faults=True,
    )
    try:
        print(
            f"bank-demo: up in {time.monotonic() - t0:.1f}s "
            f"({system.network.kind if system.network else 'no fault network'})",
            file=sys.stderr,
        )
        dsns = {s: system.dsn(s) for s in system.shard_names}
        return play(
            args, system.client_address, system.tls("app"), dsns, system.network, system, seed
        )
    finally:
        # The daemons' logs (one grep for a txid tells its story) go with the report.
        system.stop(logs_to=_out_dir(args, seed) / "logs")


def check(args: argparse.Namespace) -> int:
    dsns = _shard_dsns(args.shard, args.shard_dsn_file)
    if not dsns:
        raise UsageError("give the shards to check: --shard NAME=DSN or --shard-dsn-file NAME=PATH")
    outcomes = None
    if args.transfers:
        try:
            outcomes = checker.load_outcomes(Path(args.transfers))
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"cannot read --transfers {args.transfers}: {exc}") from None
    _check_shards(dsns)
    try:
        bank.require_schema(dsns)
    except bank.NotTheDemosSchema as exc:
        raise DemoError(str(exc)) from None
    checks = checker.run_checks(dsns, outcomes)
    print(checker.render(checks))
    return 0 if all(c.ok for c in checks) else 1


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the description's layout kept."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bank-demo", description=__doc__, formatter_class=_Formatter)
    add_version_flag(p)
    sub = p.add_subparsers(dest="command", metavar="{run,check}")
    r = sub.add_parser(
        "run", help="run the demo (the default)", description=__doc__, formatter_class=_Formatter
    )
    c = sub.add_parser(
        "check",
        help="check the invariants of existing shards",
        description=checker.__doc__,
        formatter_class=_Formatter,
    )
    for target in (p, r):
        target.add_argument(
            "--shards", type=int, default=3, metavar="N", help="shards to start (local demo)"
        )
        target.add_argument(
            "--accounts", type=int, default=100, metavar="N", help="accounts opened, ids 1..N"
        )
        target.add_argument(
            "--balance", type=int, default=1000, metavar="AMOUNT", help="initial balance of each"
        )
        target.add_argument(
            "--concurrency", type=int, default=16, metavar="N", help="concurrent clients"
        )
        target.add_argument(
            "--duration",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="how long transfers run",
        )
        target.add_argument(
            "--hot-accounts",
            type=int,
            default=0,
            metavar="N",
            help="size of a hot set of accounts, ids 1..N (0: no skew)",
        )
        target.add_argument(
            "--hot-fraction",
            type=float,
            default=0.8,
            metavar="FRACTION",
            help="share of transfers within the hot set, 0 to 1",
        )
        target.add_argument(
            "--faults",
            metavar="SCHEDULE",
            help=f"{' | '.join(PRESETS)} | FILE.json "
            "(default: mixed locally, network with --toxiproxy-url, else none)",
        )
        target.add_argument(
            "--seed", type=int, metavar="N", help="random seed (default: random, printed)"
        )
        target.add_argument(
            "--out", metavar="DIR", help="output folder (default: out/bank-demo-SEED)"
        )
        target.add_argument("--quiet", action="store_true", help="no live progress line")
        target.add_argument(
            "--coordinator", metavar="HOST:PORT", help="an existing deployment's coordinator"
        )
        target.add_argument(
            "--shard",
            action="append",
            default=[],
            metavar="NAME=DSN",
            help="an existing deployment's shard: the agent's --id and its database (repeatable)",
        )
        target.add_argument(
            "--shard-dsn-file",
            action="append",
            default=[],
            metavar="NAME=PATH",
            help="as --shard, the DSN (password included) read from a file (repeatable)",
        )
        target.add_argument(
            "--toxiproxy-url", metavar="URL", help="an existing deployment's Toxiproxy API"
        )
        target.add_argument(
            "--reset",
            action="store_true",
            help="with --shard: drop tables named accounts, ledger or bank_meta even if "
            "the demo did not create them (without it the demo refuses to touch them)",
        )
        add_tls_flags(target, daemon=False)
        add_token_flag(target)
    c.add_argument(
        "--shard",
        action="append",
        default=[],
        metavar="NAME=DSN",
        help="a shard to check: its name and its database (repeatable)",
    )
    c.add_argument(
        "--shard-dsn-file",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="as --shard, the DSN (password included) read from a file (repeatable)",
    )
    c.add_argument(
        "--transfers",
        metavar="FILE",
        help="transfers.jsonl of a run, to check the outcomes the client was told "
        "(without it those two checks are skipped)",
    )
    return p


def _validate(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.command == "check":
        return
    problems = [
        (a.shards < 1, "--shards must be at least 1"),
        (a.accounts < 2, "--accounts must be at least 2"),
        (a.balance < 0, "--balance cannot be negative"),
        (a.concurrency < 1, "--concurrency must be at least 1"),
        (not math.isfinite(a.duration) or a.duration <= 0, "--duration must be positive"),
        (
            a.hot_accounts != 0 and not 2 <= a.hot_accounts <= a.accounts,
            "--hot-accounts must be 0 or between 2 and --accounts",
        ),
        (not 0 <= a.hot_fraction <= 1, "--hot-fraction must be between 0 and 1"),
    ]
    for bad, message in problems:
        if bad:
            p.error(message)


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"bank-demo: {settings.redact(message)}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    a = p.parse_args(argv)
    _validate(p, a)
    # SIGTERM unwinds like Ctrl-C, so clusters and daemons are always cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        code = check(a) if a.command == "check" else run(a)
    except UsageError as exc:
        _fail(str(exc), 2)
    except (DemoError, HarnessError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; everything it started was stopped")
    sys.exit(code)


if __name__ == "__main__":
    main()
