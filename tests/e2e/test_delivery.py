"""Delivery promises against a real broker, each tried the way it once broke.

QoS 2 across a kill -9, retained messages across restarts, readings that
share a time, a store outage longer than the keepalive, and a database file
removed under the running daemon.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.support.brokers import BrokerFactory, Mosquitto
from tests.support.daemon import DaemonFactory, DaemonProcess
from tests.support.db import DbReader, StoreUnderTest, hold_exclusive_lock
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.waiting import wait_for

T0 = 1_700_000_000


def _stopped(daemon: DaemonProcess) -> dict[str, object]:
    for line in reversed(daemon.logs().splitlines()):
        if '"msg": "stopped"' in line:
            return dict(json.loads(line))
    raise AssertionError(f"no 'stopped' line in the log:\n{daemon.logs()}")


def _telemetry(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [
        (f"sensors/s{i % 10}/telemetry", b'{"ts": %d, "x": %d}' % (T0 + i, i))
        for i in range(start, start + n)
    ]


QOS2_ROUTES = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"
qos = 2
"""


def test_qos2_messages_not_yet_committed_survive_a_kill_9(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory, store: StoreUnderTest
) -> None:
    # Stock broker window (20): before the fix, the 20 messages paho had
    # answered with PUBREC were lost at the kill and wedged all 20 slots.
    broker = brokers(tmp_path / "broker", max_inflight=20).start()
    db = store.reader
    daemon = daemons(broker.port, QOS2_ROUTES).start()
    daemon.wait_ready()
    url = daemon.metrics_url()
    lock = store.hold_lock(6.0)  # nothing commits meanwhile
    publish(broker.port, _telemetry(100), qos=2, inflight=10)
    wait_for(
        lambda: (
            metric_value(http_get(url + "/metrics")[1], "ingestd_messages_received_total") >= 20
        ),
        10,
        what="a window of QoS 2 messages received, none committed",
    )
    assert db.count() == 0
    daemon.kill()  # SIGKILL with 20 received and uncommitted
    lock.join()
    daemon = daemons(broker.port, QOS2_ROUTES).start()
    daemon.wait_ready()
    wait_for(lambda: db.count() == 100, 30, what="all 100 stored after the restart")
    # Not wedged: more QoS 2 traffic flows through every broker slot.
    publish(broker.port, _telemetry(200, start=100), qos=2, inflight=10)
    wait_for(lambda: db.count() == 300, 30, what="200 more")
    assert daemon.stop() == 0
    daemon.kill()
    broker.kill()
    rows = db.rows("SELECT count(*), count(DISTINCT ts_ns), sum(value) FROM readings")
    assert rows == [(300, 300, sum(range(300)))]
    print(f"\nQoS 2, kill -9 with 20 uncommitted: sent 300, stored {rows[0][0]}")


def test_qos2_survives_a_broker_kill_9_mid_stream(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory, store: StoreUnderTest
) -> None:
    broker = brokers(tmp_path / "broker", max_inflight=20).start()
    db = store.reader
    env = {"INGESTD_MQTT__RECONNECT_MAX_DELAY": "0.5"}
    daemon = daemons(broker.port, QOS2_ROUTES, **env).start()
    daemon.wait_ready()
    assert daemon.stop() == 0  # the session exists; the broker queues for it
    publish(broker.port, _telemetry(3000), qos=2, inflight=10)
    broker.wait_saved()  # the queue is on disk: the kill below loses none of it
    daemon = daemons(broker.port, QOS2_ROUTES, **env).start()
    daemon.wait_ready()
    wait_for(lambda: db.count() >= 300, 30, interval=0.02, what="10% stored")
    broker.kill()
    at_kill = db.count()
    time.sleep(1.0)
    broker.start()
    wait_for(lambda: db.count() == 3000, 60, what="all 3000 stored")
    assert daemon.stop() == 0
    daemon.kill()
    broker.kill()
    assert at_kill < 3000
    assert db.rows("SELECT count(*), count(DISTINCT ts_ns) FROM readings") == [(3000, 3000)]
    print(f"\nQoS 2, broker kill -9 at {at_kill}/3000: stored 3000")


VALUE_ROUTE = """
[[routes]]
topic = "sensors/{sensor}/{metric}"
format = "value"
qos = 1
"""
STORE_RETAINED = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"
retained = "store"
"""


def test_a_retained_message_is_not_stored_again_at_each_restart(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory, store: StoreUnderTest
) -> None:
    db = store.reader
    publish(mosquitto.port, [("sensors/old/temperature", b"21.5")], retain=True)
    for run in range(3):
        daemon = daemons(mosquitto.port, VALUE_ROUTE).start()
        daemon.wait_ready()
        if run == 1:
            # A live message on the same topic is a reading like any other.
            publish(mosquitto.port, [("sensors/live/temperature", b"20")])
            wait_for(lambda: db.count() == 1, 10, what="the live reading")
        time.sleep(0.5)
        assert daemon.stop() == 0
        daemon.kill()
        readings = _stopped(daemon)["readings"]
        assert isinstance(readings, dict)
        assert readings["retained_ignored"] == 1, readings
    assert db.rows("SELECT sensor FROM readings") == [("live",)]


def test_retained_store_keeps_timed_values_once_and_counts_untimed_ones(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory, store: StoreUnderTest
) -> None:
    db = store.reader
    publish(
        mosquitto.port,
        [("sensors/a/telemetry", b'{"ts": %d, "t": 1}' % T0), ("sensors/b/telemetry", b'{"t": 2}')],
        retain=True,
    )
    duplicates = []
    for _ in range(3):
        daemon = daemons(mosquitto.port, STORE_RETAINED).start()
        daemon.wait_ready()
        wait_for(lambda: db.count() == 1, 10, what="the timed retained reading")
        time.sleep(0.5)
        assert daemon.stop() == 0
        daemon.kill()
        stopped = _stopped(daemon)
        readings = stopped["readings"]
        assert isinstance(readings, dict)
        assert readings["retained_untimed"] == 1
        duplicates.append(stopped["duplicates"])
    assert db.rows("SELECT sensor, ts_ns, value FROM readings") == [("a", T0 * 10**9, 1.0)]
    assert duplicates == [0, 1, 1]  # the re-sent retained reading, a true redelivery


ARRAYS = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"
[[routes]]
topic = "lines/{sensor}"
format = "influx"
"""


def test_readings_sharing_a_time_are_all_stored_and_none_is_a_duplicate(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory, store: StoreUnderTest
) -> None:
    db = store.reader
    daemon = daemons(mosquitto.port, ARRAYS).start()
    daemon.wait_ready()
    url = daemon.metrics_url()
    publish(
        mosquitto.port,
        [
            ("sensors/arr/telemetry", b'[{"t": 1}, {"t": 2}, {"t": 3}]'),
            (
                "sensors/same/telemetry",
                b'[{"ts": 1700000000, "t": 1}, {"ts": 1700000000, "t": 2}]',
            ),
            ("sensors/flat/telemetry", b'{"a.b": 1, "a": {"b": 2}}'),
            ("lines/ns", b"m v=1 1700000000000000100\nm v=2 1700000000000000200"),
            ("lines/batch", b"m v=1\nm v=2\nm v=3"),
            # Another message claiming a stored series and time with another value.
            ("sensors/same/telemetry", b'{"ts": 1700000000, "t": 9}'),
        ],
    )
    wait_for(lambda: db.count() == 12, 10, what="12 readings")
    wait_for(lambda: db.count("quarantine") == 1, 10, what="the conflict")
    text = http_get(url + "/metrics")[1]
    assert daemon.stop() == 0
    daemon.kill()
    assert metric_value(text, "ingestd_readings_duplicate_total") == 0
    assert metric_value(text, "ingestd_quarantined_total", 'reason="conflict"') == 1
    assert metric_value(text, "ingestd_readings_unexplained") == 0
    assert db.rows("SELECT sensor, count(*) FROM readings GROUP BY 1 ORDER BY 1") == [
        ("arr", 3),
        ("batch", 3),
        ("flat", 2),
        ("ns", 2),
        ("same", 2),
    ]
    ((reason,),) = db.rows("SELECT reason FROM quarantine")
    assert reason.startswith("conflict: a different value (1) is stored for same t")


def test_a_store_outage_longer_than_the_keepalive_keeps_the_connection(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory
) -> None:
    # The window (100) is smaller than what the broker sends (1000): reading
    # pauses, and the PINGRESP waits unread behind the messages not taken.
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    db = DbReader(tmp_path / "ingestd.db")
    env = {
        "INGESTD_MQTT__KEEPALIVE": "5",
        "INGESTD_MQTT__MAX_INFLIGHT": "100",
        "INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000",
        "INGESTD_STORE__BUSY_TIMEOUT_MS": "100",
        "INGESTD_STORE__RETRY_MAX_DELAY": "0.5",
    }
    daemon = daemons(broker.port, **env).start()
    daemon.wait_ready()
    url = daemon.metrics_url()
    lock = hold_exclusive_lock(tmp_path / "ingestd.db", 13.0)  # > 2.5 x keepalive
    publish(broker.port, _telemetry(1000))
    lock.join()
    wait_for(lambda: db.count() == 1000, 30, what="all 1000 stored")
    text = http_get(url + "/metrics")[1]
    assert daemon.stop() == 0
    daemon.kill()
    broker.kill()
    logs = daemon.logs()
    assert "broker connection lost" not in logs
    assert metric_value(text, "ingestd_broker_reconnects_total") == 0
    assert metric_value(text, "ingestd_inflight_pauses_total") >= 1
    # Nothing redelivered: every reading was stored once, none seen twice.
    assert metric_value(text, "ingestd_readings_duplicate_total") == 0


def test_a_database_deleted_while_running_is_noticed_and_recreated(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    path = tmp_path / "ingestd.db"
    db = DbReader(path)
    daemon = daemons(mosquitto.port).start()
    daemon.wait_ready()
    publish(mosquitto.port, _telemetry(10))
    wait_for(lambda: db.count() == 10, 10, what="10 readings")
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)
    publish(mosquitto.port, _telemetry(10, start=10))
    wait_for(lambda: db.count() == 10, 10, what="10 readings in a new database")
    assert daemon.stop() == 0
    daemon.kill()
    assert db.rows("SELECT min(value), max(value) FROM readings") == [(10.0, 19.0)]
    logs = daemon.logs()
    assert '"condition": "database replaced"' in logs
    assert "was deleted or replaced while ingestd had it open" in logs
    assert "store available again" in logs


def test_two_daemons_with_one_client_id_back_off_and_say_why(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    env = {"INGESTD_MQTT__CLIENT_ID": "same-id", "INGESTD_MQTT__RECONNECT_MAX_DELAY": "30"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = daemons(mosquitto.port, workdir=tmp_path / "a", **env).start()
    b = daemons(mosquitto.port, workdir=tmp_path / "b", **env).start()
    time.sleep(15)
    assert a.stop() == 0
    assert b.stop() == 0
    a.kill()
    b.kill()
    connects = [d.logs().count('"msg": "connected to broker"') for d in (a, b)]
    # Each takeover used to reset the backoff: ~20 connections each in 15 s.
    print(f"\ntwo daemons, one client_id, 15 s: connections {connects}")
    assert max(connects) <= 8, connects
    said = a.logs() + b.logs()
    assert "another client is connected with the same mqtt.client_id" in said
    assert '"client_id": "same-id"' in said


def test_a_window_sent_in_one_burst_is_written_in_several_batches(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory
) -> None:
    # A persistent session's backlog: at connection the broker sends the whole
    # window (200 messages of 10 readings) at once, and one read can take it
    # all. Taken as one chunk it was one batch of 2,000 readings, whatever
    # batch.max_readings said, and nothing more could be read until it was in.
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    db = DbReader(tmp_path / "ingestd.db")
    env = {
        "INGESTD_MQTT__MAX_INFLIGHT": "200",
        "INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000",
        "INGESTD_BATCH__MAX_READINGS": "500",
    }
    daemon = daemons(broker.port, **env).start()
    daemon.wait_ready()  # the session is registered
    assert daemon.stop() == 0
    messages = [
        (
            f"sensors/s{i % 10}/telemetry",
            json.dumps([{"ts": T0 + i * 10 + j, "x": j} for j in range(10)]).encode(),
        )
        for i in range(600)
    ]
    publish(broker.port, messages)
    daemon.start()
    wait_for(lambda: db.count() == 6000, 30, what="6,000 readings")

    # The histogram is observed when the event loop takes the commit's
    # result, which can be after another connection sees the rows: wait
    # until it holds all 6,000.
    def scrape() -> str:
        return http_get(daemon.metrics_url() + "/metrics")[1]

    wait_for(lambda: metric_value(scrape(), "ingestd_batch_rows_sum") == 6000, 10)
    text = scrape()
    assert daemon.stop() == 0
    batches = metric_value(text, "ingestd_batch_rows_count")
    largest_allowed = metric_value(text, "ingestd_batch_rows_bucket", 'le="500.0"')
    # A chunk is at most a quarter of the window (50 messages, 500 readings):
    # every batch within max_readings, and so several per window.
    assert batches >= 12
    assert largest_allowed == batches, text
