"""Closing the rollups' pending readings (`ingestd.rollups`): gauges' readings
a batch committed with a pending copy are merged into the rollup rows every
`rollups.close_seconds`, sooner once `rollups.close_readings` are pending,
at start (what a crash left) and once more after the drain at a stop.

A close is a transaction of at most CHUNK readings (merged a few series at a
time: `ingestd.pending.Closing`); a pass closes until a close finds none,
or as many as were pending when it began (a busy daemon's writer keeps
adding). A failure (the store away) is logged
once, retried next pass: the pending rows stay in the database, counted with
the raw readings, and `ingestd query --every` adds them meanwhile. Closing
never stops ingestion; a pass that closed nothing waits for close_seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from ingestd.config import RollupSettings, Settings
from ingestd.errors import StoreError
from ingestd.store import Store

log = structlog.get_logger("ingestd.closing")

# Readings a close takes at most: its memory (about 100 bytes a reading while
# it runs) and how long it holds SQLite's write lock.
CHUNK = 100_000
_POLL = 0.5  # seconds between looks at the pending count


class Closer:
    def __init__(
        self, store: Store, settings: RollupSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.closed = 0  # readings closed by this run
        self.failures = 0
        self._failing = False

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings.rollups

    async def run(
        self, stop: asyncio.Event, drained: asyncio.Task[None], left: Callable[[], float]
    ) -> None:
        """Close at start, then on time or volume until `stop`; once `drained`
        (the writer's last batch committed), close what is left, within the
        `left()` seconds of the stop timeout (the rest waits for the next start)."""
        await self.close_pending(everything=True, stop=stop)
        last = self.clock()
        stalled = False  # the last pass closed nothing: wait for the time, not the volume
        while not stop.is_set():
            s = self.settings
            due = last + s.close_seconds
            volume = not stalled and self.store.pending_readings >= s.close_readings
            if volume or self.clock() >= due:
                stalled = await self.close_pending(stop=stop) == 0
                last = self.clock()
                continue
            try:
                async with asyncio.timeout(min(_POLL, max(due - self.clock(), 0.01))):
                    await stop.wait()
            except TimeoutError:
                pass
        await asyncio.wait({drained})
        try:
            async with asyncio.timeout(max(left(), 0.1)):
                await self.close_pending(everything=True)
        except TimeoutError:
            log.warning(
                "stop timeout: rollups left pending (closed at the next start)",
                stop_timeout_left=round(left(), 3),
            )

    async def close_pending(
        self, everything: bool = False, stop: asyncio.Event | None = None
    ) -> int:
        """One pass; the readings closed. `everything`: not bounded by this
        process's count (at start, what a crash left; after the drain).
        `stop`: ends the pass between closes once set."""
        bound = None if everything else max(self.store.pending_readings, CHUNK)
        done = 0
        try:
            while (bound is None or done < bound) and not (stop and stop.is_set()):
                n = await self.store.close_rollups(CHUNK)
                done += n
                if n == 0:  # none left when it looked
                    break
                await asyncio.sleep(0)  # the writer's turn
        except StoreError as exc:
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.warning(
                    "closing rollups failed; retrying next pass (the pending readings are "
                    "kept with the raw ones)",
                    error=str(exc),
                    path=self.store.where,
                )
        else:
            if self._failing:
                self._failing = False
                log.info("closing rollups works again", closed=done)
        self.closed += done
        return done
