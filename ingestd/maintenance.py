"""Background upkeep of the store: retention, then the engine's housekeeping
(for SQLite a WAL checkpoint), every `store.maintenance_interval` seconds.

The work itself is the store's (`Store.upkeep`), in small transactions so the
writer never waits on it for long. A failure here is logged and retried next
pass: upkeep never stops ingestion.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from ingestd.config import Settings, StoreSettings
from ingestd.errors import StoreError
from ingestd.store import Store

log = structlog.get_logger("ingestd.maintenance")

DAY = 86400.0


class Maintenance:
    def __init__(
        self, store: Store, settings: StoreSettings, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
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
        """One pass: retention, then housekeeping. (readings, quarantined) deleted."""
        s = self.settings
        self.store.keep = tuple((r.sensor, r.days) for r in s.retention)
        cutoff = self.clock() - s.retention_days * DAY if s.retention_days > 0 else None
        try:
            done = await self.store.upkeep(cutoff, s.retention_batch)
        except StoreError as exc:
            self.failures += 1
            log.warning(
                "store maintenance failed; retrying next pass",
                error=str(exc),
                path=self.store.where,
            )
            return 0, 0
        self.passes += 1
        self.deleted_readings += done.readings_deleted
        self.deleted_quarantined += done.quarantined_deleted
        if done.readings_deleted or done.quarantined_deleted:
            log.info(
                "retention: old data deleted",
                readings=done.readings_deleted,
                quarantined=done.quarantined_deleted,
                retention_days=s.retention_days,
            )
        log.debug("store housekeeping", **(done.detail or {}))
        return done.readings_deleted, done.quarantined_deleted
