"""A corrupt SQLite file, found at open or while writing: set aside with its
-wal and -shm, never deleted, and a fresh database taking the batch."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ingestd.errors import StoreError, StoreUnavailable
from ingestd.events import NS, Reading, SensorStatus
from ingestd.store.sqlite import SqliteStore
from ingestd.store.sqlite.corrupt import check
from tests.support.damage import corrupt_page, overwrite_header


def readings(n: int, sensor: str = "s", t0: int = 10**9) -> list[Reading]:
    return [Reading(sensor, "temperature", (t0 + i) * NS, float(i), "t") for i in range(n)]


async def filled(path: Path, n: int = 20_000) -> None:
    async with SqliteStore(path) as store, store.batch() as tx:
        await tx.add_readings(readings(n))
        await tx.set_status(SensorStatus(sequences={"s": (7, 1, 2)}))


def set_aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


def count(path: Path) -> int:
    with sqlite3.connect(path) as c:
        return int(c.execute("SELECT count(*) FROM readings").fetchone()[0])


async def test_a_header_overwritten_is_set_aside_at_open_and_a_fresh_one_started(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.db"
    await filled(path, 100)
    before = overwrite_header(path)
    store = SqliteStore(path)
    async with store:
        assert store.corrupt_files == 1
        assert store.sequences == {}  # the device state starts afresh, without a crash
        async with store.batch() as tx:
            await tx.add_readings(readings(3))
    (aside,) = set_aside(path)
    assert aside.read_bytes()[16:] == before[16:]  # moved, not rewritten
    assert count(path) == 3


async def test_a_page_corrupted_mid_file_is_found_by_the_check_at_open(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    await filled(path)
    corrupt_page(path, "samples", "leaf")
    assert "quick_check" in str(check(path, 5.0, 1000).problem)
    async with SqliteStore(path) as store:
        assert store.corrupt_files == 1
    assert len(set_aside(path)) == 1
    assert count(path) == 0


def test_the_check_at_open_is_bounded_in_time(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    import asyncio

    asyncio.run(filled(path, 50_000))
    cut = check(path, 1e-6, 1000)
    assert (cut.problem, cut.complete) == (None, False)
    whole = check(path, 30.0, 1000)
    assert (whole.problem, whole.complete) == (None, True)


async def test_a_corrupt_page_met_while_writing_sets_the_file_aside_and_the_retry_writes_fresh(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.db"
    await filled(path)
    corrupt_page(path, "samples", "root")
    # check_seconds 0: not found at open (a big file's check cut short).
    async with SqliteStore(path, check_seconds=0) as store:
        assert store.corrupt_files == 0
        with pytest.raises(StoreUnavailable) as info:
            async with store.batch() as tx:
                await tx.add_readings(readings(5, t0=2 * 10**9))
        assert info.value.condition == "database corrupt"
        assert store.corrupt_files == 1
        (aside,) = set_aside(path)
        assert str(aside) in str(info.value)
        # The writer's retry of the same batch: into a fresh database.
        async with store.batch() as tx:
            await tx.add_readings(readings(5, t0=2 * 10**9))
        assert (tx.inserted, tx.duplicates) == (5, 0)
    assert count(path) == 5


async def test_a_command_reports_a_corrupt_file_and_leaves_it_where_it_is(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.db"
    await filled(path, 100)
    overwrite_header(path)
    with pytest.raises(StoreError, match="corrupt"):
        await SqliteStore(path, set_aside_corrupt=False).open()
    assert set_aside(path) == []
