"""A Sparkplug B edge node against the running daemon: BIRTH, 10,000 DATA by
alias, a sequence gap (one rebirth request, answered), a restart of ingestd
and a kill -9 mid-stream (its node state comes back from the store: no
rebirth, nothing quarantined), NDEATH. Every stored value is checked against
what the node sent; every DATA message not stored is in quarantine with its
reason. Then redeliveries through broker restarts, and junk from new ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.brokers import BrokerFactory, Mosquitto
from tests.support.config import REPO, SHIPPED_CONFIG
from tests.support.daemon import DaemonFactory, DaemonProcess
from tests.support.db import DbReader, hold_exclusive_lock
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.sparkplug_node import METRICS, EdgeNode
from tests.support.waiting import wait_for

ROUTE = """
[[routes]]
topic = "spBv1.0/#"
format = "sparkplug"
"""
HOST = "ingestd-test"


def retained(port: int, topic: str) -> bytes | None:
    """The retained message on `topic`, if any."""
    got: list[bytes] = []
    done = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(bytes(msg.payload))
        done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe-state")
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.subscribe(topic, 1)
    done.wait(2)
    c.disconnect()
    c.loop_stop()
    return got[-1] if got else None


def test_a_sparkplug_edge_node_through_a_gap_a_restart_and_its_death(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    env = {"INGESTD_MQTT__SPARKPLUG_HOST_ID": HOST}
    db = DbReader(tmp_path / "ingestd.db")
    daemon = daemons(mosquitto.port, ROUTE, **env).start()
    daemon.wait_ready()
    # The host application's STATE, retained, so edge nodes know it is there.
    state = retained(mosquitto.port, f"spBv1.0/STATE/{HOST}")
    assert state is not None
    assert json.loads(state)["online"] is True

    node = EdgeNode(mosquitto.port).connect()
    node.birth(0)
    for i in range(1, 5001):
        node.data(i)
    node.data(5001, skip_seq=True)  # a sequence number lost on the way
    wait_for(lambda: node.rebirth_requests == 1, 60, what="the rebirth request")
    for i in range(5002, 7001):
        node.data(i)  # the first answers the request with an NBIRTH
    wait_for(lambda: db.count() >= 4 * 7000 - 4, 60, what="DATA up to 7,000 stored")
    text = http_get(daemon.metrics_url() + "/metrics")[1]
    assert metric_value(text, "ingestd_sparkplug_rebirth_requests_total") == 1
    assert metric_value(text, "ingestd_readings_unexplained") == 0
    assert daemon.stop() == 0
    assert node.rebirth_requests == 1, "one gap, one request"
    # While ingestd is away its session keeps the node's DATA; back, it goes on
    # from the node's state as last committed (BIRTH, aliases, sequence): no
    # rebirth, nothing quarantined.
    for i in range(7001, 7501):
        node.data(i)
    again = daemons(mosquitto.port, ROUTE, **env).start()
    again.wait_ready()
    for i in range(7501, 8501):
        node.data(i)
    # Killed -9 with DATA read and not committed (another writer holds the
    # database; this broker sends 20 at a time unacknowledged): the broker
    # sends them again, and the state is the one of the last commit, so they
    # follow on.
    wait_for(lambda: db.count() == 4 * (8500 - 1 + node.births), 60, what="DATA to 8,500")
    lock = hold_exclusive_lock(tmp_path / "ingestd.db", 6)
    for i in range(8501, 9001):
        node.data(i)
    wait_for(
        lambda: metrics_of(again, "ingestd_inflight_unacked_messages") >= 20,
        5,
        what="a broker's window of them read and held",
    )
    again.kill()
    lock.join()
    assert db.count() == 4 * (8500 - 1 + node.births), "none of them was committed"
    third = daemons(mosquitto.port, ROUTE, **env).start()
    third.wait_ready()
    for i in range(9001, 10001):
        node.data(i)
    node.death()
    sent_data = node.data_sent
    wait_for(
        lambda: db.count() == 4 * (sent_data - 1 + node.births),
        60,
        what="everything but DATA 5001 stored",
    )
    time.sleep(1.0)
    text = http_get(third.metrics_url() + "/metrics")[1]
    assert metric_value(text, "ingestd_sparkplug_rebirth_requests_total") == 0
    assert metric_value(text, "ingestd_readings_unexplained") == 0
    assert third.stop() == 0
    node.close()
    assert node.rebirth_requests == 1, "a restart is not a rebirth"
    assert db.count("quarantine") == 1

    # Every stored value is what the node sent, at the time it sent it.
    units = {name: unit for name, (_a, _t, unit) in METRICS.items()}
    rows = db.rows("SELECT sensor, metric, ts_ns, value, unit FROM readings")
    stored_ts: set[int] = set()
    for sensor, metric, ts_ns, value, unit in rows:
        assert sensor == "plant/press-1"
        ts_ms = ts_ns // 1_000_000
        assert node.sent[ts_ms][metric] == value, (metric, ts_ms)
        assert unit == units[metric]
        stored_ts.add(ts_ms)
    assert len(rows) == len(set((m, t) for _s, m, t, _v, _u in rows)), "nothing twice"
    # Not stored: DATA 5001 (after the gap), quarantined with its reason.
    assert set(node.sent) - stored_ts == {node.t0_ms + 5001 * 10}
    [(reason,)] = db.rows("SELECT reason FROM quarantine")
    assert reason.startswith("Sparkplug node plant/press-1: sequence gap: expected")
    assert node.births == 2
    # NDEATH: the node is offline, as `ingestd sensors` shows.
    out = subprocess.run(
        [sys.executable, "-m", "ingestd", "sensors", "--db", str(tmp_path / "ingestd.db")],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if "plant/press-1" in x)
    assert "offline" in line
    assert db.rows("SELECT state FROM sensor_status WHERE sensor = 'plant/press-1'") == [
        ("offline",)
    ]
    # Stopped cleanly: the host STATE says offline (its will would say so too).
    state = retained(mosquitto.port, f"spBv1.0/STATE/{HOST}")
    assert state is not None
    assert json.loads(state)["online"] is False


def test_the_simulators_edge_nodes_are_reborn_on_request_and_die_on_stop(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    """`ingestd simulate --format sparkplug` with the shipped config. The nodes
    are born before ingestd starts, so ingestd first sees their DATA without
    a BIRTH: it asks each for a rebirth, they answer, and their data is
    stored from then on. When the simulator stops, their NDEATH marks them
    offline."""
    env = {
        "INGESTD_MQTT__PORT": str(mosquitto.port),
        "INGESTD_STORE__PATH": str(tmp_path / "ingestd.db"),
    }
    sim = subprocess.Popen(
        [
            *(sys.executable, "-m", "ingestd", "simulate", "--config", str(SHIPPED_CONFIG)),
            *("--format", "sparkplug", "--sensors", "2", "--interval", "0.1", "--rounds", "60"),
        ],
        env={**os.environ, **env},
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # born, and sending DATA, before ingestd is there
        db = DbReader(tmp_path / "ingestd.db")
        daemon = daemons(mosquitto.port, config=SHIPPED_CONFIG).start()
        daemon.wait_ready()
        _, err = sim.communicate(timeout=60)
    finally:
        if sim.poll() is None:
            sim.kill()
    assert sim.returncode == 0, err
    assert "answered 2 rebirth request(s)" in err
    wait_for(
        lambda: db.rows("SELECT count(*) FROM sensor_status WHERE state = 'offline'") == [(2,)],
        15,
        what="both nodes offline after the simulator stopped",
    )
    assert daemon.stop() == 0
    sensors = db.rows("SELECT DISTINCT sensor, metric, unit FROM readings ORDER BY 1, 2")
    assert sensors == [
        (f"ingestd-sim/{node}", metric, unit)
        for node in ("kitchen", "living-room")
        for metric, unit in [
            ("Environment/CO2", "ppm"),
            ("Environment/Humidity", "%"),
            ("Environment/Temperature", "°C"),
            ("Status/Uptime", "s"),
        ]
    ]
    reasons = [r for (r,) in db.rows("SELECT reason FROM quarantine")]
    assert reasons, "the DATA sent before the rebirth is quarantined, not guessed"
    assert all("has not seen its birth" in r or "waiting for its rebirth" in r for r in reasons)


def test_the_host_state_will_says_offline_when_ingestd_dies(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    """kill -9: no clean goodbye, so the broker publishes the will: the
    retained STATE goes offline, with the timestamp of the online message it
    ends (Sparkplug 3.0 ties the two by it)."""
    daemon = daemons(mosquitto.port, ROUTE, INGESTD_MQTT__SPARKPLUG_HOST_ID=HOST).start()
    daemon.wait_ready()
    online = retained(mosquitto.port, f"spBv1.0/STATE/{HOST}")
    assert online is not None
    assert json.loads(online)["online"] is True
    daemon.kill()
    wait_for(
        lambda: (
            (got := retained(mosquitto.port, f"spBv1.0/STATE/{HOST}")) is not None
            and json.loads(got)["online"] is False
        ),
        30,
        what="the will",
    )
    offline = retained(mosquitto.port, f"spBv1.0/STATE/{HOST}")
    assert offline is not None
    assert json.loads(offline)["timestamp"] == json.loads(online)["timestamp"]


# -- redeliveries through a real broker reconnect --------------------------------------

REDELIVERY_ENV = {
    "INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000",
    "INGESTD_MQTT__RECONNECT_MIN_DELAY": "0.1",
    "INGESTD_MQTT__RECONNECT_MAX_DELAY": "1",
}


def metrics_of(daemon: DaemonProcess, name: str, labels: str = "") -> float:
    return metric_value(http_get(daemon.metrics_url() + "/metrics")[1], name, labels)


def unacked_across_a_broker_restart(
    broker: Mosquitto, daemon: DaemonProcess, node: EdgeNode, db: Path, send: Callable[[], int]
) -> None:
    """`send` publishes messages (returning how many) while another writer holds
    the database, so ingestd reads them but can neither commit nor acknowledge
    them; then the broker restarts, and sends them again, flagged DUP, to
    ingestd's persistent session. The lock goes once ingestd is back."""
    reconnects = metrics_of(daemon, "ingestd_broker_reconnects_total")
    lock = hold_exclusive_lock(db, 6)
    n = send()
    wait_for(
        lambda: metrics_of(daemon, "ingestd_inflight_unacked_messages") >= n,
        5,
        what=f"ingestd to read the {n} messages and hold them",
    )
    node.expect_reconnect()
    broker.restart()
    wait_for(
        lambda: metrics_of(daemon, "ingestd_broker_reconnects_total") > reconnects,
        20,
        what="ingestd to reconnect",
    )
    node.wait_connected()
    lock.join()


def stored_as_sent(db: DbReader, node: EdgeNode) -> int:
    """Every stored value is the one the node sent under that name at that
    time, and none twice; the number of rows."""
    rows = db.rows("SELECT metric, ts_ns, value FROM readings")
    for metric, ts_ns, value in rows:
        assert node.sent[ts_ns // 1_000_000][metric] == value, (metric, ts_ns)
    assert len(rows) == len({(m, t) for m, t, _v in rows}), "nothing twice"
    return len(rows)


@pytest.fixture
def redelivery(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory
) -> Iterator[tuple[Mosquitto, DaemonProcess, EdgeNode, DbReader]]:
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    daemon = daemons(broker.port, ROUTE, **REDELIVERY_ENV).start()
    daemon.wait_ready()
    node = EdgeNode(broker.port).connect()
    db = DbReader(tmp_path / "ingestd.db")
    node.birth(0)
    for i in range(1, 21):
        node.data(i)
    wait_for(lambda: db.count() == 4 * 21, 20, what="the first 20 DATA stored")
    yield broker, daemon, node, db
    node.close()


def test_redeliveries_of_200_unacknowledged_data_are_not_a_gap(
    tmp_path: Path, redelivery: tuple[Mosquitto, DaemonProcess, EdgeNode, DbReader]
) -> None:
    """Case (c): more than 128 of a node's messages unacknowledged at a
    reconnect (200: their numbers wrap past the current one), sent again, are
    known for read (skipped: their readings are on their way), not taken for
    a gap that would unbirth the node."""
    broker, daemon, node, db = redelivery

    def send() -> int:
        for i in range(21, 221):
            node.data(i)
        return 200

    unacked_across_a_broker_restart(broker, daemon, node, tmp_path / "ingestd.db", send)
    for i in range(221, 261):
        node.data(i)
    # Back on the broker, the node is born again (its NDEATH was published).
    want = 4 * (260 + node.births)
    wait_for(lambda: db.count() == want, 30, what="all 260 DATA and the BIRTHs stored")
    time.sleep(0.5)
    assert node.births == 2
    assert stored_as_sent(db, node) == want
    assert db.count("quarantine") == 0
    assert metrics_of(daemon, "ingestd_sparkplug_rebirth_requests_total") == 0
    assert node.rebirth_requests == 0
    # Sent again after the restart, read before: skipped, not read twice.
    assert metrics_of(daemon, "ingestd_values_skipped_total", 'kind="redelivered"') >= 200
    assert metrics_of(daemon, "ingestd_readings_unexplained") == 0
    assert daemon.stop() == 0


def test_a_redelivery_from_before_a_rebirth_keeps_its_own_aliases(
    tmp_path: Path, redelivery: tuple[Mosquitto, DaemonProcess, EdgeNode, DbReader]
) -> None:
    """Case (b): DATA read before a rebirth that changed the aliases, sent
    again after a reconnect, is never read with the new BIRTH's aliases (a
    Temperature stored as a Pressure that never was)."""
    broker, daemon, node, db = redelivery
    swapped = {**node.aliases, "Line/Temperature": 2, "Line/Pressure": 1}

    def send() -> int:
        for i in range(21, 26):
            node.data(i)
        node.birth(26, aliases=swapped)
        for i in range(27, 32):
            node.data(i)
        return 11

    unacked_across_a_broker_restart(broker, daemon, node, tmp_path / "ingestd.db", send)
    for i in range(32, 41):
        node.data(i)
    want = 4 * (40 - 1 + 3)  # DATA 1-40 but 26 (a BIRTH instead), three BIRTHs
    wait_for(lambda: db.count() == want, 30, what="everything stored")
    time.sleep(0.5)
    assert stored_as_sent(db, node) == want
    assert db.count("quarantine") == 0
    # All 11 sent again, read before the restart of the broker: skipped.
    assert metrics_of(daemon, "ingestd_values_skipped_total", 'kind="redelivered"') >= 11
    assert metrics_of(daemon, "ingestd_sparkplug_rebirth_requests_total") == 0
    assert metrics_of(daemon, "ingestd_readings_unexplained") == 0
    assert daemon.stop() == 0


def test_a_gap_of_150_after_a_reconnect_is_a_gap(
    tmp_path: Path, redelivery: tuple[Mosquitto, DaemonProcess, EdgeNode, DbReader]
) -> None:
    """Case (a): a jump of 128-255 is a gap like any other (quarantined, one
    rebirth asked), while the reconnect's redeliveries before it are not."""
    broker, daemon, node, db = redelivery

    def send() -> int:
        for i in range(21, 31):
            node.data(i)
        return 10

    unacked_across_a_broker_restart(broker, daemon, node, tmp_path / "ingestd.db", send)
    node.data(31, lost=150)
    wait_for(lambda: node.rebirth_requests == 1, 20, what="the rebirth request")
    for i in range(32, 41):
        node.data(i)  # the first answers with an NBIRTH
    want = 4 * (40 - 1 + 3)  # DATA 1-40 but 31 (quarantined), three BIRTHs
    wait_for(lambda: db.count() == want, 30, what="everything but DATA 31 stored")
    time.sleep(0.5)
    assert stored_as_sent(db, node) == want
    [(reason,)] = db.rows("SELECT reason FROM quarantine")
    # After the BIRTH of its new session (seq 0), 150 lost.
    assert "sequence gap: expected 1, got 151 (150 message(s) missing)" in reason
    assert metrics_of(daemon, "ingestd_sparkplug_rebirth_requests_total") == 1
    assert metrics_of(daemon, "ingestd_readings_unexplained") == 0
    assert daemon.stop() == 0


def test_junk_from_2000_new_ids_buys_bounded_commands_and_log_lines(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    """Anyone who can publish junk under spBv1.0/ and homie/ must not make
    ingestd publish commands or write log lines at their rate: 2,000 node ids
    sending DATA before any BIRTH, and 2,000 Homie ids sending $state."""
    routes = ROUTE + '\n[[routes]]\ntopic = "homie/#"\nformat = "homie"\n'
    daemon = daemons(mosquitto.port, routes).start()
    daemon.wait_ready()
    commands: list[str] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ncmd-watch")
    watcher.on_message = lambda _c, _u, m: commands.append(m.topic)
    watcher.connect("127.0.0.1", mosquitto.port)
    watcher.loop_start()
    watcher.subscribe("spBv1.0/+/NCMD/+", 0)
    time.sleep(0.3)
    junk = [(f"spBv1.0/junk/NDATA/n{i}", node_data_payload(i)) for i in range(2000)]
    junk += [(f"homie/5/j{i}/$state", b"ready") for i in range(2000)]
    started = time.monotonic()
    publish(mosquitto.port, junk)
    db = DbReader(tmp_path / "ingestd.db")
    wait_for(lambda: db.count("quarantine") == 2000, 30, what="the junk DATA quarantined")
    seconds = time.monotonic() - started
    time.sleep(1.0)
    watcher.loop_stop()
    watcher.disconnect()
    text = http_get(daemon.metrics_url() + "/metrics")[1]
    asked = metric_value(text, "ingestd_sparkplug_rebirth_requests_total")
    held = metric_value(text, "ingestd_sparkplug_rebirths_suppressed_total")
    # At most 10 a second (and a burst of 10), the rest counted, never lost track of.
    assert asked <= 10 + 10 * (seconds + 1), (asked, seconds)
    assert asked + held == 2000
    assert len(commands) == asked
    lines = [json.loads(x) for x in daemon.logs().splitlines() if x.startswith("{")]
    device_lines = [
        x for x in lines if x["msg"] in ("homie device state", "sparkplug rebirth requested")
    ]
    assert len(device_lines) <= 20  # the shared budget of one minute
    assert metric_value(text, "ingestd_device_log_lines_suppressed_total") >= 2000 + asked - 20
    info = [x for x in lines if x["level"] in ("info", "warning") and x["msg"] != "summary"]
    assert len(info) < 60, [x["msg"] for x in info]
    print(
        f"\n4,000 junk messages in {seconds:.1f} s: {asked:.0f} rebirths asked, {held:.0f} "
        f"held back, {len(commands)} NCMDs seen, {len(device_lines)} per-device lines, "
        f"{len(info)} info/warning lines in all"
    )
    assert daemon.stop() == 0


def node_data_payload(i: int) -> bytes:
    """An NDATA (seq 1) by alias, from a node no BIRTH declared."""
    from ingestd.formats.sparkplug_pb import Payload

    p = Payload(timestamp=int(time.time() * 1000), seq=1)
    p.metrics.add(alias=1, double_value=float(i))
    return bytes(p.SerializeToString())


def test_a_redelivery_from_before_a_rebirth_whose_clock_went_back_keeps_its_aliases(
    tmp_path: Path, redelivery: tuple[Mosquitto, DaemonProcess, EdgeNode, DbReader]
) -> None:
    """Case (b) again, the node's clock an hour back after its reboot (found
    by review: payload times cannot tell which BIRTH a redelivery belongs to;
    what this process read, by packet id and content, can)."""
    broker, daemon, node, db = redelivery
    swapped = {**node.aliases, "Line/Temperature": 2, "Line/Pressure": 1}

    def send() -> int:
        for i in range(21, 23):
            node.data(i)  # the old BIRTH's aliases
        node.t0_ms -= 3_600_000  # the node reboots; its clock now an hour behind
        node.birth(23, aliases=swapped)
        for i in range(24, 50):
            node.data(i)
        return 2 + 1 + 26

    unacked_across_a_broker_restart(broker, daemon, node, tmp_path / "ingestd.db", send)
    for i in range(50, 55):
        node.data(i)
    want = 4 * (54 - 1 + node.births)  # DATA 1-54 but 23 (a BIRTH instead)
    wait_for(lambda: db.count() == want, 30, what="everything stored")
    time.sleep(0.5)
    assert stored_as_sent(db, node) == want
    assert db.count("quarantine") == 0
    assert metrics_of(daemon, "ingestd_sparkplug_rebirth_requests_total") == 0
    assert daemon.stop() == 0
