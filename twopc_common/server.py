"""The one way both daemons build and bind their gRPC server (`twopc_common.serving`
starts and stops it).

Binding happens in `bind_grpc_server`, before the daemon does anything durable (the
coordinator bumps its epoch only after its port is secured); `start` follows once the
daemon is ready to answer. The server's transport security comes from one place,
`twopc_common.tls`: mutual TLS on `listen` unless the daemon runs `--insecure`, and
server-only TLS on the coordinator's optional token port.

A request whose bytes do not decode (a truncated message, invalid UTF-8 in a string
field) is answered INVALID_ARGUMENT, not gRPC's UNKNOWN: every handler's deserializer
is wrapped once, at registration, so a call pays one isinstance check for it.

Besides the daemon's own service, every server carries the standard health service
(`twopc_common.health`) and server reflection, so that `grpc_health_probe`,
`grpcurl list` and `grpcurl describe` work without the .proto files. They are not
behind the per-RPC rules of `twopc_common.auth` (they name no transaction and change
nothing): any peer that completed the handshake may call them, which on `listen` means
a certificate from the CA. Interceptors (the RPC metrics of `twopc_common.metrics`)
wrap every call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from twopc_common.errors import InvalidArgument, TwoPCError
from twopc_common.health import SERVICE_NAME as HEALTH_SERVICE
from twopc_common.health import Health
from twopc_common.log import EventLogger
from twopc_common.tls import TlsConfig, server_credentials


class ListenError(TwoPCError):
    """The daemon cannot listen on the address it was given."""


def bind_grpc_server(
    listen: str,
    max_message: int,
    register: Callable[[grpc.aio.Server], None],
    health: Health,
    tls: TlsConfig,
    log: EventLogger,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    token_listen: str | None = None,
) -> grpc.aio.Server:
    """A server with the servicers `register` adds, the health service answering for
    `health.service`, and reflection, bound to `listen` (mutual TLS) and to
    `token_listen` if given (TLS without client certificates: callers present a bearer
    token instead), not started."""
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),
        ],
    )
    register(cast(grpc.aio.Server, _DecodeGuard(server)))
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (health.service, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
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


@dataclass(frozen=True, slots=True)
class _Undecodable:
    error: str


def _guarded(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, answering undecodable requests INVALID_ARGUMENT. A stream's
    first undecodable message raises `InvalidArgument` where the handler reads it
    (stream handlers are wrapped in `translate_errors`, which answers it)."""
    deserialize = handler.request_deserializer
    assert deserialize is not None

    def decode(data: bytes) -> object:
        try:
            return deserialize(data)
        except Exception as exc:
            return _Undecodable(f"{type(exc).__name__}: {exc}")

    async def refuse(request: _Undecodable, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"undecodable request ({request.error})"
        )

    if handler.stream_stream is not None:
        streaming = cast(Callable[..., Awaitable[Any]], handler.stream_stream)

        async def decoded(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async for request in requests:
                if isinstance(request, _Undecodable):
                    raise InvalidArgument(f"undecodable request ({request.error})")
                yield request

        async def guarded_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await streaming(decoded(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(
            guarded_stream,
            request_deserializer=decode,
            response_serializer=handler.response_serializer,
        )

    behavior = handler.unary_unary
    assert behavior is not None, "only unary-unary and stream-stream methods"

    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Undecodable):
            await refuse(request, context)
        return await cast(Callable[..., Awaitable[Any]], behavior)(request, context)

    return grpc.unary_unary_rpc_method_handler(
        guarded, request_deserializer=decode, response_serializer=handler.response_serializer
    )


class _DecodeGuard:
    """What the generated `add_*Servicer_to_server` functions see instead of the
    server: they register each service's handlers twice (generic and registered), and
    both registrations get the guarded handlers."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        guarded = {name: _guarded(h) for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, guarded)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, guarded),)
        )

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """Replaced by the guarded copy `add_registered_method_handlers` adds."""
