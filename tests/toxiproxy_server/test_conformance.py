"""Conformance of the Toxiproxy HTTP API and toxic behaviour with toxiproxy-server 2.x,
driven only through the API (the toxiproxy-python client, or raw HTTP for exact status
codes and JSON shapes), with toxics measured on real sockets in front of an echo server.
The numbered checks follow "Compatibility checks" in TOXIPROXY_API.md.

The server under test is TOXIPROXY_URL if set, else toxiproxy-server from PATH on a free
port, else ours in a background thread. (No __init__.py here: with tests/ not a package,
pytest would put tests/ on sys.path and this folder would shadow the `toxiproxy` client.)"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
from toxiproxy import Toxiproxy
from toxiproxy.exceptions import ProxyExists

from twopc_harness.toxiproxy import run_in_thread


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RawApi:
    """Plain HTTP requests to the API, for checking status codes and JSON shapes exactly."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 8474

    def request(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> Reply:
        data = body if body is None or isinstance(body, (bytes, str)) else json.dumps(body)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=headers or {})
            response = conn.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            conn.close()

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, body: object = None) -> Reply:
        return self.request("POST", path, body)

    def delete(self, path: str) -> Reply:
        return self.request("DELETE", path)


def _wait_for_api(url: str, deadline: float) -> None:
    api = RawApi(url)
    while True:
        try:
            if api.get("/version").status == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"no toxiproxy API at {url}"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def toxiproxy_url() -> Iterator[str]:
    url = os.environ.get("TOXIPROXY_URL")
    if url:
        yield url.rstrip("/")
        return
    binary = shutil.which("toxiproxy-server")
    if binary is not None:
        port = free_port()
        process = subprocess.Popen(
            [binary, "-host", "127.0.0.1", "-port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_for_api(url, time.monotonic() + 10)
            yield url
        finally:
            process.terminate()
            process.wait(10)
        return
    with run_in_thread("127.0.0.1", 0) as handle:
        yield handle.url


@pytest.fixture
def api(toxiproxy_url: str) -> Iterator[RawApi]:
    """Raw API access; afterwards every proxy is reset and deleted, so tests start clean."""
    raw = RawApi(toxiproxy_url)
    yield raw
    raw.post("/reset")
    for name in raw.get("/proxies").json():
        raw.delete(f"/proxies/{name}")


@pytest.fixture
def client(api: RawApi) -> Any:
    toxiproxy = Toxiproxy()
    toxiproxy.update_api_consumer(api.host, api.port)
    return toxiproxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="session")
def echo() -> Iterator[str]:
    """host:port of a TCP echo server."""
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


TOXIC_TYPES = [
    "latency",
    "bandwidth",
    "slow_close",
    "timeout",
    "reset_peer",
    "slicer",
    "limit_data",
    "noop",
]


def connect(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "::", "0.0.0.0"):
        host = "127.0.0.1"
    return socket.create_connection((host, int(port)), timeout=5)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        assert more, f"EOF after {len(data)} of {size} bytes"
        data += more
    return data


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything until the peer closes (the socket timeout bounds each wait)."""
    data = b""
    while more := sock.recv(65536):
        data += more
    return data


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> float:
    started = time.monotonic()
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload
    return time.monotonic() - started


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def create_proxy(api: RawApi, name: str, upstream: str, **fields: object) -> dict[str, Any]:
    reply = api.post(
        "/proxies", {"name": name, "upstream": upstream, "listen": "127.0.0.1:0", **fields}
    )
    assert reply.status == 201, reply.body
    proxy: dict[str, Any] = reply.json()
    return proxy


def add_toxic(api: RawApi, proxy: str, **toxic: object) -> dict[str, Any]:
    reply = api.post(f"/proxies/{proxy}/toxics", toxic)
    assert reply.status == 200, reply.body
    created: dict[str, Any] = reply.json()
    return created


def error_of(reply: Any) -> tuple[int, str]:
    body = json.loads(reply.body)
    assert body["status"] == reply.status
    return reply.status, body["error"]


# 1
def test_duplicate_proxy_conflicts_and_port_in_use_is_500(
    api: RawApi, client: Any, echo: str
) -> None:
    client.create(upstream=echo, name="dup")
    reply = api.post("/proxies", {"name": "dup", "upstream": echo, "listen": "127.0.0.1:0"})
    assert error_of(reply) == (409, "proxy already exists")
    with pytest.raises(ProxyExists):
        client.create(upstream=echo, name="dup")

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        reply = api.post(
            "/proxies", {"name": "busy", "upstream": echo, "listen": f"127.0.0.1:{port}"}
        )
    status, message = error_of(reply)
    assert status == 500
    assert "address already in use" in message
    assert api.get("/proxies/busy").status == 404


# 2
def test_missing_fields_are_400_with_exact_messages(api: RawApi) -> None:
    assert error_of(api.post("/proxies", {})) == (400, "missing required field: name")
    assert error_of(api.post("/proxies", {"upstream": "x:1"})) == (
        400,
        "missing required field: name",
    )
    assert error_of(api.post("/proxies", {"name": "x"})) == (
        400,
        "missing required field: upstream",
    )
    assert error_of(api.post("/proxies", b"")) == (400, "bad request body: EOF")
    assert api.post("/proxies", {"name": 5, "upstream": "x:1"}).status == 400
    assert api.get("/proxies").json() == {}


# 3
def test_listen_address_is_resolved(api: RawApi, client: Any, echo: str) -> None:
    proxy = client.create(upstream=echo, name="ephemeral", listen="127.0.0.1:0")
    match = re.fullmatch(r"127\.0\.0\.1:(\d+)", proxy.listen)
    assert match and int(match.group(1)) != 0
    with connect(proxy.listen) as sock:
        round_trip(sock)

    port = free_port()
    reply = api.post("/proxies", {"name": "named", "upstream": echo, "listen": f"localhost:{port}"})
    assert reply.status == 201
    assert reply.json()["listen"] == f"127.0.0.1:{port}"
    assert api.get("/proxies/named").json()["listen"] == f"127.0.0.1:{port}"


# 4
def test_created_disabled_has_no_listener_and_verbatim_listen(api: RawApi, echo: str) -> None:
    port = free_port()
    proxy = create_proxy(api, "off", echo, listen=f"localhost:{port}", enabled=False)
    assert proxy["enabled"] is False
    assert proxy["listen"] == f"localhost:{port}"
    assert proxy["toxics"] == []
    with pytest.raises(ConnectionRefusedError):
        connect(f"127.0.0.1:{port}")


# 5
def test_disable_refuses_and_closes_live_connections_enable_rebinds(client: Any, echo: str) -> None:
    proxy = client.create(upstream=echo, name="flappy")
    listen = proxy.listen
    live = connect(listen)
    round_trip(live)

    proxy.disable()
    with pytest.raises(ConnectionRefusedError):
        connect(listen)
    live.settimeout(5)
    assert closed_by_peer(live)
    live.close()

    proxy.enable()
    assert client.get_proxy("flappy").listen == listen
    with connect(listen) as sock:
        round_trip(sock)


# 6
def test_toxic_create_defaults(api: RawApi, echo: str) -> None:
    create_proxy(api, "p", echo)
    reply = api.post("/proxies/p/toxics", {"type": "latency", "attributes": {"latency": 10}})
    assert reply.status == 200
    toxic = reply.json()
    assert toxic["name"] == "latency_downstream"
    assert toxic["type"] == "latency"
    assert toxic["stream"] == "downstream"
    assert toxic["toxicity"] == 1.0
    assert toxic["attributes"] == {"latency": 10, "jitter": 0}
    assert api.get("/proxies/p/toxics/latency_downstream").json() == toxic
    assert api.get("/proxies/p").json()["toxics"] == [toxic]


# 7
def test_toxic_conflicts_and_invalid_type_or_stream(api: RawApi, echo: str) -> None:
    create_proxy(api, "p", echo)
    add_toxic(api, "p", type="latency")
    reply = api.post(
        "/proxies/p/toxics", {"type": "latency", "stream": "upstream", "name": "latency_downstream"}
    )
    assert error_of(reply) == (409, "toxic already exists")
    assert error_of(api.post("/proxies/p/toxics", {"type": "down"})) == (400, "invalid toxic type")
    reply = api.post("/proxies/p/toxics", {"type": "latency", "stream": "walrustream"})
    assert error_of(reply) == (400, "stream was invalid, can be either upstream or downstream")
    reply = api.post(
        "/proxies/p/toxics", {"type": "latency", "name": "f", "attributes": {"latency": 1000.0}}
    )
    assert reply.status == 400
    assert error_of(api.post("/proxies/nope/toxics", {"type": "latency"})) == (
        404,
        "proxy not found",
    )


def test_every_toxic_type_is_accepted_and_listed_upstream_first(api: RawApi, echo: str) -> None:
    create_proxy(api, "p", echo)
    add_toxic(api, "p", type="noop", name="down1")
    for toxic_type in TOXIC_TYPES:
        add_toxic(api, "p", type=toxic_type, stream="upstream", toxicity=0)
    names = [toxic["name"] for toxic in api.get("/proxies/p/toxics").json()]
    assert names == [f"{t}_upstream" for t in TOXIC_TYPES] + ["down1"]


# 8
def test_toxic_update_merges_attributes_and_keeps_toxicity(
    api: RawApi, client: Any, echo: str
) -> None:
    proxy = client.create(upstream=echo, name="p")
    proxy.add_toxic(
        type="latency", name="lag", toxicity=0.5, attributes={"latency": 100, "jitter": 10}
    )
    reply = api.post("/proxies/p/toxics/lag", {"attributes": {"latency": 200}})
    assert reply.status == 200
    assert reply.json()["attributes"] == {"latency": 200, "jitter": 10}
    assert reply.json()["toxicity"] == 0.5
    reply = api.request("PATCH", "/proxies/p/toxics/lag", {"toxicity": 0.25})
    assert reply.status == 200
    assert reply.json()["attributes"] == {"latency": 200, "jitter": 10}
    assert proxy.get_toxic("lag").toxicity == 0.25


# 9
def test_delete_twice_is_204_then_404(api: RawApi, echo: str) -> None:
    create_proxy(api, "p", echo)
    add_toxic(api, "p", type="noop")
    reply = api.delete("/proxies/p/toxics/noop_downstream")
    assert (reply.status, reply.body) == (204, b"")
    assert error_of(api.delete("/proxies/p/toxics/noop_downstream")) == (404, "toxic not found")
    assert api.delete("/proxies/p").status == 204
    assert error_of(api.delete("/proxies/p")) == (404, "proxy not found")


# 10
def test_reset_removes_toxics_and_enables_proxies(api: RawApi, client: Any, echo: str) -> None:
    proxy = client.create(upstream=echo, name="p")
    proxy.add_toxic(type="latency", attributes={"latency": 1000})
    proxy.add_toxic(type="timeout", stream="upstream")
    proxy.disable()
    reply = api.post("/reset")
    assert (reply.status, reply.body) == (204, b"")
    state = api.get("/proxies/p").json()
    assert state["enabled"] is True
    assert state["toxics"] == []
    assert state["listen"] == proxy.listen
    with connect(proxy.listen) as sock:
        assert round_trip(sock) < 1.0
    assert client.reset() is True


# 11
def test_populate_keeps_unchanged_proxies_and_validates_first(api: RawApi, echo: str) -> None:
    kept = create_proxy(api, "kept", echo)
    add_toxic(api, "kept", type="latency", attributes={"latency": 5})
    reply = api.post(
        "/populate",
        [
            {"name": "kept", "listen": kept["listen"], "upstream": echo},
            {"name": "fresh", "listen": "127.0.0.1:0", "upstream": echo},
        ],
    )
    assert reply.status == 201
    assert [p["name"] for p in reply.json()["proxies"]] == ["kept", "fresh"]
    state = api.get("/proxies/kept").json()
    assert state["listen"] == kept["listen"]
    assert [t["name"] for t in state["toxics"]] == ["latency_downstream"]
    assert api.get("/proxies/fresh").json()["enabled"] is True

    reply = api.post(
        "/populate",
        [
            {"name": "first", "listen": "127.0.0.1:0", "upstream": echo},
            {"name": "second", "listen": "127.0.0.1:0"},
        ],
    )
    assert error_of(reply) == (400, "missing required field: upstream at proxy 2")
    assert api.get("/proxies/first").status == 404
    assert api.post("/populate", {"name": "x"}).status == 400


# 12
def test_latency_delays_downstream_and_toxicity_zero_does_not(
    api: RawApi, client: Any, echo: str
) -> None:
    proxy = client.create(upstream=echo, name="p")
    proxy.add_toxic(type="latency", name="lag", attributes={"latency": 100})
    with connect(proxy.listen) as sock:
        elapsed = round_trip(sock)
    assert 0.1 <= elapsed < 3.0

    api.post("/proxies/p/toxics/lag", {"attributes": {"latency": 2000}, "toxicity": 0})
    with connect(proxy.listen) as sock:
        assert round_trip(sock) < 1.0


def test_latency_is_pipelined_and_applies_to_open_connections(client: Any, echo: str) -> None:
    proxy = client.create(upstream=echo, name="p")
    with connect(proxy.listen) as sock:
        assert round_trip(sock) < 1.0
        proxy.add_toxic(type="latency", name="lag", attributes={"latency": 300})
        started = time.monotonic()
        for i in range(5):
            sock.sendall(b"%d" % i)
            time.sleep(0.02)
        assert recv_exactly(sock, 5) == b"01234"
        elapsed = time.monotonic() - started
        # Delayed once as a stream, not 5 x 300 ms.
        assert 0.3 <= elapsed < 1.3
        proxy.destroy_toxic("lag")
        assert round_trip(sock) < 1.0


# 13
def test_limit_data_forwards_exactly_n_bytes_then_eof(client: Any, echo: str) -> None:
    proxy = client.create(upstream=echo, name="p")
    proxy.add_toxic(type="limit_data", attributes={"bytes": 10})
    payload = bytes(range(100))
    with connect(proxy.listen) as sock:
        sock.sendall(payload)
        assert read_to_eof(sock) == payload[:10]


# 14
def test_timeout_zero_is_silent_until_removed(api: RawApi, client: Any, echo: str) -> None:
    proxy = client.create(upstream=echo, name="p")
    proxy.add_toxic(type="timeout", attributes={"timeout": 0})
    with connect(proxy.listen) as sock:
        sock.sendall(b"hello")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(100)
        assert api.delete("/proxies/p/toxics/timeout_downstream").status == 204
        sock.settimeout(5)
        assert read_to_eof(sock) == b""


def test_timeout_closes_after_its_delay(client: Any, echo: str) -> None:
    proxy = client.create(upstream=echo, name="p")
    proxy.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 200})
    with connect(proxy.listen) as sock:
        started = time.monotonic()
        assert closed_by_peer(sock)
        # The proxy's timer starts when it accepts, ours when connect() returns: a
        # couple of milliseconds either way between two processes' clocks and loops.
        assert 0.19 <= time.monotonic() - started < 3.0


# 15
def test_reset_peer_resets_the_client(client: Any, echo: str) -> None:
    proxy = client.create(upstream=echo, name="p")
    proxy.add_toxic(type="reset_peer", stream="upstream", attributes={"timeout": 0})
    with connect(proxy.listen) as sock:
        sock.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            read_to_eof(sock)


# 16
def test_unreachable_upstream_gives_immediate_eof(client: Any) -> None:
    proxy = client.create(upstream=f"127.0.0.1:{free_port()}", name="p")
    with connect(proxy.listen) as sock:
        started = time.monotonic()
        assert read_to_eof(sock) == b""
        assert time.monotonic() - started < 3.0
    assert client.get_proxy("p").enabled is True


# 17
def test_version_is_json(api: RawApi, client: Any) -> None:
    reply = api.get("/version")
    assert reply.status == 200
    assert isinstance(json.loads(reply.body)["version"], str)
    assert b"version" in client.version()


def test_routing_errors_and_request_ids(api: RawApi, echo: str) -> None:
    assert api.get("/nope").status == 404
    assert api.get("/proxies/").status == 404
    assert api.request("PUT", "/proxies").status == 405
    assert api.request("GET", "/proxies", headers={"User-Agent": "Mozilla/5.0"}).status == 403
    reply = api.get("/proxies")
    assert reply.headers["X-Toxiproxy-Request-Id"]
    assert reply.headers["Content-Type"].startswith("application/json")
    assert error_of(api.get("/proxies/missing")) == (404, "proxy not found")


def test_update_changes_upstream_and_listen(api: RawApi, echo: str) -> None:
    proxy = create_proxy(api, "p", f"127.0.0.1:{free_port()}")
    reply = api.post("/proxies/p", {"upstream": echo})
    assert reply.status == 200
    assert reply.json()["upstream"] == echo
    assert reply.json()["listen"] == proxy["listen"]
    with connect(proxy["listen"]) as sock:
        round_trip(sock)
    port = free_port()
    reply = api.request("PATCH", "/proxies/p", {"listen": f"localhost:{port}"})
    assert reply.json()["listen"] == f"127.0.0.1:{port}"
    with connect(f"127.0.0.1:{port}") as sock:
        round_trip(sock)


def test_bandwidth_limits_rate(client: Any, echo: str) -> None:
    proxy = client.create(upstream=echo, name="p")
    proxy.add_toxic(type="bandwidth", attributes={"rate": 10})
    payload = b"x" * 5000
    with connect(proxy.listen) as sock:
        elapsed = round_trip(sock, payload)
    # 5000 bytes at 10 KB/s (KB = 1000 bytes) take 0.5 s.
    assert 0.4 <= elapsed < 5.0


def test_slicer_keeps_bytes_intact(client: Any, echo: str) -> None:
    proxy = client.create(upstream=echo, name="p")
    proxy.add_toxic(
        type="slicer", attributes={"average_size": 10, "size_variation": 5, "delay": 100}
    )
    payload = bytes(range(256)) * 4
    with connect(proxy.listen) as sock:
        round_trip(sock, payload)


def test_slow_close_delays_the_close(client: Any, echo: str) -> None:
    proxy = client.create(upstream=echo, name="p")
    proxy.add_toxic(type="slow_close", attributes={"delay": 300})
    with connect(proxy.listen) as sock:
        round_trip(sock)
        started = time.monotonic()
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b""
        assert 0.3 <= time.monotonic() - started < 3.0
