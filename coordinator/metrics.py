"""The coordinator's Prometheus metrics (`--metrics HOST:PORT`).

Counts come from the engine's own counters and state, read at scrape time (one
collector), so the protocol code carries no metrics calls; only the decision log's
batches are observed as they happen (fsync latency and batch size histograms).
Labels: abort cause, commit kind and participant, all bounded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.engine import Coordinator
from coordinator.heuristics import HeuristicWatch
from coordinator.memory import TransactionInfo
from coordinator.protocol import AbortCause, TxState
from twopc_common.health import Health

# engine counter -> commit kind
_COMMITS = {
    "committed_two_phase": "two_phase",
    "committed_one_phase": "one_phase",
    "committed_read_only": "read_only",
}
_UNACKNOWLEDGED = (TxState.COMMITTING, TxState.ABORTING)

LOG_WRITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _EngineCollector(Collector):
    def __init__(self, engine: Coordinator, health: Health, heuristics: HeuristicWatch) -> None:
        self._engine = engine
        self._health = health
        self._heuristics = heuristics

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        yield from _outcomes(engine.counters)
        yield from _events(engine.counters)
        yield from _unacknowledged(engine.in_flight())
        yield from _participants(engine)
        yield from _heuristic_decisions(self._heuristics)
        yield from _status(engine, self._health)


def _outcomes(c: Counter[str]) -> Iterator[Metric]:
    """Transactions committed, by kind, and aborted, by cause."""
    committed = CounterMetricFamily(
        "twopc_coordinator_committed",
        "Transactions committed, by kind (two_phase, one_phase, read_only)",
        labels=["kind"],
    )
    for key, kind in _COMMITS.items():
        committed.add_metric([kind], c[key])
    yield committed
    aborted = CounterMetricFamily(
        "twopc_coordinator_aborted", "Transactions aborted, by cause", labels=["cause"]
    )
    for cause in AbortCause:
        aborted.add_metric([cause.value], c[f"aborted_{cause.value}"])
    yield aborted


# engine counter -> (metric name, help), one unlabelled counter each
_EVENTS = (
    ("phase2_retries", "phase2_retries", "Commit/Abort deliveries retried"),
    ("heuristic_hazards", "heuristic_hazards", "Branches found in the other final state"),
    ("idempotent_replays", "idempotent_replays", "Keyed Runs answered from memory or log"),
    ("recovered_commits", "recovered_commits", "Logged commits re-driven after a start"),
    ("deadlocks_broken", "deadlocks_broken", "Cross-shard deadlock cycles broken"),
    ("deadlock_retries", "deadlock_retries", "Deadlock victims retried by the coordinator"),
    (
        "refused_in_flight_limit",
        "refused_in_flight",
        "New transactions refused at the --max-in-flight limit (admission control)",
    ),
    (
        "admission_queued",
        "admission_queued",
        "New transactions that waited for a turn at the --max-in-flight limit",
    ),
    (
        "participants_marked_down",
        "participants_marked_down",
        "Times a participant was marked down by the probes",
    ),
    (
        "aborts_left_to_recovery",
        "aborts_left_to_recovery",
        "Abort deliveries given up and left to recovery (presumed abort)",
    ),
)


def _events(c: Counter[str]) -> Iterator[Metric]:
    """What the protocol did besides deciding: retries, replays, recovery, refusals."""
    for key, name, doc in _EVENTS:
        yield CounterMetricFamily(f"twopc_coordinator_{name}", doc, value=c[key])
    resolved = CounterMetricFamily(
        "twopc_coordinator_in_doubt_resolved",
        "In-doubt branches resolved by recovery, by outcome",
        labels=["outcome"],
    )
    resolved.add_metric(["commit"], c["in_doubt_committed"])
    resolved.add_metric(["abort"], c["in_doubt_aborted"])
    yield resolved


def _unacknowledged(now_live: Sequence[TransactionInfo]) -> Iterator[Metric]:
    """Transactions in memory, and the decided ones still waiting for an acknowledgement."""
    yield GaugeMetricFamily(
        "twopc_coordinator_live_transactions", "Transactions in memory", value=len(now_live)
    )
    waiting = [t for t in now_live if t.state in _UNACKNOWLEDGED and t.pending_acks]
    yield GaugeMetricFamily(
        "twopc_coordinator_unacknowledged_decisions",
        "Decided transactions still waiting for a phase-2 acknowledgement",
        value=len(waiting),
    )
    yield GaugeMetricFamily(
        "twopc_coordinator_oldest_unacknowledged_decision_seconds",
        "Age of the oldest transaction still waiting for a phase-2 acknowledgement",
        value=max((t.age_seconds for t in waiting), default=0.0),
    )


def _participants(engine: Coordinator) -> Iterator[Metric]:
    """Per participant: up or down, phase-2 calls and the decisions they carried."""
    up = GaugeMetricFamily(
        "twopc_coordinator_participant_up",
        "1 unless the coordinator's probes mark the participant down (new transactions "
        "touching it then abort at once)",
        labels=["participant"],
    )
    for name in engine.clients:
        up.add_metric([name], 0 if engine.down([name]) else 1)
    yield up
    calls = CounterMetricFamily(
        "twopc_coordinator_phase2_calls", "Finish calls sent", labels=["participant"]
    )
    decisions = CounterMetricFamily(
        "twopc_coordinator_phase2_decisions",
        "Commit decisions carried by Finish calls",
        labels=["participant"],
    )
    for client in engine.clients.values():
        calls.add_metric([client.name], client.stats["phase2_calls"])
        decisions.add_metric([client.name], client.stats["phase2_decisions"])
    yield calls
    yield decisions


def _heuristic_decisions(heuristics: HeuristicWatch) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "twopc_coordinator_heuristic_decisions",
        "Operators' heuristic decisions on this coordinator's branches, found on the agents",
        value=len(heuristics.verdicts),
    )
    yield GaugeMetricFamily(
        "twopc_coordinator_heuristic_hazard_branches",
        "Of those, the ones that contradict this coordinator's outcome",
        value=len(heuristics.hazards),
    )


def _status(engine: Coordinator, health: Health) -> Iterator[Metric]:
    """Recovered, serving, and the incarnation."""
    yield GaugeMetricFamily(
        "twopc_coordinator_recovered",
        "1 once start-up recovery has made 'unknown' answers safe",
        value=int(engine.recovered),
    )
    yield GaugeMetricFamily(
        "twopc_serving", "1 while the gRPC health status is SERVING", value=health.serving
    )
    yield GaugeMetricFamily(
        "twopc_coordinator_epoch", "Incarnation number", value=engine.decision_log.epoch
    )


def register(
    registry: CollectorRegistry, engine: Coordinator, health: Health, heuristics: HeuristicWatch
) -> None:
    """Everything the coordinator exports, on `registry`."""
    registry.register(_EngineCollector(engine, health, heuristics))
    write = Histogram(
        "twopc_decision_log_fsync_seconds",
        "Time to commit one forced (fsynced) batch of decision-log records",
        buckets=LOG_WRITE_BUCKETS,
        registry=registry,
    )
    batch = Histogram(
        "twopc_decision_log_batch_records",
        "Records per decision-log batch (group commit)",
        ["forced"],
        buckets=BATCH_BUCKETS,
        registry=registry,
    )
    forced_batch, plain_batch = batch.labels("true"), batch.labels("false")

    def observe(records: int, forced: bool, seconds: float) -> None:
        if forced:
            write.observe(seconds)
            forced_batch.observe(records)
        else:
            plain_batch.observe(records)

    engine.decision_log.on_batch = observe
