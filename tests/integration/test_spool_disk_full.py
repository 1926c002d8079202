"""A spool whose disk is full cannot delete what it forwarded (SQLite's log
needs room): the rows stay, marked forwarded, and forwarding goes on with the
batches after them; once every batch is forwarded the file starts afresh."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from ingestd.errors import StoreUnavailable
from ingestd.events import NS, Reading, SensorStatus
from ingestd.spool import Spool, SpooledBatch
from tests.support.tmpfs import fill, mounted_tmpfs


def _batch(n: int) -> SpooledBatch:
    readings = [Reading(f"s{n}", "t", NS * (n * 100 + i), float(i), "t") for i in range(100)]
    return SpooledBatch(readings, [], SensorStatus())


def _refuse_deletions(spool: Spool) -> None:
    """The spool's disk refuses its deletions (SQLite's log needs room)."""
    conn = spool._conn  # noqa: SLF001
    assert conn is not None
    real = conn.execute

    def refusing(sql: str, *args: object) -> object:
        if sql.startswith("DELETE"):
            raise sqlite3.OperationalError("database or disk is full")
        return real(sql, *args)

    conn.execute = refusing  # type: ignore[method-assign,assignment]


async def test_forwarding_goes_on_past_rows_a_full_disk_cannot_delete(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "tiny", "512k") as disk:
        spool = Spool(disk / "spool.db", 1 << 30)
        await spool.open()
        try:
            n = 0
            with pytest.raises(StoreUnavailable):
                while n < 10_000:
                    assert await spool.put(_batch(n))
                    n += 1
            fill(disk / "filler")
            assert n >= 3, n
            ids = [e.id for e, _ in await spool.take(1 << 30)]
            assert len(ids) == n == spool.state().batches
            old = spool.id
            # All but the last forwarded; the disk refuses the deletion.
            taken = await spool.take(100 * (n - 1))
            assert [e.id for e, _ in taken] == ids[:-1]
            assert await spool.remove(ids[-2]) == 100 * (n - 1)
            # The forwarded rows are not taken again: the last batch is next.
            taken = await spool.take(1 << 20)
            assert [e.id for e, _ in taken] == ids[-1:]
            assert taken[0][1].readings[0].sensor == f"s{n - 1}"
            assert await spool.remove(ids[-1]) == 100
            assert (len(spool), spool.readings) == (0, 0)
            assert spool.id != old  # started afresh: the space is free again
            with contextlib.suppress(FileNotFoundError):
                (disk / "filler").unlink()
            assert await spool.put(_batch(n))
            assert [b.readings[0].sensor for _, b in await spool.take(1 << 20)] == [f"s{n}"]
        finally:
            await spool.close()


async def test_a_batch_put_while_the_file_starts_afresh_lands_in_the_new_file(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool.db", 1 << 30, 0)
    await spool.open()
    try:
        spool.active = True  # as the writer sets it, spooling
        assert await spool.put(_batch(0))
        ((entry, _),) = await spool.take(1 << 20)
        _refuse_deletions(spool)

        async def live_batch() -> bool:
            await asyncio.sleep(0)  # the writer's next batch, a moment later
            return await spool.put(_batch(1))

        removed, put = await asyncio.gather(spool.remove(entry.id), live_batch())
        assert (removed, put) == (100, True)
        # Still spooling: the new file's batch is forwarded, and the writer's
        # next batches go after it. (The fresh start's open() said not: the
        # forwarder slept with the batch in the file; seen after a kill -9.)
        assert spool.active
        assert [b.readings[0].sensor for _, b in await spool.take(1 << 20)] == ["s1"]
    finally:
        await spool.close()


async def test_a_fresh_start_that_cannot_open_still_removes_what_it_forwarded(
    tmp_path: Path,
) -> None:
    # The old file went with every batch in it, forwarded; the new one could
    # not be opened (the disk still full). That raised out of remove(), and
    # the forwarder never counted those batches as forwarded: they stayed in
    # `spooled` until a restart. Now the removal stands and the next use
    # opens the file.
    spool = Spool(tmp_path / "spool.db", 1 << 30, 0)
    await spool.open()
    try:
        assert await spool.put(_batch(0))
        ((entry, _),) = await spool.take(1 << 20)
        _refuse_deletions(spool)
        real_open = spool.open

        async def cannot_open() -> None:
            raise StoreUnavailable("disk full", "the disk is full")

        spool.open = cannot_open  # type: ignore[method-assign]
        assert await spool.remove(entry.id) == 100
        assert (len(spool), spool.readings) == (0, 0)
        # Empty, and the file still cannot be opened: the forwarder is told
        # there is nothing to take (it raised, and the spool stayed active
        # with every live batch sent to it: all ingest stalled).
        assert await spool.take(1 << 20) == []
        spool.open = real_open  # type: ignore[method-assign]
        assert await spool.put(_batch(1))  # opened again
        assert [b.readings[0].sensor for _, b in await spool.take(1 << 20)] == ["s1"]
    finally:
        await spool.close()
