"""Prometheus metrics (served by `observe.endpoints`), read from `observe.health`.

Counters live where the work happens, as plain integers on the components
(the hot path pays nothing for them); a collector reads them at scrape time,
family by family from one table (`ALWAYS`, then `STARTING` before the store is
open or `RUNNING` once a pipeline runs): the exposed names are that table.
Only the two histograms (batch size, commit latency) are observed as events
happen, once per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import InfoMetricFamily
from prometheus_client.registry import Collector

from ingestd import __version__
from ingestd.events import REJECT_KINDS, BatchCommitted
from ingestd.observe.families import Definition, Samples, Scrape, counter, flag, gauge, watched
from ingestd.observe.health import Health
from ingestd.store.base import CONDITIONS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ingestd.bus import Subscription
    from ingestd.closing import Closer
    from ingestd.pipeline import Pipeline
    from ingestd.writer import BatchWriter


def _prefix(p: Pipeline) -> str:
    """A subscriber's name is the member's own, or prefixed by the role."""
    return "" if p.role == "member" else f"{p.role} "


def _quarantined(s: Scrape) -> Samples:
    by_kind = s.tally.quarantined
    return [([kind], by_kind.get(kind, 0)) for kind in sorted({*REJECT_KINDS, *by_kind})]


def _spooling(s: Scrape) -> list[BatchWriter]:
    """The writers with a spool (a member's, with a remote store)."""
    return [p.writer for p in s.pipelines if p.writer.spool is not None]


def _closers(s: Scrape) -> list[Closer]:
    return [p.closer for p in s.pipelines if p.closer is not None]


def _queues(read: Callable[[Subscription], int]) -> Callable[[Scrape], Samples]:
    return lambda s: [
        ([_prefix(p) + sub.name, sub.policy], read(sub))
        for p in s.pipelines
        for sub in p.bus.subscriptions
    ]


def _route_silent(s: Scrape) -> Samples:
    up = s.upstream
    quiet = set(up.state.silent_routes)
    return [([r.topic], flag(r.topic in quiet)) for r in up.settings.routes if r.expect_within]


def _unmatched(s: Scrape) -> list[str]:
    """Keys reported unmatched, and matched by no pipeline that has them (a
    shared group's member and primary each judge what they read)."""
    usages = [p.processor.rules.usage for p in s.pipelines]
    reported = sorted({k for u in usages for k in u.unmatched_reported})
    return [k for k in reported if all(k in u.unmatched for u in usages if k in u.keys)]


def _store_errors(s: Scrape) -> Samples:
    counts = s.tally.store_errors
    return [([c], counts.get(c, 0)) for c in sorted({*CONDITIONS, *counts})]


ALWAYS = (
    gauge("ingestd_up", "1 while the event loop is turning", lambda s: flag(s.health.live())),
    gauge(
        "ingestd_ready",
        "1 when /readyz would answer 200",
        lambda s: flag(s.health.readiness()[0]),
    ),
    counter("ingestd_reloads", "Configuration reloads applied", lambda s: s.health.reloads),
    counter(
        "ingestd_reload_failures",
        "Configuration reloads rejected (invalid file)",
        lambda s: s.health.reload_failures,
    ),
)

# Before the store is open: the panels show "not available", not "No data".
STARTING = (
    gauge("ingestd_store_available", "0 while the store refuses writes", lambda s: 0),
    gauge("ingestd_broker_connected", "1 while connected to the broker", lambda s: 0),
)

RUNNING = (
    gauge(
        "ingestd_primary",
        "1 while this member holds its shared group's primary role (it reads the "
        "routes only one reader can follow)",
        lambda s: flag(s.health.primary is not None),
    ),
    counter(
        "ingestd_primary_terms",
        "Terms as the primary role this process held and ended",
        lambda s: s.health.primary_terms,
    ),
    counter(
        "ingestd_messages_received",
        "MQTT messages received",
        lambda s: s.accounting.messages_received,
    ),
    counter(
        "ingestd_oversized_packets_skipped",
        "PUBLISH packets over the maximum packet size (input.max_payload_bytes plus "
        "headroom) read past without being buffered, each quarantined as too_large",
        lambda s: s.tally.oversized_skipped,
    ),
    gauge(
        "ingestd_max_packet_size_bytes",
        "The largest packet taken from the broker (MQTT 5: sent as Maximum Packet "
        "Size, and the broker drops bigger messages, counted only in its log)",
        lambda s: max(p.source.max_packet_size for p in s.pipelines),
    ),
    counter(
        "ingestd_readings_decoded",
        "Readings decoded from received payloads (what explain lists)",
        lambda s: s.accounting.decoded,
    ),
    counter(
        "ingestd_readings_committed",
        "Readings committed to the store",
        lambda s: s.accounting.committed,
    ),
    counter(
        "ingestd_readings_duplicate",
        "Redelivered readings: already stored with the same value, not written again",
        lambda s: s.accounting.duplicate,
    ),
    counter(
        "ingestd_readings_quarantined",
        "Readings quarantined one by one: limits, clock, conflicts",
        lambda s: s.accounting.quarantined,
    ),
    counter(
        "ingestd_readings_retained_untimed",
        "Readings of a retained message without a device time, not stored",
        lambda s: s.accounting.retained_untimed,
    ),
    counter(
        "ingestd_readings_handed_over",
        "Readings read while this member was the primary and not committed when "
        "it lost the role (unacknowledged: redelivered to the next primary)",
        lambda s: s.accounting.handed_over,
    ),
    gauge(
        "ingestd_readings_spooled",
        "Readings this run committed to the local spool (store.spool) and "
        "acknowledged, not yet forwarded to the store",
        lambda s: s.accounting.spooled,
    ),
    counter(
        "ingestd_readings_recovered",
        "Readings an earlier run left in the spool, forwarded by this one",
        lambda s: s.accounting.recovered,
    ),
    gauge(
        "ingestd_spool_readings",
        "Readings in the local spool now (this run's and an earlier one's)",
        lambda s: sum(w.spool.readings for w in _spooling(s) if w.spool),
    ),
    gauge(
        "ingestd_spool_bytes",
        "Bytes of batches in the local spool (bounded by store.spool.max_bytes)",
        lambda s: sum(w.spool.bytes for w in _spooling(s) if w.spool),
    ),
    gauge(
        "ingestd_spool_oldest_age_seconds",
        "Age of the oldest batch in the local spool (0: empty)",
        lambda s: max(
            (time.time() - t for w in _spooling(s) if w.spool and (t := w.spool.state().oldest)),
            default=0,
        ),
    ),
    counter(
        "ingestd_spool_batches",
        "Batches committed to the local spool instead of the store",
        lambda s: sum(w.spooled_batches for w in _spooling(s)),
    ),
    counter(
        "ingestd_spool_forwarded_readings",
        "Readings forwarded from the local spool to the store (rate: the drain rate)",
        lambda s: sum(w.forwarded for w in _spooling(s)),
    ),
    gauge(
        "ingestd_spool_full",
        "1 while the spool cannot take batches (full, or its disk refuses): "
        "batches are held unacknowledged",
        lambda s: flag(any(not w.spool_available for w in _spooling(s))),
    ),
    gauge(
        "ingestd_rollups_pending_readings",
        "Gauge readings this instance committed and has not yet closed into the "
        "rollups ([rollups] close_seconds; the views lag by them)",
        lambda s: sum(c.store.pending_readings for c in _closers(s)),
    ),
    counter(
        "ingestd_rollups_closed_readings",
        "Pending gauge readings closed into the rollups (by any instance's writes)",
        lambda s: sum(c.closed for c in _closers(s)),
    ),
    counter(
        "ingestd_rollups_close_failures",
        "Closes of pending rollup readings that failed (retried; logged once a run of them)",
        lambda s: sum(c.failures for c in _closers(s)),
    ),
    gauge(
        "ingestd_readings_in_flight",
        "Readings decoded and not yet committed or quarantined",
        lambda s: s.accounting.in_flight,
    ),
    gauge(
        "ingestd_readings_unexplained",
        "decoded - (committed + duplicate + quarantined + rate limited + "
        "retained untimed + handed over + spooled + in flight): always 0, else a bug",
        lambda s: s.accounting.unexplained,
    ),
    counter(
        "ingestd_retained_ignored",
        "Retained messages re-sent by the broker on subscribe, not stored "
        '(routes with retained = "ignore")',
        lambda s: s.accounting.retained_ignored,
    ),
    Definition(
        "ingestd_quarantined",
        "Rejected payloads and readings stored in quarantine, by reason",
        "counter",
        _quarantined,
        labels=("reason",),
    ),
    Definition(
        "ingestd_readings_rate_limited",
        "Readings over a route's per-device rate limit",
        "counter",
        lambda s: [
            (["drop"], s.accounting.rate_dropped),
            (["quarantine"], s.accounting.rate_quarantined),
        ],
        labels=("policy",),
    ),
    counter("ingestd_batches_committed", "Store transactions committed", lambda s: s.tally.batches),
    gauge(
        "ingestd_last_commit_timestamp_seconds",
        "Wall-clock time of the last commit (0: none yet)",
        lambda s: s.tally.last_commit_at,
    ),
    Definition(
        "ingestd_bus_queue_depth",
        "Events waiting, per subscriber",
        "gauge",
        _queues(lambda sub: sub.depth),
        labels=("subscriber", "policy"),
    ),
    Definition(
        "ingestd_bus_queue_capacity",
        "Queue bound, per subscriber",
        "gauge",
        _queues(lambda sub: sub.queue.maxsize),
        labels=("subscriber", "policy"),
    ),
    Definition(
        "ingestd_bus_dropped",
        "Events dropped by a full observer queue",
        "counter",
        lambda s: [([name], s.tally.dropped[name]) for name in sorted(s.tally.delivered)],
        labels=("subscriber",),
    ),
    Definition(
        "ingestd_bus_delivered",
        "Events delivered",
        "counter",
        lambda s: [([name], n) for name, n in sorted(s.tally.delivered.items())],
        labels=("subscriber",),
    ),
    gauge(
        "ingestd_inflight_messages",
        "Messages received and not yet committed and acknowledged",
        lambda s: sum(p.window.in_flight for p in s.pipelines),
    ),
    gauge(
        "ingestd_inflight_unacked_messages",
        "QoS 1/2 messages not yet acknowledged to the broker",
        lambda s: sum(p.window.unacked for p in s.pipelines),
    ),
    gauge(
        "ingestd_inflight_limit",
        "The in-flight window (mqtt.max_inflight; one per pipeline)",
        lambda s: sum(p.window.limit for p in s.pipelines),
    ),
    counter(
        "ingestd_inflight_pauses",
        "Times reading from the broker paused on a full window",
        lambda s: s.tally.pauses,
    ),
    gauge(
        "ingestd_broker_connected",
        "1 while connected to the broker (each connection: the member's, and the "
        "primary role's while held)",
        lambda s: flag(all(p.source.connected for p in s.pipelines)),
    ),
    counter(
        "ingestd_broker_reconnects", "Connections after the first", lambda s: s.tally.reconnects
    ),
    gauge(
        "ingestd_store_available",
        "0 while the store refuses writes",
        lambda s: flag(all(p.writer.store_available for p in s.pipelines)),
    ),
    gauge(
        "ingestd_broker_dropped_messages",
        "The broker's own count of messages it dropped, all clients "
        "($SYS/broker/publish/messages/dropped)",
        lambda s: s.upstream.state.broker_dropped or 0,
        shown=lambda s: watched(s) and s.upstream.state.broker_dropped is not None,
    ),
    counter(
        "ingestd_broker_drops_seen",
        "Increase of the broker's drop count while ingestd watched",
        lambda s: s.upstream.state.drops_seen,
        shown=watched,
    ),
    gauge(
        "ingestd_routes_silent",
        "Routes with expect_within that hear nothing",
        lambda s: len(s.upstream.state.silent_routes),
        shown=watched,
    ),
    gauge(
        "ingestd_sensors_stale",
        "Sensors silent longer than their route's expect_within",
        lambda s: s.upstream.state.stale_sensors,
        shown=watched,
    ),
    Definition(
        "ingestd_route_silent",
        "1 while a route with expect_within hears nothing",
        "gauge",
        _route_silent,
        labels=("route",),
        shown=watched,
    ),
    counter(
        "ingestd_sequence_gaps",
        "Jumps in devices' message counters (messages lost upstream), in messages committed",
        lambda s: s.tally.sequence_gaps,
    ),
    counter(
        "ingestd_sequence_missing",
        "Messages missing in those jumps (an estimate of what was lost)",
        lambda s: s.tally.sequence_missing,
    ),
    counter(
        "ingestd_sparkplug_rebirth_requests",
        "Rebirths asked of Sparkplug edge nodes (a sequence gap, DATA before "
        "its BIRTH, an undeclared alias)",
        lambda s: s.tally.rebirth_requests,
    ),
    counter(
        "ingestd_sparkplug_rebirths_suppressed",
        "Rebirths not asked because more were due than sparkplug's "
        "rebirth_max_per_second allows in all (asked again as the data goes on)",
        lambda s: s.tally.rebirths_suppressed,
    ),
    counter(
        "ingestd_device_log_lines_suppressed",
        "Per-device info lines (state changes, rebirths) over the shared budget "
        "of 20 a minute: counted here, not written",
        lambda s: s.tally.log_lines_suppressed,
    ),
    Definition(
        "ingestd_values_skipped",
        "Values a format read and did not store (not numbers: strings, "
        "datasets, ...; Sparkplug transient or null values), by kind",
        "counter",
        lambda s: [([kind], n) for kind, n in sorted(s.tally.skipped.items())],
        labels=("kind",),
    ),
    Definition(
        "ingestd_processor_key_unmatched",
        "1 for each limit or scaling key that matched no reading in the first "
        "processor.report_unmatched_after seconds of traffic (a typo?), while it matches none",
        "gauge",
        lambda s: [([key], 1) for key in _unmatched(s)],
        labels=("key",),
    ),
    Definition(
        "ingestd_store_errors",
        "Failed commit attempts (retried), by condition",
        "counter",
        _store_errors,
        labels=("condition",),
    ),
    counter(
        "ingestd_store_corrupt_files",
        "SQLite database files found corrupt (at start or while running), set aside "
        "as <name>.corrupt-<time> and replaced by a fresh database",
        lambda s: sum(p.writer.store.corrupt_files for p in s.pipelines),
    ),
)


class PipelineCollector(Collector):
    """Reads the components' counters at scrape time, as the tables say."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def describe(self) -> Iterable[Metric]:
        return []  # collected fresh on each scrape; names may appear later

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("ingestd_build", "ingestd version")
        info.add_metric([], {"version": __version__})
        yield info
        s = Scrape(self.health)
        for d in (*ALWAYS, *(RUNNING if s.pipelines else STARTING)):
            if d.shown(s):
                yield d.family(s)


class Metrics:
    def __init__(self, health: Health) -> None:
        self.health = health
        self.registry = CollectorRegistry()
        self.registry.register(PipelineCollector(health))
        # prometheus_client's own: process_* (CPU, memory, open files, start
        # time; Linux only, from /proc) and python_* (version, GC).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
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
