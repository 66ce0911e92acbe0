"""What one gRPC message costs in Python on this machine: the unit the system's CPU
per transfer is made of.

A bidirectional stream between two processes (grpc.aio, as the daemons use it, mutual
TLS on unless --insecure), one request and one answer at a time: the p50 round trip and
the CPU of each process per round trip (one message written and one read on each
end). Then the same process pair as the smallest thing a transfer could cost if each
of its messages cost only that: the system sends, per transfer at concurrency 1, one
Run and its answer (client and coordinator), a Prepare and its vote to each of two
agents, and a Finish and its answer to each (see README "Performance").

    python bench/message_cost.py [--round-trips 4000] [--insecure]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twopc_common.certs import Identity, issue
from twopc_pb import types_pb2 as pb

_METHOD = "/bench.Echo/Echo"


def _message() -> pb.Statement:
    """About the size of a Prepare item: one statement of a transfer leg."""
    return pb.Statement(
        sql="UPDATE accounts SET balance = balance - %s WHERE id = %s AND balance >= %s",
        params=[pb.Value(int_value=5), pb.Value(int_value=123456), pb.Value(int_value=5)],
    )


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _serve(port: int, certs: Path | None) -> None:
    async def echo(requests: AsyncIterator[pb.Statement], context: Any) -> None:
        async for request in requests:
            await context.write(request)

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.stream_stream_rpc_method_handler(
                echo,
                request_deserializer=pb.Statement.FromString,
                response_serializer=pb.Statement.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    address = f"127.0.0.1:{port}"
    if certs is None:
        server.add_insecure_port(address)
    else:
        key, cert = (certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes()
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], (certs / "ca.pem").read_bytes(), require_client_auth=True
        )
        server.add_secure_port(address, credentials)
    await server.start()
    await server.wait_for_termination()


async def _client(port: int, certs: Path | None, round_trips: int, server_pid: int) -> None:
    address = f"127.0.0.1:{port}"
    if certs is None:
        channel = grpc.aio.insecure_channel(address)
    else:
        credentials = grpc.ssl_channel_credentials(
            (certs / "ca.pem").read_bytes(),
            (certs / "client.key").read_bytes(),
            (certs / "client.pem").read_bytes(),
        )
        channel = grpc.aio.secure_channel(address, credentials)
    async with channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call = channel.stream_stream(
            _METHOD,
            request_serializer=pb.Statement.SerializeToString,
            response_deserializer=pb.Statement.FromString,
        )()
        message = _message()
        for _ in range(300):  # warm up
            await call.write(message)
            await call.read()
        spans = []
        client_cpu, server_cpu = time.process_time(), _cpu_seconds(server_pid)
        for _ in range(round_trips):
            started = time.perf_counter()
            await call.write(message)
            await call.read()
            spans.append(time.perf_counter() - started)
        client_cpu = time.process_time() - client_cpu
        server_cpu = _cpu_seconds(server_pid) - server_cpu
        await call.done_writing()
    spans.sort()
    per_client, per_server = client_cpu / round_trips * 1e6, server_cpu / round_trips * 1e6
    print(f"one message each way ({message.ByteSize()} bytes), {round_trips} round trips:")
    print(f"  round trip p50 {spans[len(spans) // 2] * 1e3:.3f} ms")
    print(f"  CPU per round trip: client {per_client:.0f} us, server {per_server:.0f} us")
    # Per transfer at concurrency 1: Run (client <-> coordinator), then Prepare and
    # Finish to each of two agents (coordinator <-> agent): 5 round trips, each one
    # paid on both of its ends.
    floor = 5 * (per_client + per_server) / 1000
    print(
        f"  5 such round trips per transfer (a Run, two Prepares, two Finishes): "
        f"{floor:.2f} ms of CPU, before any work"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--round-trips", type=int, default=4000)
    p.add_argument("--insecure", action="store_true", help="without TLS")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve is not None:
        asyncio.run(_serve(a.serve, a.certs))
        return
    from twopc_harness.postgres import free_port

    with tempfile.TemporaryDirectory(prefix="message-cost-") as tmp:
        certs = None
        if not a.insecure:
            certs = Path(tmp)
            issue(certs, [Identity("participant", "server"), Identity("client", "client")])
        port = free_port()
        extra = [] if certs is None else ["--certs", str(certs)]
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), *extra])
        try:
            asyncio.run(_client(port, certs, a.round_trips, server.pid))
        finally:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
