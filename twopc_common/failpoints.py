"""Named failpoints, after tikv's fail-rs: test hooks at every protocol step.

Configured from the environment variable TWOPC_FAILPOINTS at start (and at run time
through `configure`), as `name=action` pairs separated by `;`. An action is
`[P%][N*]task`, where task is one of:

    off           disable the point
    crash         os._exit(FAILPOINT_EXIT_CODE) at once: no cleanup, no flush
    error(msg)    raise FailpointError(msg)
    sleep(ms)     delay, then continue
    hang          block until the point is reconfigured

`P%` fires with probability P, `N*` fires at most N times. For example
`TWOPC_FAILPOINTS="coordinator.after_decision_logged=crash;participant.before_prepare=25%sleep(200)"`.

Off, a failpoint costs one dict lookup on an empty dict.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
from dataclasses import dataclass, field

from twopc_common.errors import InvalidArgument, PermissionDenied, TwoPCError

ENV_VAR = "TWOPC_FAILPOINTS"
FAILPOINT_EXIT_CODE = 86

_ACTION = re.compile(
    r"^(?:(?P<pct>\d+(?:\.\d+)?)%)?(?:(?P<count>\d+)\*)?(?P<task>off|crash|hang|error|sleep)"
    r"(?:\((?P<arg>[^)]*)\))?$"
)


class FailpointError(TwoPCError):
    """Raised by a failpoint whose task is `error`."""


@dataclass
class _Point:
    task: str
    arg: str
    probability: float
    remaining: int | None
    released: asyncio.Event | None = field(default=None)


_active: dict[str, _Point] = {}


def parse(spec: str) -> dict[str, _Point]:
    points: dict[str, _Point] = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, sep, action = item.partition("=")
        match = _ACTION.match(action.strip())
        if not sep or not name.strip() or match is None:
            raise ValueError(f"bad failpoint {item!r}: expected name=[P%][N*]task[(arg)]")
        task, arg = match["task"], match["arg"] or ""
        if task == "sleep" and not arg.isdigit():
            raise ValueError(f"bad failpoint {item!r}: sleep takes milliseconds")
        points[name.strip()] = _Point(
            task=task,
            arg=arg,
            probability=float(match["pct"]) / 100 if match["pct"] else 1.0,
            remaining=int(match["count"]) if match["count"] else None,
        )
    return points


def configure(spec: str) -> None:
    """Replace points named in `spec`; `name=off` removes one (and releases a hang)."""
    for name, point in parse(spec).items():
        old = _active.pop(name, None)
        if old is not None and old.released is not None:
            old.released.set()
        if point.task != "off":
            _active[name] = point


def configure_remotely(allowed: bool, spec: str) -> dict[str, str]:
    """The admin call's logic, shared by both daemons' servicers."""
    if not allowed:
        raise PermissionDenied("failpoints are disabled: start the daemon with --allow-failpoints")
    try:
        configure(spec)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    return active()


def configure_from_env(allowed: bool) -> None:
    """Points from TWOPC_FAILPOINTS; a daemon without --allow-failpoints refuses to
    start with them rather than ignore them silently."""
    spec = os.environ.get(ENV_VAR, "")
    if spec and not allowed:
        raise ValueError(f"{ENV_VAR} is set but the daemon was not started with --allow-failpoints")
    configure(spec)


def active() -> dict[str, str]:
    return {name: p.task + (f"({p.arg})" if p.arg else "") for name, p in _active.items()}


def _should_fire(point: _Point) -> bool:
    if point.remaining == 0:
        return False
    if point.probability < 1.0 and random.random() >= point.probability:
        return False
    if point.remaining is not None:
        point.remaining -= 1
    return True


async def hit(name: str) -> None:
    """Run the failpoint `name` if it is configured."""
    point = _active.get(name)
    if point is None or not _should_fire(point):
        return
    if point.task == "crash":
        os._exit(FAILPOINT_EXIT_CODE)
    if point.task == "error":
        raise FailpointError(point.arg or f"failpoint {name}")
    if point.task == "sleep":
        await asyncio.sleep(int(point.arg) / 1000)
    elif point.task == "hang":
        point.released = point.released or asyncio.Event()
        await point.released.wait()
