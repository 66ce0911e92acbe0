"""The async client's Runs over one RunStream call (`coordinator.run_sharing`): each
answered exactly as a unary Run would be (outcomes, errors with their codes and
trailers, admission's retry hint, ownership), on real daemons."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.client import AsyncCoordinatorClient, Outcome, Statement
from tests.conftest import SystemFactory, create_tagged_rows, rows, tagged_inserts
from twopc_common.errors import NotFound, ResourceExhausted
from twopc_harness.system import LocalSystem

PAIR = ("shard1", "shard2")


def _runs(client: AsyncCoordinatorClient) -> dict[str, int]:
    """The client's RunStream counters, summed over its connections."""
    total: dict[str, int] = {}
    for connection in client._calls._endpoints.connections():
        if "runs" in connection.__dict__:
            for name, value in connection.runs.stats.items():
                total[name] = total.get(name, 0) + value
    return total


def test_concurrent_runs_share_one_call_and_each_gets_its_own_answer(
    system: LocalSystem,
) -> None:
    create_tagged_rows(system)

    async def scenario() -> None:
        async with system.async_client(timeout=60) as client:
            good = [
                client.run(tagged_inserts(f"shared-{i}", PAIR), wait_for_completion=True)
                for i in range(16)
            ]
            bad = client.run({"no-such-shard": [Statement("SELECT 1")]})
            answers = await asyncio.gather(*good, bad, return_exceptions=True)
            assert all(isinstance(a, Outcome) and a.committed for a in answers[:16]), answers
            assert isinstance(answers[16], NotFound), answers[16]  # as unary Run answers
            assert "no-such-shard" in str(answers[16])
            counters = _runs(client)
            assert counters["run_streams"] == 1 and counters["run_items"] == 17, counters

    asyncio.run(scenario())
    for i in range(16):
        assert rows(system, f"shared-{i}") == {"shard1": 1, "shard2": 1, "shard3": 0}


def test_unshared_runs_use_unary_calls(system: LocalSystem) -> None:
    create_tagged_rows(system)

    async def scenario() -> None:
        async with AsyncCoordinatorClient(
            system.client_addresses, timeout=60, tls=system.tls("app"), share_calls=False
        ) as client:
            outcome = await client.run(tagged_inserts("unshared", PAIR), wait_for_completion=True)
            assert outcome.committed
            assert _runs(client) == {}

    asyncio.run(scenario())
    assert rows(system, "unshared") == {"shard1": 1, "shard2": 1, "shard3": 0}


def test_a_shared_run_belongs_to_the_streams_caller(system: LocalSystem) -> None:
    create_tagged_rows(system)

    async def scenario() -> None:
        async with (
            system.async_client(timeout=60) as app,
            system.async_client(timeout=60, identity="other") as other,
        ):
            outcome = await app.run(tagged_inserts("owned", PAIR))
            assert (await app.get_transaction(outcome.transaction_id)).outcome == "committed"
            with pytest.raises(NotFound):
                await other.get_transaction(outcome.transaction_id)

    asyncio.run(scenario())


def test_admission_refuses_shared_runs_with_the_retry_hint(make_system: SystemFactory) -> None:
    system = make_system(["--max-in-flight", "2", "--admission-queue", "0"])
    create_tagged_rows(system)

    def slow(i: int) -> dict[str, list[Statement]]:
        return {
            shard: [
                Statement("SELECT pg_sleep(0.5)"),
                Statement("INSERT INTO twopc_test_rows VALUES (%s)", (f"shared-admit-{i}",)),
            ]
            for shard in PAIR
        }

    async def scenario() -> list[Outcome | BaseException]:
        async with system.async_client(timeout=60) as client:
            return await asyncio.gather(
                *(client.run(slow(i), wait_for_completion=True) for i in range(8)),
                return_exceptions=True,
            )

    answers = asyncio.run(scenario())
    refused = [a for a in answers if isinstance(a, ResourceExhausted)]
    done = [a for a in answers if isinstance(a, Outcome)]
    assert len(done) >= 2 and refused and len(done) + len(refused) == 8, answers
    assert all(o.committed for o in done), done
    for exc in refused:
        assert "--max-in-flight" in str(exc) and exc.retry_after is not None
    applied = sum(rows(system, f"shared-admit-{i}")["shard1"] for i in range(8))
    assert applied == len(done)
