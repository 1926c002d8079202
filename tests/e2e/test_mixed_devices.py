"""Devices as they are, against the running daemon: mixed formats on several
routes, a runaway device, and a fuzz run of 100,000 generated payloads."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ingestd.config import load_settings, route_table
from ingestd.devices import DeviceState
from ingestd.tools.explain import outcome
from tests.support.brokers import Mosquitto
from tests.support.config import write_config
from tests.support.daemon import DaemonFactory
from tests.support.db import DbReader
from tests.support.harness import InProcess, settings_for, until
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.waiting import wait_for

T0 = 1_700_000_000.0

MIXED_ROUTES = """
[[routes]]
topic = "plant/{site}/{sensor}/json"
format = "json"
exclude_fields = ["status"]

[[routes]]
topic = "senml/{sensor}"
format = "senml"

[[routes]]
topic = "telegraf/{site}"
format = "influx"
sensor = "{site}"
sensor_tag = "host"

[[routes]]
topic = "sensors/{sensor}/{metric}"
format = "value"
"""


async def test_mixed_formats_on_several_routes(tmp_path: Path, mosquitto: Mosquitto) -> None:
    settings = settings_for(
        tmp_path,
        mosquitto.port,
        MIXED_ROUTES,
        processor={"scaling": {"pressure": {"scale": 0.01, "unit": "hPa"}}},
    )
    db = DbReader(tmp_path / "ingestd.db")
    async with InProcess(settings) as daemon:
        await asyncio.to_thread(
            publish,
            mosquitto.port,
            [
                (
                    "plant/lyon/p1/json",
                    json.dumps(
                        {"ts": T0, "status": "ok", "pressure": 101325, "env": {"t": 21.5}}
                    ).encode(),
                ),
                # A record's unit is its own `u`, else `bu` (RFC 8428 4.6), and a unit
                # is part of a series: both temperatures say Cel.
                (
                    "senml/dev7",
                    json.dumps(
                        [
                            {"bn": "dev7:", "bt": T0, "n": "temp", "u": "Cel", "v": 23.1},
                            {"n": "temp", "u": "Cel", "t": 60, "v": 23.4},
                            {"n": "door", "vb": True, "t": 60},
                        ]
                    ).encode(),
                ),
                (
                    "telegraf/paris",
                    b"cpu,host=web1,core=0 idle=97.5 1700000000000000000\n"
                    b"cpu,host=web2,core=0 idle=12 1700000000000000000",
                ),
                ("sensors/k1/temperature", b"19.25"),
            ],
        )
        await until(lambda: db.count() == 8, 20, what="8 readings")
        assert daemon.accounting().unexplained == 0
    assert daemon.status == 0
    rows = db.rows(
        "SELECT sensor, metric, ts, value, tags, unit FROM readings "
        "WHERE sensor != 'k1' ORDER BY sensor, metric, ts"
    )
    assert rows == [
        ("dev7", "dev7:door", T0 + 60, 1.0, "", ""),
        ("dev7", "dev7:temp", T0, 23.1, "", "Cel"),
        ("dev7", "dev7:temp", T0 + 60, 23.4, "", "Cel"),
        ("p1", "env.t", T0, 21.5, '{"site":"lyon"}', ""),
        ("p1", "pressure", T0, pytest.approx(1013.25), '{"site":"lyon"}', "hPa"),
        ("web1", "cpu.idle", T0, 97.5, '{"core":"0"}', ""),
        ("web2", "cpu.idle", T0, 12.0, '{"core":"0"}', ""),
    ]
    (k1,) = db.rows("SELECT metric, value FROM readings WHERE sensor = 'k1'")
    assert k1 == ("temperature", 19.25)
    assert db.count("quarantine") == 0


def test_a_runaway_device_cannot_starve_the_others(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    routes = """
[[routes]]
topic = "sensors/{sensor}/{metric}"
format = "value"
rate_limit = 50
rate_burst = 100
"""
    config = write_config(tmp_path / "ingestd.toml", routes=routes)
    daemon = daemons(mosquitto.port, config=config).start()
    db = DbReader(tmp_path / "ingestd.db")
    loud = 20_000
    daemon.wait_ready()
    base = daemon.metrics_url()
    messages = []
    for i in range(loud):
        messages.append(("sensors/loud/t", b"%d" % i))
        if i % 20 == 0:  # 10 quiet devices, 100 readings each, at 1 per 200 loud ones
            messages.append((f"sensors/quiet{i // 20 % 10}/t", b"%d" % i))
    publish(mosquitto.port, messages)
    wait_for(
        lambda: db.count("readings WHERE sensor GLOB 'quiet*'") == 1000,
        30,
        what="every quiet reading",
    )

    def settled() -> bool:
        text = http_get(base + "/metrics")[1]
        return (
            metric_value(text, "ingestd_messages_received_total") == loud + 1000
            and metric_value(text, "ingestd_inflight_messages") == 0
        )

    wait_for(settled, 30, what="all messages received and settled")
    _, text = http_get(base + "/metrics")
    dropped = metric_value(text, "ingestd_readings_rate_limited_total", 'policy="drop"')
    assert daemon.stop() == 0
    daemon.kill()
    stored = db.count("readings WHERE sensor = 'loud'")
    assert stored + dropped == loud
    # The burst, then 50/s for as long as the flood lasted (a few seconds here).
    assert 100 <= stored < 2000, stored
    assert db.count("readings WHERE sensor GLOB 'quiet*'") == 1000


# -- fuzz ---------------------------------------------------------------------------------

FUZZ_ROUTES = """
[[routes]]
topic = "fzj/{sensor}"
format = "json"
[[routes]]
topic = "fzs/{sensor}"
format = "senml"
[[routes]]
topic = "fzi/{sensor}"
format = "influx"
[[routes]]
topic = "fzv/{sensor}"
format = "value"
metric = "v"
[[routes]]
topic = "spBv1.0/#"
format = "sparkplug"
sensor = "{edge_node}"
request_rebirth = false
"""


def _sparkplug_seeds() -> list[bytes]:
    """NBIRTHs (each message its own edge node, so each stands alone) and
    NDEATHs, valid before mutation: protobuf garbage after."""
    from ingestd.formats.sparkplug_pb import BY_NAME, Payload

    birth = Payload(timestamp=1_700_000_000_000, seq=0)
    birth.metrics.add(name="bdSeq", datatype=BY_NAME["UInt64"], long_value=3)
    t = birth.metrics.add(name="t", alias=1, datatype=BY_NAME["Double"], double_value=21.5)
    t.properties.keys.append("engUnit")
    t.properties.values.add(type=BY_NAME["String"], string_value="C")
    birth.metrics.add(name="n", alias=2, datatype=BY_NAME["Int32"], int_value=2**32 - 5)
    birth.metrics.add(name="s", alias=3, datatype=BY_NAME["String"], string_value="x")
    birth.metrics.add(name="h", alias=4, datatype=BY_NAME["Float"], float_value=0.5, timestamp=1)
    death = Payload(timestamp=1_700_000_000_000)
    death.metrics.add(name="bdSeq", datatype=BY_NAME["UInt64"], long_value=3)
    return [bytes(birth.SerializeToString()), bytes(death.SerializeToString())]


SEEDS = {
    "fzj": [
        b'{"ts": 1700000000, "t": 21.5, "env": {"h": 40, "co2": 400}}',
        b'[{"ts": 1700000000.5, "a": 1}, {"ts": "2023-11-14T22:13:20Z", "b": true}]',
    ],
    "fzs": [
        b'[{"bn":"d:","bt":1700000000,"bu":"Cel","n":"t","v":21.5},{"n":"h","v":40,"t":5}]',
        b'[{"n":"x","v":1,"s":2}]',
    ],
    "fzi": [
        b"cpu,host=a,core=0 idle=97.5,user=2i 1700000000000000000\nmem used=1u",
        b'weather,loc=x temp=21.5,ok=t,desc="fine" 1700000000000000000',
    ],
    "fzv": [b"21.5", b"-1e3", b"true"],
    "spBv1.0/fz/NBIRTH": _sparkplug_seeds()[:1],
    "spBv1.0/fz/NDEATH": _sparkplug_seeds()[1:],
}
TOKENS = [
    b"NaN",
    b"Infinity",
    b"1e999",
    b"9" * 400,
    b"\xff\xfe",
    b"\x00",
    b"[[[[[[",
    b'"',
    b"\\",
    b"\n",
    b",",
    b"=",
    b" ",
    b"{}",
    b"[]",
    b"null",
    b'"bver":99',
    b'"x_":1',
    b"\xe2\x82",
    b"-",
    b"e",
    b"i",
    b"u",
    b'"vs":"a"',
    b"{" * 600,
]


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            del data[min(pos, len(data) - 1)]
        elif op == 1:
            data[pos:pos] = rng.choice(TOKENS)
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 6))
        elif op == 3:
            del data[pos:]
        elif data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


@pytest.mark.slow
def test_fuzz_100000_generated_payloads_through_the_daemon(
    tmp_path: Path,
    mosquitto: Mosquitto,
    record_property: Callable[[str, object], None],
    daemons: DaemonFactory,
) -> None:
    config = write_config(
        tmp_path / "ingestd.toml",
        routes=FUZZ_ROUTES,
        processor={"max_age_days": 0, "max_future_seconds": 0},
    )
    daemon = daemons(mosquitto.port, config=config).start()
    rng = random.Random(20261125)
    n = 100_000
    messages = []
    for i in range(n):
        prefix = rng.choice(list(SEEDS))
        messages.append((f"{prefix}/f{i}", _mutate(rng, rng.choice(SEEDS[prefix]))))
    daemon.wait_ready()
    base = daemon.metrics_url()
    publish(mosquitto.port, messages)

    def settled() -> bool:
        # One accounting snapshot: every message received, every reading settled.
        text = http_get(base + "/metrics")[1]
        return (
            metric_value(text, "ingestd_messages_received_total") == n
            and metric_value(text, "ingestd_readings_in_flight") == 0
            and metric_value(text, "ingestd_inflight_messages") == 0
        )

    wait_for(settled, 120, interval=0.5, what="every fuzz message settled")
    metrics = http_get(base + "/metrics")[1]
    assert daemon.proc is not None
    assert daemon.proc.poll() is None, "the daemon died"
    assert daemon.stop() == 0
    daemon.kill()
    with sqlite3.connect(tmp_path / "ingestd.db") as c:
        per_sensor = dict(c.execute("SELECT sensor, count(*) FROM readings GROUP BY sensor"))
        stored = set(per_sensor)
        quarantined = {
            t.rsplit("/", 1)[1]: r for t, r in c.execute("SELECT topic, reason FROM quarantine")
        }
    assert all(quarantined.values()), "a quarantine row without a reason"
    bugs = [r for r in quarantined.values() if r.startswith("internal error")]
    assert bugs == [], bugs[:5]
    # Every message: the readings explain lists are the readings stored (each
    # message has its own sensor, so nothing can be a duplicate of another).
    settings = load_settings(config)
    table = route_table(settings)
    devices = DeviceState()
    disagree = []
    explained = 0
    silent = set()  # nothing to store and nothing wrong (a Sparkplug NDEATH, say)
    for i, (topic, payload) in enumerate(messages):
        kept, rejected = outcome(table, devices, settings.processor, topic, payload, time.time_ns())
        explained += len(kept)
        if not kept and not rejected:
            silent.add(f"f{i}")
        if len(kept) != per_sensor.get(f"f{i}", 0):
            disagree.append((topic, payload, len(kept), per_sensor.get(f"f{i}", 0)))
    assert disagree == [], disagree[:5]
    # And the daemon's own accounting: every decoded reading has an outcome.
    assert metric_value(metrics, "ingestd_readings_unexplained") == 0
    assert metric_value(metrics, "ingestd_readings_duplicate_total") == 0
    assert metric_value(metrics, "ingestd_readings_committed_total") == explained
    assert metric_value(metrics, "ingestd_readings_decoded_total") == explained + metric_value(
        metrics, "ingestd_readings_quarantined_total"
    )
    unaccounted = [
        f"f{i}"
        for i in range(n)
        if f"f{i}" not in stored and f"f{i}" not in quarantined and f"f{i}" not in silent
    ]
    assert unaccounted == [], f"{len(unaccounted)} messages neither stored nor quarantined"
    only_quarantined = len(set(quarantined) - stored)
    record_property("fuzz_messages", n)
    record_property("fuzz_quarantined", len(quarantined))
    record_property("fuzz_only_quarantined", only_quarantined)
    record_property("fuzz_stored_some", len(stored))
    record_property("fuzz_nothing_to_store", len(silent))
    print(
        f"fuzz: {n} messages, {len(quarantined)} quarantined with a reason "
        f"({only_quarantined} wholly), {len(stored)} yielded readings, {len(silent)} had "
        "nothing to store (explain agrees); 0 crashes"
    )
    assert len(quarantined) > n // 2  # mostly malformed, as generated


HOMIE_ROUTE = """
[[routes]]
topic = "homie/5/#"
format = "homie"
"""


def test_a_homie_device_through_the_daemon_and_a_restart(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    """A Homie 5 device as devices publish: retained description, state and
    values. Values are stored with the description's units; a device that never
    described itself is quarantined with the reason; after a restart the broker
    re-sends everything retained and nothing is stored twice."""
    description = {
        "homie": "5.0",
        "version": 1,
        "nodes": {
            "env": {
                "properties": {
                    "temperature": {"datatype": "float", "unit": "°C"},
                    "on": {"datatype": "boolean"},
                    "mode": {"datatype": "enum", "format": "eco,comfort"},
                }
            }
        },
    }
    retained = [
        ("homie/5/boiler/$description", json.dumps(description).encode()),
        ("homie/5/boiler/$state", b"init"),
    ]
    publish(mosquitto.port, retained, retain=True)
    db = DbReader(tmp_path / "ingestd.db")
    daemon = daemons(mosquitto.port, HOMIE_ROUTE).start()
    daemon.wait_ready()
    live = [
        ("homie/5/boiler/$state", b"ready"),
        *[("homie/5/boiler/env/temperature", b"%.1f" % (20 + i / 10)) for i in range(10)],
        ("homie/5/boiler/env/on", b"true"),
        ("homie/5/boiler/env/mode", b"eco"),
        ("homie/5/stranger/env/temperature", b"5"),
    ]
    publish(mosquitto.port, live, retain=True)  # as Homie devices do
    wait_for(lambda: db.count() == 11 and db.count("quarantine") == 1, 15, what="stored")
    text = http_get(daemon.metrics_url() + "/metrics")[1]
    assert metric_value(text, "ingestd_readings_unexplained") == 0
    assert daemon.stop() == 0
    logs = daemon.logs()
    assert '"state": "init"' in logs
    assert '"state": "ready"' in logs
    # A restart: the broker re-sends the retained description, state and last
    # values; the values have no time of their own and are not stored again.
    again = daemons(mosquitto.port, HOMIE_ROUTE).start()
    again.wait_ready()
    time.sleep(1.5)
    text = http_get(again.metrics_url() + "/metrics")[1]
    assert metric_value(text, "ingestd_readings_unexplained") == 0
    assert again.stop() == 0
    assert db.count() == 11
    rows = db.rows("SELECT sensor, metric, value, unit FROM readings ORDER BY ts_ns")
    assert rows[0] == ("boiler", "env.temperature", 20.0, "°C")
    assert rows[-1] == ("boiler", "env.on", 1.0, "")
    ((reason,),) = db.rows("SELECT reason FROM quarantine")
    assert reason.startswith("device 'stranger' has not sent its $description")
    # The device's own word on its state, kept for `ingestd sensors`.
    assert db.rows("SELECT state FROM sensor_status WHERE sensor = 'boiler'") == [("ready",)]
