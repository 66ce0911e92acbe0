"""Small helpers the daemons' command lines share: argument types that refuse bad
values at parse time (usage error, exit status 2), the flags every daemon has, and
`run_daemon`, which turns a start-up failure into one line naming the program."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from twopc_common import failpoints, log, settings
from twopc_common.errors import InvalidArgument
from twopc_common.flags import Flag, add_field_flags
from twopc_common.ids import check_name
from twopc_common.metrics import parse_listen
from twopc_common.statements import StatementKind, policy_kinds
from twopc_common.tls import TlsConfig, add_tls_flags

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def named_addresses(items: Iterable[str], flag: str) -> dict[str, str]:
    """Parse repeated `NAME=HOST:PORT` flags, refusing duplicates and bad names."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, address = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{flag} {item!r}: expected NAME=HOST:PORT")
        check_name(flag.lstrip("-"), name)
        settings.host_port(f"{flag} {name}", address)
        if name in out:
            raise argparse.ArgumentTypeError(f"{flag} {name!r} given twice")
        out[name] = address
    return out


def named_address_lists(items: Iterable[str], flag: str) -> dict[str, tuple[str, ...]]:
    """Parse repeated `NAME=HOST:PORT[,HOST:PORT...]` flags: the processes that serve
    one name (an active coordinator and its standbys), in the order to try them."""
    out: dict[str, tuple[str, ...]] = {}
    for item in items:
        name, sep, joined = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(
                f"{flag} {item!r}: expected NAME=HOST:PORT[,HOST:PORT...]"
            )
        check_name(flag.lstrip("-"), name)
        addresses = tuple(a.strip() for a in joined.split(","))
        for address in addresses:
            settings.host_port(f"{flag} {name}", address)
        if len(set(addresses)) != len(addresses):
            raise argparse.ArgumentTypeError(f"{flag} {name}: an address is given twice")
        if name in out:
            raise argparse.ArgumentTypeError(f"{flag} {name!r} given twice")
        out[name] = addresses
    return out


def _argument_type(check: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse type from a check that raises InvalidArgument or ValueError."""

    def parse(text: str) -> Any:
        try:
            return check(text)
        except (InvalidArgument, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in its error for a bare ValueError
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidArgument(f"{text!r} is not a number of seconds") from None


positive = _argument_type(lambda text: settings.seconds("the value", _number(text)), "seconds")
"""A finite number of seconds > 0."""
non_negative = _argument_type(
    lambda text: settings.seconds("the value", _number(text), zero_ok=True), "seconds"
)
"""A finite number of seconds >= 0."""
listen_address = _argument_type(lambda text: settings.host_port("address", text), "HOST:PORT")
"""HOST:PORT with a port 1-65535."""
dsn = _argument_type(lambda text: settings.dsn("the DSN", text), "DSN")
"""A connection string libpq can parse."""


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has one worth reading: not for required
    flags, switches, or repeatable flags that start empty."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if action.required or default is None or default is False or default == []:
            return action.help
        if default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def log_level(p: argparse.ArgumentParser, level: str) -> str:
    """The --log-level, checked also when it came from TWOPC_LOG_LEVEL (argparse checks
    choices only on the command line)."""
    if level not in LOG_LEVELS:
        p.error(f"log level {level!r} (from TWOPC_LOG_LEVEL): choose from {', '.join(LOG_LEVELS)}")
    return level


def add_version_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--version", action="version", version=f"%(prog)s {metadata.version('twopc-postgres')}"
    )


def add_statement_policy_flags(p: argparse.ArgumentParser) -> None:
    """--allow-statement / --refuse-statement: the statement policy (see README)."""
    p.add_argument(
        "--allow-statement",
        action="append",
        default=[],
        metavar="KIND",
        help="also allow this kind of statement in branches (repeatable; "
        f"kinds: {', '.join(k.value for k in StatementKind)})",
    )
    p.add_argument(
        "--refuse-statement",
        action="append",
        default=[],
        metavar="KIND",
        help="refuse this kind of statement although the default allows it (repeatable)",
    )


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str
    """DEBUG, INFO, WARNING or ERROR."""
    format: str
    """`text` (key=value) or `json` (one object per line)."""


def metrics_address(text: str) -> str:
    try:
        parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_daemon_flags(p: argparse.ArgumentParser, defaults: object) -> None:
    """The flags every daemon has; `defaults` is its config with default values."""
    p.add_argument(
        "--metrics",
        type=metrics_address,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off if not given)",
    )
    p.add_argument(
        "--log-format",
        choices=log.FORMATS,
        default=os.environ.get("TWOPC_LOG_FORMAT", "text"),
        help="text (key=value) or json, one object per line (env TWOPC_LOG_FORMAT)",
    )
    p.add_argument(
        "--allow-failpoints",
        action="store_true",
        help="accept the SetFailpoints admin call (tests only)",
    )
    p.add_argument(
        "--admin",
        action="append",
        default=[],
        metavar="NAME",
        help="a client identity with the admin role (repeatable)",
    )
    add_tls_flags(p, daemon=True)
    add_field_flags(
        p, defaults, [Flag("--tls-reload-interval", "tls_reload_interval", positive, "SECONDS")]
    )
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=os.environ.get("TWOPC_LOG_LEVEL", "INFO").upper(),
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR; TWOPC_LOG_LEVEL in the environment sets the default",
    )
    add_version_flag(p)


DAEMON_FLAG_NAMES = {
    "metrics_listen": "--metrics",
    "tls_reload_interval": "--tls-reload-interval",
    "admins": "--admin",
}
"""Config field -> flag, for the fields `add_daemon_flags` sets."""


def daemon_values(args: argparse.Namespace, tls: TlsConfig) -> dict[str, Any]:
    """The config fields of the flags every daemon has (`add_daemon_flags`,
    `add_statement_policy_flags`), by name."""
    return {
        "metrics_listen": args.metrics,
        "allow_failpoints": args.allow_failpoints,
        "tls": tls,
        "tls_reload_interval": args.tls_reload_interval,
        "admins": frozenset(args.admin),
        "statement_kinds": policy_kinds(args.allow_statement, args.refuse_statement),
    }


def log_settings(args: argparse.Namespace) -> LogSettings:
    return LogSettings(args.log_level, args.log_format)


def run_daemon(
    prog: str,
    serve: Coroutine[Any, Any, None],
    logs: LogSettings,
    startup_errors: type[Exception] | tuple[type[Exception], ...],
    allow_failpoints: bool,
) -> None:
    """Set up logs and failpoints, serve until SIGTERM; a start-up failure ends the
    process with one line naming the program."""
    try:
        log.setup(logs.level, logs.format)
        failpoints.configure_from_env(allow_failpoints)
    except ValueError as exc:
        serve.close()  # never started: close it, or Python warns it was never awaited
        sys.exit(f"{prog}: {exc}")
    _exit_with_parent()
    # For performance work: TWOPC_CPROFILE=PREFIX writes a cProfile of the whole run
    # to PREFIX.<program>.<pid> when the daemon stops (see bench/cpu_split.py).
    profile_to = os.environ.get("TWOPC_CPROFILE")
    profiler = cProfile.Profile() if profile_to else None
    if profiler is not None:
        profiler.enable()
    try:
        asyncio.run(serve)
    except startup_errors as exc:
        sys.exit(f"{prog}: {settings.one_line(settings.redact(str(exc)))}")
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(f"{profile_to}.{prog}.{os.getpid()}")


EXIT_WITH_PARENT = "TWOPC_EXIT_WITH_PARENT"


def _exit_with_parent() -> None:
    """Daemons started by the test harness (which sets TWOPC_EXIT_WITH_PARENT to its
    pid) shut down when it is gone, killed or not, instead of outliving it."""
    parent = os.environ.get(EXIT_WITH_PARENT)
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
