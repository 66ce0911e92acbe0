"""Where the time goes: CPU per committed transfer, process by process.

Runs the system and the raw 2PC baseline of `bench/transfers.py` at one concurrency on
2 shards, and reads each process's CPU time (utime + stime from /proc) before and after:
the coordinator, each agent, the client (this process) and the PostgreSQL backends,
told apart by application_name. Prints milliseconds of CPU per committed transfer,
and each daemon's by kind of thread (its event loop, gRPC's C threads, the others).

    python bench/cpu_split.py [--concurrency 16] [--duration 10] [--profile out/profile]

With --profile, py-spy samples the coordinator and the agents during the system run
and the hottest functions of each are printed (self time and inclusive time); the
collapsed stacks are kept in that folder for flame graphs. py-spy samples stacks, not
CPU: a thread blocked in fsync (the decision log's COMMIT) counts as busy; the /proc
figures above are the CPU truth.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfers import (
    Picker,
    drive,
    prepare_bank,
    raw_2pc,
    raw_pools,
    start_bench_system,
    through_system,
)

from twopc_harness.system import LocalSystem

TICKS = os.sysconf("SC_CLK_TCK")


def _stat(path: str) -> tuple[str, float] | None:
    """The name and CPU seconds (utime + stime) of a /proc stat file; None if gone."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    name, _, rest = text.partition("(")[2].rpartition(")")
    fields = rest.split()
    return name, (int(fields[11]) + int(fields[12])) / TICKS


def cpu_seconds(pid: int) -> float:
    found = _stat(f"/proc/{pid}/stat")
    return found[1] if found else 0.0


def thread_cpu(pid: int) -> dict[str, float]:
    """A daemon's CPU seconds by kind of thread: its event loop (the main thread),
    gRPC's C threads (named event_engine), and its other Python threads (gRPC's
    completion-queue poller, the decision log's writer)."""
    kinds: dict[str, float] = collections.defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (found := _stat(f"{task}/stat")) is None:
            continue
        name, secs = found
        kind = "other threads"
        if int(task.name) == pid:
            kind = "event loop"
        elif name == "event_engine":
            kind = "gRPC C threads"
        kinds[kind] += secs
    return dict(kinds)


def processes(system: LocalSystem) -> dict[str, list[int]]:
    """Process groups: our daemons, this client, and PostgreSQL backends by role."""
    assert system.coordinator is not None and system.coordinator.process is not None
    groups: dict[str, list[int]] = {
        "coordinator": [system.coordinator.process.pid],
        "client": [os.getpid()],
    }
    for name, agent in system.participants.items():
        assert agent.process is not None
        groups[f"agent {name}"] = [agent.process.pid]
        with psycopg.connect(system.dsn(name), autocommit=True) as conn:
            for pid, app in conn.execute("SELECT pid, application_name FROM pg_stat_activity"):
                role = "agent" if str(app).startswith("twopc-participant") else "other"
                groups.setdefault(f"postgres {name} ({role} backends)", []).append(int(pid))
    return groups


def py_spy() -> str:
    """py-spy of this virtualenv (a dev dependency), else the one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        sys.exit("--profile needs py-spy: pip install -e '.[dev]'")
    return found


def start_profilers(system: LocalSystem, folder: Path, duration: float) -> dict[str, Any]:
    """py-spy on each daemon, sampling without pausing it, for `duration` seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    daemons = {"coordinator": system.coordinator, **system.participants}
    spies = {}
    for name, daemon in daemons.items():
        assert daemon is not None and daemon.process is not None
        out = folder / f"{name}.txt"
        spies[name] = (
            subprocess.Popen(
                [
                    py_spy(),
                    "record",
                    "--pid",
                    str(daemon.process.pid),
                    "--nonblocking",
                    "--rate",
                    "250",
                    "--duration",
                    str(int(duration)),
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            out,
        )
    return spies


def report_profile(name: str, collapsed: Path, top: int = 12) -> None:
    """Hottest frames of a collapsed-stack file: self time, then inclusive time."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return
    print(f"profile of {name} ({total} samples):")
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"  {title}:")
        for frame, n in counter.most_common(top):
            print(f"    {100 * n / total:5.1f}%  {frame[:110]}")


async def measure(
    name: str,
    transfer: Callable[[str, int, int], Any],
    system: LocalSystem,
    concurrency: int,
    duration: float,
    profile: Path | None = None,
) -> None:
    shards = system.shard_names
    await drive(transfer, Picker(shards, 1), concurrency, 2.0, f"warm-{name}")
    groups = processes(system)
    before = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
    daemons = {
        g: pids[0] for g, pids in groups.items() if g == "coordinator" or g.startswith("agent")
    }
    threads_before = {g: thread_cpu(pid) for g, pid in daemons.items()}
    spies = start_profilers(system, profile, duration) if profile else {}
    result = await drive(transfer, Picker(shards, 2), concurrency, duration, name)
    groups = processes(system)  # the pool may have opened backends meanwhile
    after = {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}
    threads_after = {g: thread_cpu(pid) for g, pid in daemons.items()}
    committed = result["committed"] or 1
    print(f"{name}: {result['transfers_per_s']}/s committed; CPU ms per transfer:")
    total = 0.0
    for group in sorted(after):
        ms = 1000 * (after[group] - before.get(group, 0.0)) / committed
        total += ms
        if ms >= 0.01:
            print(f"  {group:<40} {ms:6.2f}")
        if group in daemons:
            # A thread that ended meanwhile (gRPC resizes its pool) is in the
            # process's figure only: the remainder.
            kinds = {
                kind: 1000 * (secs - threads_before[group].get(kind, 0.0)) / committed
                for kind, secs in threads_after[group].items()
            }
            # (The two readings are not simultaneous: a few hundredths either way
            # are that, not a thread.)
            if (ended := ms - sum(kinds.values())) >= 0.05:
                kinds["threads that ended"] = ended
            for kind, kind_ms in kinds.items():
                if kind_ms >= 0.01:
                    print(f"    {kind:<38} {kind_ms:6.2f}")
    print(f"  {'total':<40} {total:6.2f}")
    for spy_name, (spy, out) in spies.items():
        spy.wait()
        if out.exists():
            report_profile(spy_name, out)


async def main_async(
    system: LocalSystem, concurrency: int, duration: float, profile: Path | None
) -> None:
    shards = system.shard_names
    pools = await raw_pools(system, shards, 70)
    try:
        async with system.async_client(timeout=60) as client:
            await measure(
                "system", through_system(client, shards), system, concurrency, duration, profile
            )
            status = await client.status()
            batching = {
                k: v
                for k, v in status.counters.items()
                if k.startswith(("phase2_", "log_", "prepare_", "finish_"))
            }
            print("coordinator batching counters:", batching)
        await measure("raw", raw_2pc(pools, shards), system, concurrency, duration)
    finally:
        for pool in pools.values():
            await pool.close()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--profile", type=Path, help="folder for py-spy profiles of the daemons")
    a = p.parse_args()
    system = start_bench_system()
    try:
        prepare_bank(system, system.shard_names)
        asyncio.run(main_async(system, a.concurrency, a.duration, a.profile))
    finally:
        system.stop()


if __name__ == "__main__":
    main()
