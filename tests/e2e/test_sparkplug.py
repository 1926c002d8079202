"""A Sparkplug B edge node against the running daemon: BIRTH, 10,000 DATA by
alias, a sequence gap (one rebirth request, answered), a restart of ingestd
mid-stream (its node state is gone: rebirth, nothing guessed), NDEATH. Every
stored value is checked against what the node sent; every DATA message not
stored is in quarantine with its reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.helpers import (
    REPO,
    SHIPPED_CONFIG,
    DaemonFactory,
    DbReader,
    Mosquitto,
    http_get,
    metric_value,
    wait_for,
)
from tests.sparkplug_node import METRICS, EdgeNode

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
    # While ingestd is away its session keeps the node's DATA; back, it has no
    # node state: it asks for a rebirth and stores nothing it cannot resolve.
    for i in range(7001, 7501):
        node.data(i)
    again = daemons(mosquitto.port, ROUTE, **env).start()
    again.wait_ready()
    wait_for(lambda: node.rebirth_requests == 2, 60, what="the rebirth request after restart")
    for i in range(7501, 10001):
        node.data(i)
    node.death()
    sent_data = node.data_sent
    wait_for(
        lambda: db.count("quarantine") == 501 and db.count() == 4 * (sent_data - 501 + node.births),
        60,
        what="everything stored or quarantined",
    )
    time.sleep(1.0)
    text = http_get(again.metrics_url() + "/metrics")[1]
    assert metric_value(text, "ingestd_sparkplug_rebirth_requests_total") == 1
    assert metric_value(text, "ingestd_readings_unexplained") == 0
    assert again.stop() == 0
    node.close()

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
    # Not stored: DATA 5001 (after the gap) and 7001-7500 (before the rebirth).
    missing = {node.t0_ms + i * 10 for i in [5001, *range(7001, 7501)]}
    assert set(node.sent) - stored_ts == missing
    reasons = [r for (r,) in db.rows("SELECT reason FROM quarantine ORDER BY received_at")]
    assert reasons[0].startswith("Sparkplug node plant/press-1: sequence gap: expected")
    assert "has not seen its birth" in reasons[1]
    assert reasons[1].endswith("rebirth requested")
    assert all(r.endswith("waiting for its rebirth") for r in reasons[2:])
    assert node.births == 3
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
