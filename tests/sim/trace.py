"""What happened in a schedule, in virtual time: the story a failure prints."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    who: str
    txid: str
    what: str

    def __str__(self) -> str:
        tx = f" txid={self.txid}" if self.txid else ""
        return f"{self.at:9.4f} {self.who:<8}{tx} {self.what}"


class Trace:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def add(self, who: str, what: str, txid: str = "") -> None:
        try:
            at = asyncio.get_running_loop().time()
        except RuntimeError:
            at = 0.0
        self.events.append(Event(at, who, txid, what))

    def story(self, txids: set[str]) -> list[str]:
        """Every event about `txids`, and every crash, restart and fault, in order."""
        return [
            str(e)
            for e in self.events
            if txids.intersection(e.txid.split(",")) or (not e.txid and e.who == "world")
        ]


class CaptureLogs(logging.Handler):
    """The daemons' own structured log lines, into the trace (only when telling a
    story: formatting them costs more than the rest of a schedule)."""

    def __init__(self, trace: Trace) -> None:
        super().__init__(logging.DEBUG)
        self._trace = trace

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        txid = ""
        for part in text.split():
            if part.startswith("txid="):
                txid = part[5:]
        # Drop the wall-clock ts= field: virtual time is on the left.
        text = " ".join(p for p in text.split() if not p.startswith("ts="))
        self._trace.add("log", text, txid)


def digest(trace: Trace) -> str:
    """A fingerprint of the whole schedule: equal for a seed and its replay."""
    return hashlib.sha256("\n".join(map(str, trace.events)).encode()).hexdigest()[:16]
