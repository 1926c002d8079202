"""Formats that keep per-device state, with several instances in one shared
group on one PostgreSQL: what holds, and what check-config refuses.

A shared subscription hands each message to one member. Homie devices
describe themselves in `$` topics; every member subscribes to those outside
the group, so a value reaching any member is read with its description,
whether the device described itself before the member joined (retained) or
after (live). Sparkplug and `sequence_field` cannot be judged on part of a
device's stream: in a group on PostgreSQL one member at a time, the primary,
reads them (tests/e2e/test_primary.py); with SQLite check-config refuses them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.brokers import BrokerFactory
from tests.support.config import REPO, write_config
from tests.support.daemon import DaemonFactory, DaemonProcess
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.postgres import PgReader
from tests.support.waiting import wait_for

HOMIE = """
[[routes]]
topic = "homie/#"
format = "homie"
"""


def description(n: int) -> bytes:
    return json.dumps(
        {
            "homie": "5.0",
            "version": n,
            "name": f"device {n}",
            "nodes": {
                "env": {
                    "properties": {
                        "temperature": {"datatype": "float", "unit": "°C"},
                        "count": {"datatype": "integer"},
                    }
                }
            },
        }
    ).encode()


def values(device: str, n: int, start: int = 0) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for i in range(start, start + n):
        out.append((f"homie/5/{device}/env/temperature", b"%.2f" % (20 + i / 100)))
        out.append((f"homie/5/{device}/env/count", b"%d" % i))
    return out


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_homie_devices_described_before_and_after_members_join(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    pg_url: str,
    protocol: str,
) -> None:
    b = brokers(tmp_path / "broker", max_inflight=1000).start()
    db = PgReader(pg_url)
    env = {
        "INGESTD_STORE__URL": pg_url,
        "INGESTD_MQTT__SHARED_GROUP": "ingest",
        "INGESTD_MQTT__PROTOCOL": protocol,
        "INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000",
    }

    fleet: list[DaemonProcess] = []

    def member(i: int) -> None:
        fleet.append(daemons(b.port, HOMIE, workdir=tmp_path / f"m{i}", **env).start())
        fleet[-1].wait_ready()

    member(0)
    # Described before the other members join: retained, and live to member 0.
    publish(b.port, [("homie/5/early/$description", description(1))], retain=True)
    publish(b.port, [("homie/5/early/$state", b"ready")], retain=True)
    member(1)
    member(2)
    # Described after every member joined: a live message.
    publish(b.port, [("homie/5/late/$description", description(2))], retain=True)
    publish(b.port, [("homie/5/late/$state", b"ready")], retain=True)
    sent = publish(b.port, values("early", 300) + values("late", 300))
    assert sent == 1200
    wait_for(lambda: db.count() + db.count("quarantine") >= 1200, 60, what="every value handled")
    assert db.count("quarantine") == 0, db.rows("SELECT topic, reason FROM quarantine LIMIT 3")
    assert db.count() == 1200
    assert db.rows("SELECT count(*) FROM readings WHERE unit = '°C'") == [(600,)]
    # Spread over the members: each stored some (a test of the group, not of one member).
    for m in fleet:
        text = http_get(m.metrics_url() + "/metrics")[1]
        assert metric_value(text, "ingestd_readings_committed_total") > 0
    # A member that joins later still has both descriptions.
    member(3)
    publish(b.port, values("early", 100, start=300) + values("late", 100, start=300))
    wait_for(lambda: db.count() + db.count("quarantine") >= 1600, 60, what="the rest handled")
    assert db.count("quarantine") == 0
    assert db.count() == 1600
    states = dict(db.rows("SELECT sensor, state FROM sensor_status"))
    assert states == {"early": "ready", "late": "ready"}


def check_config(tmp_path: Path, routes: str, **env: str) -> subprocess.CompletedProcess[str]:
    config = write_config(tmp_path / "ingestd.toml", routes=routes)
    return subprocess.run(
        [sys.executable, "-m", "ingestd", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"INGESTD_MQTT__SHARED_GROUP": "ingest", "PATH": "/usr/bin:/bin", **env},
    )


def test_check_config_takes_ordered_routes_in_a_group_only_with_postgresql(
    tmp_path: Path,
) -> None:
    sparkplug = '[[routes]]\ntopic = "spBv1.0/#"\nformat = "sparkplug"\n'
    sequenced = '[[routes]]\ntopic = "s/{sensor}/t"\nsequence_field = "n"\n'
    out = check_config(tmp_path, sparkplug + sequenced + HOMIE)
    assert out.returncode == 78, out.stderr
    assert "routes[0].format: not with mqtt.shared_group:" in out.stderr
    assert "routes[1].sequence_field: not with mqtt.shared_group:" in out.stderr
    assert "PostgreSQL store they share (store.url)" in out.stderr
    assert "routes[2]" not in out.stderr  # homie reads in a group
    assert check_config(tmp_path, HOMIE).returncode == 0
    host = check_config(tmp_path, HOMIE, INGESTD_MQTT__SPARKPLUG_HOST_ID="scada")
    assert host.returncode == 78
    assert "mqtt.sparkplug_host_id: not with mqtt.shared_group:" in host.stderr
    pg = {"INGESTD_STORE__URL": "postgresql://ingestd@127.0.0.1:1/ingestd"}
    both = check_config(tmp_path, sparkplug + sequenced + HOMIE, **pg)
    assert both.returncode == 0, both.stderr
    assert check_config(tmp_path, HOMIE, INGESTD_MQTT__SPARKPLUG_HOST_ID="x", **pg).returncode == 0
    # A shared route reaching the ordered route's topics: the member would read them.
    wide = '[[routes]]\ntopic = "s/{sensor}/#"\n'
    out = check_config(tmp_path, sequenced + wide, **pg)
    assert out.returncode == 78
    assert "routes[1].topic: not with mqtt.shared_group: it reaches topics of routes[0]" in (
        out.stderr
    )
