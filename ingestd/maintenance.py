"""Background upkeep of the store: retention and WAL checkpoints.

It runs on a connection of its own, in small transactions, so the writer
never waits on it for long (SQLite has one writer at a time; the writer's
busy timeout covers the few milliseconds a deletion batch holds the lock).
A failure here is logged and retried next pass: upkeep never stops ingestion.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable

import aiosqlite
import structlog

from ingestd.config import Settings, StoreSettings
from ingestd.events import NS

log = structlog.get_logger("ingestd.maintenance")

DAY = 86400.0


class Maintenance:
    def __init__(self, settings: StoreSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.deleted_readings = 0
        self.deleted_quarantined = 0
        self.passes = 0
        self.failures = 0

    def reconfigure(self, settings: Settings) -> None:
        """A reload: retention and its pace from the next pass on."""
        self.settings = settings.store

    async def run(self, stop: asyncio.Event) -> None:
        while True:
            try:
                async with asyncio.timeout(self.settings.maintenance_interval):
                    await stop.wait()
                return
            except TimeoutError:
                pass
            await self.run_once()

    async def run_once(self) -> tuple[int, int]:
        """One pass: retention, then a checkpoint. (readings, quarantined) deleted."""
        s = self.settings
        try:
            async with aiosqlite.connect(s.path, isolation_level=None) as conn:
                await conn.execute(f"PRAGMA busy_timeout = {int(s.busy_timeout_ms)}")
                readings = quarantined = 0
                if s.retention_days > 0:
                    cutoff = self.clock() - s.retention_days * DAY
                    readings = await _delete_samples(conn, int(cutoff * NS), s.retention_batch)
                    quarantined = await _delete_quarantine(conn, cutoff, s.retention_batch)
                async with conn.execute("PRAGMA wal_checkpoint(PASSIVE)") as cur:
                    busy, wal_pages, moved = await cur.fetchone() or (0, 0, 0)
        except sqlite3.Error as exc:
            self.failures += 1
            log.warning(
                "store maintenance failed; retrying next pass", error=str(exc), path=str(s.path)
            )
            return 0, 0
        self.passes += 1
        self.deleted_readings += readings
        self.deleted_quarantined += quarantined
        if readings or quarantined:
            log.info(
                "retention: old data deleted",
                readings=readings,
                quarantined=quarantined,
                retention_days=s.retention_days,
            )
        log.debug("wal checkpoint", wal_pages=wal_pages, checkpointed=moved, busy=busy)
        return readings, quarantined


async def _delete_samples(conn: aiosqlite.Connection, cutoff_ns: int, batch: int) -> int:
    """Delete samples older than `cutoff_ns`, at most `batch` rows per transaction,
    walking each series along its (series_id, ts_ns, seq) key."""
    async with conn.execute("SELECT id FROM series ORDER BY id") as cur:
        series = [row[0] for row in await cur.fetchall()]
    deleted = 0
    for sid in series:
        while True:
            # The batch-th oldest expired timestamp bounds this transaction.
            async with conn.execute(
                "SELECT ts_ns FROM samples WHERE series_id = ? AND ts_ns < ? ORDER BY ts_ns "
                "LIMIT 1 OFFSET ?",
                (sid, cutoff_ns, batch - 1),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                cur2 = await conn.execute(
                    "DELETE FROM samples WHERE series_id = ? AND ts_ns < ?", (sid, cutoff_ns)
                )
            else:
                cur2 = await conn.execute(
                    "DELETE FROM samples WHERE series_id = ? AND ts_ns <= ?", (sid, row[0])
                )
            deleted += cur2.rowcount
            await cur2.close()
            await asyncio.sleep(0)  # let the writer in between batches
            if row is None:
                break
    return deleted


async def _delete_quarantine(conn: aiosqlite.Connection, cutoff: float, batch: int) -> int:
    deleted = 0
    while True:
        cur = await conn.execute(
            "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine "
            "WHERE received_at < ? ORDER BY received_at LIMIT ?)",
            (cutoff, batch),
        )
        n = cur.rowcount
        await cur.close()
        deleted += n
        if n < batch:
            return deleted
        await asyncio.sleep(0)
