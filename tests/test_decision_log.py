"""The decision log: durable COMMIT records, group commit, epochs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from coordinator.decision_log import DecisionLog


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
