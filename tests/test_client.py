"""The client library's two faces are one implementation: the blocking
`CoordinatorClient` runs `AsyncCoordinatorClient`'s calls on a private event loop, so
both have the same methods with the same parameters; the blocking one serves many
threads at once and, closed or dropped, leaves no thread behind."""

from __future__ import annotations

import asyncio
import gc
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from coordinator.client import (
    AsyncCoordinatorClient,
    AsyncTransaction,
    CoordinatorClient,
    Statement,
    Transaction,
    TransactionAborted,
)
from tests.conftest import SHARDS, create_tagged_rows, rows
from twopc_harness.daemons import wait_until
from twopc_harness.system import LocalSystem


def _surface(cls: type) -> dict[str, list[tuple[str, object]]]:
    """Public methods and their parameters (name, default), `self` left out."""
    return {
        name: [(p.name, p.default) for p in inspect.signature(member).parameters.values()][1:]
        for name, member in vars(cls).items()
        if callable(member) and not name.startswith("_")
    }


@pytest.mark.parametrize(
    ("blocking", "asyncio_twin"),
    [(CoordinatorClient, AsyncCoordinatorClient), (Transaction, AsyncTransaction)],
)
def test_the_blocking_and_asyncio_clients_offer_the_same_calls(
    blocking: type, asyncio_twin: type
) -> None:
    assert _surface(blocking) == _surface(asyncio_twin)


def _client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "twopc-client"]


def test_one_blocking_client_serves_many_threads_and_closes_cleanly(
    system: LocalSystem,
) -> None:
    create_tagged_rows(system)
    before = len(_client_threads())
    client = system.client()
    assert len(_client_threads()) == before + 1

    def transfer(n: int) -> bool:
        with client.transaction() as tx:
            for shard in SHARDS:
                tx.execute_many(
                    shard, [Statement("INSERT INTO twopc_test_rows VALUES (%s)", (f"threads-{n}",))]
                )
            # Listed while it is open: once committed it may already be gone.
            listed = any(t.transaction_id == tx.id for t in client.list_transactions())
        assert tx.outcome is not None
        return tx.outcome.committed and listed

    with ThreadPoolExecutor(8) as pool:
        committed = list(pool.map(transfer, range(16)))
    assert all(committed)
    for n in range(16):
        assert rows(system, f"threads-{n}") == dict.fromkeys(SHARDS, 1)

    client.close()
    client.close()  # idempotent
    assert len(_client_threads()) == before
    with pytest.raises(ValueError, match="closed"):
        client.status()


def test_a_blocking_client_dropped_unclosed_stops_its_thread(system: LocalSystem) -> None:
    before = len(_client_threads())
    assert system.client().run({"shard1": [Statement("SELECT 1")]}).committed
    gc.collect()
    wait_until(lambda: len(_client_threads()) == before, 10, "the dropped client's loop to end")


def test_the_asyncio_client_runs_interactive_work_and_lists_transactions(
    system: LocalSystem,
) -> None:
    create_tagged_rows(system)

    async def main() -> tuple[bool, bool, str]:
        async with system.async_client() as client:
            tx = await client.begin()
            results = await tx.execute_many(
                "shard1",
                [
                    Statement("INSERT INTO twopc_test_rows VALUES ('async-many')"),
                    Statement("SELECT count(*) FROM twopc_test_rows WHERE tag = 'async-many'"),
                ],
            )
            listed = tx.id in {t.transaction_id for t in await client.list_transactions()}
            outcome = await tx.commit()
            failing = await client.begin()
            with pytest.raises(TransactionAborted):
                await failing.execute_many("shard2", [Statement("SELECT 1/0")])
            assert failing.outcome is not None
            return (
                listed and results[1].rows[0][0] == 1,
                outcome.committed,
                failing.outcome.abort_cause,
            )

    listed, committed, cause = asyncio.run(main())
    assert listed and committed
    assert cause == "EXECUTE_FAILED"
    assert rows(system, "async-many")["shard1"] == 1
