"""SQLite inserts a batch's rows grouped by series: the daemon against a model of
what was published. For every key (sensor, metric, ts_ns, seq) the value of
the FIRST reading in publish order is stored; a later same-key
reading is a duplicate (same value) or a quarantined conflict (another
value); the rollups agree with the raw readings (a rebuild changes nothing).

Messages are arrays with repeated timestamps (seq > 0) drawn from a small
pool, so that one batch holds same-key readings inside one message and across
messages, redeliveries and new readings, over 256 rows (multi-row statements
of 128, 16 and 1 rows).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.brokers import BrokerFactory
from tests.support.daemon import DaemonFactory
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.waiting import wait_for

ROUTES = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"
qos = 1

[processor.kinds]
c = "counter"
"""
NS = 1_000_000_000


def messages(seed: int, count: int, wide: bool = False) -> list[tuple[str, bytes]]:
    rnd = random.Random(seed)
    base = (int(time.time()) - 2000) // 60 * 60
    pool = [base + rnd.randrange(0, 600) for _ in range(40)]
    out = []
    for i in range(count):
        sensor = f"s{rnd.randrange(12)}"
        if wide:  # a message's own times (a few, repeated inside it): nearly all new
            pool = [base - 12000 + i * 3 + k for k in range(3)] * 13
        objs = []
        for _ in range(rnd.randrange(1, 14)):
            obj: dict[str, float] = {
                "ts": rnd.choice(pool[:8]) if rnd.random() < 0.5 else rnd.choice(pool)
            }
            obj["g"] = rnd.randrange(3)
            if rnd.random() < 0.7:
                obj["c"] = rnd.randrange(0, 50)
            objs.append(obj)
        payload = json.dumps(objs if len(objs) > 1 else objs[0]).encode()
        out.append((f"sensors/{sensor}/telemetry", payload))
        if rnd.random() < 0.15:  # a redelivery-like copy, now or a little later
            out.append((f"sensors/{sensor}/telemetry", payload))
    return out


def model(msgs: list[tuple[str, bytes]]) -> tuple[dict[tuple[str, str, int, int], float], int, int]:
    """Stored values by key (first in publish order), duplicates, conflicts."""
    stored: dict[tuple[str, str, int, int], float] = {}
    dups = conflicts = 0
    for topic, payload in msgs:
        sensor = topic.split("/")[1]
        data = json.loads(payload)
        objs = data if isinstance(data, list) else [data]
        seen: dict[tuple[str, int], int] = {}
        for obj in objs:
            ts = obj["ts"] * NS
            for metric in ("g", "c"):
                if metric not in obj:
                    continue
                seq = seen.get((metric, ts), 0)
                seen[(metric, ts)] = seq + 1
                key = (sensor, metric, ts, seq)
                value = float(obj[metric])
                if key not in stored:
                    stored[key] = value
                elif stored[key] == value:
                    dups += 1
                else:
                    conflicts += 1
    return stored, dups, conflicts


def db_state(path: Path) -> dict[tuple[str, str, int, int], float]:
    with sqlite3.connect(path) as conn:
        return {
            (s, m, ts, seq): v
            for s, m, ts, seq, v in conn.execute(
                "SELECT sensor, metric, ts_ns, seq, value FROM readings"
            )
        }


def rollups(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT * FROM rollups ORDER BY 1, 2, 3").fetchall()


def expected_rollups(
    stored: dict[tuple[str, str, int, int], float], width: int
) -> dict[tuple[str, str, int], tuple[object, ...]]:
    by: dict[tuple[str, str, int], list[tuple[int, int, float]]] = {}
    for (s, m, ts, seq), v in stored.items():
        by.setdefault((s, m, ts // (width * NS) * width), []).append((ts, seq, v))
    out: dict[tuple[str, str, int], tuple[object, ...]] = {}
    for k, rows in by.items():
        rows.sort()
        vs = [v for _, _, v in rows]
        out[k] = (len(rows), min(vs), max(vs), sum(vs), rows[0][2], rows[-1][2])
    return out


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("rollups_on", [True, False])
@pytest.mark.parametrize("kill", [False, True])
def test_first_reading_of_a_key_is_stored_and_counts_agree(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    rollups_on: bool,
    kill: bool,
    wide: bool,
) -> None:
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    env = {
        "INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000",
        "INGESTD_ROLLUPS__ENABLED": "true" if rollups_on else "false",
    }
    daemon = daemons(broker.port, ROUTES, **env).start()
    daemon.wait_ready()
    msgs = messages(seed=28 + kill + 2 * rollups_on, count=3000, wide=wide)
    stored, dups, conflicts = model(msgs)
    db = tmp_path / "ingestd.db"
    if kill:
        half = len(msgs) // 2
        publish(broker.port, msgs[:half])
        time.sleep(0.3)
        proc = daemon.proc
        assert proc is not None
        proc.kill()  # kill -9 mid-stream
        proc.wait()
        publish(broker.port, msgs[half:])
        daemon.start()
        daemon.wait_ready()
    else:
        publish(broker.port, msgs)

    def settled() -> bool:
        try:
            text = http_get(daemon.metrics_url() + "/metrics")[1]
        except OSError:
            return False
        return metric_value(text, "ingestd_readings_in_flight") == 0 and len(db_state(db)) >= len(
            stored
        )

    wait_for(settled, 60, what="every reading stored")
    time.sleep(1.0)
    text = http_get(daemon.metrics_url() + "/metrics")[1]
    assert daemon.stop() == 0
    got = db_state(db)
    wrong = {k: (got.get(k), v) for k, v in stored.items() if got.get(k) != v}
    extra = set(got) - set(stored)
    assert not wrong, f"{len(wrong)} wrong: {list(wrong.items())[:5]}"
    assert not extra, f"{len(extra)} invented: {list(extra)[:5]}"
    with sqlite3.connect(db) as conn:
        quarantined = conn.execute(
            "SELECT count(*) FROM quarantine WHERE reason LIKE 'conflict:%'"
        ).fetchone()[0]
    if not kill:
        assert metric_value(text, "ingestd_readings_committed_total") == len(stored)
        assert metric_value(text, "ingestd_readings_duplicate_total") == dups
        assert quarantined == conflicts
        assert metric_value(text, "ingestd_readings_unexplained") == 0
    else:  # a redelivery after the kill may repeat a conflict; never lose one
        assert quarantined >= conflicts
    if rollups_on:
        before = rollups(db)
        for width, name in ((60, "1m"), (3600, "1h")):
            with sqlite3.connect(db) as conn:
                view = {
                    (s, m, b): (n, mn, mx, sm, f, la)
                    for s, m, b, n, mn, mx, sm, f, la in conn.execute(
                        "SELECT sensor, metric, bucket, count, min, max, sum, first, last "
                        f"FROM rollup_{name}"
                    )
                }
            want = expected_rollups(stored, width)
            diff = {k: (view.get(k), w) for k, w in want.items() if view.get(k) != w}
            assert not diff, f"rollup_{name}: {len(diff)} buckets differ: {list(diff.items())[:5]}"
        out = subprocess.run(
            [sys.executable, "-m", "ingestd", "rollups", "rebuild", "--config", str(daemon.config)],
            capture_output=True,
            text=True,
            env={**os.environ, **daemon.env},
            cwd=tmp_path,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert rollups(db) == before, "a rebuild changed the rollups the daemon kept"
