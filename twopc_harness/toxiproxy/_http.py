"""A small HTTP/1.1 server on asyncio streams: keep-alive, Content-Length and chunked
request bodies, one handler coroutine for every request."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 60.0
MAX_BODY = 16 * 1024 * 1024
MAX_HEADERS = 100


@dataclass
class Request:
    method: str
    path: str  # percent-decoded, without the query string
    headers: dict[str, str]  # lower-cased names
    body: bytes


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


class _BadRequest(Exception):
    def __init__(self, status: int = 400) -> None:
        self.status = status


class HttpServer:
    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._accept, sock=sock, backlog=socket.SOMAXCONN)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._clients):
            task.cancel()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._clients.add(task)
        task.add_done_callback(self._clients.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request, keep_alive = await _read_request(reader, writer)
                except _BadRequest as exc:
                    await _write_response(
                        writer, Response(exc.status, content_type="text/plain"), False
                    )
                    return
                if request is None:
                    return
                response = await self._handler(request)
                await _write_response(writer, response, keep_alive)
                if not keep_alive:
                    return
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(431) from None


async def _read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[Request | None, bool]:
    """The next request and whether the connection stays open after it; None at a clean EOF."""
    try:
        async with asyncio.timeout(IDLE_TIMEOUT):
            line = await _read_line(reader)
            while line in (b"\r\n", b"\n"):  # tolerated before a request, as Go does
                line = await _read_line(reader)
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest() from None
        return None, False
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest()
    method, target, version = parts
    headers: dict[str, str] = {}
    while (line := await _read_line(reader)) not in (b"\r\n", b"\n"):
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon or len(headers) >= MAX_HEADERS:
            raise _BadRequest()
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = await _read_body(reader, headers)
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    path = unquote(urlsplit(target).path)
    return Request(method, path, headers, body), keep_alive


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_text = (await _read_line(reader)).split(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest() from None
            if size == 0:
                while (await _read_line(reader)).strip():  # trailers
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise _BadRequest(413)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    length_text = headers.get("content-length", "0").strip()
    if not length_text.isdigit():
        raise _BadRequest()
    length = int(length_text)
    if length > MAX_BODY:
        raise _BadRequest(413)
    return await reader.readexactly(length)


async def _write_response(
    writer: asyncio.StreamWriter, response: Response, keep_alive: bool
) -> None:
    status = response.status
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    if response.content_type is not None:
        lines.append(f"Content-Type: {response.content_type}")
    lines.extend(f"{name}: {value}" for name, value in response.headers.items())
    lines.append(f"Date: {formatdate(usegmt=True)}")
    if status != 204:
        lines.append(f"Content-Length: {len(response.body)}")
    if not keep_alive:
        lines.append("Connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body)
    await writer.drain()
