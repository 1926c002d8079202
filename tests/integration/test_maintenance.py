"""Retention and backup against a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from ingestd.config import StoreSettings
from ingestd.errors import StoreError
from ingestd.events import NS, Reading, Rejected
from ingestd.maintenance import DAY, Maintenance
from ingestd.store import open_store
from ingestd.store.sqlite import SqliteStore, backup

NOW = 1_800_000_000.0


async def _populate(path: Path) -> None:
    async with SqliteStore(path) as store, store.batch() as tx:
        readings = [
            Reading(f"s{s}", metric, int(NOW - age_h * 3600) * NS, float(age_h))
            for s in range(3)
            for metric in ("t", "h")
            for age_h in range(0, 24 * 10, 2)  # every 2 h over 10 days
        ]
        await tx.add_readings(readings)
        await tx.add_rejected([Rejected("x", b"bad", "reason", NOW - d * DAY) for d in range(10)])


def _count(path: Path, sql: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(sql).fetchone()[0])


async def test_retention_deletes_exactly_what_is_older_than_the_cutoff(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    await _populate(db)
    total = _count(db, "SELECT count(*) FROM readings")
    assert total == 3 * 2 * 120
    cutoff = NOW - 3.5 * DAY
    expected_left = _count(db, f"SELECT count(*) FROM readings WHERE ts >= {cutoff}")
    # Batches smaller than a series' expired rows: several transactions per series.
    settings = StoreSettings(path=db, retention_days=3.5, retention_batch=7)
    m = Maintenance(open_store(settings), settings, clock=lambda: NOW)
    deleted, quarantined = await m.run_once()

    assert deleted == total - expected_left
    assert _count(db, "SELECT count(*) FROM readings") == expected_left
    assert _count(db, f"SELECT count(*) FROM readings WHERE ts < {cutoff}") == 0
    assert _count(db, "SELECT min(ts) FROM readings") >= cutoff
    assert quarantined == 6  # 4..9 days old
    assert _count(db, "SELECT count(*) FROM quarantine") == 4
    # A second pass finds nothing more; off (0 days) deletes nothing at all.
    assert await m.run_once() == (0, 0)
    off = StoreSettings(path=db, retention_days=0)
    later = Maintenance(open_store(off), off, clock=lambda: NOW + 100 * DAY)
    assert await later.run_once() == (0, 0)
    assert _count(db, "SELECT count(*) FROM readings") == expected_left


async def test_retention_runs_beside_the_writer(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    await _populate(db)
    settings = StoreSettings(path=db, retention_days=1, retention_batch=5)
    async with SqliteStore(db) as store:
        m = Maintenance(open_store(settings), settings, clock=lambda: NOW)
        # The writer holds an open transaction while retention starts: retention
        # waits on the lock (busy timeout) instead of failing, then proceeds.
        async with store.batch() as tx:
            await tx.add_readings([Reading("new", "t", int(NOW) * NS, 1.0)])
            task = asyncio.create_task(m.run_once())
            await asyncio.sleep(0.3)
            assert not task.done()  # waiting for the writer's transaction
        await task
    assert m.failures == 0
    assert _count(db, "SELECT count(*) FROM readings WHERE sensor = 'new'") == 1
    assert _count(db, f"SELECT count(*) FROM readings WHERE ts < {NOW - DAY}") == 0


async def test_online_backup_is_a_complete_copy_and_never_overwrites(tmp_path: Path) -> None:
    db = tmp_path / "src.db"
    await _populate(db)
    dest = tmp_path / "copy.db"
    seen: list[tuple[int, int]] = []
    await backup(db, dest, lambda rem, total: seen.append((rem, total)), pages_per_step=2)
    assert len(seen) > 1
    assert seen[-1][0] == 0
    assert _count(dest, "SELECT count(*) FROM readings") == 720
    assert _count(dest, "PRAGMA user_version") == _count(db, "PRAGMA user_version")
    with pytest.raises(StoreError, match="already exists"):
        await backup(db, dest)
    with pytest.raises(StoreError, match="no database"):
        await backup(tmp_path / "missing.db", tmp_path / "x.db")
