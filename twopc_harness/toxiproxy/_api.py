"""The Toxiproxy 2.x HTTP API: routing, request ids, and the handlers for proxies,
toxics, /populate, /reset and /version over the collection of proxies."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import random
import struct
import time
from collections.abc import Awaitable, Callable

from . import _errors as err
from ._errors import ApiError
from ._http import Request, Response
from ._jsonbody import BOOL, FLOAT32, INT64, OBJECT, STRING, DecodeError, fields, json_kind, parse
from ._proxy import Proxy
from ._toxics import DOWNSTREAM, TYPES, UPSTREAM, Toxic

log = logging.getLogger(__name__)

VERSION = "2.12.0"
HANDLER_TIMEOUT = 25.0

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
_GO_TIMEOUT_BODY = b"<html><head><title>Timeout</title></head><body><h1>Timeout</h1></body></html>"

_PROXY_FIELDS = {"name": STRING, "listen": STRING, "upstream": STRING, "enabled": BOOL}
_TOXIC_FIELDS = {
    "name": STRING,
    "type": STRING,
    "stream": STRING,
    "toxicity": FLOAT32,
    "attributes": OBJECT,
}
_TOXIC_UPDATE_FIELDS = {"attributes": OBJECT, "toxicity": FLOAT32}
_POPULATE_ITEM = 'struct { Proxy; Enabled *bool "json:\\"enabled\\"" }'

RouteHandler = Callable[..., Awaitable[Response]]


class _RequestIds:
    """xid-style ids (time, machine, pid, counter in base32hex), like the real server's."""

    def __init__(self) -> None:
        self._machine = random.randbytes(3)
        self._counter = itertools.count(random.getrandbits(24))

    def next(self) -> str:
        raw = (
            struct.pack(">I", int(time.time()))
            + self._machine
            + struct.pack(">H", os.getpid() & 0xFFFF)
            + (next(self._counter) & 0xFFFFFF).to_bytes(3, "big")
        )
        return base64.b32hexencode(raw).decode("ascii").lower().rstrip("=")


def _json(status: int, value: object, content_type: str = JSON) -> Response:
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(status, body, content_type)


def _error(exc: ApiError) -> Response:
    body = json.dumps(
        {"error": exc.message, "status": exc.status}, separators=(",", ":"), ensure_ascii=False
    )
    return Response(exc.status, (body + "\n").encode(), TEXT, {"X-Content-Type-Options": "nosniff"})


def _decode(body: bytes, struct_name: str, spec: dict[str, str]) -> dict[str, object]:
    try:
        return fields(parse(body), struct_name, spec)
    except DecodeError as exc:
        raise err.bad_body(str(exc)) from None


def _text(data: dict[str, object], key: str, default: str = "") -> str:
    value = data.get(key, default)
    return value if isinstance(value, str) else default


def _number(data: dict[str, object], key: str) -> float | None:
    value = data.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _flag(data: dict[str, object], key: str, default: bool) -> bool:
    value = data.get(key, default)
    return value if isinstance(value, bool) else default


def _attributes(toxic_type: str, raw: object) -> dict[str, int]:
    """The attributes given for a toxic type; unknown keys are ignored, wrong types rejected."""
    spec = TYPES[toxic_type]
    try:
        found = fields(raw, spec.go_name, dict.fromkeys(spec.attributes, INT64))
    except DecodeError as exc:
        raise err.bad_body(str(exc)) from None
    return {name: int(value) for name, value in found.items() if isinstance(value, int)}


class Api:
    def __init__(self) -> None:
        self.proxies: dict[str, Proxy] = {}
        # Serialises changes to the set of proxies (create, delete, populate).
        self._lock = asyncio.Lock()
        self._ids = _RequestIds()
        self._overdue: set[asyncio.Task[Response]] = set()
        self._routes: list[tuple[tuple[str, ...], dict[str, RouteHandler]]] = [
            (("reset",), {"POST": self.reset}),
            (("proxies",), {"GET": self.proxy_index, "POST": self.proxy_create}),
            (("populate",), {"POST": self.populate}),
            (
                ("proxies", "{}"),
                {
                    "GET": self.proxy_show,
                    "POST": self.proxy_update,
                    "PATCH": self.proxy_update,
                    "DELETE": self.proxy_delete,
                },
            ),
            (("proxies", "{}", "toxics"), {"GET": self.toxic_index, "POST": self.toxic_create}),
            (
                ("proxies", "{}", "toxics", "{}"),
                {
                    "GET": self.toxic_show,
                    "POST": self.toxic_update,
                    "PATCH": self.toxic_update,
                    "DELETE": self.toxic_delete,
                },
            ),
            (("version",), {"GET": self.version}),
        ]

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()

    async def handle(self, request: Request) -> Response:
        if request.headers.get("user-agent", "").startswith("Mozilla/"):
            # The real server refuses browsers so web pages cannot drive it (CSRF).
            return Response(
                403, b"User agent not allowed\n", TEXT, {"X-Content-Type-Options": "nosniff"}
            )
        routed = self._route(request.path)
        if routed is None:
            return Response(
                404, b"404 page not found\n", TEXT, {"X-Content-Type-Options": "nosniff"}
            )
        methods, params = routed
        handler = methods.get(request.method)
        if handler is None:
            return Response(405)
        request_id = self._ids.next()
        task = asyncio.get_running_loop().create_task(self._call(handler, request, params))
        done, _ = await asyncio.wait({task}, timeout=HANDLER_TIMEOUT)
        if not done:
            # Like Go's TimeoutHandler: answer now, let the handler finish on its own.
            self._overdue.add(task)
            task.add_done_callback(self._overdue.discard)
            return Response(503, _GO_TIMEOUT_BODY, "text/html; charset=utf-8")
        response = task.result()
        response.headers["X-Toxiproxy-Request-Id"] = request_id
        return response

    def _route(self, path: str) -> tuple[dict[str, RouteHandler], list[str]] | None:
        if not path.startswith("/"):
            return None
        segments = path[1:].split("/")
        for template, methods in self._routes:
            if len(template) != len(segments):
                continue
            params: list[str] = []
            for pattern, segment in zip(template, segments, strict=True):
                if pattern == "{}" and segment:
                    params.append(segment)
                elif pattern != segment:
                    break
            else:
                return methods, params
        return None

    async def _call(self, handler: RouteHandler, request: Request, params: list[str]) -> Response:
        try:
            return await handler(request, *params)
        except ApiError as exc:
            return _error(exc)
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            return _error(ApiError(500, str(exc)))

    def _proxy(self, name: str) -> Proxy:
        proxy = self.proxies.get(name)
        if proxy is None:
            raise ApiError(404, err.PROXY_NOT_FOUND)
        return proxy

    @staticmethod
    def _toxic(proxy: Proxy, name: str) -> Toxic:
        toxic = proxy.find_toxic(name)
        if toxic is None:
            raise ApiError(404, err.TOXIC_NOT_FOUND)
        return toxic

    async def proxy_index(self, request: Request) -> Response:
        return _json(200, {name: self.proxies[name].to_json() for name in sorted(self.proxies)})

    async def proxy_create(self, request: Request) -> Response:
        data = _decode(request.body, "Proxy", _PROXY_FIELDS)
        name, upstream = _text(data, "name"), _text(data, "upstream")
        if not name:
            raise err.missing_field("name")
        if not upstream:
            raise err.missing_field("upstream")
        async with self._lock:
            if name in self.proxies:
                raise ApiError(409, err.PROXY_EXISTS)
            proxy = Proxy(name, _text(data, "listen"), upstream)
            if _flag(data, "enabled", True):
                await proxy.start()
            self.proxies[name] = proxy
        return _json(201, proxy.to_json())

    async def proxy_show(self, request: Request, name: str) -> Response:
        return _json(200, self._proxy(name).to_json())

    async def proxy_update(self, request: Request, name: str) -> Response:
        proxy = self._proxy(name)
        data = _decode(request.body, "Proxy", _PROXY_FIELDS)
        async with proxy.lock:
            await proxy.update(
                _text(data, "listen", proxy.listen),
                _text(data, "upstream", proxy.upstream),
                _flag(data, "enabled", proxy.enabled),
            )
        return _json(200, proxy.to_json())

    async def proxy_delete(self, request: Request, name: str) -> Response:
        async with self._lock:
            proxy = self._proxy(name)
            async with proxy.lock:
                proxy.stop()
            del self.proxies[name]
        return Response(204)

    async def toxic_index(self, request: Request, name: str) -> Response:
        return _json(200, [toxic.to_json() for toxic in self._proxy(name).toxics()])

    async def toxic_create(self, request: Request, name: str) -> Response:
        proxy = self._proxy(name)
        data = _decode(request.body, "ToxicWrapper", _TOXIC_FIELDS)
        stream = _text(data, "stream", DOWNSTREAM)
        direction = stream.lower()
        if direction not in (UPSTREAM, DOWNSTREAM):
            raise ApiError(400, err.INVALID_STREAM)
        toxic_type = _text(data, "type")
        toxic_name = _text(data, "name") or f"{toxic_type}_{stream}"
        if toxic_type not in TYPES:
            raise ApiError(400, err.INVALID_TOXIC_TYPE)
        async with proxy.lock:
            if proxy.find_toxic(toxic_name) is not None:
                raise ApiError(409, err.TOXIC_EXISTS)
            attributes = dict.fromkeys(TYPES[toxic_type].attributes, 0)
            attributes.update(_attributes(toxic_type, data.get("attributes")))
            toxicity = _number(data, "toxicity")
            toxic = Toxic(
                toxic_name,
                toxic_type,
                stream,
                direction,
                1.0 if toxicity is None else toxicity,
                attributes,
            )
            await proxy.add_toxic(toxic)
        return _json(200, toxic.to_json())

    async def toxic_show(self, request: Request, name: str, toxic_name: str) -> Response:
        return _json(200, self._toxic(self._proxy(name), toxic_name).to_json())

    async def toxic_update(self, request: Request, name: str, toxic_name: str) -> Response:
        proxy = self._proxy(name)
        async with proxy.lock:
            toxic = self._toxic(proxy, toxic_name)
            data = _decode(request.body, "ToxicWrapper", _TOXIC_UPDATE_FIELDS)
            attributes = _attributes(toxic.type, data.get("attributes"))
            await proxy.update_toxic(toxic, attributes, _number(data, "toxicity"))
        return _json(200, toxic.to_json())

    async def toxic_delete(self, request: Request, name: str, toxic_name: str) -> Response:
        proxy = self._proxy(name)
        async with proxy.lock:
            await proxy.remove_toxic(self._toxic(proxy, toxic_name))
        return Response(204)

    async def reset(self, request: Request) -> Response:
        for proxy in list(self.proxies.values()):
            async with proxy.lock:
                await proxy.start()
                await proxy.remove_all_toxics()
        return Response(204)

    async def version(self, request: Request) -> Response:
        return Response(
            200, f'{{"version": "{VERSION}"}}\n'.encode(), "application/json;charset=utf-8"
        )

    async def populate(self, request: Request) -> Response:
        status, done, error = await self.populate_body(request.body)
        body: dict[str, object] = {}
        if error is not None:
            body = {"error": error.message, "status": error.status}
        body["proxies"] = [proxy.to_json() for proxy in done] or None
        return _json(status, body)

    async def populate_body(self, raw: bytes) -> tuple[int, list[Proxy], ApiError | None]:
        """Apply a /populate body (also used for -config): status, proxies handled, error."""
        try:
            items = self._populate_items(raw)
        except ApiError as exc:
            return exc.status, [], exc
        done: list[Proxy] = []
        async with self._lock:
            for name, listen, upstream, enabled in items:
                try:
                    existing = self.proxies.get(name)
                    if existing is not None:
                        async with existing.lock:
                            if not await existing.differs(listen, upstream):
                                done.append(existing)
                                continue
                            existing.stop()
                    proxy = Proxy(name, listen, upstream)
                    if enabled:
                        await proxy.start()
                except ApiError as exc:
                    return exc.status, done, exc
                self.proxies[name] = proxy
                done.append(proxy)
        return 201, done, None

    @staticmethod
    def _populate_items(raw: bytes) -> list[tuple[str, str, str, bool]]:
        try:
            value = parse(raw)
            if value is None:
                value = []
            if not isinstance(value, list):
                kind = json_kind(value)
                raise DecodeError(
                    f"json: cannot unmarshal {kind} into Go value of type []{_POPULATE_ITEM}"
                )
            decoded = [fields(item, _POPULATE_ITEM, _PROXY_FIELDS) for item in value]
        except DecodeError as exc:
            raise err.bad_body(str(exc)) from None
        items = []
        for number, data in enumerate(decoded, start=1):
            name, upstream = _text(data, "name"), _text(data, "upstream")
            if not name:
                raise err.missing_field(f"name at proxy {number}")
            if not upstream:
                raise err.missing_field(f"upstream at proxy {number}")
            items.append((name, _text(data, "listen"), upstream, _flag(data, "enabled", True)))
        return items
