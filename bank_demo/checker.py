"""The invariant checker: proves, from the shards themselves, that the bank is intact.

1. total money equals what was put in (each shard's `bank_meta.initial_total`);
2. no balance is negative;
3. every transfer has both legs or neither;
4. every transfer the client recorded as committed has both legs;
5. every transfer the client recorded as aborted has none;
6. no prepared transaction of this system is left on any shard.

Checks 4 and 5 need what the client was told (a run's transfers.jsonl); without it they
are reported as SKIP with the reason, never as PASS.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bank_demo.bank import BOTH_LEGS, Snapshot, snapshot


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    """False if the check failed (a skipped check did not fail)."""
    offending: tuple[str, ...] = field(default=())
    detail: str = ""
    skipped: str = ""
    """Why the check could not be made; empty if it was."""

    @property
    def verdict(self) -> str:
        return "SKIP" if self.skipped else "PASS" if self.ok else "FAIL"


_NO_OUTCOMES = "no --transfers file: what the client was told is not known"


def load_outcomes(path: Path) -> dict[str, str]:
    """Transfer id -> committed | aborted | unknown, from the demo's transfers.jsonl."""
    outcomes = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                outcomes[str(record["id"])] = str(record["outcome"])
    return outcomes


def _ids(values: Iterable[object]) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


def check(snap: Snapshot, outcomes: Mapping[str, str] | None) -> list[Check]:
    checks = [
        Check(
            "total money unchanged",
            snap.total == snap.initial_total,
            detail=f"now {snap.total}, put in {snap.initial_total}",
        ),
        Check("no negative balance", not snap.negative, _ids(snap.negative)),
        Check(
            "every transfer has both legs or neither",
            not snap.half_applied(),
            tuple(snap.half_applied()),
        ),
    ]
    if outcomes is None:
        checks += [
            Check("every committed transfer applied", True, skipped=_NO_OUTCOMES),
            Check("no aborted transfer applied", True, skipped=_NO_OUTCOMES),
        ]
    else:
        committed = sorted(t for t, o in outcomes.items() if o == "committed")
        aborted = sorted(t for t, o in outcomes.items() if o == "aborted")
        missing = tuple(t for t in committed if snap.legs.get(t) != BOTH_LEGS)
        leaked = tuple(t for t in aborted if snap.legs.get(t))
        checks += [
            Check(
                "every committed transfer applied",
                not missing,
                missing,
                f"{len(committed)} recorded committed",
            ),
            Check(
                "no aborted transfer applied",
                not leaked,
                leaked,
                f"{len(aborted)} recorded aborted",
            ),
        ]
    leftovers = tuple(f"{shard}:{gid}" for shard, gids in snap.prepared.items() for gid in gids)
    checks.append(Check("no prepared transaction left", not leftovers, leftovers))
    return checks


def run_checks(dsns: Mapping[str, str], outcomes: Mapping[str, str] | None) -> list[Check]:
    return check(snapshot(dsns), outcomes)


def render(checks: list[Check], limit: int = 10) -> str:
    lines = []
    for c in checks:
        line = f"  {c.verdict}  {c.name}"
        if c.skipped:
            line += f" ({c.skipped})"
        if c.detail:
            line += f" ({c.detail})"
        if c.offending:
            shown = ", ".join(c.offending[:limit])
            more = f" and {len(c.offending) - limit} more" if len(c.offending) > limit else ""
            line += f": {shown}{more}"
        lines.append(line)
    return "\n".join(lines)
