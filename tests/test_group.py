"""Several coordinators of their own ids and logs over the same agents, used through
one client (`coordinator.group`): every member takes its share, each transaction is
answered for by the member that began it, and a keyed Run is applied once whichever
way it is retried."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.group import AsyncCoordinatorGroup
from tests.conftest import SystemFactory, create_tagged_rows, rows, tagged_inserts
from twopc_common.errors import InvalidArgument, NotFound

PAIR = ("shard1", "shard2")


def test_a_group_spreads_work_and_routes_by_transaction_id(make_system: SystemFactory) -> None:
    system = make_system(workers=2)
    create_tagged_rows(system)
    members = system.group_members()
    assert len(members) == 2

    async def scenario() -> None:
        async with system.group_client(timeout=60) as group:
            outcomes = await asyncio.gather(
                *(
                    group.run(tagged_inserts(f"group-{i}", PAIR), wait_for_completion=True)
                    for i in range(12)
                )
            )
            assert all(o.committed for o in outcomes)
            by_member = {m: 0 for m in members}
            for o in outcomes:
                by_member[o.transaction_id.split(".")[0]] += 1
            assert by_member == {m: 6 for m in members}, by_member  # in turn
            for o in outcomes:  # each answered by its own member
                status = await group.get_transaction(o.transaction_id)
                assert status.outcome == "committed", status
            tx = await group.begin()
            await tx.execute("shard3", "INSERT INTO twopc_test_rows VALUES ('group-interactive')")
            await tx.execute("shard1", "INSERT INTO twopc_test_rows VALUES ('group-interactive')")
            assert (await tx.commit(wait_for_completion=True)).committed
            statuses = await group.status()
            assert set(statuses) == set(members)
            with pytest.raises(NotFound):
                await group.get_transaction("elsewhere.1.1")
            with pytest.raises(InvalidArgument):
                await group.get_transaction("not an id")

    asyncio.run(scenario())
    for i in range(12):
        assert rows(system, f"group-{i}") == {"shard1": 1, "shard2": 1, "shard3": 0}
    assert rows(system, "group-interactive") == {"shard1": 1, "shard2": 0, "shard3": 1}


def test_a_keyed_run_goes_to_one_member_and_is_applied_once(make_system: SystemFactory) -> None:
    system = make_system(workers=2)
    create_tagged_rows(system)

    async def scenario() -> set[str]:
        used: set[str] = set()
        async with system.group_client(timeout=60) as group:
            for i in range(8):
                key = f"order-{i}"
                first = await group.run(
                    tagged_inserts(key, PAIR), idempotency_key=key, wait_for_completion=True
                )
                again = await group.run(tagged_inserts(key, PAIR), idempotency_key=key)
                assert first.committed and again.transaction_id == first.transaction_id
                owner = first.transaction_id.split(".")[0]
                assert owner == group.member_for_key(key)
                used.add(owner)
        # A second client (another process, say) sends the same keys to the same members.
        async with system.group_client(timeout=60) as other:
            for i in range(8):
                key = f"order-{i}"
                replay = await other.run(tagged_inserts(key, PAIR), idempotency_key=key)
                assert replay.transaction_id.split(".")[0] == other.member_for_key(key)
        return used

    used = asyncio.run(scenario())
    assert used == set(system.group_members()), used  # eight keys hit both members
    for i in range(8):
        assert rows(system, f"order-{i}") == {"shard1": 1, "shard2": 1, "shard3": 0}


def test_a_group_needs_members() -> None:
    with pytest.raises(InvalidArgument):
        AsyncCoordinatorGroup({})
