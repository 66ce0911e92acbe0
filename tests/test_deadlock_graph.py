"""The deadlock detector's pure part: cycles, victims, and no victim without proof."""

from __future__ import annotations

import random

from coordinator.deadlock import Wait, confirmed, find_victims


def wait(waiter: str, holder: str, on: str = "a", at: float = 1.0) -> Wait:
    return Wait(on, waiter, holder, at)


def everyone(_: str) -> bool:
    return True


def test_a_two_transaction_cycle_loses_its_youngest() -> None:
    waits = [wait("c.1.5", "c.1.9", "a"), wait("c.1.9", "c.1.5", "b")]
    (victim,) = find_victims(waits, everyone)
    assert victim.transaction_id == "c.1.9" and victim.participant == "b"
    assert victim.cycle == ("c.1.9", "c.1.5")
    assert "c.1.9 -> c.1.5 -> c.1.9" in victim.describe()


def test_youngest_is_by_epoch_then_sequence() -> None:
    waits = [wait("c.2.1", "c.1.900"), wait("c.1.900", "c.2.1", "b")]
    assert [v.transaction_id for v in find_victims(waits, everyone)] == ["c.2.1"]


def test_a_three_shard_cycle_and_chains_without_cycles() -> None:
    ring = [wait("c.1.1", "c.1.2", "a"), wait("c.1.2", "c.1.3", "b"), wait("c.1.3", "c.1.1", "c")]
    chain = [wait("c.1.7", "c.1.8"), wait("c.1.8", "c.1.9", "b")]
    victims = find_victims(ring + chain, everyone)
    assert [(v.transaction_id, v.participant) for v in victims] == [("c.1.3", "c")]
    assert find_victims(chain, everyone) == []


def test_one_victim_that_breaks_two_cycles_is_not_doubled() -> None:
    waits = [
        wait("c.1.1", "c.1.9"),
        wait("c.1.9", "c.1.1", "b"),
        wait("c.1.2", "c.1.9"),
        wait("c.1.9", "c.1.2", "b"),
    ]
    assert [v.transaction_id for v in find_victims(waits, everyone)] == ["c.1.9"]


def test_only_eligible_transactions_are_chosen() -> None:
    waits = [wait("mine.1.1", "other.1.9"), wait("other.1.9", "mine.1.1", "b")]
    victims = find_victims(waits, lambda t: t.startswith("mine."))
    assert [v.transaction_id for v in victims] == ["mine.1.1"]
    assert find_victims(waits, lambda t: False) == []


def test_a_cycle_must_be_seen_twice_as_the_same_waits() -> None:
    first = [wait("c.1.1", "c.1.2", "a", 10.0), wait("c.1.2", "c.1.1", "b", 11.0)]
    # One wait ended and a new one began between the snapshots: not proven.
    second = [wait("c.1.1", "c.1.2", "a", 10.0), wait("c.1.2", "c.1.1", "b", 12.5)]
    assert find_victims(confirmed(first, second), everyone) == []
    assert len(find_victims(confirmed(first, first), everyone)) == 1


def test_random_graphs_are_left_acyclic_by_their_victims() -> None:
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    for _ in range(300):
        nodes = [f"c.1.{i}" for i in range(rng.randint(2, 12))]
        waits = [
            wait(a, b, rng.choice("abc"))
            for a in nodes
            for b in nodes
            if a != b and rng.random() < 0.2
        ]
        victims = {v.transaction_id for v in find_victims(waits, everyone)}
        rest = [w for w in waits if w.waiter not in victims and w.holder not in victims]
        assert find_victims(rest, everyone) == [], (seed, waits, victims)
        # Each victim sits on a cycle of the original graph: no victim without one.
        for v in find_victims(waits, everyone):
            assert all(
                any(w.waiter == a and w.holder == b for w in waits)
                for a, b in zip(v.cycle, (*v.cycle[1:], v.cycle[0]), strict=True)
            )
