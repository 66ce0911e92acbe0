"""Small helpers the daemons' command lines share."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine, Iterable
from typing import Any

from twopc_common import failpoints, log
from twopc_common.ids import check_name
from twopc_common.tls import add_tls_flags


def named_addresses(items: Iterable[str], flag: str) -> dict[str, str]:
    """Parse repeated `NAME=HOST:PORT` flags, refusing duplicates and bad names."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, address = item.partition("=")
        if not sep or ":" not in address:
            raise argparse.ArgumentTypeError(f"{flag} {item!r}: expected NAME=HOST:PORT")
        check_name(flag.lstrip("-"), name)
        if name in out:
            raise argparse.ArgumentTypeError(f"{flag} {name!r} given twice")
        out[name] = address
    return out


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


async def wait_for_termination() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def add_daemon_flags(p: argparse.ArgumentParser) -> None:
    """The flags every daemon has."""
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
    p.add_argument(
        "--log-level",
        default=os.environ.get("TWOPC_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (env TWOPC_LOG_LEVEL)",
    )


def run_daemon(
    prog: str,
    serve: Coroutine[Any, Any, None],
    level: str,
    startup_errors: type[Exception] | tuple[type[Exception], ...],
    allow_failpoints: bool,
) -> None:
    """Set up logs and failpoints, serve until SIGTERM; a start-up failure ends the
    process with one line naming the program."""
    log.setup(level)
    try:
        failpoints.configure_from_env(allow_failpoints)
    except ValueError as exc:
        serve.close()
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
        sys.exit(f"{prog}: {exc}")
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
