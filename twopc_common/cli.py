"""Small helpers the daemons' command lines share."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Iterable

from twopc_common.ids import check_name


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
