"""Readings into the store from the command line (`quarantine replay`,
`import`), committed the way the daemon's writer commits them.

The same `Store` and `Batch` as the daemon: one transaction per batch, the
same keys (a reading stored before is a duplicate, a different value under
its key a conflict, quarantined), so running a replay or an import twice
stores nothing twice. It runs beside the daemon: a SQLite file takes one
writer at a time (a longer busy timeout here, the daemon's own retries
there), PostgreSQL gets a connection of its own. A store that is locked or
away is waited out for `wait` seconds, then the command gives up, saying so.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from ingestd.backoff import Backoff
from ingestd.closing import CHUNK
from ingestd.config import Settings
from ingestd.errors import StoreError, StoreUnavailable
from ingestd.events import Reading, Rejected
from ingestd.store import Batch, Store, open_store, with_db

# A tool's transaction waits this long for the daemon's to finish (SQLite).
TOOL_BUSY_TIMEOUT_MS = 10_000


@dataclass
class Tally:
    """What the commits did, summed."""

    stored: int = 0  # readings new to the store
    duplicates: int = 0  # readings already stored with the same value
    conflicts: int = 0  # readings whose key holds another value (quarantined)
    quarantined: int = 0  # quarantine records written (conflicts included)
    forgotten: int = 0  # quarantine records removed (replayed)
    batches: int = 0


class Intake:
    """The store, opened for a command that writes readings."""

    def __init__(
        self,
        settings: Settings,
        db: str | None = None,
        *,
        wait: float = 60.0,
        err: TextIO = sys.stderr,
    ) -> None:
        store_settings = with_db(settings.store, db, reading=False)
        store_settings = store_settings.model_copy(
            update={"busy_timeout_ms": max(store_settings.busy_timeout_ms, TOOL_BUSY_TIMEOUT_MS)}
        )
        self.store: Store = open_store(store_settings, settings.rollup_plan(), tool=True)
        # Its device state (a Sparkplug node's BIRTH): what replayed DATA needs.
        self.store.owner = settings.mqtt.client_id
        self.wait = wait
        self.err = err
        self.tally = Tally()
        self.postgres = store_settings.postgres
        self._retry = (store_settings.retry_min_delay, store_settings.retry_max_delay)

    async def open(self) -> None:
        await self._waiting(self.store.open)

    async def close(self) -> None:
        """Close the rollups' pending readings it wrote (else a daemon does,
        later), then the store."""
        try:
            while self.store.pending_readings and await self.store.close_rollups(CHUNK):
                pass
        except StoreError as exc:
            print(f"ingestd: rollups left pending (a daemon closes them): {exc}", file=self.err)
        finally:
            await self.store.close()

    async def commit(
        self,
        readings: Sequence[Reading],
        rejected: Sequence[Rejected] = (),
        forget: Sequence[int] = (),
    ) -> None:
        """One transaction: quarantine records `forget` (ids) removed, the
        readings stored, `rejected` quarantined; all of it or none."""

        async def once() -> None:
            async with self.store.batch() as tx:
                if forget:
                    await tx.execute_many(
                        "DELETE FROM quarantine WHERE id = ?", [(i,) for i in forget]
                    )
                await tx.add_readings(readings)
                await self._quarantine(tx, rejected)
            t = self.tally
            t.stored += tx.inserted
            t.duplicates += tx.duplicates
            t.conflicts += len(tx.conflicts)
            t.quarantined += tx.quarantined
            t.forgotten += len(forget)
            t.batches += 1

        await self._waiting(once)

    async def _quarantine(self, tx: Batch, rejected: Sequence[Rejected]) -> None:
        """Quarantine records not already there: a replay or an import run
        again writes none twice. (PostgreSQL's quarantine has a unique key
        for that; SQLite's has none, hence the statement.)"""
        if self.postgres or not rejected:
            await tx.add_rejected(rejected)
            return
        await tx.execute_many(
            "INSERT INTO quarantine (received_at, topic, payload, reason) SELECT ?, ?, ?, ? "
            "WHERE NOT EXISTS (SELECT 1 FROM quarantine WHERE received_at = ? AND topic = ? "
            "AND payload = ? AND reason = ?)",
            [(r.received_at, r.topic, r.payload, r.reason) * 2 for r in rejected],
        )
        tx.quarantined += len(rejected)

    async def _waiting(self, attempt: Callable[[], Awaitable[None]]) -> None:
        """`attempt()`, again while the store is unavailable, up to `wait` s."""
        backoff = Backoff(*self._retry)
        deadline = time.monotonic() + self.wait
        told = ""
        while True:
            try:
                await attempt()
            except StoreUnavailable as exc:
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"{self.store.where}: {exc} (waited {self.wait:g} s; nothing of "
                        "this batch was written: run the command again, it stores nothing twice)"
                    ) from None
                if exc.condition != told:
                    told = exc.condition
                    print(f"ingestd: {self.store.where}: {exc}; waiting", file=self.err)
                await asyncio.sleep(backoff.next())
            else:
                return
