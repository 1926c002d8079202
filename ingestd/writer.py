"""The batch writer: readings in, one transaction per batch, acknowledgements out.

A batch is committed when it holds `max_readings` (a chunk that would take it
past that starts the next batch; a chunk is never split), when its oldest
chunk is `max_delay` old, when it holds half of the in-flight window or half
of what the broker sends before it waits for acknowledgements (more can only
come as fast as we commit, so waiting would only add latency), or when a
chunk asks for a flush (shutdown).

A store that cannot take writes (locked, full, read-only, I/O error) is waited
out: the batch is held and retried with backoff, nothing is acknowledged, and
the condition is logged once when it starts and once when it clears.

A store that takes several batches at once (PostgreSQL: a connection each)
gets up to `store.concurrent_batches` in flight: the server loads one while
the daemon sends the next. They are settled (counted, acknowledged) in the
order they were formed, whatever order they commit in; a batch that writes a
sensor's state waits for batches in flight that write the same sensor's, so
per-sensor state is written in order too.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

import structlog

from ingestd.backoff import Backoff
from ingestd.bus import EventBus, Subscription
from ingestd.config import Settings
from ingestd.errors import StoreUnavailable
from ingestd.events import (
    BatchCommitted,
    Processed,
    Reading,
    Rejected,
    SensorStatus,
    merge_statuses,
)
from ingestd.spool import Spool, SpooledBatch
from ingestd.store import Store
from ingestd.window import InFlightWindow

log = structlog.get_logger("ingestd.writer")

Acknowledge = Callable[[int, list[tuple[int, int]]], None]
# A commit's outcome: inserted, duplicates, conflicts; None: spooled instead.
Outcome = tuple[int, int, list[Rejected]] | None
# StoreUnavailable's condition for a commit slower than store.spool.after_ms.
SLOW = "slower than store.spool.after_ms"


class BatchWriter:
    def __init__(
        self,
        store: Store,
        inbox: Subscription,
        bus: EventBus,
        window: InFlightWindow,
        acknowledge: Acknowledge,
        *,
        max_readings: int,
        max_delay: float,
        retry_min_delay: float,
        retry_max_delay: float,
    ) -> None:
        self.store = store
        self.inbox = inbox
        self.bus = bus
        self.window = window
        self.acknowledge = acknowledge
        self.max_readings = max_readings
        self.max_delay = max_delay
        self.retry_min_delay = retry_min_delay
        self.retry_max_delay = retry_max_delay
        self._chunks: list[Processed] = []
        # The (packet id, CRC) of the last tracked messages batched (see
        # SensorStatus.packets), twice the window: every message the broker
        # may still hold unacknowledged is among them. Seeded at start with
        # those committed before.
        self.packets: collections.deque[tuple[int, int]] = collections.deque(
            maxlen=2 * window.limit
        )
        self._size = 0
        self._deliveries = 0
        self._unacked = 0
        self._opened_at = 0.0
        self.committed = 0
        self.duplicates = 0
        self.quarantined = 0
        # Readings (not messages) quarantined: by the processor, or as conflicts.
        self.quarantined_readings = 0
        self.batches = 0
        # Gaps (and messages missing) in devices' counters, in committed chunks.
        self.gaps_committed = 0
        self.missing_committed = 0
        self.store_available = True
        self._condition: str | None = None  # why the store refused the last attempt
        # For metrics and health (read from the metrics server's thread too).
        self.quarantined_by_kind: dict[str, int] = {}
        self.store_errors: dict[str, int] = {}
        self.last_commit_at = 0.0  # wall clock, 0 before the first
        # monotonic start of each store call in progress: a call that never
        # returns (a lock held forever) is how a writer wedges.
        self._busy: dict[int, float] = {}
        self.on_commit: Callable[[BatchCommitted], None] | None = None
        self.concurrency = max(1, store.concurrent_batches)
        self._slots = asyncio.Semaphore(self.concurrency)
        self._last: asyncio.Task[None] | None = None  # the newest batch in flight
        self._jobs: asyncio.TaskGroup | None = None
        # Sensors whose state a batch in flight writes, per batch.
        self._stating: dict[int, frozenset[str]] = {}
        self._formed = 0
        # The local spool (a remote store's, `ingestd.spool`), and how long a
        # commit may take before its batch goes there instead.
        self.spool: Spool | None = None
        self.spool_after: float | None = None
        self.spool_available = True  # False while the spool cannot take batches
        self._spool_problem: str | None = None
        # Batches (numbers) the spool refused and the writer holds: the spool
        # takes batches again once none is held (a smaller one taken beside
        # a held one does not end it).
        self._held: set[int] = set()
        # Readings (to store, or quarantined by the processor) this run
        # committed to the spool and not yet forwarded: a term of the identity.
        self.spooled = 0
        self.spooled_batches = 0
        self.forwarded = 0  # readings forwarded from the spool, this run's or an earlier's
        # Readings an earlier run spooled, forwarded by this one (outside the
        # identity: this run did not decode them).
        self.recovered = 0

    @property
    def busy_since(self) -> float | None:
        """monotonic start of the oldest store call in progress, else None
        (read from the metrics server's thread too)."""
        starts = list(self._busy.values())
        return min(starts) if starts else None

    @property
    def store_condition(self) -> str | None:
        """Why the store refused the last attempt, while it does (for /readyz)."""
        return self._condition

    @property
    def spooling(self) -> bool:
        """Batches go to the spool, and it takes them."""
        return self.spool is not None and self.spool.active and self.spool_available

    def reconfigure(self, settings: Settings) -> None:
        """A reload: batch size and age, and the store's retry delays, from the
        next batch on."""
        self.max_readings = settings.batch.max_readings
        self.max_delay = settings.batch.max_delay_ms / 1000
        self.retry_min_delay = settings.store.retry_min_delay
        self.retry_max_delay = settings.store.retry_max_delay

    async def run(self) -> None:
        if self.concurrency == 1:
            await self._run()
            return
        try:
            async with asyncio.TaskGroup() as jobs:
                self._jobs = jobs
                await self._run()
        except BaseExceptionGroup as group:
            # A batch's failure is the writer's, as with one batch at a time.
            raise group.exceptions[0] from None
        finally:
            self._jobs = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._chunks:
                remaining = self._opened_at + self.max_delay - loop.time()
                if remaining <= 0:
                    await self.flush()
                    continue
                try:
                    async with asyncio.timeout(remaining):
                        event = await self.inbox.get()
                except TimeoutError:
                    await self.flush()
                    continue
            else:
                event = await self.inbox.get()
            chunk: Processed = event
            while True:
                # A chunk that would take the batch past max_readings starts
                # the next one (a chunk larger than that is a batch alone).
                size = len(chunk.readings) + len(chunk.rejected)
                if self._chunks and self._size + size > self.max_readings:
                    await self.flush()
                self._add(chunk, loop.time())
                if chunk.flush or self._full() or self.inbox.queue.empty():
                    break
                # Take whatever else is already queued without waiting.
                chunk = self.inbox.get_nowait()
            if chunk.flush or self._full():
                await self.flush()
            if chunk.last:
                return

    def _full(self) -> bool:
        """Commit now rather than wait for more?

        At `max_readings`, or as the in-flight window's sizing rule says
        (`InFlightWindow.batch_full`: half the window).
        """
        return self._size >= self.max_readings or self.window.batch_full(
            self._deliveries, self._unacked
        )

    def _add(self, chunk: Processed, now: float) -> None:
        if not (chunk.readings or chunk.rejected or chunk.deliveries or chunk.status):
            return  # a control chunk
        if not self._chunks:
            self._opened_at = now
        self._chunks.append(chunk)
        self._size += len(chunk.readings) + len(chunk.rejected)
        self._deliveries += chunk.deliveries
        self._unacked += len(chunk.acks)

    async def flush(self) -> None:
        chunks = self._chunks
        if not chunks:
            return
        self._chunks, self._size, self._deliveries, self._unacked = [], 0, 0, 0
        readings: list[Reading] = []
        rejected: list[Rejected] = []
        packets = False
        for c in chunks:
            readings.extend(c.readings)
            rejected.extend(c.rejected)
            if c.status.packets:
                self.packets.extend(c.status.packets)
                packets = True
        merged = merge_statuses(c.status for c in chunks if c.status)
        sequences, expect, states, devices = (
            merged.sequences,
            merged.expect_within,
            merged.states,
            merged.devices,
        )
        status = SensorStatus(
            sequences, expect, states, devices, tuple(self.packets) if packets else ()
        )
        moved = sum(c.rejected_readings for c in chunks)
        if self._jobs is None:
            started = time.perf_counter()
            result = await self._commit(readings, rejected, status, moved=moved)
            self._settle(chunks, readings, rejected, result, time.perf_counter() - started)
            return
        self._formed += 1
        number = self._formed
        sensors = (
            frozenset(sequences)
            | frozenset(expect)
            | frozenset(states)
            | frozenset(f"\x00{f}\x00{d}" for f, d in devices)  # apart from sensor names
            | (frozenset({"\x00packets"}) if packets else frozenset())  # one row, in order
        )
        if sensors and any(sensors & other for other in self._stating.values()):
            # Its state must not overtake an earlier batch's: wait for those in
            # flight (settled in order, so the newest done means all are).
            last = self._last
            if last is not None:
                await asyncio.wait({last})
        await self._slots.acquire()
        if sensors:
            self._stating[number] = sensors
        self._last = self._jobs.create_task(
            self._job(number, self._last, chunks, readings, rejected, status),
            name=f"batch {number}",
        )

    async def _job(
        self,
        number: int,
        earlier: asyncio.Task[None] | None,
        chunks: list[Processed],
        readings: list[Reading],
        rejected: list[Rejected],
        status: SensorStatus,
    ) -> None:
        """One batch in flight: commit it, then settle it after the batch before."""
        try:
            started = time.perf_counter()
            moved = sum(c.rejected_readings for c in chunks)
            result = await self._commit(readings, rejected, status, number, moved)
            seconds = time.perf_counter() - started
        finally:
            self._stating.pop(number, None)
            self._slots.release()
        if earlier is not None:
            await earlier  # its failure is this one's too: nothing settles out of order
        self._settle(chunks, readings, rejected, result, seconds)

    def _settle(
        self,
        chunks: list[Processed],
        readings: list[Reading],
        rejected: list[Rejected],
        result: Outcome,
        seconds: float,
    ) -> None:
        """A committed batch: counters, acknowledgements, the window, the event."""
        if result is None:
            self._settle_spooled(chunks, readings, seconds)
            return
        inserted, duplicates, conflicts = result
        if conflicts:
            rejected = rejected + conflicts
        # Counters first: whoever sees the window settle (a scrape, say) sees them too.
        self.committed += inserted
        self.duplicates += duplicates
        self.quarantined += len(rejected)
        if rejected:
            by_kind = self.quarantined_by_kind
            for r in rejected:
                by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
        self.batches += 1
        self.last_commit_at = time.time()
        deliveries = 0
        moved = sum(c.rejected_readings for c in chunks)
        self.quarantined_readings += moved + len(conflicts)
        self.window.readings -= len(readings) + moved
        for c in chunks:
            self.gaps_committed += c.gaps[0]
            self.missing_committed += c.gaps[1]
            # Chunks are in arrival order, so acknowledgements are too.
            self.acknowledge(c.epoch, c.acks)
            self.window.settle(c.deliveries, len(c.acks))
            deliveries += c.deliveries
        event = BatchCommitted(
            inserted,
            duplicates,
            len(rejected),
            deliveries,
            seconds,
            len(readings) + len(rejected) - len(conflicts),
            conflicts,
        )
        if self.on_commit is not None:
            self.on_commit(event)
        self.bus.publish_nowait(event)

    def _settle_spooled(
        self, chunks: list[Processed], readings: list[Reading], seconds: float
    ) -> None:
        """A batch committed to the spool: acknowledged, its readings `spooled`
        until forwarded (`settle_forwarded`)."""
        moved = sum(c.rejected_readings for c in chunks)
        self.spooled += len(readings) + moved
        self.spooled_batches += 1
        self.window.readings -= len(readings) + moved
        deliveries = 0
        for c in chunks:
            self.gaps_committed += c.gaps[0]
            self.missing_committed += c.gaps[1]
            self.acknowledge(c.epoch, c.acks)
            self.window.settle(c.deliveries, len(c.acks))
            deliveries += c.deliveries
        self.bus.publish_nowait(
            BatchCommitted(0, 0, 0, deliveries, seconds, spooled=len(readings) + moved)
        )

    def store_back(self) -> None:
        """The store took a batch (the forwarder's): available again."""
        if self._condition is not None:
            self.store_available = True
            log.warning("store available again; forwarding the spool", after=self._condition)
            self._condition = None

    async def _commit(
        self,
        readings: list[Reading],
        rejected: list[Rejected],
        status: SensorStatus | None = None,
        number: int = 0,
        moved: int = 0,
    ) -> Outcome:
        """Commit a batch to the store, or to the spool (None) while the spool
        is in use or when the store cannot take it; hold it (retrying) while
        neither can."""
        backoff = Backoff(self.retry_min_delay, self.retry_max_delay)
        spool = self.spool
        while True:
            if spool is not None and spool.active:
                # Spooling: every batch goes there, in order, until it is forwarded.
                if await self._spool(readings, rejected, status, moved, number):
                    return None
                await asyncio.sleep(backoff.next())
                continue
            self._busy[number] = time.monotonic()
            try:
                async with asyncio.timeout(self.spool_after if spool is not None else None):
                    async with self.store.batch() as tx:
                        await tx.add_readings(readings)
                        await tx.add_rejected(rejected)
                        if status:
                            await tx.set_status(status)
            except (StoreUnavailable, TimeoutError) as exc:
                self._busy.pop(number, None)
                condition = exc.condition if isinstance(exc, StoreUnavailable) else SLOW
                self.store_errors[condition] = self.store_errors.get(condition, 0) + 1
                # Once per change of condition, whichever batch in flight meets it.
                if condition != self._condition:
                    self._condition = condition
                    self.store_available = False
                    log.error(
                        "store unavailable; "
                        + (
                            "spooling batches to local disk"
                            if spool is not None
                            else "holding the batch and retrying"
                        ),
                        condition=condition,
                        error=str(exc) or condition,
                        readings=len(readings),
                        path=self.store.where,
                    )
                if spool is not None and await self._spool(
                    readings, rejected, status, moved, number
                ):
                    return None
                await asyncio.sleep(backoff.next())
                continue
            finally:
                self._busy.pop(number, None)
            if self._condition is not None:
                self.store_available = True
                log.warning("store available again; batch committed", after=self._condition)
                self._condition = None
            self._taken_again("store", number)
            return tx.inserted, tx.duplicates, tx.conflicts

    def _taken_again(self, by: str, number: int) -> None:
        """Batch `number` was taken: if the spool had refused batches and none
        is held now, that is over."""
        self._held.discard(number)
        if self._held:
            return
        if self._spool_problem is not None:
            log.warning("batches are taken again", by=by, after=self._spool_problem)
            self._spool_problem = None
        self.spool_available = True

    async def _spool(
        self,
        readings: list[Reading],
        rejected: list[Rejected],
        status: SensorStatus | None,
        moved: int,
        number: int,
    ) -> bool:
        """Commit batch `number` to the spool; False if it cannot take it
        (full, or its disk refuses), logged once each time that starts and ends."""
        spool = self.spool
        assert spool is not None
        started = not spool.active and not len(spool)
        spool.active = True  # from now on batches go to the spool, in order
        spool.wake.set()
        try:
            taken = await spool.put(
                SpooledBatch(readings, rejected, status or SensorStatus(), moved)
            )
            problem = None if taken else "full"
        except StoreUnavailable as exc:
            taken, problem = False, f"{exc.condition}: {exc}"
        if not taken:
            if self._spool_problem is None:
                state = spool.state()
                log.error(
                    "spool cannot take batches; holding them unacknowledged (the broker "
                    "queues meanwhile) until the store takes the spool's",
                    problem=problem,
                    spool=str(spool.path),
                    spooled_readings=state.readings,
                    spooled_bytes=state.bytes,
                    max_bytes=spool.max_bytes,
                )
            self._spool_problem = problem
            self.spool_available = False
            self._held.add(number)
            return False
        self._taken_again("spool", number)
        if started:
            log.warning(
                "spooling: batches are committed to local disk and acknowledged, and "
                "forwarded to the store when it takes them",
                spool=str(spool.path),
                store=self.store.where,
            )
        return True
