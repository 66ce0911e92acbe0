"""A proxy: its listener, its live connections, and its toxic chains, which every
connection follows as they change."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

from ._addr import AddressError, bind, connect_target, resolve_listen
from ._errors import ApiError
from ._link import Link
from ._toxics import DOWNSTREAM, UPSTREAM, Toxic

log = logging.getLogger(__name__)

_LINGER_ZERO = struct.pack("ii", 1, 0)


class Connection:
    """A client socket, the upstream socket dialled for it, and the two links between them."""

    def __init__(
        self, proxy: Proxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._proxy = proxy
        self._client = (reader, writer)
        self._upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.links: dict[str, Link] = {}
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._proxy_traffic()
        except OSError as exc:
            log.debug(
                "proxy %s: dialling upstream %s failed: %s",
                self._proxy.name,
                self._proxy.upstream,
                exc,
            )
        except AddressError as exc:
            log.debug("proxy %s: bad upstream: %s", self._proxy.name, exc)
        finally:
            for link in self.links.values():
                link.kill()
            self._client[1].close()
            if self._upstream is not None:
                self._upstream[1].close()
            self._proxy.forget(self)

    async def _proxy_traffic(self) -> None:
        host, port = connect_target(self._proxy.upstream)
        self._upstream = await asyncio.open_connection(host, port)
        client_reader, client_writer = self._client
        upstream_reader, upstream_writer = self._upstream
        chains = self._proxy.chains
        if any(t.type == "reset_peer" for chain in chains.values() for t in chain):
            # Only sockets accepted while a reset_peer exists get linger 0, as in the
            # real server; closing them then sends RST so peers see ECONNRESET.
            for writer in (client_writer, upstream_writer):
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO
                )
        # Links are built from the chains in the same step in which they become visible
        # to toxic edits, so no edit can fall between the two.
        self.links = {
            UPSTREAM: Link(list(chains[UPSTREAM]), client_reader, upstream_writer),
            DOWNSTREAM: Link(list(chains[DOWNSTREAM]), upstream_reader, client_writer),
        }
        await asyncio.wait([link.start() for link in self.links.values()])

    def abort(self) -> None:
        self._client[1].transport.abort()
        if self._upstream is not None:
            self._upstream[1].transport.abort()
        self._task.cancel()


class Proxy:
    def __init__(self, name: str, listen: str, upstream: str) -> None:
        self.name = name
        self.listen = listen
        self.upstream = upstream
        self.enabled = False
        self.chains: dict[str, list[Toxic]] = {UPSTREAM: [], DOWNSTREAM: []}
        # Serialises changes to this proxy; edits to live links must not interleave.
        self.lock = asyncio.Lock()
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "toxics": [toxic.to_json() for toxic in self.toxics()],
        }

    async def start(self) -> None:
        if self.enabled:
            return
        try:
            sock, bound = await bind(self.listen)
        except AddressError as exc:
            raise ApiError(500, str(exc)) from None
        self._server = await asyncio.start_server(self._accept, sock=sock, backlog=socket.SOMAXCONN)
        self.listen = bound
        self.enabled = True
        log.info("proxy %s listening on %s -> %s", self.name, self.listen, self.upstream)

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            log.info("proxy %s stopped", self.name)
        for connection in list(self._connections):
            connection.abort()
        self._connections.clear()
        self.enabled = False

    async def differs(self, listen: str, upstream: str) -> bool:
        try:
            resolved = await resolve_listen(listen)
        except AddressError as exc:
            raise ApiError(500, str(exc)) from None
        return resolved != self.listen or upstream != self.upstream

    async def update(self, listen: str, upstream: str, enabled: bool) -> None:
        if await self.differs(listen, upstream):
            self.stop()
            self.listen = listen
            self.upstream = upstream
        if enabled:
            await self.start()
        else:
            self.stop()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(Connection(self, reader, writer))

    def forget(self, connection: Connection) -> None:
        self._connections.discard(connection)

    def toxics(self) -> list[Toxic]:
        return self.chains[UPSTREAM] + self.chains[DOWNSTREAM]

    def find_toxic(self, name: str) -> Toxic | None:
        return next((toxic for toxic in self.toxics() if toxic.name == name), None)

    def _links(self, direction: str) -> list[Link]:
        return [c.links[direction] for c in self._connections if c.links]

    # The toxic edits below expect the caller to hold self.lock.

    async def add_toxic(self, toxic: Toxic) -> None:
        self.chains[toxic.direction].append(toxic)
        for link in self._links(toxic.direction):
            await link.add(toxic)

    async def update_toxic(
        self, toxic: Toxic, attributes: dict[str, int], toxicity: float | None
    ) -> None:
        toxic.attributes.update(attributes)
        if toxicity is not None:
            toxic.toxicity = toxicity
        for link in self._links(toxic.direction):
            await link.update(toxic)

    async def remove_toxic(self, toxic: Toxic) -> None:
        self.chains[toxic.direction].remove(toxic)
        for link in self._links(toxic.direction):
            await link.remove(toxic)

    async def remove_all_toxics(self) -> None:
        for chain in self.chains.values():
            while chain:
                await self.remove_toxic(chain[0])
