"""Prometheus metrics shared by both daemons: the RPC latency interceptor and the
`/metrics` endpoint.

Each daemon has its own registry. Values that the daemons already keep (counters,
live state) are read by collectors at scrape time rather than counted twice; the
endpoint is served from the daemon's event loop, so a collector sees the daemon's
state between two steps of the protocol, never halfway through one.

Label values are bounded: RPC method names come from the registered services, status
codes from gRPC's fixed set, participants from the configuration. No transaction id
ever becomes a label.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest

from twopc_common import multiplex
from twopc_common.grpc_errors import status_of
from twopc_common.log import EventLogger
from twopc_common.server import ListenError

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
"""Seconds; from a loopback round trip to a prepare timeout."""

MAX_REQUEST_HEAD = 8192
"""Bytes of an HTTP request head the endpoint reads before it gives up on the peer."""
REQUEST_TIMEOUT = 5.0
"""Seconds a scraper gets to send its request head."""


MULTIPLEXED = {"PrepareStream": "Prepare", "FinishStream": "Finish", "RunStream": "Run"}
"""Streams that carry many unary requests (`twopc_common.multiplex`) -> the unary method
each item is timed as, so that a request counts the same whichever way it came."""


class RpcMetrics(grpc.aio.ServerInterceptor):
    """Times every unary call by method and status code
    (`twopc_rpc_duration_seconds`), and every item of a multiplexed stream as its
    unary method (`MULTIPLEXED`). Other streaming calls (health Watch, reflection) are
    long-lived by design and not timed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "twopc_rpc_duration_seconds",
            "Time to answer a gRPC call, by method and status code",
            ["method", "code"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is not None and handler.stream_stream is not None:
            return self._items_timed(handler, handler_call_details.method.lstrip("/"))
        if handler is None or handler.unary_unary is None:
            return handler
        inner: Callable[..., Awaitable[Any]] = handler.unary_unary
        # "/twopc.v1.Coordinator/Run" -> "twopc.v1.Coordinator/Run"; only registered methods
        # get here (an unknown one has no handler), so the label set is bounded.
        method = handler_call_details.method.lstrip("/")
        duration = self.duration

        async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            failed = False
            try:
                return await inner(request, context)
            except BaseException:
                failed = True
                raise
            finally:
                code = context.code()
                if code is None:
                    name = "UNKNOWN" if failed else "OK"
                else:
                    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
                duration.labels(method, name).observe(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _items_timed(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        service, _, name = method.rpartition("/")
        if name not in MULTIPLEXED:
            return handler
        unary = f"{service}/{MULTIPLEXED[name]}"
        inner: Callable[..., Awaitable[Any]] = handler.stream_stream  # type: ignore[assignment]
        duration = self.duration

        def observe(code: int, seconds: float) -> None:
            duration.labels(unary, status_of(code).name).observe(seconds)

        async def timed(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            multiplex.item_observer.set(observe)  # this call's context only
            return await inner(requests, context)

        return grpc.stream_stream_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (or `:PORT` for every interface) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics {text!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


async def serve_metrics(
    listen: str, registry: CollectorRegistry, log: EventLogger
) -> asyncio.Server:
    """Serve `GET /metrics` (the Prometheus text format) on `listen`, from this event
    loop. Any other path is 404; anything but GET is 405."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            if len(head) > MAX_REQUEST_HEAD:
                raise ValueError("request head too long")
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = path.split("?", 1)[0]
            if method != "GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path != "/metrics":
                status, ctype, body = "404 Not Found", "text/plain", b"see /metrics\n"
            else:
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (
            TimeoutError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass  # a scraper that went away or spoke no HTTP: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    host, port = parse_listen(listen)
    try:
        server = await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_HEAD)
    except OSError as exc:
        raise ListenError(f"cannot serve metrics on {listen}: {exc}") from exc
    log.info("metrics_serving", listen=listen)
    return server
