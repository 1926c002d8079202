"""The metric names /metrics exposes are a public interface (dashboards,
alerts, the README): this snapshot fails on any name, type or label added,
renamed or dropped. Change the lists here only together with the README and
`config/`'s dashboard, and say so in the changelog."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from ingestd.observe.health import Health
from ingestd.observe.metrics import Metrics
from tests.support.brokers import Mosquitto
from tests.support.harness import InProcess, settings_for, until
from tests.support.mqtt import publish

# name, type, label names (those of its samples; "le": a histogram's buckets).
RUNNING = [
    "ingestd_batch_rows histogram le",
    "ingestd_batches_committed counter",
    "ingestd_broker_connected gauge",
    "ingestd_broker_dropped_messages gauge",
    "ingestd_broker_drops_seen counter",
    "ingestd_broker_reconnects counter",
    "ingestd_build info version",
    "ingestd_bus_delivered counter subscriber",
    "ingestd_bus_dropped counter subscriber",
    "ingestd_bus_queue_capacity gauge policy,subscriber",
    "ingestd_bus_queue_depth gauge policy,subscriber",
    "ingestd_commit_duration_seconds histogram le",
    "ingestd_device_log_lines_suppressed counter",
    "ingestd_inflight_limit gauge",
    "ingestd_inflight_messages gauge",
    "ingestd_inflight_pauses counter",
    "ingestd_inflight_unacked_messages gauge",
    "ingestd_last_commit_timestamp_seconds gauge",
    "ingestd_max_packet_size_bytes gauge",
    "ingestd_messages_received counter",
    "ingestd_oversized_packets_skipped counter",
    "ingestd_primary gauge",
    "ingestd_primary_terms counter",
    "ingestd_processor_key_unmatched gauge",  # label key: once a key is reported
    "ingestd_quarantined counter reason",
    "ingestd_readings_committed counter",
    "ingestd_readings_decoded counter",
    "ingestd_readings_duplicate counter",
    "ingestd_readings_handed_over counter",
    "ingestd_readings_in_flight gauge",
    "ingestd_readings_quarantined counter",
    "ingestd_readings_rate_limited counter policy",
    "ingestd_readings_recovered counter",
    "ingestd_readings_retained_untimed counter",
    "ingestd_readings_spooled gauge",
    "ingestd_readings_unexplained gauge",
    "ingestd_ready gauge",
    "ingestd_reload_failures counter",
    "ingestd_reloads counter",
    "ingestd_retained_ignored counter",
    "ingestd_rollups_close_failures counter",
    "ingestd_rollups_closed_readings counter",
    "ingestd_rollups_pending_readings gauge",
    "ingestd_route_silent gauge route",
    "ingestd_routes_silent gauge",
    "ingestd_sensors_stale gauge",
    "ingestd_sequence_gaps counter",
    "ingestd_sequence_missing counter",
    "ingestd_sparkplug_rebirth_requests counter",
    "ingestd_sparkplug_rebirths_suppressed counter",
    "ingestd_spool_batches counter",
    "ingestd_spool_bytes gauge",
    "ingestd_spool_forwarded_readings counter",
    "ingestd_spool_full gauge",
    "ingestd_spool_oldest_age_seconds gauge",
    "ingestd_spool_readings gauge",
    "ingestd_store_available gauge",
    "ingestd_store_corrupt_files counter",
    "ingestd_store_errors counter condition",
    "ingestd_up gauge",
    "ingestd_values_skipped counter",  # label kind: once a Sparkplug value is skipped
]

# Before the store is open (no pipeline yet): what the panels can show then.
STARTING = [
    "ingestd_batch_rows histogram le",
    "ingestd_broker_connected gauge",
    "ingestd_build info version",
    "ingestd_commit_duration_seconds histogram le",
    "ingestd_ready gauge",
    "ingestd_reload_failures counter",
    "ingestd_reloads counter",
    "ingestd_store_available gauge",
    "ingestd_up gauge",
]

# prometheus_client's own collectors, in every state: python_* everywhere,
# process_* where /proc is (Linux only).
RUNTIME = [
    "python_gc_collections counter generation",
    "python_gc_objects_collected counter generation",
    "python_gc_objects_uncollectable counter generation",
    "python_info gauge implementation,major,minor,patchlevel,version",
]
if sys.platform == "linux":
    RUNTIME += [
        "process_cpu_seconds counter",
        "process_max_fds gauge",
        "process_open_fds gauge",
        "process_resident_memory_bytes gauge",
        "process_start_time_seconds gauge",
        "process_virtual_memory_bytes gauge",
    ]

ROUTES = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"
qos = 1
expect_within = 60

[[routes]]
topic = "sensors/{sensor}/{metric}"
format = "value"
"""


def exposed(registry: CollectorRegistry) -> list[str]:
    out = []
    for family in registry.collect():
        labels = sorted({k for s in family.samples for k in s.labels})
        out.append(f"{family.name} {family.type} {','.join(labels)}".rstrip())
    return sorted(out)


def test_names_before_the_store_is_open() -> None:
    assert exposed(Metrics(Health(30.0)).registry) == sorted(STARTING + RUNTIME)


async def test_names_of_a_running_pipeline(tmp_path: Path, mosquitto: Mosquitto) -> None:
    settings = settings_for(tmp_path, mosquitto.port, ROUTES)
    async with InProcess(settings) as daemon:
        await asyncio.to_thread(
            publish, mosquitto.port, [("sensors/s1/telemetry", b'{"t": 1.5}')], qos=1
        )
        health = daemon.daemon.health
        # Every family shows once a batch is committed and the broker's $SYS
        # drop count (retained) has arrived.
        await until(
            lambda: (
                health.accounting.committed == 1
                and daemon.daemon.upstream.state.broker_dropped is not None
            ),
            15,
            "a commit and the broker's drop count",
        )
        assert exposed(daemon.daemon.metrics.registry) == sorted(RUNNING + RUNTIME)
