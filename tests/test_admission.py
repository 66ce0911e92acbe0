"""Admission control: beyond --max-in-flight, new transactions are refused at once with
a hint of when to retry, instead of queueing until the prepare timeout throws their
work away."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from coordinator.client import Outcome, Statement
from tests.conftest import SystemFactory, create_tagged_rows, rows, wait_no_prepared
from twopc_common.errors import ResourceExhausted


def test_beyond_the_in_flight_limit_transactions_are_refused_at_once_with_a_hint(
    make_system: SystemFactory,
) -> None:
    system = make_system(["--max-in-flight", "2"])
    create_tagged_rows(system)

    def slow(i: int) -> tuple[Outcome | ResourceExhausted, float]:
        branches = {
            shard: [
                Statement("SELECT pg_sleep(0.5)"),
                Statement("INSERT INTO twopc_test_rows VALUES (%s)", (f"admit-{i}",)),
            ]
            for shard in ("shard1", "shard2")
        }
        started = time.monotonic()
        with system.client() as client:
            try:
                answer: Outcome | ResourceExhausted = client.run(branches)
            except ResourceExhausted as exc:
                answer = exc
        return answer, time.monotonic() - started

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(slow, range(8)))
    refused = [(a, t) for a, t in answers if isinstance(a, ResourceExhausted)]
    done = [a for a, _ in answers if isinstance(a, Outcome)]
    assert len(done) >= 2 and refused, answers
    assert all(o.committed for o in done), done  # nothing aborted for lateness
    for exc, took in refused:
        assert "--max-in-flight" in str(exc) and exc.retry_after is not None
        assert 0 < exc.retry_after < 5 and took < 0.4  # at once, before any work
    wait_no_prepared(system)
    applied = sum(rows(system, f"admit-{i}")["shard1"] for i in range(8))
    assert applied == len(done)  # what was refused never ran
