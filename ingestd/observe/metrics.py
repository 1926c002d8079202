"""Prometheus metrics (served by `observe.endpoints`), read from `observe.health`.

Counters live where the work happens, as plain integers on the components
(the hot path pays nothing for them); a collector reads them at scrape time.
Only the two histograms (batch size, commit latency) are observed as events
happen, once per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from ingestd import __version__
from ingestd.events import REJECT_KINDS, BatchCommitted
from ingestd.observe.health import Health
from ingestd.store.base import CONDITIONS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric


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
