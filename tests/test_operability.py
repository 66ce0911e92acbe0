"""Operability: the standard gRPC health service (NOT_SERVING until the coordinator's
start-up recovery is done, and while its decision log cannot write), server
reflection, and the Prometheus endpoint of both daemons, all against real daemons."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from bank_demo import bank
from tests.conftest import SystemFactory, reset_bank, wait_no_prepared
from twopc_common import log
from twopc_harness.daemons import Daemon, wait_until
from twopc_harness.postgres import free_port
from twopc_harness.system import LocalSystem
from twopc_pb import coordinator_pb2 as cpb
from twopc_pb import coordinator_pb2_grpc as cgrpc

TXID = re.compile(r"\.\d+\.\d+$")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(daemon: Daemon, service: str = "") -> int | None:
    """The daemon's health status, or None if it does not answer (asked over the
    daemon's mutual TLS, as the harness's admin client)."""
    with daemon.admin_channel() as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError:
            return None
    return int(reply.status)


def restart_with(daemon: Daemon, *args: str, wait: bool = True) -> None:
    """Restart `daemon` with extra flags (later flags win in argparse)."""
    daemon.stop()
    daemon.argv += list(args)
    daemon.start(wait=wait)


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed by prometheus_client's own parser: (sample, labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def families(address: str) -> set[str]:
    """The metric family names the daemon at `address` exports (even with no samples)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        return {f.name for f in text_string_to_metric_families(reply.read().decode())}


DASHBOARD = (
    Path(__file__).resolve().parent.parent / "docker" / "grafana" / "dashboards" / "twopc.json"
)


def value(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def ops(make_system: SystemFactory) -> Iterator[LocalSystem]:
    system = make_system()
    reset_bank(system)
    yield system
    wait_no_prepared(system)


def test_coordinator_is_not_serving_until_start_up_recovery_finished(ops: LocalSystem) -> None:
    coordinator = ops.coordinator
    assert coordinator is not None
    assert health(coordinator) == SERVING
    # With shard3's agent down, start-up recovery waits for its in-doubt list (up to
    # the start-up recovery timeout) before the coordinator may say SERVING.
    ops.participants["shard3"].stop()
    restart_with(coordinator, "--rpc-timeout", "30", wait=False)
    seen: list[int | None] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and SERVING not in seen:
        seen.append(health(coordinator))
        time.sleep(0.1)
    answered = [s for s in seen if s is not None]
    assert answered, f"the coordinator never answered a health check:\n{coordinator.log_tail()}"
    assert answered[0] == NOT_SERVING, seen
    assert answered[-1] == SERVING, seen
    assert answered.count(NOT_SERVING) >= 5, "NOT_SERVING for at least half a second"
    # The service's own name answers the same as the whole server.
    assert health(coordinator, "twopc.v1.Coordinator") == SERVING
    log = coordinator.log_tail(20000)
    assert "event=health status=serving" in log
    ops.participants["shard3"].start()


def test_coordinator_is_not_serving_while_its_decision_log_cannot_write(
    ops: LocalSystem,
) -> None:
    coordinator = ops.coordinator
    assert coordinator is not None
    # Another process holding the SQLite write lock: the log cannot take a record.
    blocker = sqlite3.connect(ops.workdir / "decisions.sqlite", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        wait_until(
            lambda: health(coordinator) == NOT_SERVING,
            30,
            "NOT_SERVING while the decision log is locked",
        )
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_until(lambda: health(coordinator) == SERVING, 30, "SERVING again")
    log = coordinator.log_tail(20000)
    assert "event=health status=not_serving" in log


def test_reflection_lists_the_services_of_both_daemons(shared_system: LocalSystem) -> None:
    assert shared_system.coordinator is not None
    daemons = {
        "twopc.v1.Coordinator": shared_system.coordinator,
        "twopc.v1.Participant": shared_system.participants["shard1"],
    }
    for service, daemon in daemons.items():
        with daemon.admin_channel() as channel:
            reflected = ProtoReflectionDescriptorDatabase(channel)
            services = set(reflected.get_services())
            assert services == {
                service,
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            }
            # `grpcurl describe`: the whole contract is reachable from the service.
            described = reflected.FindFileContainingSymbol(service)
            assert any(s.name == service.split(".")[-1] for s in described.service)


def _account_on(shard: str, shards: list[str]) -> int:
    return next(a for a in range(1, 21) if bank.shard_of(a, shards) == shard)


def test_metrics_parse_and_count_commits_and_aborts(ops: LocalSystem) -> None:
    coordinator, shard1 = ops.coordinator, ops.participants["shard1"]
    assert coordinator is not None
    coordinator_metrics, agent_metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    restart_with(shard1, "--metrics", agent_metrics)
    restart_with(coordinator, "--metrics", coordinator_metrics)
    # The coordinator's probes must see every agent up, or a transfer fails fast.
    wait_until(
        lambda: all(
            value(scrape(coordinator_metrics), "twopc_coordinator_participant_up", participant=p)
            == 1
            for p in ops.shard_names
        ),
        30,
        "every participant up in the coordinator's eyes",
    )
    before, agent_before = scrape(coordinator_metrics), scrape(agent_metrics)
    shards = ops.shard_names
    source, target = _account_on("shard1", shards), _account_on("shard2", shards)
    with ops.client() as client:
        ok = client.run(bank.transfer("t-ok", source, target, 10, shards), wait_for_completion=True)
        # More than the balance of 100: shard1's debit votes NO.
        no = client.run(
            bank.transfer("t-no", source, target, 1000, shards), wait_for_completion=True
        )
    assert ok.committed and not no.committed
    with coordinator.admin_channel() as channel, pytest.raises(grpc.RpcError):
        cgrpc.CoordinatorStub(channel).GetTransaction(
            cpb.GetTransactionRequest(transaction_id="not an id"), timeout=10
        )

    after = scrape(coordinator_metrics)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("twopc_coordinator_committed_total", kind="two_phase") == 1
    assert moved("twopc_coordinator_aborted_total", cause="vote_no") == 1
    assert moved("twopc_coordinator_aborted_total", cause="prepare_timeout") == 0
    assert (
        value(
            after, "twopc_rpc_duration_seconds_count", method="twopc.v1.Coordinator/Run", code="OK"
        )
        == 2
    )
    bad_id = value(
        after,
        "twopc_rpc_duration_seconds_count",
        method="twopc.v1.Coordinator/GetTransaction",
        code="INVALID_ARGUMENT",
    )
    assert bad_id == 1
    assert moved("twopc_decision_log_fsync_seconds_count") >= 1
    assert value(after, "twopc_decision_log_batch_records_count", forced="true") >= 1
    assert value(after, "twopc_serving") == 1
    assert value(after, "twopc_coordinator_unacknowledged_decisions") == 0

    agent_after = scrape(agent_metrics)

    def agent_moved(name: str, **labels: str) -> float:
        return value(agent_after, name, **labels) - value(agent_before, name, **labels)

    assert agent_moved("twopc_participant_votes_total", vote="yes") == 1
    assert agent_moved("twopc_participant_votes_total", vote="no") == 1
    assert agent_moved("twopc_participant_phase2_total", decision="commit", changed="true") == 1
    assert (
        value(
            agent_after,
            "twopc_rpc_duration_seconds_count",
            method="twopc.v1.Participant/Prepare",
            code="OK",
        )
        == 2
    )
    assert value(agent_after, "twopc_participant_database_up") == 1
    assert value(agent_after, "twopc_participant_pool_max_connections") == 20
    assert agent_moved("twopc_participant_pool_requests_total") >= 2
    # Every metric the Grafana dashboard plots is one the daemons export.
    exported = families(coordinator_metrics) | families(agent_metrics)
    plotted = {
        re.sub(r"_(total|bucket|sum|count)$", "", name)
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        for target in panel["targets"]
        for name in re.findall(r"twopc_\w+", target["expr"])
    }
    assert plotted and plotted <= exported, sorted(plotted - exported)
    # Bounded cardinality: no transaction id or key in any label value.
    for metrics in (after, agent_after):
        for _, labels in metrics:
            assert not any(TXID.search(v) or v.startswith("t-") for _, v in labels), labels


def test_metrics_show_foreign_prepared_transactions(ops: LocalSystem) -> None:
    shard1 = ops.participants["shard1"]
    agent_metrics = f"127.0.0.1:{free_port()}"
    restart_with(shard1, "--metrics", agent_metrics)
    with ops.connect("shard1") as conn:
        conn.execute("BEGIN")
        conn.execute("PREPARE TRANSACTION 'someone-elses-xact'")
    try:
        wait_until(
            lambda: (
                value(scrape(agent_metrics), "twopc_participant_foreign_prepared_transactions") == 1
            ),
            30,
            "the foreign prepared transaction in the metrics",
        )
        # Never ours to resolve: recovery leaves it alone.
        assert ops.prepared_transactions()["shard1"] == ["someone-elses-xact"]
    finally:
        with ops.connect("shard1") as conn:
            conn.execute("ROLLBACK PREPARED 'someone-elses-xact'")
    wait_until(
        lambda: (
            value(scrape(agent_metrics), "twopc_participant_foreign_prepared_transactions") == 0
        ),
        30,
        "no foreign prepared transaction",
    )


def test_metrics_endpoint_answers_only_get_metrics(ops: LocalSystem) -> None:
    coordinator = ops.coordinator
    assert coordinator is not None
    address = f"127.0.0.1:{free_port()}"
    restart_with(coordinator, "--metrics", address)
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://{address}/other", timeout=10)
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(f"http://{address}/metrics", data=b"x", timeout=10)
    assert posted.value.code == 405


def test_log_format_json_writes_one_object_per_line(ops: LocalSystem) -> None:
    coordinator = ops.coordinator
    assert coordinator is not None
    coordinator.stop()
    start = coordinator.logfile.stat().st_size
    coordinator.argv += ["--log-format", "json"]
    coordinator.start()
    coordinator.stop()
    with coordinator.logfile.open("rb") as f:
        f.seek(start)
        lines = [line for line in f.read().decode().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    events = [r["event"] for r in records]
    assert "serving" in events and "stopping" in events, events
    serving = records[events.index("serving")]
    assert serving["daemon"] == "coordinator" and serving["level"] == "info"
    assert isinstance(serving["epoch"], int) and serving["ts"].endswith("Z")
    coordinator.start()


def test_json_log_lines_stay_json_for_tracebacks_too(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("INFO", "json")
    try:
        log.EventLogger("coordinator", "c1").info("decided", txid="c1.1.1", attempt=3)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("twopc").exception("internal error in %s", "Run")
    finally:
        log.setup("INFO", "text")
    event, failure = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert event["event"] == "decided" and event["txid"] == "c1.1.1" and event["attempt"] == 3
    assert failure["level"] == "error" and failure["message"] == "internal error in Run"
    assert "RuntimeError: boom" in failure["exception"]
