"""Prometheus metrics, health and readiness (served by `observe.endpoints`).

Counters live where the work happens, as plain integers on the components
(the hot path pays nothing for them); a collector reads them at scrape time.
Only the two histograms (batch size, commit latency) are observed as events
happen, once per batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from ingestd import __version__
from ingestd.events import REJECT_KINDS, BatchCommitted
from ingestd.store.base import CONDITIONS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ingestd.observe.upstream import UpstreamWatch
    from ingestd.pipeline import Pipeline

# The event loop ticks the health clock every second; this long without a
# tick means it is blocked (/healthz fails).
LOOP_STALL = 10.0


@dataclass(frozen=True)
class Accounting:
    """Where every decoded reading went, read in one go on the event loop.

    Each transition (decode, commit) updates all of its terms without an await
    in between, so on the loop the identity always holds:
    decoded = committed + duplicate + quarantined + rate_limited
              + retained_untimed + handed_over + in_flight.
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
    in_flight: int = 0
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
            in_flight=p.window.readings,
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
        stall = self.stall()
        checks["pipeline"] = stall is None
        if stall is not None:
            checks["detail"] = f"pipeline stalled: {stall}"
        elif not checks["store"]:
            checks["detail"] = "store unavailable; holding data and retrying"
        elif not checks["broker"]:
            down = next(p for p in ps if not p.source.connected)
            checks["detail"] = f"not connected to the broker {down.source.broker}" + (
                "" if down.role == "member" else f" ({down.role} role)"
            )
        ok = all(v is True for k, v in checks.items() if k != "detail")
        if self.primary is not None:
            checks["role"] = "primary"
        if self.upstream is not None:
            checks["upstream"] = self.upstream.detail()
        return ok, checks


class PipelineCollector(Collector):
    """Reads the components' counters at scrape time."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def describe(self) -> Iterable[Metric]:
        return []  # collected fresh on each scrape; names may appear later

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("ingestd_build", "ingestd version")
        info.add_metric([], {"version": __version__})
        yield info
        h = self.health
        yield _gauge("ingestd_up", "1 while the event loop is turning", 1 if h.live() else 0)
        ready, _ = h.readiness()
        yield _gauge("ingestd_ready", "1 when /readyz would answer 200", 1 if ready else 0)
        yield _counter("ingestd_reloads", "Configuration reloads applied", h.reloads)
        yield _counter(
            "ingestd_reload_failures",
            "Configuration reloads rejected (invalid file)",
            h.reload_failures,
        )
        ps = h.running()
        if not ps:
            # Before the store is open: the panels show "not available", not "No data".
            yield _gauge("ingestd_store_available", "0 while the store refuses writes", 0)
            yield _gauge("ingestd_broker_connected", "1 while connected to the broker", 0)
            return
        t = h.fresh_tally()
        a = t.accounting
        yield _gauge(
            "ingestd_primary",
            "1 while this member holds its shared group's primary role (it reads the "
            "routes only one reader can follow)",
            1 if h.primary is not None else 0,
        )
        yield _counter(
            "ingestd_primary_terms",
            "Terms as the primary role this process held and ended",
            h.primary_terms,
        )
        yield _counter("ingestd_messages_received", "MQTT messages received", a.messages_received)
        yield _counter(
            "ingestd_oversized_packets_skipped",
            "PUBLISH packets over the maximum packet size (input.max_payload_bytes plus "
            "headroom) read past without being buffered, each quarantined as too_large",
            t.oversized_skipped,
        )
        yield _gauge(
            "ingestd_max_packet_size_bytes",
            "The largest packet taken from the broker (MQTT 5: sent as Maximum Packet "
            "Size, and the broker drops bigger messages, counted only in its log)",
            max(p.source.max_packet_size for p in ps),
        )
        yield _counter(
            "ingestd_readings_decoded",
            "Readings decoded from received payloads (what explain lists)",
            a.decoded,
        )
        yield _counter("ingestd_readings_committed", "Readings committed to the store", a.committed)
        yield _counter(
            "ingestd_readings_duplicate",
            "Redelivered readings: already stored with the same value, not written again",
            a.duplicate,
        )
        yield _counter(
            "ingestd_readings_quarantined",
            "Readings quarantined one by one: limits, clock, conflicts",
            a.quarantined,
        )
        yield _counter(
            "ingestd_readings_retained_untimed",
            "Readings of a retained message without a device time, not stored",
            a.retained_untimed,
        )
        yield _counter(
            "ingestd_readings_handed_over",
            "Readings read while this member was the primary and not committed when "
            "it lost the role (unacknowledged: redelivered to the next primary)",
            a.handed_over,
        )
        yield _gauge(
            "ingestd_readings_in_flight",
            "Readings decoded and not yet committed or quarantined",
            a.in_flight,
        )
        yield _gauge(
            "ingestd_readings_unexplained",
            "decoded - (committed + duplicate + quarantined + rate limited + "
            "retained untimed + handed over + in flight): always 0, else a bug",
            a.unexplained,
        )
        yield _counter(
            "ingestd_retained_ignored",
            "Retained messages re-sent by the broker on subscribe, not stored "
            '(routes with retained = "ignore")',
            a.retained_ignored,
        )
        q = CounterMetricFamily(
            "ingestd_quarantined",
            "Rejected payloads and readings stored in quarantine, by reason",
            labels=["reason"],
        )
        by_kind = t.quarantined
        for kind in sorted({*REJECT_KINDS, *by_kind}):
            q.add_metric([kind], by_kind.get(kind, 0))
        yield q
        limited = CounterMetricFamily(
            "ingestd_readings_rate_limited",
            "Readings over a route's per-device rate limit",
            labels=["policy"],
        )
        limited.add_metric(["drop"], a.rate_dropped)
        limited.add_metric(["quarantine"], a.rate_quarantined)
        yield limited
        yield _counter("ingestd_batches_committed", "Store transactions committed", t.batches)
        yield _gauge(
            "ingestd_last_commit_timestamp_seconds",
            "Wall-clock time of the last commit (0: none yet)",
            t.last_commit_at,
        )
        depth = GaugeMetricFamily(
            "ingestd_bus_queue_depth",
            "Events waiting, per subscriber",
            labels=["subscriber", "policy"],
        )
        cap = GaugeMetricFamily(
            "ingestd_bus_queue_capacity",
            "Queue bound, per subscriber",
            labels=["subscriber", "policy"],
        )
        dropped = CounterMetricFamily(
            "ingestd_bus_dropped", "Events dropped by a full observer queue", labels=["subscriber"]
        )
        delivered = CounterMetricFamily(
            "ingestd_bus_delivered", "Events delivered", labels=["subscriber"]
        )
        for p in ps:
            prefix = "" if p.role == "member" else f"{p.role} "
            for sub in p.bus.subscriptions:
                depth.add_metric([prefix + sub.name, sub.policy], sub.depth)
                cap.add_metric([prefix + sub.name, sub.policy], sub.queue.maxsize)
        for name in sorted(t.delivered):
            dropped.add_metric([name], t.dropped[name])
            delivered.add_metric([name], t.delivered[name])
        yield from (depth, cap, dropped, delivered)
        yield _gauge(
            "ingestd_inflight_messages",
            "Messages received and not yet committed and acknowledged",
            sum(p.window.in_flight for p in ps),
        )
        yield _gauge(
            "ingestd_inflight_unacked_messages",
            "QoS 1/2 messages not yet acknowledged to the broker",
            sum(p.window.unacked for p in ps),
        )
        yield _gauge(
            "ingestd_inflight_limit",
            "The in-flight window (mqtt.max_inflight; one per pipeline)",
            sum(p.window.limit for p in ps),
        )
        yield _counter(
            "ingestd_inflight_pauses",
            "Times reading from the broker paused on a full window",
            t.pauses,
        )
        yield _gauge(
            "ingestd_broker_connected",
            "1 while connected to the broker (each connection: the member's, and the "
            "primary role's while held)",
            1 if all(p.source.connected for p in ps) else 0,
        )
        yield _counter("ingestd_broker_reconnects", "Connections after the first", t.reconnects)
        yield _gauge(
            "ingestd_store_available",
            "0 while the store refuses writes",
            1 if all(p.writer.store_available for p in ps) else 0,
        )
        up = h.upstream
        if up is not None:
            u = up.state
            if u.broker_dropped is not None:
                yield _gauge(
                    "ingestd_broker_dropped_messages",
                    "The broker's own count of messages it dropped, all clients "
                    "($SYS/broker/publish/messages/dropped)",
                    u.broker_dropped,
                )
            yield _counter(
                "ingestd_broker_drops_seen",
                "Increase of the broker's drop count while ingestd watched",
                u.drops_seen,
            )
            yield _gauge(
                "ingestd_routes_silent",
                "Routes with expect_within that hear nothing",
                len(u.silent_routes),
            )
            yield _gauge(
                "ingestd_sensors_stale",
                "Sensors silent longer than their route's expect_within",
                u.stale_sensors,
            )
            silent = GaugeMetricFamily(
                "ingestd_route_silent",
                "1 while a route with expect_within hears nothing",
                labels=["route"],
            )
            quiet = set(u.silent_routes)
            for r in up.settings.routes:
                if r.expect_within:
                    silent.add_metric([r.topic], 1 if r.topic in quiet else 0)
            yield silent
        yield _counter(
            "ingestd_sequence_gaps",
            "Jumps in devices' message counters (messages lost upstream), in messages committed",
            t.sequence_gaps,
        )
        yield _counter(
            "ingestd_sequence_missing",
            "Messages missing in those jumps (an estimate of what was lost)",
            t.sequence_missing,
        )
        yield _counter(
            "ingestd_sparkplug_rebirth_requests",
            "Rebirths asked of Sparkplug edge nodes (a sequence gap, DATA before "
            "its BIRTH, an undeclared alias)",
            t.rebirth_requests,
        )
        yield _counter(
            "ingestd_sparkplug_rebirths_suppressed",
            "Rebirths not asked because more were due than sparkplug's "
            "rebirth_max_per_second allows in all (asked again as the data goes on)",
            t.rebirths_suppressed,
        )
        yield _counter(
            "ingestd_device_log_lines_suppressed",
            "Per-device info lines (state changes, rebirths) over the shared budget "
            "of 20 a minute: counted here, not written",
            t.log_lines_suppressed,
        )
        skipped = CounterMetricFamily(
            "ingestd_values_skipped",
            "Values a format read and did not store (not numbers: strings, "
            "datasets, ...; Sparkplug transient or null values), by kind",
            labels=["kind"],
        )
        for kind, n in sorted(t.skipped.items()):
            skipped.add_metric([kind], n)
        yield skipped
        errors = CounterMetricFamily(
            "ingestd_store_errors",
            "Failed commit attempts (retried), by condition",
            labels=["condition"],
        )
        counts = t.store_errors
        for condition in sorted({*CONDITIONS, *counts}):
            errors.add_metric([condition], counts.get(condition, 0))
        yield errors


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, health: Health) -> None:
        self.health = health
        self.registry = CollectorRegistry()
        self.registry.register(PipelineCollector(health))
        self.batch_size = Histogram(
            "ingestd_batch_rows",
            "Rows (readings and quarantined) per committed batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000),
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "ingestd_commit_duration_seconds",
            "Time to commit one batch, retries included",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

    def observe_commit(self, event: BatchCommitted) -> None:
        self.batch_size.observe(event.size)
        self.commit_seconds.observe(event.seconds)
