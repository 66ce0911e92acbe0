"""Admission control: beyond --max-in-flight, a new transaction waits its turn before
any of its work is done (at most --admission-queue of them, each at most
--admission-wait seconds); one that cannot wait is refused with a hint of when to
retry. Nothing waits behind the prepare timeout, which would throw its work away."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from coordinator.client import Outcome, Statement, TransportError
from tests.conftest import SystemFactory, create_tagged_rows, rows, wait_no_prepared
from twopc_common.errors import ResourceExhausted


def test_beyond_the_in_flight_limit_transactions_are_refused_at_once_with_a_hint(
    make_system: SystemFactory,
) -> None:
    system = make_system(["--max-in-flight", "2", "--admission-queue", "0"])
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


def slow_transfer(tag: str, seconds: float) -> dict[str, list[Statement]]:
    return {
        shard: [
            Statement("SELECT pg_sleep(%s)", (seconds,)),
            Statement("INSERT INTO twopc_test_rows VALUES (%s)", (tag,)),
        ]
        for shard in ("shard1", "shard2")
    }


async def timed(call: asyncio.Future[Outcome]) -> tuple[object, float]:
    started = time.monotonic()
    try:
        answer: object = await call
    except Exception as exc:  # the answer under test: an error or an outcome
        answer = exc
    return answer, time.monotonic() - started


def test_beyond_the_limit_transactions_wait_their_turn_and_all_commit(
    make_system: SystemFactory,
) -> None:
    system = make_system(["--max-in-flight", "2"])
    create_tagged_rows(system)

    async def scenario() -> tuple[list[tuple[object, float]], float]:
        async with system.async_client(timeout=60) as client:
            started = time.monotonic()
            answers = await asyncio.gather(
                *(
                    timed(asyncio.ensure_future(client.run(slow_transfer(f"queue-{i}", 0.4))))
                    for i in range(8)
                )
            )
            return answers, time.monotonic() - started

    answers, took = asyncio.run(scenario())
    assert all(isinstance(a, Outcome) and a.committed for a, _ in answers), answers
    # Two at a time: four rounds of 0.4 s at least. Without the limit all eight
    # sleep together (about 0.4 s); without the queue six are refused.
    assert took >= 4 * 0.4, took
    wait_no_prepared(system)
    assert sum(rows(system, f"queue-{i}")["shard1"] for i in range(8)) == 8


def test_a_wait_that_runs_out_is_refused_and_its_work_never_runs(
    make_system: SystemFactory,
) -> None:
    system = make_system(["--max-in-flight", "1", "--admission-wait", "0.3"])
    create_tagged_rows(system)

    async def scenario() -> list[tuple[object, float]]:
        async with system.async_client(timeout=60) as client:
            first = asyncio.ensure_future(client.run(slow_transfer("wait-0", 2.0)))
            await asyncio.sleep(0)  # the first is sent before the others
            later = [
                timed(asyncio.ensure_future(client.run(slow_transfer(f"wait-{i}", 0))))
                for i in (1, 2)
            ]
            return await asyncio.gather(timed(first), *later)

    (first, _), *refused = asyncio.run(scenario())
    assert isinstance(first, Outcome) and first.committed, first
    for exc, took in refused:
        assert isinstance(exc, ResourceExhausted), exc
        assert "--admission-wait" in str(exc) and exc.retry_after is not None, exc
        assert 0.3 <= took < 2.0, took  # it waited its bound, not for the first's end
    wait_no_prepared(system)
    assert rows(system, "wait-1")["shard1"] == rows(system, "wait-2")["shard1"] == 0


def test_a_full_queue_refuses_at_once(make_system: SystemFactory) -> None:
    system = make_system(["--max-in-flight", "1", "--admission-queue", "1"])
    create_tagged_rows(system)

    async def scenario() -> list[tuple[object, float]]:
        async with system.async_client(timeout=60) as client:
            calls = []
            for i in range(4):
                calls.append(asyncio.ensure_future(client.run(slow_transfer(f"full-{i}", 0.6))))
                await asyncio.sleep(0.1)  # in this order: running, waiting, refused x2
            return await asyncio.gather(*(timed(c) for c in calls))

    answers = asyncio.run(scenario())
    done = [a for a, _ in answers if isinstance(a, Outcome)]
    refused = [(a, t) for a, t in answers if isinstance(a, ResourceExhausted)]
    assert len(done) == 2 and all(o.committed for o in done), answers
    assert len(refused) == 2, answers
    for exc, took in refused:
        assert "--admission-queue" in str(exc) and took < 0.5, (exc, took)
    wait_no_prepared(system)
    assert [rows(system, f"full-{i}")["shard1"] for i in range(4)] == [1, 1, 0, 0]


def test_a_waiter_given_up_by_its_caller_leaves_no_slot_taken(make_system: SystemFactory) -> None:
    """A caller's deadline ends its wait; the slot it never got is not lost, nor is a
    turn handed to it after it left: the next transaction runs at once."""
    system = make_system(["--max-in-flight", "1"])
    create_tagged_rows(system)

    async def scenario() -> tuple[object, float]:
        async with (
            system.async_client(timeout=60) as client,
            system.async_client(timeout=0.5) as impatient,
        ):
            first = asyncio.ensure_future(client.run(slow_transfer("leave-0", 1.5)))
            await asyncio.sleep(0.2)
            with pytest.raises(TransportError, match="DEADLINE_EXCEEDED"):
                await impatient.run(slow_transfer("leave-1", 0))
            assert (await first).committed
            return await timed(asyncio.ensure_future(client.run(slow_transfer("leave-2", 0))))

    answer, took = asyncio.run(scenario())
    assert isinstance(answer, Outcome) and answer.committed, answer
    assert took < 2.0, took  # not queued behind a turn handed to the caller that left
    wait_no_prepared(system)
    assert rows(system, "leave-1")["shard1"] == 0 and rows(system, "leave-2")["shard1"] == 1


def test_an_interactive_commit_waits_its_turn(make_system: SystemFactory) -> None:
    """And a Commit repeated while the first waits gets the first one's answer: the
    transaction is looked at again when its turn comes."""
    system = make_system(["--max-in-flight", "1"])
    create_tagged_rows(system)

    async def scenario() -> tuple[Outcome, Outcome, Outcome]:
        async with system.async_client(timeout=60) as client:
            tx = await client.begin()
            for shard in ("shard1", "shard2"):
                await tx.execute(
                    shard, Statement("INSERT INTO twopc_test_rows VALUES (%s)", ("interactive",))
                )
            first = asyncio.ensure_future(client.run(slow_transfer("before-commit", 0.8)))
            await asyncio.sleep(0.2)
            committed, again = await asyncio.gather(tx.commit(), tx.commit())
            return await first, committed, again

    first, committed, again = asyncio.run(scenario())
    assert first.committed and committed.committed and again.committed, (first, committed, again)
    assert committed.transaction_id == again.transaction_id
    wait_no_prepared(system)
    applied = rows(system, "interactive")
    assert applied["shard1"] == applied["shard2"] == 1, applied
