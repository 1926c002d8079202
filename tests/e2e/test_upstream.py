"""Loss that ingestd cannot prevent, made visible: a stock broker dropping a
burst, gaps in devices' message counters, and silent routes and sensors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import (
    REPO,
    BrokerFactory,
    DaemonFactory,
    DbReader,
    Mosquitto,
    hold_exclusive_lock,
    http_get,
    metric_value,
    publish,
    wait_for,
)


def _sensors(tmp_path: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ingestd",
            "sensors",
            "--db",
            str(tmp_path / "ingestd.db"),
            "-f",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return list(json.loads(out.stdout))


def test_a_stock_broker_dropping_a_burst_is_reported(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory
) -> None:
    # Mosquitto's defaults: 20 in flight, 1000 queued; it publishes $SYS every second here.
    broker = brokers(tmp_path / "broker", max_inflight=20)
    broker.conf.write_text(
        broker.conf.read_text().replace("max_queued_messages 0\n", "") + "sys_interval 1\n"
    )
    broker.start()
    db = DbReader(tmp_path / "ingestd.db")
    daemon = daemons(broker.port).start()
    daemon.wait_ready()
    base = daemon.metrics_url()
    lock = hold_exclusive_lock(tmp_path / "ingestd.db", 3.0)  # ingestd falls behind
    publish(
        broker.port,
        [
            (f"sensors/s{i % 10}/telemetry", b'{"ts": %d, "x": %d}' % (1_700_000_000 + i, i))
            for i in range(5000)
        ],
    )
    lock.join()
    wait_for(
        lambda: "the broker is dropping messages" in daemon.logs(),
        15,
        what="the drop reported in the log",
    )
    text = http_get(base + "/metrics")[1]
    ready = json.loads(http_get(base + "/readyz")[1])
    # What the broker did not drop, ingestd stored: the loss is all upstream.
    dropped = int(metric_value(text, "ingestd_broker_drops_seen_total"))
    wait_for(lambda: db.count() == 5000 - dropped, 20, what="the rest stored")
    stored = db.count()
    assert daemon.stop() == 0
    daemon.kill()
    broker.kill()
    seen = metric_value(text, "ingestd_broker_drops_seen_total")
    assert seen > 0
    assert metric_value(text, "ingestd_broker_dropped_messages") >= seen
    assert ready["upstream"]["broker_drops_seen"] > 0
    line = next(
        json.loads(x) for x in daemon.logs().splitlines() if "the broker is dropping messages" in x
    )
    assert "config/mosquitto.conf" in line["msg"]
    assert "Outgoing messages are being dropped" in broker.log.read_text()
    print(
        f"\nstock Mosquitto, 5000-message burst: stored {stored}, broker dropped "
        f"{int(seen)}; log: {line['msg'][:60]}..."
    )


SEQ_ROUTE = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"
sequence_field = "seq"
"""


def _seq(sensor: str, numbers: list[int]) -> list[tuple[str, bytes]]:
    return [
        (f"sensors/{sensor}/telemetry", b'{"ts": %d, "seq": %d, "t": 1}' % (1_700_000_000 + n, n))
        for n in numbers
    ]


def test_gaps_in_a_device_counter_are_counted_exactly_across_a_restart(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    db = DbReader(tmp_path / "ingestd.db")
    sent = [n for n in range(100) if n not in (10, 11, 12, 50)]  # gaps: 2, missing: 4
    daemon = daemons(mosquitto.port, SEQ_ROUTE).start()
    daemon.wait_ready()
    base = daemon.metrics_url()
    publish(mosquitto.port, _seq("dev", sent) + _seq("ok", list(range(50))))
    wait_for(lambda: db.count() == len(sent) + 50, 10, what="all readings")
    text = http_get(base + "/metrics")[1]
    assert daemon.stop() == 0
    daemon.kill()
    assert (
        metric_value(text, "ingestd_sequence_gaps_total"),
        metric_value(text, "ingestd_sequence_missing_total"),
    ) == (2, 4)
    # The seq field is the counter, not a reading.
    assert db.rows("SELECT DISTINCT metric FROM readings") == [("t",)]
    # Across a restart of ingestd: 100..104 never arrive.
    daemon = daemons(mosquitto.port, SEQ_ROUTE).start()
    daemon.wait_ready()
    publish(mosquitto.port, _seq("dev", [105, 106]))
    wait_for(lambda: db.count() == len(sent) + 52, 10, what="two more")
    assert daemon.stop() == 0
    daemon.kill()
    by_sensor = {r["sensor"]: (r["seq_gaps"], r["seq_missing"]) for r in _sensors(tmp_path)}
    assert by_sensor == {"dev": (3, 9), "ok": (0, 0)}


SILENT_ROUTES = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"
expect_within = 2
[[routes]]
topic = "typo/{sensor}/telemtry"
format = "json"
expect_within = 2
"""


def test_silent_routes_and_stale_sensors_are_reported(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    db = DbReader(tmp_path / "ingestd.db")
    daemon = daemons(mosquitto.port, SILENT_ROUTES).start()
    daemon.wait_ready()
    base = daemon.metrics_url()
    publish(
        mosquitto.port,
        [("sensors/a/telemetry", b'{"t": 1}'), ("sensors/b/telemetry", b'{"t": 1}')],
    )
    wait_for(lambda: db.count() == 2, 10, what="two readings")
    wait_for(lambda: "route silent" in daemon.logs(), 10, what="the silent route")
    # a keeps talking; b stops: after 2 s b is stale, a is not.
    deadline = time.monotonic() + 10
    while "sensors stale" not in daemon.logs() and time.monotonic() < deadline:
        publish(mosquitto.port, [("sensors/a/telemetry", b'{"t": 1}')])
        time.sleep(0.5)
    publish(mosquitto.port, [("sensors/a/telemetry", b'{"t": 1}')])
    time.sleep(0.5)  # committed (batch.max_delay_ms 200)
    flags = {r["sensor"]: r["stale"] for r in _sensors(tmp_path)}
    text = http_get(base + "/metrics")[1]
    ready = json.loads(http_get(base + "/readyz")[1])
    assert daemon.stop() == 0
    daemon.kill()
    assert metric_value(text, "ingestd_route_silent", 'route="typo/{sensor}/telemtry"') == 1
    assert metric_value(text, "ingestd_route_silent", 'route="sensors/{sensor}/telemetry"') == 0
    assert metric_value(text, "ingestd_sensors_stale") == 1
    assert ready["upstream"]["silent_routes"] == ["typo/{sensor}/telemtry"]
    stale = next(json.loads(x) for x in daemon.logs().splitlines() if "sensors stale" in x)
    assert stale["sensors"] == ["b"]
    assert flags == {"a": "no", "b": "yes"}


def test_the_shipped_broker_settings_load_next_to_debians_config(
    tmp_path: Path, brokers: BrokerFactory
) -> None:
    # Installed as README says (conf.d/ingestd.conf) beside a main config that
    # sets persistence, as Debian's does: Mosquitto must start.
    confd = tmp_path / "conf.d"
    confd.mkdir()
    (confd / "ingestd.conf").write_text((REPO / "config" / "mosquitto.conf").read_text())
    broker = brokers(tmp_path / "broker", extra=f"include_dir {confd}\n")
    broker.start()
    broker.kill()
    assert "Error" not in broker.log.read_text()
