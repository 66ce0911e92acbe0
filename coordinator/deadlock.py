"""Distributed deadlock detection, the pure part: a global wait-for graph and its victims.

Theory of operation. T1 holds a row on shard A and waits for T2 on shard B while T2
waits for T1 on A: neither PostgreSQL sees a cycle, and only a lock timeout would end
it (after the work of both was done and thrown away). Each agent reports its shard's
lock waits between open branches (`Participant.WaitsFor`); the coordinator unions every
shard's edges into one graph, finds its cycles, and aborts one victim per cycle.

The victim is the youngest transaction of the cycle (highest epoch, then sequence, of
its id): the oldest work survives, and a transaction that keeps losing is retried with
a younger id only by its client's choice. "Least work" would need a measure of work the
coordinator does not have.

No false victims. Lock waits are snapshots taken on different shards at different
moments, and a wait seen on shard A may have ended before the one on shard B was read.
So a cycle is acted on only if every edge of it appears, as the same wait (the same
`wait_started`), in two snapshots taken one after the other: each wait then lasted
across the whole interval between its two readings, those intervals overlap, and at
some instant every transaction of the cycle was blocked by the next one. Under strict
two-phase locking nobody in such a cycle can move again: it is a real deadlock.
Waits for prepared transactions or for sessions outside the system are never part of
a cycle here (they are reported, not broken).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twopc_common.ids import TransactionId


@dataclass(frozen=True, slots=True)
class Wait:
    """On `participant`, transaction `waiter` waits for a lock `holder` holds."""

    participant: str
    waiter: str
    holder: str
    wait_started: float


@dataclass(frozen=True, slots=True)
class Victim:
    transaction_id: str
    participant: str
    """Where the victim waits (the shard whose Abort interrupts it)."""
    cycle: tuple[str, ...]
    """The cycle's transactions, starting with the victim, each waiting for the next."""

    def describe(self) -> str:
        ring = " -> ".join((*self.cycle, self.cycle[0]))
        return f"deadlock {ring} (each waits for the next); {self.transaction_id} is the youngest"


def confirmed(first: Iterable[Wait], second: Iterable[Wait]) -> set[Wait]:
    """The waits seen, unchanged, in both snapshots."""
    return set(first) & set(second)


def _age_key(txid: str) -> tuple[int, int, str]:
    parsed = TransactionId.parse(txid)
    return parsed.epoch, parsed.sequence, txid


def find_victims(waits: Iterable[Wait], eligible: Callable[[str], bool]) -> list[Victim]:
    """One victim per cycle of the wait-for graph: its youngest `eligible` member.
    A victim leaves the graph before the next cycle is looked for, so one abort that
    breaks two cycles is not repeated. A cycle with no eligible member (say, all of
    another coordinator's) is left to its own coordinator."""
    graph: dict[str, dict[str, Wait]] = {}
    for w in waits:
        if w.holder and w.holder != w.waiter:
            graph.setdefault(w.waiter, {})[w.holder] = w
    victims: list[Victim] = []
    while (cycle := _a_cycle(graph)) is not None:
        candidates = [t for t in cycle if eligible(t)]
        if not candidates:
            for t in cycle:  # not ours to break: look past it
                graph.pop(t, None)
            continue
        victim = max(candidates, key=_age_key)
        start = cycle.index(victim)
        ordered = (*cycle[start:], *cycle[:start])
        victims.append(Victim(victim, graph[victim][ordered[1]].participant, ordered))
        graph.pop(victim)
        for edges in graph.values():
            edges.pop(victim, None)
    return victims


def _a_cycle(graph: dict[str, dict[str, Wait]]) -> list[str] | None:
    """Some cycle of `graph` (as the list of its nodes in wait order), or None."""
    done: set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        path: list[str] = []
        on_path: dict[str, int] = {}
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph.get(root, {})))]
        path.append(root)
        on_path[root] = 0
        while stack:
            node, nexts = stack[-1]
            if not nexts:
                stack.pop()
                path.pop()
                del on_path[node]
                done.add(node)
                continue
            nxt = nexts.pop()
            if nxt in on_path:
                return path[on_path[nxt] :]
            if nxt in done or nxt not in graph:
                continue
            on_path[nxt] = len(path)
            path.append(nxt)
            stack.append((nxt, sorted(graph[nxt])))
    return None
