"""The daemon's closer of pending rollup readings (`ingestd.closing`) on a real
SQLite store: it never spins on a count another closed for it, and a stop
ends its start-up pass."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ingestd import pending
from ingestd.closing import CHUNK, Closer
from ingestd.config import RollupSettings
from ingestd.events import Reading
from ingestd.rollups import RollupPlan
from ingestd.store.sqlite import SqliteStore

NS = 1_000_000_000
PLAN = RollupPlan((60, 3600), {60: 90.0, 3600: 0.0})


@pytest.fixture(autouse=True)
def sparse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch's gauges left pending (`ingestd.pending.dense` says no)."""
    monkeypatch.setattr(pending, "DENSE", 10**9)


class Counted(SqliteStore):
    """A store that counts its closes."""

    closes = 0

    async def close_rollups(self, most: int) -> int:
        self.closes += 1
        return await super().close_rollups(most)


async def _until(stop: asyncio.Event) -> None:
    await stop.wait()  # the writer, done once stopped


async def _fill(store: SqliteStore, readings: int, series: int = 50) -> None:
    t0 = int(time.time()) * NS
    for start in range(0, readings, 5000):
        async with store.batch() as tx:
            await tx.add_readings(
                [
                    Reading(f"s{i % series}", "t", t0 + i * 1000, float(i))
                    for i in range(start, start + 5000)
                ]
            )


def test_a_count_others_closed_does_not_make_it_close_again_and_again(tmp_path: Path) -> None:
    """Another instance (or a tool) closed what this one wrote: its own count
    stays high until a close finds nothing; then it waits for the time."""

    async def run() -> tuple[int, int]:
        store = Counted(tmp_path / "x.db", rollups=PLAN)
        await store.open()
        try:
            await _fill(store, 20_000)
            other = SqliteStore(tmp_path / "x.db", rollups=PLAN)
            while await other.close_rollups(CHUNK):  # another closes them all
                pass
            await other.close()
            assert store.pending_readings == 20_000
            closer = Closer(store, RollupSettings(close_seconds=60, close_readings=1000))
            stop = asyncio.Event()
            writer = asyncio.create_task(_until(stop))
            task = asyncio.create_task(closer.run(stop, writer, lambda: 5.0))
            await asyncio.sleep(1.5)
            stop.set()
            await task
            return store.closes, store.pending_readings
        finally:
            await store.close()

    closes, pending = asyncio.run(run())
    assert pending == 0
    assert closes <= 3  # at start, perhaps once more, and at the stop: not a spin


def test_a_stop_ends_the_start_up_pass_and_leaves_the_rest_pending(tmp_path: Path) -> None:
    async def run() -> tuple[float, int]:
        store = SqliteStore(tmp_path / "x.db", rollups=PLAN)
        await store.open()
        try:
            await _fill(store, 300_000, series=20_000)  # closes of 100,000 (CHUNK)
            closer = Closer(store, RollupSettings())
            stop = asyncio.Event()
            writer = asyncio.create_task(_until(stop))
            asyncio.get_running_loop().call_later(0.05, stop.set)
            began = time.monotonic()
            await closer.run(stop, writer, lambda: 0.0)  # no time left at the stop
            took = time.monotonic() - began
            left = 300_000 - closer.closed
            return took, left
        finally:
            await store.close()

    took, left = asyncio.run(run())
    assert took < 2.0
    assert left > 100_000  # closed at the next start
