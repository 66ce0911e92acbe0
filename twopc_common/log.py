"""Structured log lines: `ts=... level=... daemon=... event=... key=value ...`, or
with `setup(fmt="json")` one JSON object per line with the same keys, for log
pipelines.

Every line about a transaction carries `txid=...`, so one grep over the daemons' logs
tells a transaction's whole story. Timestamps are UTC with milliseconds. `RateLimit`
keeps a warning that repeats every scan (an in-doubt branch waiting for its
coordinator) to one line per key and interval.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

FORMATS = ("text", "json")
"""The values of `--log-format`."""

_json = False


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def _plain(value: object) -> object:
    """JSON keeps numbers and booleans; anything else is logged as its text."""
    return value if isinstance(value, bool | int | float | str) else str(value)


_EVENT = "twopc_event"


class _JsonLines(logging.Formatter):
    """Event lines are JSON already; anything else logged under `twopc` (an
    unexpected error's traceback, say) becomes one JSON object too, so a pipeline
    never meets a line it cannot parse."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, _EVENT, False):
            return record.getMessage()
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": "log",
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class EventLogger:
    def __init__(self, daemon: str, name: str) -> None:
        self._daemon = daemon
        self._logger = logging.getLogger(f"twopc.{daemon}")
        self._name = name

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if not self._logger.isEnabledFor(level):
            return
        now = time.time()
        ts = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now))}.{int(now % 1 * 1000):03d}"
        if _json:
            record: dict[str, Any] = {
                "ts": f"{ts}Z",
                "level": logging.getLevelName(level).lower(),
                "daemon": self._daemon,
                "id": self._name,
                "event": event,
            }
            record.update((k, _plain(v)) for k, v in fields.items() if v is not None)
            line = json.dumps(record, separators=(",", ":"))
            self._logger.log(level, line, extra={_EVENT: True})
            return
        parts = [
            f"ts={ts}Z",
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


def setup(level: str = "INFO", fmt: str = "text") -> None:
    global _json
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    _json = fmt == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines() if _json else logging.Formatter("%(message)s"))
    root = logging.getLogger("twopc")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
