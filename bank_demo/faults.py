"""The fault schedule: what goes wrong, when, for how long; and the player that makes it
happen on a running deployment.

A schedule is a pure function of (preset, seed, duration, shards): the same seed plays
the same faults. Presets:

    none      no faults
    network   partitions and latency through Toxiproxy only (any deployment with a
              Toxiproxy API, e.g. docker compose)
    mixed     network faults plus SIGKILL and restart of the coordinator and of one
              agent, and an immediate stop and restart of one PostgreSQL (local only)

With `--ha` (two coordinator processes on a PostgreSQL log, local only) every preset
but none also kills the active coordinator twice; a killed coordinator (always the
one active at that moment) is restarted at the end of its event, as a standby.

A schedule can also come from a JSON file: a list of
`{"at": seconds, "duration": seconds, "kind": ..., "target": ...}` with kind one of
partition, latency, kill_coordinator, kill_agent, crash_postgres.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from twopc_harness.daemons import CoordinatorDaemon
from twopc_harness.network import FaultNetwork
from twopc_harness.system import LocalSystem

PRESETS = ("none", "network", "mixed")
KINDS = ("partition", "latency", "kill_coordinator", "kill_agent", "crash_postgres")
PROCESS_KINDS = ("kill_coordinator", "kill_agent", "crash_postgres")


class ScheduleError(ValueError):
    """A fault schedule that cannot be played."""


@dataclass(frozen=True, slots=True)
class FaultEvent:
    at: float
    duration: float
    kind: str
    target: str = ""
    latency_ms: int = 0

    @property
    def label(self) -> str:
        extra = f" {self.latency_ms}ms" if self.kind == "latency" else ""
        return f"{self.kind} {self.target}{extra}".strip()


def make_schedule(
    preset: str,
    seed: int,
    duration: float,
    shards: Sequence[str],
    proxies: Sequence[str],
    ha: bool = False,
) -> list[FaultEvent]:
    """Faults spread over the middle of the run, one at a time, each followed by a
    quiet spell so that recovery shows in the chart."""
    if preset not in PRESETS:
        raise ScheduleError(f"unknown fault preset {preset!r} (choose from {', '.join(PRESETS)})")
    if preset == "none":
        return []
    rng = random.Random(seed)
    kinds = ["partition", "latency", "partition"]
    if preset == "mixed":
        kinds += ["kill_coordinator", "kill_agent", "crash_postgres"]
    if ha:
        kinds += ["kill_coordinator", "kill_coordinator"]
    rng.shuffle(kinds)
    if not proxies:
        kinds = [k for k in kinds if k in PROCESS_KINDS]
    if not kinds:
        return []
    slot = duration * 0.8 / len(kinds)
    events = []
    for i, kind in enumerate(kinds):
        start = duration * 0.1 + i * slot
        length = round(min(3.0, slot * 0.5) * rng.uniform(0.6, 1.0), 2)
        target = ""
        latency = 0
        if kind in ("partition", "latency"):
            target = rng.choice(sorted(proxies))
            latency = rng.choice([300, 1000, 3000]) if kind == "latency" else 0
        elif kind in ("kill_agent", "crash_postgres"):
            target = rng.choice(list(shards))
        events.append(FaultEvent(round(start, 2), length, kind, target, latency))
    return events


def load_schedule(
    path: Path, shards: Sequence[str], proxies: Sequence[str], can_kill: bool
) -> list[FaultEvent]:
    try:
        items = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ScheduleError(f"cannot read fault schedule {path}: {exc}") from exc
    if not isinstance(items, list):
        raise ScheduleError(f"{path}: a fault schedule is a JSON list of events")
    events = []
    for i, item in enumerate(items, 1):
        try:
            event = FaultEvent(
                float(item["at"]),
                float(item["duration"]),
                str(item["kind"]),
                str(item.get("target", "")),
                int(item.get("latency_ms", 1000)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ScheduleError(f"{path}: event {i} is malformed ({exc})") from exc
        if event.kind not in KINDS:
            raise ScheduleError(f"{path}: event {i} has unknown kind {event.kind!r}")
        if event.at < 0 or event.duration <= 0:
            raise ScheduleError(f"{path}: event {i} needs at >= 0 and duration > 0")
        if event.kind in ("partition", "latency") and event.target not in proxies:
            raise ScheduleError(f"{path}: event {i}: no proxy {event.target!r}")
        if event.kind in ("kill_agent", "crash_postgres") and event.target not in shards:
            raise ScheduleError(f"{path}: event {i}: no shard {event.target!r}")
        if event.kind in PROCESS_KINDS and not can_kill:
            raise ScheduleError(f"{path}: event {i}: {event.kind} needs the local deployment")
        events.append(event)
    return sorted(events, key=lambda e: e.at)


def schedule_json(events: Sequence[FaultEvent]) -> list[dict[str, Any]]:
    return [asdict(e) for e in events]


class FaultPlayer:
    """Carries out one event at a time (blocking; run it in a thread)."""

    def __init__(self, network: FaultNetwork | None, system: LocalSystem | None) -> None:
        self._network = network
        self._system = system
        self.current = ""
        self._killed: CoordinatorDaemon | None = None

    def play(self, events: Sequence[FaultEvent], started: float, stop_at: float) -> None:
        for event in events:
            if not _sleep_until(started + event.at, stop_at):
                return
            self.current = event.label
            try:
                self._begin(event)
                _sleep_until(started + event.at + event.duration, float("inf"))
            finally:
                self._end(event)
                self.current = ""

    def _begin(self, event: FaultEvent) -> None:
        if event.kind == "partition":
            assert self._network is not None
            self._network[event.target].disable()
        elif event.kind == "latency":
            assert self._network is not None
            self._network[event.target].add_toxic(
                name="demo_latency",
                type="latency",
                stream="downstream",
                attributes={"latency": event.latency_ms, "jitter": event.latency_ms // 10},
            )
        elif event.kind == "kill_coordinator":
            assert self._system is not None and self._system.coordinator is not None
            # With standbys, the one active now (a standby takes over within seconds).
            victim = self._system.active_coordinator() or self._system.coordinator
            victim.kill()
            self._killed = victim
        elif event.kind == "kill_agent":
            assert self._system is not None
            self._system.participants[event.target].kill()
        elif event.kind == "crash_postgres":
            assert self._system is not None
            self._system.cluster(event.target).stop("immediate")

    def _end(self, event: FaultEvent) -> None:
        if event.kind == "partition":
            assert self._network is not None
            self._network[event.target].enable()
        elif event.kind == "latency":
            assert self._network is not None
            self._network[event.target].destroy_toxic("demo_latency")
        elif event.kind == "kill_coordinator":
            assert self._system is not None and self._killed is not None
            if self._system.standbys:
                # Back as a standby (the other one took over): listening, NOT_SERVING.
                self._killed.start(wait=False)
                self._killed.wait_ready(serving=False)
            else:
                self._killed.start()
            self._killed = None
        elif event.kind == "kill_agent":
            assert self._system is not None
            self._system.participants[event.target].start()
        elif event.kind == "crash_postgres":
            assert self._system is not None
            self._system.cluster(event.target).start()


def _sleep_until(deadline: float, stop_at: float) -> bool:
    """Wait until `deadline`; False if `stop_at` comes first (the run is over)."""
    while time.monotonic() < deadline:
        if time.monotonic() >= stop_at:
            return False
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    return True
