"""Command line: `python -m twopc_harness.toxiproxy -host 127.0.0.1 -port 8474 [-config FILE]`,
taking the real toxiproxy-server's single-dash flags (double-dash forms work too)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import sys

from . import VERSION, ToxiproxyServer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m twopc_harness.toxiproxy", allow_abbrev=False)
    parser.add_argument(
        "-host", "--host", default="localhost", help="host for the API to listen on"
    )
    parser.add_argument(
        "-port", "--port", type=int, default=8474, help="API port; 0 picks a free one"
    )
    parser.add_argument("-config", "--config", help="JSON file of proxies to create at start-up")
    parser.add_argument("-seed", "--seed", type=int, help="seed for toxicity and jitter draws")
    parser.add_argument(
        "-version", "--version", action="store_true", help="print the version and exit"
    )
    return parser


async def _serve(args: argparse.Namespace) -> None:
    server = ToxiproxyServer(args.host, args.port, args.config)
    await server.start()
    # A parent process reads this line to learn the port when it asked for port 0.
    print(f"toxiproxy api listening on {server.url}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        print(f"toxiproxy-server version {VERSION}")
        return 0
    if args.seed is not None:
        random.seed(args.seed)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(args))
    except OSError as exc:
        print(f"toxiproxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
