"""The decision log: durable COMMIT records, group commit, epochs."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.decision_log import DecisionLog, LogFailed
from coordinator.engine import Coordinator
from twopc_common.errors import Unavailable


def test_epoch_is_bumped_at_every_open(tmp_path: Path) -> None:
    epochs = []
    for _ in range(3):
        log = DecisionLog(str(tmp_path / "log.sqlite"), "c")
        log.open()
        epochs.append(log.epoch)
        log.close()
    assert epochs == [1, 2, 3]


def test_commit_records_survive_reopen_until_complete(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sqlite")

    async def write() -> None:
        log = DecisionLog(path, "c")
        log.open()
        await log.record_commit("c.1.1", ("a", "b"), 1.0, {"committed": True})
        await log.record_commit("c.1.2", ("a",), 1.0, {"committed": True}, "key", "hash")
        await log.mark_complete("c.1.2")
        log.close()

    asyncio.run(write())
    log = DecisionLog(path, "c")
    log.open()
    try:
        assert [r.transaction_id for r in log.incomplete_commits()] == ["c.1.1"]
        record = asyncio.run(log.by_key("key"))
        assert record is not None and record.state == "committed"
        assert record.participants == ("a",)
    finally:
        log.close()


def test_concurrent_commits_share_fsyncs(tmp_path: Path) -> None:
    log = DecisionLog(str(tmp_path / "log.sqlite"), "c")
    log.open()

    async def many() -> None:
        await asyncio.gather(
            *(
                log.record_commit(f"c.1.{i}", ("a", "b"), 1.0, {"committed": True})
                for i in range(200)
            )
        )

    try:
        asyncio.run(many())
        assert log.stats["log_records"] == 200
        # Group commit: far fewer synced batches than records.
        assert log.stats["log_fsync_batches"] < 100, log.stats
    finally:
        log.close()


def test_writers_on_several_event_loops_are_each_answered_on_their_own(
    tmp_path: Path,
) -> None:
    """The writer thread answers a batch's callers with one hand-off per event loop:
    callers on two loops (two threads) whose records share batches all return, and
    each record is durable when its caller returns."""
    log = DecisionLog(str(tmp_path / "log.sqlite"), "c")
    log.open()
    durable: dict[str, bool] = {}

    async def writes(tag: str) -> None:
        async def one(i: int) -> None:
            txid = f"c.1.{tag}{i}"
            await log.record_commit(txid, ("a",), 1.0, {"committed": True})
            durable[txid] = (await log.get(txid)) is not None

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(300))), timeout=60)

    try:
        threads = [threading.Thread(target=asyncio.run, args=(writes(t),)) for t in "xy"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert len(durable) == 600 and all(durable.values())
        assert log.stats["log_batches"] < 600, log.stats  # the loops' records shared batches
    finally:
        log.close()


def test_a_log_refuses_another_coordinator(tmp_path: Path) -> None:
    import pytest

    path = str(tmp_path / "log.sqlite")
    log = DecisionLog(path, "c")
    log.open()
    log.close()
    with pytest.raises(ValueError, match="belongs to coordinator 'c'"):
        DecisionLog(path, "other").open()


def test_a_bad_record_fails_alone_not_its_batch(tmp_path: Path) -> None:
    import sqlite3

    log = DecisionLog(str(tmp_path / "log.sqlite"), "c")
    log.open()

    async def batch() -> list[BaseException | None]:
        writes = [
            log.record_commit(f"c.1.{i}", ("a",), 1.0, {"committed": True}, "same-key", "h")
            if i in (3, 7)
            else log.record_commit(f"c.1.{i}", ("a",), 1.0, {"committed": True})
            for i in range(10)
        ]
        return await asyncio.gather(*writes, return_exceptions=True)

    try:
        results = asyncio.run(batch())
        failures = [r for r in results if isinstance(r, BaseException)]
        assert len(failures) == 1 and isinstance(failures[0], sqlite3.IntegrityError)
        assert len(log.incomplete_commits()) == 9
    finally:
        log.close()


def test_the_writer_survives_callers_that_give_up(tmp_path: Path) -> None:
    log = DecisionLog(str(tmp_path / "log.sqlite"), "c")
    log.open()

    async def scenario() -> None:
        # Callers cancelled while their records are queued or being written: the
        # writer must answer them without dying.
        for round_ in range(20):
            writes = [
                asyncio.create_task(
                    log.record_commit(f"c.1.{round_}.{i}", ("a",), 1.0, {"committed": True})
                )
                for i in range(20)
            ]
            await asyncio.sleep(0)
            for task in writes:
                task.cancel()
            await asyncio.gather(*writes, return_exceptions=True)
        # ... and a caller after them is answered.
        await asyncio.wait_for(log.record_commit("c.1.last", ("a",), 1.0, {}), timeout=10)

    try:
        asyncio.run(scenario())
        assert log.failure is None
        assert log._writer is not None and log._writer.is_alive()
    finally:
        log.close()


def test_a_log_that_cannot_write_fails_stop_and_the_coordinator_takes_no_new_work(
    tmp_path: Path,
) -> None:
    log = DecisionLog(str(tmp_path / "log.sqlite"), "c")
    log.acquire()
    # SQLite's own "database or disk is full", as on a full disk: the file may not grow.
    assert log._writer_conn is not None
    pages = log._writer_conn.execute("PRAGMA page_count").fetchone()[0]
    log._writer_conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    log.begin_epoch()
    engine: Coordinator | None = None

    async def scenario() -> None:
        nonlocal engine
        engine = Coordinator(CoordinatorConfig(id="c", log_path="-"), log, {})
        with pytest.raises(LogFailed, match="full"):
            for i in range(10_000):  # until the file would have to grow
                await asyncio.wait_for(
                    log.record_commit(f"c.1.{i}", ("a",), 1.0, {"pad": "x" * 2000}), timeout=10
                )
        # Fail-stop: every later write fails at once, and no new transaction starts.
        with pytest.raises(LogFailed):
            await asyncio.wait_for(log.mark_complete("c.1.0"), timeout=10)
        with pytest.raises(Unavailable, match="decision log cannot write"):
            engine.begin()
        await engine.close()

    try:
        asyncio.run(scenario())
    finally:
        log.close()


def test_prune_reads_finished_records_by_age_through_an_index(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sqlite")
    log = DecisionLog(path, "c", prune_batch=3)
    log.open()

    async def scenario() -> None:
        for i in range(5):
            await log.record_commit(f"c.1.{i}", ("a",), 1.0, {}, completed=True)
        await log.record_commit("c.1.open", ("a",), 1.0, {})  # awaiting phase 2: kept
        await log.prune(time.time() + 1)
        assert len(log._query("SELECT * FROM transactions")) == 3  # a bounded batch
        await log.prune(time.time() + 1)
        assert [r.transaction_id for r in log._query("SELECT * FROM transactions")] == ["c.1.open"]

    try:
        asyncio.run(scenario())
        with sqlite3.connect(path) as db:
            plan = db.execute(
                "EXPLAIN QUERY PLAN SELECT rowid FROM transactions "
                "INDEXED BY transactions_finished_age "
                "WHERE state IN ('committed', 'aborted') AND decided_at < 0"
            ).fetchall()
        assert "USING INDEX transactions_finished_age" in str(plan), plan
    finally:
        log.close()
