"""Decode throughput of each payload format, on one core, without MQTT or SQLite.

    .venv/bin/python -m bench.decode_bench

Each format decodes the same representative message over and over through
`decode_all` (route matching, decoding, the Reading structs), in chunks of
1,000 messages as the daemon does; the median of 5 runs is reported as
readings/s and microseconds per reading.
"""

from __future__ import annotations

import json
import statistics
import time

from ingestd.config import Settings, route_table
from ingestd.decode import decode_all
from ingestd.devices import DeviceState
from ingestd.events import NS

T0 = 1_700_000_000.0
ROUTES = [
    {"topic": "json/{sensor}", "format": "json"},
    {"topic": "senml/{sensor}", "format": "senml"},
    {"topic": "influx/{sensor}", "format": "influx"},
    {"topic": "value/{sensor}/{metric}", "format": "value"},
    {"topic": "homie/5/#", "format": "homie"},
    {"topic": "spBv1.0/#", "format": "sparkplug"},
]
# Homie values need their device's description first (decoded once, before timing).
HOMIE_DESCRIPTION = json.dumps(
    {"homie": "5.0", "version": 1, "nodes": {"env": {"properties": {
        "temperature": {"datatype": "float", "unit": "°C"}}}}}
).encode()  # fmt: skip
CASES = [
    (
        "json, flat object, 2 readings",
        "json/d1",
        json.dumps({"ts": T0, "temperature": 21.5, "humidity": 40.2}).encode(),
    ),
    (
        "json, nested objects, 4 readings",
        "json/d1",
        json.dumps(
            {"ts": T0, "env": {"t": 21.5, "h": 40.2}, "power": {"v": 230.1, "a": 1.5}}
        ).encode(),
    ),
    (
        "json, array of 25 objects, 50 readings",
        "json/d1",
        json.dumps(
            [{"ts": T0 + i, "temperature": 21.5, "humidity": 40.2} for i in range(25)]
        ).encode(),
    ),
    (
        "senml, pack of 10 records",
        "senml/d1",
        json.dumps(
            [{"bn": "urn:dev:mac:0024befffe804ff1:", "bt": T0, "bu": "Cel", "n": "temp", "v": 21.5}]
            + [{"n": "temp", "t": i, "v": 21.5 + i / 10} for i in range(1, 10)]
        ).encode(),
    ),
    (
        "influx, 10 lines x 2 fields, tags",
        "influx/d1",
        "\n".join(
            f"cpu,host=web1,core={i} usage_user={i}.5,usage_system=3i {int((T0 + i) * 1e9)}"
            for i in range(10)
        ).encode(),
    ),
    ("value, one number", "value/d1/temperature", b"21.5"),
    ("homie, one float property", "homie/5/d1/env/temperature", b"21.5"),
]


def sparkplug_messages() -> tuple[bytes, list[bytes]]:
    """An NBIRTH declaring 10 Double metrics, and 1,024 NDATA carrying all 10 by
    alias, seq 1, 2, ... 255, 0, 1, ... (a whole number of wraps, so chunk after
    chunk follows on as a live node's would)."""
    from ingestd.formats.sparkplug_pb import BY_NAME, Payload  # noqa: PLC0415

    ms = int(T0 * 1000)
    birth = Payload(timestamp=ms, seq=0)
    for a in range(10):
        birth.metrics.add(name=f"m{a}", alias=a, datatype=BY_NAME["Double"], double_value=0.0)
    data = []
    for k in range(1024):
        p = Payload(timestamp=ms + k, seq=(k + 1) % 256)
        for a in range(10):
            p.metrics.add(alias=a, double_value=21.5 + a)
        data.append(p.SerializeToString())
    return birth.SerializeToString(), data


def main() -> int:
    table = route_table(Settings(routes=ROUTES))
    state = DeviceState()
    decode_all(table, state, [("homie/5/d1/$description", HOMIE_DESCRIPTION, int(T0 * NS))])
    birth, sparkplug_data = sparkplug_messages()
    decode_all(table, state, [("spBv1.0/g/NBIRTH/n1", birth, int(T0 * NS))])
    print(f"{'format':<42} {'readings/s':>12} {'us/reading':>11} {'msgs/s':>10}")
    chunks = [(name, [(topic, payload, int(T0 * NS))] * 1000) for name, topic, payload in CASES]
    chunks.append(
        (
            "sparkplug, NDATA of 10 doubles by alias",
            [("spBv1.0/g/NDATA/n1", p, int(T0 * NS)) for p in sparkplug_data],
        )
    )
    for name, chunk in chunks:
        readings, rejected = decode_all(table, state, chunk)
        assert readings, name
        assert not rejected, rejected[:1]
        per_message = len(readings) // len(chunk)
        runs = []
        for _ in range(5):
            n, started = 0, time.perf_counter()
            while time.perf_counter() - started < 0.5:
                n += len(decode_all(table, state, chunk)[0])
            runs.append(n / (time.perf_counter() - started))
        rate = statistics.median(runs)
        print(f"{name:<42} {rate:>12,.0f} {1e6 / rate:>11.2f} {rate / per_message:>10,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
