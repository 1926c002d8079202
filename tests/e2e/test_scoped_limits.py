"""Limits scoped per route and sensor glob, and a misspelt limit key reported,
through the daemon: what is stored and quarantined, the warning, the metric,
and a reload that starts the report over."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from tests.support.brokers import Mosquitto
from tests.support.daemon import DaemonFactory
from tests.support.db import DbReader
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.waiting import wait_for

CONFIG = """
[processor]
report_unmatched_after = 1.0

[processor.limits]
temperature = {{ min = -60.0, max = 100.0 }}
{typo}

[[processor.rules]]
sensor = "lab-*"
metric = "temperature"
max = 200.0

[[routes]]
topic = "freezers/{{sensor}}/{{metric}}"
format = "value"
limits = {{ temperature = {{ min = -40.0, max = -10.0 }} }}

[[routes]]
topic = "ovens/{{sensor}}/{{metric}}"
format = "value"
limits = {{ temperature = {{ max = 300.0 }} }}

[[routes]]
topic = "sensors/{{sensor}}/{{metric}}"
format = "value"
"""
UNMATCHED = "ingestd_processor_key_unmatched"
TYPO = 'key="processor.limits.temprature"'


def test_scoped_limits_and_a_misspelt_key_through_the_daemon(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    config = tmp_path / "ingestd.toml"
    config.write_text(CONFIG.format(typo="temprature = { max = 50.0 }"))
    daemon = daemons(mosquitto.port, config=config).start()
    daemon.wait_ready()
    publish(
        mosquitto.port,
        [
            ("freezers/f1/temperature", b"5"),  # the global accepts; the route's does not
            ("freezers/f1/temperature", b"-20"),
            ("ovens/o1/temperature", b"250"),  # the global refuses; the route's accepts
            ("sensors/lab-1/temperature", b"150"),  # the rule's max wins over the global
            ("sensors/k1/temperature", b"150"),  # the global limit
            ("sensors/k1/temperature", b"21"),
        ],
    )
    db = DbReader(tmp_path / "ingestd.db")
    wait_for(lambda: db.count() + db.count("quarantine") == 6, 20, what="6 judged")
    assert sorted(db.rows("SELECT sensor, value FROM readings")) == [
        ("f1", -20.0),
        ("k1", 21.0),
        ("lab-1", 150.0),
        ("o1", 250.0),
    ]
    assert sorted(r for (r,) in db.rows("SELECT reason FROM quarantine")) == [
        "temperature=150 is above the limit max=100",
        "temperature=5 is above the limit max=-10 "
        "(routes[freezers/{sensor}/{metric}].limits.temperature)",
    ]

    # More than report_unmatched_after seconds of traffic later: reported, once.
    time.sleep(1.2)
    _send(mosquitto.port)
    wait_for(lambda: _warnings(daemon.logs()) != [], 20, what="the report")
    (warning,) = _warnings(daemon.logs())
    assert warning["key"] == "processor.limits.temprature"
    assert warning["did_you_mean"] == ["temperature"]
    base = daemon.metrics_url()
    assert metric_value(http_get(base + "/metrics")[1], UNMATCHED, TYPO) == 1
    _send(mosquitto.port)
    wait_for(lambda: db.count() == 6, 20, what="two more readings")
    assert len(_warnings(daemon.logs())) == 1

    # The typo fixed and reloaded: the report starts over with the new keys.
    config.write_text(CONFIG.format(typo=""))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: '"configuration reloaded"' in daemon.logs(), 20, what="the reload")
    assert f"{UNMATCHED}{{{TYPO}}}" not in http_get(base + "/metrics")[1]
    assert daemon.stop() == 0


def _send(port: int) -> None:
    publish(port, [("sensors/k1/temperature", b"22")])


def _warnings(logs: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    return [x for x in lines if "matched no reading" in str(x.get("msg"))]
