"""Structured log lines: `ts=... level=... daemon=... event=... key=value ...`.

Every line about a transaction carries `txid=...`, so one grep over the daemons' logs
tells a transaction's whole story. Timestamps are UTC with milliseconds. `RateLimit`
keeps a warning that repeats every scan (an in-doubt branch waiting for its
coordinator) to one line per key and interval.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class EventLogger:
    def __init__(self, daemon: str, name: str) -> None:
        self._daemon = daemon
        self._logger = logging.getLogger(f"twopc.{daemon}")
        self._name = name

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if not self._logger.isEnabledFor(level):
            return
        now = time.time()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        parts = [
            f"ts={ts}.{int(now % 1 * 1000):03d}Z",
            f"level={logging.getLevelName(level).lower()}",
            f"daemon={self._daemon}",
            f"id={self._name}",
            f"event={event}",
        ]
        parts += [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
        self._logger.log(level, " ".join(parts))

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields)


class RateLimit:
    """Says whether a line about `key` is due: at most once per `interval` seconds
    per key. Keys not seen for an interval are forgotten, so memory stays bounded by
    what repeats."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}

    def due(self, key: str) -> bool:
        now = self._clock()
        if len(self._last) > 1024:
            self._last = {k: t for k, t in self._last.items() if now - t < self._interval}
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            return False
        self._last[key] = now
        return True


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("twopc")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
