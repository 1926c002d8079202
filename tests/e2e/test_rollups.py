"""Rollups kept by the running daemon: across a kill -9 mid-stream, through
two members of a shared group, beside retention; checked against the raw
readings stored, `ingestd rollups rebuild` and `ingestd query --every`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestd.rollups import deltas
from tests.support.brokers import BrokerFactory
from tests.support.daemon import DaemonFactory, DaemonProcess
from tests.support.db import DbReader, StoreUnderTest
from tests.support.mqtt import publish
from tests.support.postgres import PgReader
from tests.support.waiting import wait_for

NS = 1_000_000_000
T0 = int(time.time()) // 3600 * 3600 - 3 * 3600  # 3 hours ago, an hour's start
KINDS = {"INGESTD_PROCESSOR__KINDS": '{"energy": "counter"}'}
FAST = {"INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000", "INGESTD_MQTT__MAX_INFLIGHT": "1000"}
DEVICES = 20


def stream(n: int) -> Iterator[tuple[str, bytes]]:
    """Message i: device d<i % DEVICES>, a gauge and a counter (a reset at
    i = n/2 for device 3), 3 hours spread over n messages."""
    for i in range(n):
        dev = i % DEVICES
        k = i // DEVICES
        energy = 1000 + 3 * k + dev
        if dev == 3 and i >= n // 2:
            energy = k - (n // 2) // DEVICES  # restarted from 0
        ts = T0 + (k * 3 * 3600) / (n // DEVICES) + dev / 1000
        yield (
            f"sensors/d{dev}/telemetry",
            b'{"ts": %.3f, "temp": %.1f, "energy": %d}' % (ts, (i * 7) % 23 - 5.5, energy),
        )


def expected(db: Any) -> dict[tuple[str, str, int, int], tuple[Any, ...]]:
    """Every rollup row computed from the raw readings stored."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for sensor, metric, ts_ns, value in db.rows(
        "SELECT sensor, metric, ts_ns, value FROM readings ORDER BY sensor, metric, ts_ns, seq"
    ):
        series[(sensor, metric)].append((int(ts_ns), float(value)))
    out = {}
    for (sensor, metric), points in series.items():
        d = deltas([v for _, v in points])
        for width in (60, 3600):
            buckets: dict[int, list[int]] = defaultdict(list)
            for i, (ts, _) in enumerate(points):
                buckets[ts // NS // width * width].append(i)
            for b, idx in buckets.items():
                vs = [points[i][1] for i in idx]
                inc = round(sum(d[i] for i in idx), 6) if metric == "energy" else None
                out[(sensor, metric, width, b)] = (len(vs), min(vs), max(vs), round(sum(vs), 6),
                                                   vs[0], vs[-1], inc)  # fmt: skip
    return out


def stored(db: Any) -> dict[tuple[str, str, int, int], tuple[Any, ...]]:
    out = {}
    for width, view in ((60, "rollup_1m"), (3600, "rollup_1h")):
        for sensor, metric, b, n, lo, hi, total, first, last, inc in db.rows(
            "SELECT sensor, metric, bucket, count, min, max, sum, first, last, increase "
            f"FROM {view}"
        ):
            out[(sensor, metric, width, int(b))] = (
                int(n), float(lo), float(hi), round(float(total), 6), float(first), float(last),
                None if inc is None else round(float(inc), 6),
            )  # fmt: skip
    return out


def cli(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingestd", *args, "--config", str(d.config)],
        capture_output=True,
        text=True,
        env={**os.environ, **d.env},
        check=False,
    )


@pytest.mark.slow
def test_rollups_survive_a_kill_and_agree_with_the_raw_readings(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory, store: StoreUnderTest
) -> None:
    n = 20_000
    b = brokers(tmp_path / "broker", max_inflight=1000).start()
    d = daemons(b.port, **store.env, **KINDS, **FAST).start()
    d.wait_ready()
    pub = threading.Thread(target=publish, args=(b.port, stream(n)), daemon=True)
    pub.start()
    db = store.reader
    wait_for(lambda: db.count() >= n // 2, 60, what="half stored")
    d.kill()  # kill -9 mid-stream: the batch in flight is redelivered
    d.start()
    pub.join(120)
    wait_for(lambda: db.count() == 2 * n, 120, what="every reading stored")
    assert d.stop() == 0
    want = expected(db)
    got = stored(db)
    assert set(got) == set(want)
    wrong = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    assert not wrong, wrong[:5]
    # Computed again from the raw readings: nothing changes.
    rebuilt = cli(d, "rollups", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rollups rebuilt (1m, 1h)" in rebuilt.stderr
    assert stored(db) == got
    # What an operator reads: the hourly rows, as JSON.
    out = cli(d, "query", "--sensor", "d3", "--metric", "energy", "--every", "1h",
              "--since", str(T0), "-f", "json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    hourly = json.loads(out.stdout)
    assert [r["increase"] for r in hourly] == [
        want[("d3", "energy", 3600, r["bucket"])][6] for r in hourly
    ]
    assert all(r["increase"] >= 0 for r in hourly), "a reset is not a negative spike"
    # 15 minutes: summed from the 1-minute rows.
    quarter = cli(d, "query", "-s", "d1", "-m", "temp", "--every", "15m", "--since", str(T0),
                  "-f", "json")  # fmt: skip
    assert quarter.returncode == 0, quarter.stderr
    rows = json.loads(quarter.stdout)
    assert sum(r["count"] for r in rows) == db.count(
        "readings WHERE sensor = 'd1' AND metric = 'temp'"
    )
    print(f"\n{store.name}: kill -9 mid-stream: {len(got):,} rollup rows equal the raw readings'")


@pytest.mark.slow
def test_two_members_and_a_kill_give_the_rollups_of_one(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory, pg_url: str
) -> None:
    n = 20_000
    b = brokers(tmp_path / "broker", max_inflight=1000).start()
    env = {"INGESTD_STORE__URL": pg_url, "INGESTD_MQTT__SHARED_GROUP": "g", **KINDS, **FAST}
    a = daemons(b.port, workdir=tmp_path / "a", **env).start()
    c = daemons(b.port, workdir=tmp_path / "c", **env).start()
    a.wait_ready()
    c.wait_ready()
    pub = threading.Thread(target=publish, args=(b.port, stream(n)), daemon=True)
    pub.start()
    db = PgReader(pg_url)
    wait_for(lambda: db.count() >= n // 2, 60, what="half stored")
    a.kill()
    a.start()
    pub.join(120)
    wait_for(lambda: db.count() == 2 * n, 120, what="every reading stored")
    assert a.stop() == 0
    assert c.stop() == 0
    want = expected(db)
    got = stored(db)
    wrong = [(k, got.get(k), want[k]) for k in want if got.get(k) != want[k]]
    assert not wrong, wrong[:5]
    assert set(got) == set(want)


def test_retention_removes_raw_readings_and_keeps_their_rollups(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory, store: StoreUnderTest
) -> None:
    b = brokers(tmp_path / "broker", max_inflight=1000).start()
    old = int(time.time()) // 3600 * 3600 - 10 * 86400  # 10 days ago
    d = daemons(
        b.port,
        **store.env,
        INGESTD_STORE__RETENTION_DAYS="5",
        INGESTD_STORE__MAINTENANCE_INTERVAL="1",
        INGESTD_ROLLUPS__CLOSE_SECONDS="1",  # the views lag by a close
    ).start()
    d.wait_ready()
    publish(b.port, [
        ("sensors/d1/telemetry", b'{"ts": %d, "temp": %d}' % (old + 60 * i, i)) for i in range(120)
    ])  # fmt: skip
    db = store.reader
    wait_for(lambda: db.count("rollup_1h") == 2, 30, what="the hourly rollups")
    wait_for(lambda: db.count() == 0, 30, what="raw readings past retention deleted")
    time.sleep(1.5)  # another upkeep pass
    assert d.stop() == 0
    assert db.rows("SELECT bucket, count, min, max FROM rollup_1h ORDER BY bucket") == [
        (old, 60, 0.0, 59.0),
        (old + 3600, 60, 60.0, 119.0),
    ]
    assert db.count("rollup_1m") == 120


def test_readings_from_before_rollups_are_rolled_up_by_rebuild(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory
) -> None:
    b = brokers(tmp_path / "broker", max_inflight=1000).start()
    d = daemons(b.port, INGESTD_ROLLUPS__ENABLED="false").start()
    d.wait_ready()
    publish(b.port, list(stream(2000)))
    db = DbReader(tmp_path / "ingestd.db")
    wait_for(lambda: db.count() == 4000, 30, what="every reading stored")
    assert d.stop() == 0
    assert db.count("rollups") == 0
    d.env.pop("INGESTD_ROLLUPS__ENABLED")
    d.env.update(KINDS)
    d.start()
    d.wait_ready()
    assert d.stop() == 0
    assert "run 'ingestd rollups rebuild'" in d.logs()
    done = cli(d, "rollups", "rebuild")
    assert done.returncode == 0, done.stderr
    assert stored(db) == expected(db)
    assert db.count("rollup_1h") == 3 * DEVICES * 2
