"""Running a ToxiproxyServer on its own event loop in a background thread, for sync callers."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from ._server import ToxiproxyServer


class ServerThread:
    """Handle on a server running in a daemon thread; `stop()` shuts it down and joins."""

    def __init__(
        self, server: ToxiproxyServer, loop: asyncio.AbstractEventLoop, thread: threading.Thread
    ) -> None:
        self.server = server
        self._loop = loop
        self._thread = thread

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_in_thread(
    host: str = "127.0.0.1", port: int = 0, config: str | None = None
) -> ServerThread:
    """Start a server in a background thread; returns once it serves requests, or raises why not."""
    server = ToxiproxyServer(host, port, config)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:
            failure.append(exc)
            started.set()
            loop.close()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(_shutdown(server))
        loop.close()

    thread = threading.Thread(target=main, name=f"toxiproxy-{port}", daemon=True)
    thread.start()
    started.wait()
    if failure:
        raise failure[0]
    return ServerThread(server, loop, thread)


async def _shutdown(server: ToxiproxyServer) -> None:
    await server.stop()
    current = asyncio.current_task()
    leftovers = [task for task in asyncio.all_tasks() if task is not current]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)
