"""ToxiproxyServer: the API listener and its proxies on the running asyncio loop."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import TracebackType

from ._addr import AddressError, bind, join_host_port, split_host_port
from ._api import Api
from ._http import HttpServer

log = logging.getLogger(__name__)


class ToxiproxyServer:
    """A stand-in for toxiproxy-server: the same HTTP API, proxies and toxics.

    Port 0 picks a free port; `url` gives the bound address once started. `config` names
    a JSON file holding a /populate body applied at start-up, like `-config`.
    """

    def __init__(
        self, host: str = "localhost", port: int = 8474, config: str | None = None
    ) -> None:
        self._listen = join_host_port(host, port)
        self._config = config
        self._api = Api()
        self._http = HttpServer(self._api.handle)
        self._bound: str | None = None

    @property
    def host(self) -> str:
        """An address to reach the API at (loopback when bound to the wildcard)."""
        if self._bound is None:
            raise RuntimeError("server not started")
        host, _ = split_host_port(self._bound)
        return "127.0.0.1" if host == "::" else host

    @property
    def port(self) -> int:
        if self._bound is None:
            raise RuntimeError("server not started")
        return int(split_host_port(self._bound)[1])

    @property
    def url(self) -> str:
        return f"http://{join_host_port(self.host, self.port)}"

    async def start(self) -> None:
        if self._config is not None:
            await self._populate_from(self._config)
        try:
            sock, self._bound = await bind(self._listen)
        except AddressError as exc:
            raise OSError(str(exc)) from None
        await self._http.start(sock)
        log.info("toxiproxy API listening on %s", self.url)

    async def stop(self) -> None:
        self._http.close()
        self._api.close()
        # Aborted transports close their sockets in loop callbacks; let those run.
        await asyncio.sleep(0)

    async def __aenter__(self) -> ToxiproxyServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _populate_from(self, path: str) -> None:
        # Like the real server: a bad config file is logged, and the API starts anyway.
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            log.error("error reading config file %s: %s", path, exc)
            return
        _, done, error = await self._api.populate_body(raw)
        if error is not None:
            log.error("failed to populate proxies from %s: %s", path, error.message)
        else:
            log.info("populated %d proxies from %s", len(done), path)
