"""Toxiproxy on every network path of a local deployment.

Which server: the one at TOXIPROXY_URL if set, else a real `toxiproxy-server` from PATH
started on a free port, else the project's own compatible server
(`twopc_harness.toxiproxy`) in a background thread. Either way it is driven only
through the Toxiproxy HTTP API, with the `toxiproxy-python` client.

Paths (proxy names): `client_coordinator` (applications -> coordinator),
`coordinator_<shard>` (coordinator -> agent), `<shard>_coordinator` (agent -> coordinator,
for in-doubt resolution) and `<shard>_postgres` (agent -> its database).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import requests
from toxiproxy import Toxiproxy
from toxiproxy.proxy import Proxy

from twopc_harness.postgres import HarnessError, free_port
from twopc_harness.toxiproxy import ServerThread, run_in_thread


@dataclass
class FaultNetwork:
    url: str
    api: Toxiproxy
    proxies: dict[str, Proxy] = field(default_factory=dict)
    owned: bool = True
    """False for a deployment's own Toxiproxy: stop() heals it but deletes nothing."""
    _thread: ServerThread | None = None
    _process: subprocess.Popen[bytes] | None = None

    @property
    def kind(self) -> str:
        if self._thread is not None:
            return "built-in toxiproxy-compatible server"
        return "toxiproxy-server" if self._process is not None else f"toxiproxy at {self.url}"

    def add(self, name: str, upstream: str) -> str:
        """Create a proxy to `upstream`; return the address to use instead of it."""
        proxy = self.api.create(upstream=upstream, name=name, listen="127.0.0.1:0")
        self.proxies[name] = proxy
        return str(proxy.listen)

    def __getitem__(self, name: str) -> Proxy:
        return self.proxies[name]

    def heal(self) -> None:
        """Enable every proxy and remove every toxic."""
        self.api.reset()

    def stop(self) -> None:
        if not self.owned:
            self.heal()
            return
        for proxy in list(self.proxies.values()):
            with contextlib.suppress(requests.RequestException):
                proxy.destroy()
        self.proxies.clear()
        if self._thread is not None:
            self._thread.stop()
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)


def _client(url: str) -> Toxiproxy:
    parsed = urlparse(url)
    api = Toxiproxy()
    # toxiproxy-python keeps one global API address.
    api.update_api_consumer(parsed.hostname or "127.0.0.1", parsed.port or 8474)
    return api


def attach_network(url: str) -> FaultNetwork:
    """The Toxiproxy of an existing deployment, with the proxies it already has."""
    api = _client(url)
    if not api.running():
        raise HarnessError(f"no Toxiproxy API answers at {url}")
    return FaultNetwork(url, api, dict(api.proxies()), owned=False)


def start_network() -> FaultNetwork:
    url = os.environ.get("TOXIPROXY_URL")
    if url:
        return FaultNetwork(url, _client(url))
    binary = shutil.which("toxiproxy-server")
    if binary:
        port = free_port()
        process = subprocess.Popen(
            [binary, "-host", "127.0.0.1", "-port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        api = _client(url)
        deadline = time.monotonic() + 10
        while not api.running():
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise HarnessError(f"{binary} did not start")
            time.sleep(0.05)
        return FaultNetwork(url, api, _process=process)
    thread = run_in_thread("127.0.0.1", 0)
    return FaultNetwork(thread.url, _client(thread.url), _thread=thread)
