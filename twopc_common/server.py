"""The one way both daemons build, bind and start their gRPC server.

Binding happens in `bind_grpc_server`, before the daemon does anything durable (the
coordinator bumps its epoch only after its port is secured); `start` follows once the
daemon is ready to answer. The server's transport security comes from one place,
`twopc_common.tls`: mutual TLS on `listen` unless the daemon runs `--insecure`, and
server-only TLS on the coordinator's optional token port.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from twopc_common.errors import TwoPCError
from twopc_common.log import EventLogger
from twopc_common.tls import TlsConfig, server_credentials


class ListenError(TwoPCError):
    """The daemon cannot listen on the address it was given."""


def bind_grpc_server(
    listen: str,
    max_message: int,
    register: Callable[[grpc.aio.Server], None],
    tls: TlsConfig,
    log: EventLogger,
    token_listen: str | None = None,
) -> grpc.aio.Server:
    """A server with the servicers `register` adds, bound to `listen` (mutual TLS) and
    to `token_listen` if given (TLS without client certificates: callers present a
    bearer token instead), not started."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),
        ]
    )
    register(server)
    ports: list[tuple[str, bool]] = [(listen, True)]
    if token_listen is not None:
        ports.append((token_listen, False))
    for address, client_certs in ports:
        try:
            if tls.insecure:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, server_credentials(tls, client_certs, log))
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on {address}: {exc}") from exc
        if port == 0:
            raise ListenError(f"cannot listen on {address}")
    return server
