"""The agent's Prometheus metrics (`--metrics HOST:PORT`).

Read at scrape time from what the agent already keeps: its counters, its open
branches, the recovery's last scan, the connection pool's statistics, and the health
probe's view of the database (in-doubt branches, `participant.probe`) and the
foreign prepared transactions the recovery scan found. Labels are bounded (vote,
decision, fixed pool statistics).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from participant.agent import Agent
from participant.control_sql import ForeignPrepared
from participant.probe import DatabaseProbe
from participant.recovery import Recovery
from participant.store import Store
from twopc_common.health import Health

_VOTES = {
    "votes_yes": "yes",
    "votes_no": "no",
    "votes_read_only": "read_only",
    "committed_one_phase": "committed_one_phase",
}
# counter -> (decision, whether it changed the branch)
_PHASE2 = {
    "committed": ("commit", "true"),
    "commit_repeats": ("commit", "false"),
    "aborted": ("abort", "true"),
    "abort_repeats": ("abort", "false"),
    "aborted_active": ("abort_open", "true"),
}


class _AgentCollector(Collector):
    def __init__(
        self, agent: Agent, recovery: Recovery, probe: DatabaseProbe, health: Health, store: Store
    ) -> None:
        self._agent = agent
        self._store = store
        self._recovery = recovery
        self._probe = probe
        self._health = health

    def collect(self) -> Iterator[Metric]:
        yield from self._counters()
        yield from self._branches()
        yield from _foreign(self._recovery.foreign)
        yield from _database(self._probe, self._health, self._store.pool.get_stats())

    def _counters(self) -> Iterator[Metric]:
        """The agent's counters: votes, phase 2, recovery, refusals."""
        c = self._agent.counters
        votes = CounterMetricFamily(
            "twopc_participant_votes", "Prepare answers, by vote", labels=["vote"]
        )
        for key, vote in _VOTES.items():
            votes.add_metric([vote], c[key])
        yield votes
        phase2 = CounterMetricFamily(
            "twopc_participant_phase2",
            "Phase-2 decisions applied (changed=false: a repeat of one already applied)",
            labels=["decision", "changed"],
        )
        for key, labels in _PHASE2.items():
            phase2.add_metric(list(labels), c[key])
        yield phase2
        recovered = CounterMetricFamily(
            "twopc_participant_recovered",
            "In-doubt branches resolved by asking their coordinator, by outcome",
            labels=["outcome"],
        )
        recovered.add_metric(["commit"], c["recovered_commits"])
        recovered.add_metric(["abort"], c["recovered_aborts"])
        yield recovered
        for key, doc in (
            ("outcome_unknown", "Prepares whose connection broke while settling"),
            ("votes_no_stale_epoch", "NO votes for a coordinator epoch older than one seen"),
            ("votes_no_branch_lost", "NO votes for a branch this incarnation does not hold"),
            ("interactive_branches_refused", "Interactive branches refused (pool reserve)"),
            ("idle_branches_rolled_back", "Interactive branches rolled back as idle"),
            ("branches_opened", "Branches opened"),
        ):
            yield CounterMetricFamily(f"twopc_participant_{key}", doc, value=c[key])

    def _branches(self) -> Iterator[Metric]:
        """Branches at work and in doubt."""
        yield GaugeMetricFamily(
            "twopc_participant_open_branches",
            "Branches at work (not yet prepared)",
            value=self._agent.open_branches,
        )
        view = self._probe.view
        yield GaugeMetricFamily(
            "twopc_participant_in_doubt_branches",
            "Prepared branches of this participant waiting for phase 2",
            value=view.in_doubt,
        )
        yield GaugeMetricFamily(
            "twopc_participant_oldest_in_doubt_seconds",
            "Age of the oldest prepared branch of this participant",
            value=view.oldest_in_doubt_seconds,
        )
        yield GaugeMetricFamily(
            "twopc_participant_in_doubt_waiting",
            "Prepared branches past the grace period whose coordinator has not answered",
            value=self._recovery.waiting,
        )


def _foreign(foreign: Sequence[ForeignPrepared]) -> Iterator[Metric]:
    """Prepared transactions in the database that are not this agent's."""
    now = dt.datetime.now(dt.UTC)
    yield GaugeMetricFamily(
        "twopc_participant_foreign_prepared_transactions",
        "Prepared transactions in this database that are not this participant's "
        "branches (as of the last recovery scan); nothing here resolves them",
        value=len(foreign),
    )
    yield GaugeMetricFamily(
        "twopc_participant_oldest_foreign_prepared_seconds",
        "Age of the oldest foreign prepared transaction",
        value=max(
            ((now - f.prepared_at).total_seconds() for f in foreign if f.prepared_at),
            default=0.0,
        ),
    )
    yield GaugeMetricFamily(
        "twopc_participant_foreign_prepared_locks",
        "Locks the foreign prepared transactions hold",
        value=sum(f.locks for f in foreign),
    )


# pool statistic -> (metric name, help): gauges, then counters with their unit's scale
_POOL_GAUGES = (
    ("pool_size", "pool_connections", "Connections the pool holds"),
    ("pool_available", "pool_idle_connections", "Idle connections in the pool"),
    ("pool_max", "pool_max_connections", "Most connections the pool may open"),
    ("requests_waiting", "pool_waiting_requests", "Requests waiting for a connection"),
)
_POOL_COUNTERS = (
    ("requests_num", "pool_requests", "Connections asked of the pool", 1.0),
    ("requests_queued", "pool_queued_requests", "Requests that had to wait", 1.0),
    ("requests_errors", "pool_request_errors", "Requests that failed (timeout)", 1.0),
    ("requests_wait_ms", "pool_wait_seconds", "Time spent waiting for connections", 1e-3),
    ("connections_lost", "pool_connections_lost", "Connections found broken", 1.0),
)


def _database(probe: DatabaseProbe, health: Health, stats: Mapping[str, int]) -> Iterator[Metric]:
    """The database, the gRPC health status and the connection pool."""
    yield GaugeMetricFamily(
        "twopc_participant_database_up",
        "1 if the last health probe reached the database",
        value=int(probe.up),
    )
    yield GaugeMetricFamily(
        "twopc_serving", "1 while the gRPC health status is SERVING", value=health.serving
    )
    for key, name, doc in _POOL_GAUGES:
        yield GaugeMetricFamily(f"twopc_participant_{name}", doc, value=stats.get(key, 0))
    for key, name, doc, scale in _POOL_COUNTERS:
        yield CounterMetricFamily(f"twopc_participant_{name}", doc, value=stats.get(key, 0) * scale)


def register(
    registry: CollectorRegistry,
    agent: Agent,
    recovery: Recovery,
    probe: DatabaseProbe,
    health: Health,
    store: Store,
) -> None:
    """Everything the agent exports, on `registry`."""
    registry.register(_AgentCollector(agent, recovery, probe, health, store))
