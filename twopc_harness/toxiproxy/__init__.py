"""A pure-asyncio stand-in for toxiproxy-server 2.x: the same HTTP API, TCP proxies and
toxics, for injecting network faults in tests and demos.

    async with ToxiproxyServer("127.0.0.1", 0) as server: ...   # server.url
    handle = run_in_thread("127.0.0.1", 0); ...; handle.stop()  # handle.url
"""

from ._api import VERSION
from ._server import ToxiproxyServer
from ._thread import ServerThread, run_in_thread

__all__ = ["VERSION", "ServerThread", "ToxiproxyServer", "run_in_thread"]
