"""The forwarder: drains the local spool into the store once it takes batches
again, in arrival order, in large transactions, while live batches keep
going to the spool behind it; when the spool is empty, the writer commits to
the store again.

A spooled batch leaves the spool only after the store committed it, and the
store records, in that same transaction, the last spool row it holds
(`spool_forwarded`): after a kill -9 between the commit and the removal, or a
commit whose outcome was lost with the connection, what the store already
holds is removed from the spool without being written twice. Everything else
is what a live batch gets: the same keys, duplicates and conflicts.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import msgspec
import structlog

from ingestd.backoff import Backoff
from ingestd.errors import StoreUnavailable
from ingestd.events import BatchCommitted, Reading, Rejected, merge_statuses
from ingestd.spool import Entry, Spool, SpooledBatch
from ingestd.store import Store
from ingestd.writer import BatchWriter

log = structlog.get_logger("ingestd.forward")

# Readings per forwarding transaction: large, as the store takes them fastest.
FORWARD_READINGS = 50_000
# After a step fails, the steps stay at or below half its size this long.
STEP_CAP_SECONDS = 60.0
_MARK = (
    "INSERT INTO spool_forwarded (spool, upto, updated) VALUES (?, ?, ?) "
    "ON CONFLICT (spool) DO UPDATE SET upto = excluded.upto, updated = excluded.updated"
)


class Forwarder:
    def __init__(
        self,
        store: Store,
        spool: Spool,
        writer: BatchWriter,
        *,
        retry_min_delay: float,
        retry_max_delay: float,
        max_readings: int = FORWARD_READINGS,
    ) -> None:
        self.store = store
        self.spool = spool
        self.writer = writer
        self.retry_min_delay = retry_min_delay
        self.retry_max_delay = retry_max_delay
        self.max_readings = max_readings
        # What a step takes now: halved after a step the store failed (one
        # too large for store.statement_timeout_ms on a slow server failed
        # every time, and the spool grew until full), doubled back after
        # each that worked, up to half the size that failed for
        # STEP_CAP_SECONDS. At least one batch a step, however small.
        self.step_readings = max_readings
        self._cap, self._cap_until = max_readings, 0.0  # the step's ceiling after a failure
        self._checked = False  # the store's mark of this spool read since the last doubt
        self._drain_started = 0.0
        self._drain_readings = 0
        self._failing: str | None = None  # why forwarding failed last, until it works

    async def run(self) -> None:
        spool = self.spool
        backoff = Backoff(self.retry_min_delay, self.retry_max_delay)
        while True:
            if not spool.active:
                spool.wake.clear()
                await spool.wake.wait()
                continue
            try:
                moved = await self._step()
            except StoreUnavailable as exc:
                # Down still (or again); try later, and read the mark again
                # first (a commit may have been lost). Said once per condition.
                self._checked = False
                errors = self.writer.store_errors  # ingestd_store_errors_total, as a batch's
                errors[exc.condition] = errors.get(exc.condition, 0) + 1
                if exc.condition != self._failing:
                    self._failing = exc.condition
                    log.warning(
                        "forwarding the spool failed; retrying",
                        error=str(exc),
                        step_readings=self.step_readings,
                        spool=str(spool.path),
                        **_depth(spool),
                    )
                await asyncio.sleep(backoff.next())
                continue
            if moved and self._failing is not None:
                log.warning("forwarding the spool again", after=self._failing)
                self._failing = None
            if moved:
                backoff = Backoff(self.retry_min_delay, self.retry_max_delay)
                continue
            if spool.pending or len(spool):
                await asyncio.sleep(0.01)  # a batch on its way into the spool
                continue
            # Empty, and nothing on its way: the writer commits to the store again.
            spool.active = False
            if self._drain_readings:
                log.warning(
                    "spool drained; batches go to the store again",
                    forwarded=self._drain_readings,
                    seconds=round(time.monotonic() - self._drain_started, 1),
                )
            self._drain_readings = 0

    async def _step(self) -> int:
        """Forward the oldest spooled batches; the readings that left the spool."""
        spool = self.spool
        if not self._checked:
            done = await self.store.spool_forwarded(spool.id)
            self._checked = True
            if done and len(spool):
                # Whose before the removal: a fresh start renumbers the file.
                own = done >= spool.first_own
                held = await self._held(done)
                already = await spool.remove(done)
                if already:
                    log.info("spooled batches the store already held removed", readings=already)
                    settle_held(self.writer, *held, own=own)
                return already
        taken = await spool.take(self.step_readings)
        if not taken:
            return 0
        if not self._drain_readings:
            self._drain_started = time.monotonic()
            log.info("forwarding the spool to the store", **_depth(spool))
        readings, rejected, moved = _contents(taken)
        started = time.perf_counter()
        try:
            result = await self._commit(taken, readings, rejected)
        except StoreUnavailable:
            # Halved, and held below the size that failed for a while: doubling
            # back at once made every other step a probe that failed again.
            self.step_readings = max(1, min(self.step_readings, len(readings) + moved) // 2)
            self._cap, self._cap_until = self.step_readings, time.monotonic() + STEP_CAP_SECONDS
            raise
        top = self.max_readings if time.monotonic() >= self._cap_until else self._cap
        self.step_readings = min(top, self.step_readings * 2)
        seconds = time.perf_counter() - started
        self.writer.store_back()
        own = taken[0][0].id >= spool.first_own  # before a fresh start renumbers the file
        await spool.remove(taken[-1][0].id)
        settle_forwarded(self.writer, len(readings), moved, result, rejected, seconds, own=own)
        self._drain_readings += len(readings) + moved
        return len(readings) + moved

    async def _held(self, done: int) -> tuple[int, int, Counter[str]]:
        """What the batches up to row `done` held, to count it as what it was
        (readings, readings moved to quarantine, quarantine records by kind):
        read a step's worth at a time (after a full disk kept forwarded rows,
        a restart can find a great many)."""
        readings = moved = after = 0
        kinds: Counter[str] = Counter()
        while part := await self.spool.take(self.max_readings, upto=done, after=after):
            r, rejected, m = _contents(part)
            readings, moved, after = readings + len(r), moved + m, part[-1][0].id
            kinds.update(x.kind for x in rejected)
        return readings, moved, kinds

    async def _commit(
        self,
        taken: list[tuple[Entry, SpooledBatch]],
        readings: list[Reading],
        rejected: list[Rejected],
    ) -> tuple[int, int, list[Rejected]]:
        merged = merge_statuses(b.status for _, b in taken if b.status)
        packets = next((b.status.packets for _, b in reversed(taken) if b.status.packets), ())
        status = msgspec.structs.replace(merged, packets=packets)
        async with self.store.batch() as tx:
            await tx.add_readings(readings)
            await tx.add_rejected(rejected)
            if status:
                await tx.set_status(status)
            await tx.execute_many(_MARK, [(self.spool.id, taken[-1][0].id, time.time())])
        return tx.inserted, tx.duplicates, tx.conflicts


def settle_forwarded(
    w: BatchWriter,
    readings: int,
    moved: int,
    result: tuple[int, int, list[Rejected]],
    rejected: list[Rejected],
    seconds: float,
    *,
    own: bool,
) -> None:
    """Spooled batches the store has taken: `readings` to store and `moved`
    already quarantined by the processor, their outcome `result`. The
    outcome of this run's own batches joins the counters (they leave
    `spooled`); an earlier run's is `recovered`."""
    inserted, duplicates, conflicts = result
    if own:
        w.spooled -= readings + moved
        w.committed += inserted
        w.duplicates += duplicates
        w.quarantined_readings += moved + len(conflicts)
    else:
        w.recovered += readings + moved
    w.forwarded += readings + moved
    rejected = rejected + conflicts
    _quarantined(w, Counter(r.kind for r in rejected))
    w.batches += 1
    w.last_commit_at = time.time()
    event = BatchCommitted(
        inserted,
        duplicates,
        len(rejected),
        0,
        seconds,
        readings + len(rejected) - len(conflicts),
        conflicts,
        forwarded=readings + moved,
    )
    if w.on_commit is not None:
        w.on_commit(event)
    w.bus.publish_nowait(event)


def settle_held(
    w: BatchWriter, readings: int, moved: int, kinds: Counter[str], *, own: bool
) -> None:
    """Spooled batches the store turned out to hold already (a forwarding
    commit whose outcome was lost, or a kill -9 before the spool let them
    go), removed from the spool: their `readings` counted as committed
    (their duplicates and conflicts were counted by no one), the `moved`
    ones as quarantined readings, and their quarantine records (`kinds`);
    or, an earlier run's, as `recovered`."""
    if own:
        w.spooled -= readings + moved
        w.committed += readings
        w.quarantined_readings += moved
    else:
        w.recovered += readings + moved
    w.forwarded += readings + moved
    _quarantined(w, kinds)


def _quarantined(w: BatchWriter, kinds: Counter[str]) -> None:
    """Quarantine records committed, by kind."""
    w.quarantined += kinds.total()
    for kind, n in kinds.items():
        w.quarantined_by_kind[kind] = w.quarantined_by_kind.get(kind, 0) + n


def _contents(taken: list[tuple[Entry, SpooledBatch]]) -> tuple[list[Reading], list[Rejected], int]:
    readings: list[Reading] = []
    rejected: list[Rejected] = []
    moved = 0
    for _, b in taken:
        readings.extend(b.readings)
        rejected.extend(b.rejected)
        moved += b.moved
    return readings, rejected, moved


def _depth(spool: Spool) -> dict[str, object]:
    state = spool.state()
    return {
        "batches": state.batches,
        "readings": state.readings,
        "bytes": state.bytes,
        "oldest_age_s": round(time.time() - state.oldest, 1) if state.oldest else 0,
    }
