"""The one way both daemons build, bind and start their gRPC server.

Binding happens in `bind_grpc_server`, before the daemon does anything durable (the
coordinator bumps its epoch only after its port is secured); `start` follows once the
daemon is ready to answer.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from twopc_common.errors import TwoPCError


class ListenError(TwoPCError):
    """The daemon cannot listen on the address it was given."""


def bind_grpc_server(
    listen: str, max_message: int, register: Callable[[grpc.aio.Server], None]
) -> grpc.aio.Server:
    """A server with the servicers `register` adds, bound to `listen` (not started)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),
        ]
    )
    register(server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {listen}: {exc}") from exc
    if port == 0:
        raise ListenError(f"cannot listen on {listen}")
    return server
