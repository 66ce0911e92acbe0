"""The demo's report: figures on screen, every figure in JSON, and a PNG chart of the
run (throughput and aborts per second, fault windows shaded and labelled, in-doubt
branches)."""

from __future__ import annotations

import collections
import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bank_demo.checker import Check
from bank_demo.faults import FaultEvent
from bank_demo.workload import Second, TransferRecord


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(
    records: Sequence[TransferRecord], duration: float, timeline: Sequence[Second] = ()
) -> dict[str, Any]:
    committed = [r for r in records if r.outcome == "committed"]
    latencies = [r.latency for r in committed]
    return {
        "deadlocks_broken": sum(s.deadlocks or 0 for s in timeline),
        "deadlocks_broken_per_second": [s.deadlocks for s in timeline],
        "unaffected_committed_per_second": [s.unaffected for s in timeline],
        "transfers": len(records),
        "committed": len(committed),
        "committed_one_phase": sum(1 for r in committed if r.one_phase),
        "committed_two_phase": sum(1 for r in committed if not r.one_phase),
        "aborted": sum(1 for r in records if r.outcome == "aborted"),
        "aborted_by_cause": dict(
            collections.Counter(r.cause for r in records if r.outcome == "aborted")
        ),
        "unknown": sum(1 for r in records if r.outcome == "unknown"),
        "cross_shard": sum(1 for r in records if r.cross_shard),
        "same_shard": sum(1 for r in records if not r.cross_shard),
        "retried_after_transport_error": sum(1 for r in records if r.attempts > 1),
        "committed_per_second": round(len(committed) / duration, 1) if duration else 0.0,
        "latency_p50_ms": round(_percentile(latencies, 0.5) * 1000, 1),
        "latency_p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
        "latency_mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else 0.0,
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def write_transfers(path: Path, records: Sequence[TransferRecord]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(asdict(record)) + "\n")


def write_chart(
    path: Path, timeline: Sequence[Second], schedule: Sequence[FaultEvent], title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in timeline]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot(t, [s.committed for s in timeline], label="committed / s", color="tab:green")
    top.plot(t, [s.aborted for s in timeline], label="aborted / s", color="tab:red")
    top.plot(t, [s.unknown for s in timeline], label="unanswered / s", color="tab:gray")
    top.plot(
        t,
        [s.unaffected for s in timeline],
        label="committed / s, not touching the faulted shard",
        color="tab:blue",
        linestyle="--",
    )
    bottom.plot(
        t,
        [s.in_doubt if s.in_doubt is not None else float("nan") for s in timeline],
        color="tab:purple",
        label="in-doubt (prepared) branches",
    )
    bottom.plot(
        t,
        [s.deadlocks if s.deadlocks is not None else float("nan") for s in timeline],
        color="tab:brown",
        label="deadlocks broken / s",
    )
    ymax = max([s.committed for s in timeline] + [1])
    for i, event in enumerate(schedule):
        for axis in (top, bottom):
            axis.axvspan(event.at, event.at + event.duration, color="tab:orange", alpha=0.18)
        top.text(
            event.at,
            ymax * (0.97 - 0.07 * (i % 4)),
            event.label,
            fontsize=8,
            color="tab:orange",
            va="top",
        )
    top.set_ylabel("transfers per second")
    top.set_title(title)
    top.legend(loc="lower right", fontsize=8)
    bottom.set_ylabel("in doubt, deadlocks")
    bottom.set_xlabel("seconds since start (shaded: faults in force)")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(figs: dict[str, Any], checks: Sequence[Check], recovery_seconds: float | None) -> str:
    causes = ", ".join(f"{k} {v}" for k, v in sorted(figs["aborted_by_cause"].items())) or "-"
    lines = [
        f"transfers            {figs['transfers']} ({figs['cross_shard']} cross-shard, "
        f"{figs['same_shard']} same-shard)",
        f"committed            {figs['committed']} ({figs['committed_two_phase']} two-phase, "
        f"{figs['committed_one_phase']} one-phase), {figs['committed_per_second']}/s",
        f"aborted              {figs['aborted']} ({causes})",
        f"deadlocks broken     {figs['deadlocks_broken']} (cross-shard cycles, by the coordinator)",
        f"unanswered           {figs['unknown']}   (retried after a lost answer: "
        f"{figs['retried_after_transport_error']})",
        f"latency (committed)  p50 {figs['latency_p50_ms']} ms, p99 {figs['latency_p99_ms']} ms",
    ]
    if recovery_seconds is not None:
        lines.append(f"recovery after heal  {recovery_seconds:.1f} s until nothing was in doubt")
    return "\n".join(lines)
