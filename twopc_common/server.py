"""The one way both daemons build, bind and start their gRPC server.

Binding happens in `bind_grpc_server`, before the daemon does anything durable (the
coordinator bumps its epoch only after its port is secured); `start` follows once the
daemon is ready to answer.

Besides the daemon's own service, every server carries the standard health service
(`twopc_common.health`) and server reflection, so that `grpc_health_probe`,
`grpcurl list` and `grpcurl describe` work without the .proto files. Interceptors
(the RPC metrics of `twopc_common.metrics`) wrap every call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from twopc_common.errors import TwoPCError
from twopc_common.health import SERVICE_NAME as HEALTH_SERVICE
from twopc_common.health import Health


class ListenError(TwoPCError):
    """The daemon cannot listen on the address it was given."""


def bind_grpc_server(
    listen: str,
    max_message: int,
    register: Callable[[grpc.aio.Server], None],
    health: Health,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    """A server with the servicers `register` adds, the health service answering for
    `health.service`, and reflection, bound to `listen` (not started)."""
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),
        ],
    )
    register(server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (health.service, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {listen}: {exc}") from exc
    if port == 0:
        raise ListenError(f"cannot listen on {listen}")
    return server
