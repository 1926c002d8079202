"""Loss that ingestd cannot prevent, made visible: a stock broker dropping a
burst, gaps in devices' message counters, and silent routes and sensors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.brokers import BrokerFactory, Mosquitto
from tests.support.config import REPO
from tests.support.daemon import DaemonFactory
from tests.support.db import DbReader, hold_exclusive_lock
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.waiting import wait_for


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
    # What the broker did not drop, ingestd stored: the loss is all upstream.
    _wait_stored_plus_dropped(db, base, 5000)
    text = http_get(base + "/metrics")[1]
    ready = json.loads(http_get(base + "/readyz")[1])
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
    # Said at start, before any loss: the window is the stock one.
    assert "in-flight window in use is Mosquitto's stock 20" in daemon.logs()
    print(
        f"\nstock Mosquitto, 5000-message burst: stored {stored}, broker dropped "
        f"{int(seen)}; log: {line['msg'][:60]}..."
    )


def _retained_sys(port: int) -> set[str]:
    """The $SYS topics a new subscriber gets a retained value for."""
    got: set[str] = set()
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda _c, _u, m: got.add(m.topic) if m.retain else None
    client.connect("127.0.0.1", port)
    client.subscribe([("$SYS/broker/publish/messages/dropped", 0), ("$SYS/broker/uptime", 0)])
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        client.loop(0.1)
    client.disconnect()
    return got


def _stock_broker(tmp_path: Path, brokers: BrokerFactory) -> Mosquitto:
    """Mosquitto's defaults for what matters here: 20 in flight, 1000 queued,
    $SYS every 10 s (only a private port, persistence and user are set)."""
    broker = brokers(tmp_path / "broker", max_inflight=20)
    broker.conf.write_text(broker.conf.read_text().replace("max_queued_messages 0\n", ""))
    return broker


def _burst_while_behind(port: int, db_path: Path) -> None:
    lock = hold_exclusive_lock(db_path, 3.0)  # ingestd falls behind
    publish(
        port,
        [
            (f"sensors/s{i % 10}/telemetry", b'{"ts": %d, "x": %d}' % (1_700_000_000 + i, i))
            for i in range(5000)
        ],
    )
    lock.join()


def _wait_stored_plus_dropped(db: DbReader, base: str, sent: int) -> None:
    """Wait until every message sent is stored or counted as dropped. The count
    is read afresh each time: the broker publishes it every $SYS interval, so
    the first value heard can be from mid-burst, before the last drops."""

    def drops() -> int:
        return int(metric_value(http_get(base + "/metrics")[1], "ingestd_broker_drops_seen_total"))

    wait_for(lambda: db.count() + drops() == sent, 30, interval=0.2, what="stored + dropped = sent")


@pytest.mark.slow  # 60 s for the broker's retained count to expire
def test_drops_are_counted_on_a_broker_idle_past_its_retained_count(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory
) -> None:
    # Mosquitto 2.x publishes its drop count retained with a 60 s expiry, and
    # only when it changes: after a minute idle a new subscriber gets none,
    # so the first value it hears must count from 0, not be the baseline.
    broker = _stock_broker(tmp_path, brokers).start()
    time.sleep(62)
    retained = _retained_sys(broker.port)
    assert retained == {"$SYS/broker/uptime"}, retained  # the precondition: none to start from
    db = DbReader(tmp_path / "ingestd.db")
    daemon = daemons(broker.port).start()
    daemon.wait_ready()
    base = daemon.metrics_url()
    _burst_while_behind(broker.port, tmp_path / "ingestd.db")
    wait_for(
        lambda: "the broker is dropping messages" in daemon.logs(),
        30,
        what="the drop reported in the log",
    )
    _wait_stored_plus_dropped(db, base, 5000)
    text = http_get(base + "/metrics")[1]
    ready = json.loads(http_get(base + "/readyz")[1])
    seen = int(metric_value(text, "ingestd_broker_drops_seen_total"))
    assert daemon.stop() == 0
    daemon.kill()
    broker.kill()
    # Every message lost was seen as lost: the broker had dropped nothing before.
    assert seen > 0
    assert metric_value(text, "ingestd_broker_dropped_messages") == seen
    assert ready["upstream"]["broker_drops_seen"] == seen
    assert "before ingestd watched" not in daemon.logs()
    print(f"\nstock Mosquitto idle 62 s, 5000-message burst: dropped and seen {seen}")


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
