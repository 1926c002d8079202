"""The daemon as a subprocess against a real Mosquitto and a real SQLite file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.brokers import BrokerFactory, Mosquitto
from tests.support.config import SHIPPED_CONFIG, write_config
from tests.support.daemon import DaemonFactory
from tests.support.db import DbReader, StoreUnderTest
from tests.support.mqtt import publish
from tests.support.ports import free_port
from tests.support.waiting import wait_for

SENSORS = 200
PER_SENSOR = 100  # 200 x 100 = 20,000 messages, two metrics each
T0 = 1_700_000_000.0


def _temp(sensor: int, i: int) -> float:
    return round(20 + sensor / 10 + i / 1000, 3)


def _json_stream() -> list[tuple[str, bytes]]:
    msgs = []
    for i in range(PER_SENSOR):
        for s in range(SENSORS):
            body = {"ts": T0 + i * 0.5, "temperature": _temp(s, i), "humidity": i}
            msgs.append((f"sensors/dev{s:03d}/telemetry", json.dumps(body).encode()))
    return msgs


def test_ingests_20000_qos1_messages_exactly_once(
    tmp_path: Path,
    mosquitto: Mosquitto,
    record_property: Callable[[str, object], None],
    daemons: DaemonFactory,
    store: StoreUnderTest,
) -> None:
    daemon = daemons(mosquitto.port, config=SHIPPED_CONFIG).start()
    db = store.reader
    daemon.wait_ready()
    stream = _json_stream()
    started = time.monotonic()
    sent = publish(mosquitto.port, stream, qos=1)
    assert sent == 20_000

    def all_stored() -> bool:
        daemon.sample_rss()
        return db.count() >= 40_000

    wait_for(all_stored, 120, interval=0.1, what="40,000 readings in the database")
    elapsed = time.monotonic() - started
    rss_kb = daemon.sample_rss()
    assert daemon.stop() == 0, daemon.logs()
    daemon.kill()

    assert db.count() == 40_000
    assert db.count("quarantine") == 0
    # Each message was delivered once (no overlapping subscriptions), none redelivered.
    stopped = next(
        json.loads(line) for line in daemon.logs().splitlines() if '"msg": "stopped"' in line
    )
    assert stopped["received"] == 20_000
    assert stopped["duplicates"] == 0
    distinct = db.rows(
        "SELECT count(*) FROM (SELECT DISTINCT sensor, metric, ts FROM readings) AS r"
    )
    assert distinct[0][0] == 40_000
    # Every value is the one sent for that sensor, metric and time.
    got = {(s, m, t): v for s, m, t, v in db.rows("SELECT sensor, metric, ts, value FROM readings")}
    for i in (0, 37, PER_SENSOR - 1):
        for s in (0, 99, SENSORS - 1):
            assert got[(f"dev{s:03d}", "temperature", T0 + i * 0.5)] == _temp(s, i)
            assert got[(f"dev{s:03d}", "humidity", T0 + i * 0.5)] == i
    rate = 40_000 / elapsed
    record_property("readings_per_second", round(rate))
    record_property("peak_rss_mb", round(rss_kb / 1024, 1))
    print(
        f"\nE2E: 40,000 readings in {elapsed:.2f}s = {rate:,.0f} readings/s; "
        f"peak RSS {rss_kb / 1024:.1f} MB"
    )


def test_waits_for_a_broker_that_starts_later(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory
) -> None:
    port = free_port()
    daemon = daemons(port, config=SHIPPED_CONFIG, INGESTD_MQTT__RECONNECT_MAX_DELAY="1.0").start()
    broker = brokers(tmp_path / "late-broker", port)
    db = DbReader(tmp_path / "ingestd.db")
    wait_for(lambda: "broker unreachable" in daemon.logs(), 20, what="an unreachable log")
    time.sleep(2.5)  # several failed attempts
    assert daemon.proc is not None
    assert daemon.proc.poll() is None, daemon.logs()
    assert daemon.logs().count("broker unreachable") == 1, "logged once per state change"
    assert "READY=1" not in daemon.notices
    broker.start()
    daemon.wait_ready(30)
    publish(port, [("sensors/late/temperature", f"{20 + i / 10}".encode()) for i in range(50)])
    wait_for(lambda: db.count() >= 50, 30, what="50 readings")
    assert daemon.stop() == 0, daemon.logs()
    daemon.kill()
    broker.kill()
    assert db.count() == 50


def test_malformed_messages_are_quarantined_and_the_rest_stored(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory, store: StoreUnderTest
) -> None:
    daemon = daemons(mosquitto.port, config=SHIPPED_CONFIG).start()
    db = store.reader
    bad = [
        ("sensors/b1/telemetry", b"{not json"),
        ("sensors/b2/telemetry", b"[1, 2, 3]"),
        ("sensors/b3/telemetry", b'{"temperature": "warm"}'),
        ("sensors/b4/temperature", b"NaN"),
        ("sensors/b5/temperature", b"twenty"),
        ("sensors/b6/telemetry", b'{"ts": "yesterday", "temperature": 1}'),
        ("sensors/b7/telemetry", b"\xff\xfe\x00"),
        ("sensors/b8/temperature", b"1e999"),
        ("sensors/b9/telemetry", b'{"temperature": 500}'),  # above the shipped limit
        # Poison messages: each once crashed the daemon, and redelivery crashed it again.
        ("sensors/b10/telemetry", b'{"temperature": 1, "note": "\xff"}'),
        ("sensors/b11/telemetry", b"[" * 5000 + b"]" * 5000),
    ]
    messages: list[tuple[str, bytes]] = []
    for i in range(300):
        messages.append(
            (
                f"sensors/good{i % 10}/telemetry",
                json.dumps({"ts": T0 + i, "temperature": 20.5, "humidity": 50}).encode(),
            )
        )
        if i % 25 == 0:  # 12 bad messages: every kind, the first twice
            messages.append(bad[(i // 25) % len(bad)])
    daemon.wait_ready()
    publish(mosquitto.port, messages)
    wait_for(
        lambda: db.count() >= 600 and db.count("quarantine") >= 12,
        30,
        what="good readings and quarantined messages",
    )
    assert daemon.stop() == 0, daemon.logs()
    daemon.kill()
    assert db.count() == 600
    reasons = db.rows("SELECT topic, reason, payload FROM quarantine ORDER BY id")
    assert len(reasons) == 12
    by_topic = {t: r for t, r, _ in reasons}
    assert "not valid JSON" in by_topic["sensors/b1/telemetry"]
    assert "not an object" in by_topic["sensors/b2/telemetry"]
    assert "'temperature' is not a finite number" in by_topic["sensors/b3/telemetry"]
    assert "not a number" in by_topic["sensors/b4/temperature"]
    assert "not a number" in by_topic["sensors/b5/temperature"]
    assert "not ISO 8601" in by_topic["sensors/b6/telemetry"]
    assert "not valid JSON" in by_topic["sensors/b7/telemetry"]
    assert "not a finite number" in by_topic["sensors/b8/temperature"]
    assert "above the limit max=100" in by_topic["sensors/b9/telemetry"]
    assert by_topic["sensors/b10/telemetry"] == "payload is not valid UTF-8"
    assert by_topic["sensors/b11/telemetry"] == "JSON is nested too deeply"
    # The raw payload is kept for inspection.
    assert (b"{not json",) in db.rows("SELECT payload FROM quarantine")
    logs = daemon.logs()
    assert '"msg": "quarantined"' in logs


@pytest.mark.parametrize(
    ("toml", "env", "expect"),
    [
        ('[mqtt]\nport = "eighteen"\n', {}, "mqtt.port"),
        ("[mqtt]\nport = 1883\n[batch]\nmax_readingz = 5\n", {}, "batch.max_readingz: unknown key"),
        ("[mqtt\nport = 1\n", {}, "not valid TOML"),
        (
            "",
            {"INGESTD_BATCH__MAX_DELAY_MS": "-5"},
            "batch.max_delay_ms: Input should be greater than or equal to 0",
        ),
        (
            '[[routes]]\ntopic = "a/{x}/b"\nformat = "value"\n',
            {},
            "routes[0]: sensor template '{sensor}' uses {sensor}, which topic",
        ),
    ],
)
def test_invalid_config_exits_78_naming_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], expect: str
) -> None:
    path = tmp_path / "bad.toml"
    routes = ""
    if "[[routes]]" not in toml:
        routes = '\n[[routes]]\ntopic = "s/{sensor}/{metric}"\nformat = "value"\n'
    path.write_text(toml + routes)
    db = tmp_path / "never.db"
    proc = subprocess.run(
        [sys.executable, "-m", "ingestd", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "INGESTD_STORE__PATH": str(db), **env},
    )
    assert proc.returncode == 78, proc.stderr
    assert str(path) in proc.stderr
    assert expect.replace("Value error, ", "") in proc.stderr
    assert not db.exists(), "nothing may start on a bad config"


def test_check_config_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", mqtt={"username": "u", "password": "hunter2"})
    proc = subprocess.run(
        [sys.executable, "-m", "ingestd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "INGESTD_MQTT__PORT": "18830"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout
    effective = json.loads(proc.stdout)
    assert effective["mqtt"]["port"] == 18830
    assert effective["mqtt"]["password"] == "**********"
    assert effective["routes"][0]["topic"] == "sensors/{sensor}/telemetry"


def test_sigint_drains_and_exits_0(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    daemon = daemons(
        mosquitto.port, config=SHIPPED_CONFIG, INGESTD_BATCH__MAX_DELAY_MS="5000"
    ).start()
    db = DbReader(tmp_path / "ingestd.db")
    daemon.wait_ready()
    publish(mosquitto.port, [("sensors/s/temperature", b"1.5")] * 5, qos=1)
    time.sleep(0.5)
    # The batch would wait 5 s; a stop commits it at once.
    daemon.signal(signal.SIGINT)
    assert daemon.wait(10) == 0, daemon.logs()
    daemon.kill()
    assert db.count() == 5
    assert "STOPPING=1" in daemon.notices


def test_a_store_it_cannot_use_stops_it_with_status_1(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    db = tmp_path / "ingestd.db"
    import sqlite3

    with sqlite3.connect(db) as c:
        c.execute("PRAGMA user_version = 999")
    daemon = daemons(mosquitto.port, config=SHIPPED_CONFIG).start()
    assert daemon.wait(20) == 1
    daemon.kill()
    assert "newer than this ingestd understands" in daemon.logs()
    assert "READY=1" not in daemon.notices


def test_a_failing_component_cancels_the_rest_and_exits_non_zero(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    import sqlite3

    daemon = daemons(mosquitto.port, config=SHIPPED_CONFIG).start()
    db = tmp_path / "ingestd.db"
    daemon.wait_ready()
    publish(mosquitto.port, [("sensors/a/temperature", b"1")])
    wait_for(lambda: DbReader(db).count() == 1, 10, what="first reading")
    # Sabotage the schema under the running daemon: not a transient condition.
    with sqlite3.connect(db) as c:
        c.execute("DROP VIEW readings")
        c.execute("DROP TABLE samples")
    publish(mosquitto.port, [("sensors/a/temperature", b"2")])
    status = daemon.wait(20)
    daemon.kill()
    assert status == 1
    logs = daemon.logs()
    assert "component failed" in logs
    assert "no such table: samples" in logs
