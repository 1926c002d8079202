"""Operating the daemon: metrics and health over real HTTP, the systemd
watchdog over a real notify socket, and SIGHUP reloads."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.brokers import Mosquitto
from tests.support.config import REPO, write_config
from tests.support.daemon import DaemonFactory
from tests.support.db import DbReader, hold_exclusive_lock
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.waiting import wait_for

T0 = 1_700_000_000.0


def _telemetry(sensor: str, n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [
        (
            f"sensors/{sensor}/telemetry",
            json.dumps({"ts": T0 + i, "temperature": 20.5, "humidity": 40}).encode(),
        )
        for i in range(start, start + n)
    ]


def test_metrics_and_health_endpoints_follow_the_pipeline(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    config = write_config(tmp_path / "ingestd.toml")
    config.write_text(config.read_text() + "\n[processor.limits]\ntemperature = { max = 100 }\n")
    daemon = daemons(mosquitto.port, config=config).start()
    daemon.wait_ready()
    base = daemon.metrics_url()
    assert http_get(base + "/healthz")[0] == 200
    status, body = http_get(base + "/readyz")
    assert status == 200, body
    assert json.loads(body) == {
        "ready": True,
        "event_loop": True,
        "broker": True,
        "store": True,
        "pipeline": True,
        "upstream": {"broker_drops_seen": 0, "silent_routes": [], "stale_sensors": 0},
    }
    _, text = http_get(base + "/metrics")
    assert metric_value(text, "ingestd_readings_committed_total") == 0
    assert metric_value(text, "ingestd_broker_connected") == 1

    publish(mosquitto.port, _telemetry("a", 500))
    publish(
        mosquitto.port,
        [
            ("sensors/a/telemetry", b"{not json"),
            ("sensors/a/telemetry", b'{"temperature": 500}'),
        ],
    )
    db = DbReader(tmp_path / "ingestd.db")
    wait_for(lambda: db.count("quarantine") == 2, 20, what="2 quarantined")
    # The counters move just after the commit the database shows.
    wait_for(
        lambda: metric_value(http_get(base + "/metrics")[1], "ingestd_inflight_messages") == 0,
        10,
        what="all settled",
    )

    _, text = http_get(base + "/metrics")
    assert metric_value(text, "ingestd_messages_received_total") == 502
    assert metric_value(text, "ingestd_readings_committed_total") == 1000
    assert metric_value(text, "ingestd_quarantined_total", 'reason="decode"') == 1
    assert metric_value(text, "ingestd_quarantined_total", 'reason="out_of_range"') == 1
    assert metric_value(text, "ingestd_quarantined_total", 'reason="no_route"') == 0
    assert metric_value(text, "ingestd_batches_committed_total") >= 1
    assert metric_value(text, "ingestd_batch_rows_count") == metric_value(
        text, "ingestd_batches_committed_total"
    )
    assert metric_value(text, "ingestd_batch_rows_sum") == 1002
    assert metric_value(text, "ingestd_commit_duration_seconds_count") >= 1
    assert metric_value(text, "ingestd_bus_queue_depth", 'policy="block",subscriber="writer"') == 0
    assert metric_value(text, "ingestd_bus_dropped_total", 'subscriber="logger"') == 0
    assert metric_value(text, "ingestd_inflight_messages") == 0
    assert metric_value(text, "ingestd_last_commit_timestamp_seconds") > T0
    assert metric_value(text, "ingestd_store_available") == 1
    assert http_get(base + "/nope")[0] == 404
    # Every series the shipped Grafana dashboard plots is served.
    dashboard = (REPO / "config" / "grafana" / "ingestd-dashboard.json").read_text()
    served = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line.startswith("ingestd_")
    }
    plotted = set(re.findall(r"ingestd_[a-z_]+", dashboard)) - {"ingestd_overview"}
    assert plotted, "no metrics found in the dashboard"
    assert plotted <= served, plotted - served

    # The broker goes away: not ready (a load balancer stops sending), still alive.
    mosquitto.stop()
    wait_for(lambda: http_get(base + "/readyz")[0] == 503, 20, what="/readyz to fail")
    status, body = http_get(base + "/readyz")
    assert json.loads(body)["broker"] is False
    assert http_get(base + "/healthz")[0] == 200
    mosquitto.start()
    wait_for(lambda: http_get(base + "/readyz")[0] == 200, 30, what="/readyz to recover")
    _, text = http_get(base + "/metrics")
    assert metric_value(text, "ingestd_broker_reconnects_total") >= 1
    assert daemon.stop() == 0


def test_watchdog_pings_only_while_the_pipeline_makes_progress(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    config = write_config(tmp_path / "ingestd.toml")
    daemon = daemons(
        mosquitto.port,
        config=config,
        WATCHDOG_USEC="1000000",
        INGESTD_DAEMON__STALL_TIMEOUT="2",
        INGESTD_STORE__BUSY_TIMEOUT_MS="600000",
    ).start()
    db_path = tmp_path / "ingestd.db"
    daemon.wait_ready()
    wait_for(lambda: daemon.notices.count("WATCHDOG=1") >= 3, 10, what="watchdog pings")

    # Another process takes the database's lock and keeps it; with a busy
    # timeout of 10 minutes the writer's next transaction hangs inside SQLite.
    locker = hold_exclusive_lock(db_path, 9)
    publish(mosquitto.port, _telemetry("w", 50))
    wedged_at = time.monotonic()
    base = daemon.metrics_url()
    wait_for(lambda: http_get(base + "/readyz")[0] == 503, 10, what="/readyz to fail")
    assert "a store call has not returned" in json.loads(http_get(base + "/readyz")[1])["detail"]
    # Within stall_timeout (2 s) plus a ping interval the pings stop...
    time.sleep(3.5)
    quiet_from = time.monotonic()
    time.sleep(3)
    pings = [t for t, n in daemon.timed_notices if n == "WATCHDOG=1"]
    assert not [t for t in pings if t >= quiet_from], "pinged while wedged"
    assert [t for t in pings if t < wedged_at], "never pinged while healthy"
    assert "pipeline stalled; withholding the systemd watchdog ping" in daemon.logs()

    # ...and (had systemd not restarted us) resume once the lock is gone.
    locker.join(15)
    db = DbReader(db_path)
    wait_for(lambda: db.count() == 100, 20, what="the held readings")
    resumed = time.monotonic()
    wait_for(
        lambda: any(t > resumed for t, n in daemon.timed_notices if n == "WATCHDOG=1"),
        5,
        what="pings to resume",
    )
    assert daemon.stop() == 0
    assert "STOPPING=1" in daemon.notices


ROUTE_A = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"
qos = 1
"""
ROUTE_B = """
[[routes]]
topic = "plant/{sensor}/state"
format = "json"
qos = 1
"""


def test_sighup_reload_adds_a_route_rejects_a_bad_file_and_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    config = write_config(tmp_path / "ingestd.toml", routes=ROUTE_A)
    daemon = daemons(mosquitto.port, config=config).start()
    db = DbReader(tmp_path / "ingestd.db")
    daemon.wait_ready()
    base = daemon.metrics_url()

    # A steady stream across every reload below.
    total = 6000
    streamer = threading.Thread(
        target=lambda: publish(mosquitto.port, _slow(_telemetry("steady", total))), daemon=True
    )
    streamer.start()

    # 1. A new route, applied live: its messages now become readings.
    write_config(config, routes=ROUTE_A + ROUTE_B, batch={"max_readings": 1000})
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: '"subscriptions updated"' in daemon.logs(), 20, what="resubscribe")
    publish(
        mosquitto.port,
        [("plant/p1/state", json.dumps({"ts": T0 + i, "level": i}).encode()) for i in range(100)],
    )
    wait_for(
        lambda: db.count("readings WHERE sensor = 'p1'") == 100,
        20,
        what="readings from the new route",
    )

    # 2. An invalid file: rejected with its error, the running config kept.
    config.write_text(config.read_text() + "\n[batch]\nmax_readings = -5\n")
    daemon.signal(signal.SIGHUP)
    wait_for(
        lambda: '"reload rejected; the running configuration is kept"' in daemon.logs(),
        20,
        what="the rejection",
    )
    assert "batch" in daemon.logs()
    publish(mosquitto.port, [("plant/p2/state", b'{"ts": 1700000000, "level": 7}')])
    wait_for(lambda: db.count("readings WHERE sensor = 'p2'") == 1, 20, what="ingestion to go on")

    # 3. A setting that needs a restart is named, not applied.
    write_config(config, routes=ROUTE_A + ROUTE_B, mqtt={"keepalive": 45})
    daemon.signal(signal.SIGHUP)
    wait_for(
        lambda: '"changed settings need a restart to apply"' in daemon.logs(),
        20,
        what="the restart notice",
    )
    assert "mqtt.keepalive" in daemon.logs()

    streamer.join(120)
    wait_for(
        lambda: db.count("readings WHERE sensor = 'steady'") == 2 * total,
        30,
        what="the steady stream",
    )
    _, text = http_get(base + "/metrics")
    assert metric_value(text, "ingestd_reloads_total") == 2
    assert metric_value(text, "ingestd_reload_failures_total") == 1
    assert daemon.stop() == 0
    # Nothing lost or stored twice across three reloads.
    assert db.count("readings WHERE sensor = 'steady'") == 2 * total
    assert (
        db.rows("SELECT count(*) FROM (SELECT DISTINCT sensor, metric, ts FROM readings)")[0][0]
        == db.count()
    )
    assert db.count("quarantine") == 0
    assert daemon.notices.count("RELOADING=1") == 3


def _slow(messages: list[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
    """Yield messages at about 1,000/s, so the stream spans the reloads."""
    for i, m in enumerate(messages):
        if i % 100 == 0:
            time.sleep(0.1)
        yield m
