"""Health: where every reading went (Accounting), the counters of the running
pipelines read at one moment (Tally), and liveness, readiness and stalls
(Health): what /healthz, /readyz, the metrics, WATCHDOG=1 and STATUS= report.
The HealthMonitor keeps them current and tells systemd.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from ingestd.observe.systemd import SystemdNotifier, watchdog_interval

if TYPE_CHECKING:
    from ingestd.observe.upstream import UpstreamWatch
    from ingestd.pipeline import Pipeline
    from ingestd.writer import BatchWriter

log = structlog.get_logger("ingestd")

# The event loop ticks the health clock every second; this long without a
# tick means it is blocked (/healthz fails).
LOOP_STALL = 10.0
STATUS_INTERVAL = 5.0


@dataclass(frozen=True)
class Accounting:
    """Where every decoded reading went, read in one go on the event loop.

    Each transition (decode, commit) updates all of its terms without an await
    in between, so on the loop the identity always holds:
    decoded = committed + duplicate + quarantined + rate_limited
              + retained_untimed + handed_over + spooled + in_flight.
    A scrape from the HTTP thread has the loop take a snapshot for it, so it
    never reads a torn state.
    """

    decoded: int = 0
    committed: int = 0
    duplicate: int = 0
    quarantined: int = 0
    rate_dropped: int = 0
    rate_quarantined: int = 0
    retained_untimed: int = 0
    # Read by this member while it was the primary, not committed when it lost
    # the role: unacknowledged, the broker redelivers them to the next primary.
    handed_over: int = 0
    # In the local spool (acknowledged, on this machine's disk), not yet
    # forwarded to the store: when forwarded, their outcome moves them.
    spooled: int = 0
    in_flight: int = 0
    # Readings an earlier run spooled and this one forwarded, outside the
    # identity (this run did not decode them).
    recovered: int = 0
    # Messages, outside the identity (read at the same moment).
    retained_ignored: int = 0
    messages_received: int = 0

    @classmethod
    def of(cls, p: Pipeline) -> Accounting:
        c, w = p.source.devices.counts, p.writer
        return cls(
            decoded=c.decoded,
            committed=w.committed,
            duplicate=w.duplicates,
            quarantined=w.quarantined_readings,
            rate_dropped=c.rate_dropped,
            rate_quarantined=c.rate_quarantined,
            retained_untimed=c.retained_untimed,
            spooled=w.spooled,
            in_flight=p.window.readings,
            recovered=w.recovered,
            retained_ignored=c.retained_ignored,
            messages_received=p.source.received,
        )

    def __add__(self, other: Accounting) -> Accounting:
        return Accounting(
            *(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self))
        )

    def handing_over(self) -> Accounting:
        """A pipeline that stops for good with readings in flight hands them over."""
        return dataclasses.replace(self, handed_over=self.handed_over + self.in_flight, in_flight=0)

    @property
    def unexplained(self) -> int:
        """Readings decoded but in none of the outcomes: 0, or a bug in ingestd."""
        return self.decoded - (
            self.committed
            + self.duplicate
            + self.quarantined
            + self.rate_dropped
            + self.rate_quarantined
            + self.retained_untimed
            + self.handed_over
            + self.spooled
            + self.in_flight
        )


@dataclass
class Tally:
    """A pipeline's counters, read at one moment: summed over the pipelines of
    this process (a member's, and the primary role's while it holds it) and
    kept for the primary's past terms, so every counter only goes up."""

    accounting: Accounting = field(default_factory=Accounting)
    oversized_skipped: int = 0
    batches: int = 0
    pauses: int = 0
    reconnects: int = 0
    sequence_gaps: int = 0
    sequence_missing: int = 0
    rebirth_requests: int = 0
    rebirths_suppressed: int = 0
    log_lines_suppressed: int = 0
    last_commit_at: float = 0.0
    quarantined: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    store_errors: Counter[str] = field(default_factory=Counter)
    delivered: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, p: Pipeline, accounting: Accounting) -> Tally:
        c, w = p.source.devices.counts, p.writer
        prefix = "" if p.role == "member" else f"{p.role} "
        return cls(
            accounting,
            p.source.oversized_skipped,
            w.batches,
            p.window.pauses,
            p.source.reconnects,
            w.gaps_committed,
            w.missing_committed,
            c.rebirth_requests,
            c.rebirths_suppressed,
            # One log budget per process (shared by its pipelines): counted once.
            p.source.devices.device_log.suppressed if p.role == "member" else 0,
            w.last_commit_at,
            Counter(dict(w.quarantined_by_kind)),
            Counter(dict(c.skipped)),
            Counter(dict(w.store_errors)),
            Counter({prefix + s.name: s.delivered for s in p.bus.subscriptions}),
            Counter({prefix + s.name: s.dropped for s in p.bus.subscriptions}),
        )

    def __add__(self, other: Tally) -> Tally:
        out = Tally()
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "last_commit_at":
                setattr(out, f.name, max(a, b))
            elif isinstance(a, Counter):
                setattr(out, f.name, Counter(a) + Counter(b) if b else Counter(a))
            else:
                setattr(out, f.name, a + b)
        return out


class Health:
    """Liveness, readiness and progress: what /healthz, /readyz, WATCHDOG=1 and
    STATUS= report. Read from the HTTP thread and the event loop alike."""

    def __init__(self, stall_timeout: float) -> None:
        self.stall_timeout = stall_timeout
        self.pipeline: Pipeline | None = None  # the member's (a lone ingestd's)
        self.primary: Pipeline | None = None  # the primary role's, while held
        self.primary_terms = 0
        self.retired = Tally()  # the primary's past terms
        self.tick_at = time.monotonic()
        self.store_open = False
        self.reloads = 0
        self.reload_failures = 0
        self.accounting = Accounting()
        self.tally = Tally()
        # Why the store is not open yet (before the pipeline exists), else None.
        self.store_problem: str | None = None
        # The loop the pipeline runs on, asked for fresh snapshots by scrapes.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.upstream: UpstreamWatch | None = None

    def running(self) -> list[Pipeline]:
        return [p for p in (self.pipeline, self.primary) if p is not None]

    def take_tally(self) -> Tally:
        """Every pipeline's counters now (on the event loop: consistent)."""
        total = self.retired
        for p in self.running():
            total = total + Tally.of(p, Accounting.of(p))
        return total

    def retire(self, p: Pipeline) -> None:
        """A primary's term ended: its counts stay, what it had in flight is handed over."""
        self.primary_terms += 1
        self.retired = self.retired + Tally.of(p, Accounting.of(p).handing_over())

    def fresh_tally(self, timeout: float = 0.5) -> Tally:
        """A snapshot taken on the event loop now (from any thread); the last
        tick's if the loop does not answer within `timeout` (it is blocked)."""
        loop = self.loop
        if loop is None or self.pipeline is None:
            return self.tally
        done: concurrent.futures.Future[Tally] = concurrent.futures.Future()

        def take() -> None:
            if not done.cancelled():
                done.set_result(self.take_tally())

        try:
            loop.call_soon_threadsafe(take)
            return done.result(timeout)
        except (RuntimeError, concurrent.futures.TimeoutError):  # closed, or blocked
            done.cancel()
            return self.tally

    def tick(self) -> None:
        """On the event loop, once a second: liveness, and a consistent
        accounting snapshot for the scrapes of the next second."""
        self.tick_at = time.monotonic()
        if self.pipeline is not None:
            self.tally = self.take_tally()
            self.accounting = self.tally.accounting

    def live(self) -> bool:
        return time.monotonic() - self.tick_at < LOOP_STALL

    def stall(self) -> str | None:
        """Why a pipeline is stalled, or None while they make progress.

        Stalled: a store call has not returned for `stall_timeout` (a writer
        wedged on a lock held forever), or messages are in flight and nothing
        has been settled for `stall_timeout` while the store is available (a
        store outage is waited out, retrying; it is reported as such).
        """
        for p in self.running():
            why = self._stall(p)
            if why is not None:
                return why if p.role == "member" else f"the {p.role}'s pipeline: {why}"
        return None

    def _stall(self, p: Pipeline) -> str | None:
        now = time.monotonic()
        busy = p.writer.busy_since
        if busy is not None and now - busy > self.stall_timeout:
            return f"a store call has not returned for {now - busy:.0f} s"
        if not p.writer.store_available:
            return None
        idle_for = now - p.window.progress_at
        if p.window.in_flight > 0 and idle_for > self.stall_timeout:
            stuck = f"{p.window.in_flight} message(s) in flight, none settled for {idle_for:.0f} s"
            if busy is not None:  # where it waits: inside the store
                stuck += f"; a store call has not returned for {now - busy:.1f} s"
            return stuck
        return None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the JSON body of /readyz): every check a boolean, and
        `detail` saying why where one is false for a reason we know."""
        ps = self.running()
        checks: dict[str, Any] = {"event_loop": self.live()}
        if not ps:
            checks.update(
                broker=False,
                store=False,
                pipeline=False,
                detail=f"store not open: {self.store_problem or 'opening'}",
            )
            return False, checks
        checks["broker"] = all(p.source.connected for p in ps)
        checks["store"] = all(p.writer.store_available for p in ps)
        spooling = [p.writer for p in ps if p.writer.spool is not None]
        for w in spooling:
            checks["spool"] = spool_detail(w)
        # While the spool takes batches, the store's absence stops nothing;
        # a spool that refuses them holds the writer, whatever the store does.
        settling = all(
            p.writer.spool_available and (p.writer.store_available or p.writer.spooling) for p in ps
        )
        stall = self.stall()
        checks["pipeline"] = stall is None
        if stall is not None:
            checks["detail"] = f"pipeline stalled: {stall}"
        elif not checks["store"] and settling:
            checks["detail"] = (
                "store unavailable; spooling to local disk and forwarding when it is back"
            )
        elif not all(p.writer.spool_available for p in ps):
            checks["detail"] = (
                "the spool cannot take batches (full, its disk low on space, or refusing); "
                "holding them unacknowledged until it is forwarded"
            )
        elif not checks["store"]:
            why = next((p.writer.store_condition for p in ps if p.writer.store_condition), None)
            checks["detail"] = (
                "store unavailable"
                + (f" ({why})" if why else "")
                + "; holding data and retrying"
                + (" (the spool cannot take more)" if spooling else "")
            )
        elif not checks["broker"]:
            down = next(p for p in ps if not p.source.connected)
            checks["detail"] = f"not connected to the broker {down.source.broker}" + (
                "" if down.role == "member" else f" ({down.role} role)"
            )
        ok = settling and all(
            v is True for k, v in checks.items() if k not in ("detail", "spool", "store")
        )
        if self.primary is not None:
            checks["role"] = "primary"
        if self.upstream is not None:
            checks["upstream"] = self.upstream.detail()
        return ok, checks


def spool_detail(w: BatchWriter) -> dict[str, Any]:
    """The spool's part of /readyz."""
    assert w.spool is not None
    state = w.spool.state()
    return {
        "path": str(w.spool.path),
        "active": w.spool.active,
        "batches": state.batches,
        "readings": state.readings,
        "bytes": state.bytes,
        "max_bytes": w.spool.max_bytes,
        "oldest_age_s": round(time.time() - state.oldest, 1) if state.oldest else 0,
        "taking_batches": w.spool_available,
    }


class HealthMonitor:
    """Alongside the daemon from start to exit, on its event loop: ticks the
    liveness clock, pings the systemd watchdog while the pipelines make
    progress, sends STATUS=, runs the upstream check and logs a stall or a
    break in the accounting identity once, when it starts."""

    def __init__(
        self,
        health: Health,
        notifier: SystemdNotifier,
        upstream: UpstreamWatch,
        ready: asyncio.Event,
        stop: asyncio.Event,
    ) -> None:
        """STATUS= goes out once `ready` is set and no more after `stop`."""
        self.health = health
        self.notifier = notifier
        self.upstream = upstream
        self.ready = ready
        self.stop = stop

    async def run(self) -> None:
        """Ticks the liveness clock; WATCHDOG=1 while the pipeline makes progress; STATUS=."""
        interval = watchdog_interval()
        tick = min(1.0, interval / 4) if interval else 1.0
        last_ping = last_status = 0.0
        reported_stall: str | None = None
        unexplained = 0
        last_committed, last_at = 0, time.monotonic()
        while True:
            self.health.tick()
            gap = self.health.accounting.unexplained
            if gap != unexplained:
                if gap:
                    log.error(
                        "readings unaccounted for: a bug in ingestd, please report it",
                        **dataclasses.asdict(self.health.accounting),
                        unexplained=gap,
                    )
                unexplained = gap
            now = time.monotonic()
            stall = self.health.stall()
            if stall is not None and reported_stall is None:
                log.error(
                    "pipeline stalled; withholding the systemd watchdog ping",
                    reason=stall,
                    stall_timeout=self.health.stall_timeout,
                )
            elif stall is None and reported_stall is not None:
                log.warning("pipeline moving again")
            reported_stall = stall
            if interval and stall is None and now - last_ping >= interval / 2:
                self.notifier.notify("WATCHDOG=1")
                last_ping = now
            p = self.health.pipeline
            if p is not None:
                t = self.health.tally
                self.upstream.check(
                    [(q.source.table, q.source.devices) for q in self.health.running()],
                    (t.sequence_gaps, t.sequence_missing),
                )
            if now - last_status >= STATUS_INTERVAL:
                if p is not None and self.ready.is_set() and not self.stop.is_set():
                    committed = self.health.accounting.committed
                    rate = (committed - last_committed) / max(now - last_at, 1e-9)
                    last_committed, last_at = committed, now
                    self.notifier.notify("STATUS=" + self._status(p, rate, stall))
                last_status = now
            await asyncio.sleep(tick)

    @staticmethod
    def _status(p: Pipeline, rate: float, stall: str | None) -> str:
        if stall is not None:
            return f"stalled: {stall}"
        if not p.writer.store_available:
            if p.writer.spooling:
                state = p.writer.spool.state() if p.writer.spool else None
                held = f"{state.readings:,} readings" if state else ""
                return f"store unavailable; spooling to local disk ({held} held)"
            return "store unavailable; holding data and retrying"
        if not p.source.connected:
            return f"waiting for the broker {p.source.broker}"
        queued = sum(s.depth for s in p.bus.subscriptions if s.policy == "block")
        return (
            f"ingesting: {rate:,.0f} readings/s, in flight {p.window.in_flight}/"
            f"{p.window.limit}, queued {queued}, committed {p.writer.committed:,}"
        )
