"""The spool across a restart, and on a full disk: what a reviewer broke.

The device state a restart goes on from is the last batch acknowledged (in the
spool), not the last one forwarded: a Sparkplug rebirth spooled before a
restart keeps its aliases, a `sequence_field` counts no false gap. A spool
whose disk fills is forwarded all the same once the database is back, and
started afresh when its file cannot shrink.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ingestd.spool import read_state
from tests.support.brokers import Mosquitto
from tests.support.daemon import DaemonFactory, DaemonProcess
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.postgres import PgReader, Postgres
from tests.support.sparkplug_node import EdgeNode
from tests.support.tmpfs import fill, mounted_tmpfs
from tests.support.waiting import wait_for

NOW = time.time()
FAST = {"INGESTD_STORE__RETRY_MAX_DELAY": "0.5", "INGESTD_STORE__SPOOL__AFTER_MS": "1000"}


def spooled(d: DaemonProcess, path: Path | None = None) -> int:
    state = read_state(path or d.workdir / "ingestd-spool.db")
    return state.readings if state else 0


def test_a_sparkplug_rebirth_spooled_before_a_restart_keeps_its_aliases(
    mosquitto: Mosquitto, daemons: DaemonFactory, own_pg: Postgres
) -> None:
    url = own_pg.create_db("ingest")
    db = PgReader(url)
    route = '[[routes]]\ntopic = "spBv1.0/#"\nformat = "sparkplug"\n'
    env = {"INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000", "INGESTD_STORE__URL": url, **FAST}
    d = daemons(mosquitto.port, route, **env).start()
    d.wait_ready()
    node = EdgeNode(mosquitto.port).connect()
    try:
        node.birth(0)
        for i in range(1, 51):
            node.data(i)
        wait_for(lambda: db.count() >= 4 * 51, 30, what="the first 50 DATA stored")
        own_pg.stop()
        # A rebirth that swaps two aliases, and data under it: spooled.
        swapped = {"Line/Temperature": 2, "Line/Pressure": 1, "Line/Count": 3, "Line/Running": 4}
        node.birth(51, aliases=swapped)
        for i in range(52, 102):
            node.data(i)
        wait_for(lambda: spooled(d) >= 4 * 51, 30, what="the rebirth spooled")
        assert d.stop() == 0
        own_pg.start()
        d.start()
        d.wait_ready(60)
        for i in range(102, 152):
            node.data(i)
        wait_for(lambda: db.count() >= 4 * 152, 60, what="every value stored")
        wait_for(lambda: spooled(d) == 0, 30, what="the spool forwarded")
        assert d.stop() == 0
    finally:
        node.close()
    got = {
        (str(m), int(ts) // 1_000_000): float(v)
        for m, ts, v in db.rows("SELECT metric, ts_ns, value FROM readings")
    }
    wrong = right = 0
    for ts, values in node.sent.items():
        for name, v in values.items():
            stored = got.get((name, ts))
            right += stored == v
            wrong += stored is not None and stored != v
    assert (right, wrong) == (4 * 152, 0), (right, wrong)
    assert node.rebirth_requests == 0
    assert db.count("quarantine") == 0


def test_a_sequence_counter_spooled_before_a_restart_counts_no_gap(
    mosquitto: Mosquitto, daemons: DaemonFactory, own_pg: Postgres
) -> None:
    url = own_pg.create_db("ingest")
    db = PgReader(url)
    route = '[[routes]]\ntopic = "dev/{sensor}/tele"\nformat = "json"\nsequence_field = "seq"\n'
    d = daemons(mosquitto.port, route, INGESTD_STORE__URL=url, **FAST).start()
    d.wait_ready()
    sensors = 20

    def messages(lo: int, hi: int) -> Iterator[tuple[str, bytes]]:
        for seq in range(lo, hi):
            for s in range(sensors):
                ts = NOW - 3600 + seq / 100 + s / 10000
                yield f"dev/s{s}/tele", b'{"ts": %.4f, "seq": %d, "v": %d}' % (ts, seq, seq)

    publish(mosquitto.port, messages(1, 101))
    wait_for(lambda: db.count() == 100 * sensors, 60, what="seq 1-100 stored")
    own_pg.stop()
    publish(mosquitto.port, messages(101, 201))
    wait_for(lambda: spooled(d) == 100 * sensors, 60, what="seq 101-200 spooled")
    assert d.stop() == 0
    own_pg.start()
    d.start()
    d.wait_ready(60)
    publish(mosquitto.port, messages(201, 301))
    wait_for(lambda: db.count() == 300 * sensors, 60, what="all stored")
    wait_for(lambda: spooled(d) == 0, 30, what="the spool forwarded")
    text = http_get(d.metrics_url() + "/metrics")[1]
    assert d.stop() == 0
    assert db.rows("SELECT sum(seq_gaps), sum(seq_missing) FROM sensor_status") == [(0, 0)]
    assert metric_value(text, "ingestd_sequence_gaps_total") == 0
    assert "gaps in devices' message counters" not in d.logs()


@contextlib.contextmanager
def _spooling_on_a_tiny_disk(
    tmp_path: Path, size: str, mosquitto: Mosquitto, daemons: DaemonFactory, own_pg: Postgres
) -> Iterator[tuple[Path, DaemonProcess, PgReader]]:
    """A daemon on PostgreSQL spooling to a tmpfs of `size`, PostgreSQL stopped:
    (the spool's path, the daemon, a reader of the database)."""
    with mounted_tmpfs(tmp_path / "tiny", size) as disk:
        url = own_pg.create_db("ingest")
        spool = disk / "spool.db"
        d = daemons(
            mosquitto.port, INGESTD_STORE__URL=url, INGESTD_STORE__SPOOL__PATH=str(spool), **FAST
        ).start()
        d.wait_ready()
        own_pg.stop()
        yield spool, d, PgReader(url)


def test_a_spool_whose_disk_fills_is_forwarded_and_started_afresh(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory, own_pg: Postgres
) -> None:
    with _spooling_on_a_tiny_disk(tmp_path, "1m", mosquitto, daemons, own_pg) as (_, d, db):
        n = 15_000
        pub = threading.Thread(
            target=publish,
            args=(
                mosquitto.port,
                (
                    (f"sensors/d{i % 500}/telemetry", b'{"ts": %.3f, "x": %d}' % (NOW + i / 1e3, i))
                    for i in range(n)
                ),
            ),
            kwargs={"inflight": 200},
            daemon=True,
        )
        pub.start()
        wait_for(lambda: "spool cannot take batches" in d.logs(), 60, what="the disk full")
        status, body = http_get(d.metrics_url() + "/readyz")
        assert status == 503, body
        own_pg.start()
        pub.join(120)
        wait_for(lambda: db.count() == n, 120, what="every reading stored")
        assert d.stop() == 0, d.logs()
        assert db.rows("SELECT count(DISTINCT (sensor, ts_ns)) FROM readings") == [(n,)]
        logs = d.logs()
        assert "forwarding the spool failed; retrying" in logs
        assert "batches are taken again" in logs


def test_a_kill_while_a_full_disk_keeps_forwarded_rows_leaves_true_counters(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory, own_pg: Postgres
) -> None:
    # A spool larger than one forwarding step, its disk full to the last byte:
    # forwarded rows stay in the file; the daemon is killed after the first
    # step and restarted. The restart's counters must not take the killed
    # run's readings for its own when the file starts afresh (they did:
    # readings_spooled went to -34,420).
    with _spooling_on_a_tiny_disk(tmp_path, "16m", mosquitto, daemons, own_pg) as tiny:
        spool, d, db = tiny
        n, fields = 16_000, 20

        def body(i: int) -> bytes:
            values = b", ".join(b'"f%d": %d' % (k, i) for k in range(fields))
            return b'{"ts": %.3f, %s}' % (NOW + i / 1e3, values)

        pub = threading.Thread(
            target=publish,
            args=(mosquitto.port, ((f"sensors/d{i % 500}/telemetry", body(i)) for i in range(n))),
            kwargs={"inflight": 500},
            daemon=True,
        )
        pub.start()
        wait_for(lambda: "spool cannot take batches" in d.logs(), 120, what="the disk full")
        fill(spool.parent / "filler")  # the last bytes, taken by someone else
        own_pg.start()
        wait_for(lambda: db.count() > 0, 60, what="forwarding begun")
        # Killed at once: a fast machine forwarded the whole file within the
        # 0.3 s this waited, and started it afresh, leaving nothing to recover.
        d.kill()
        left = read_state(spool)  # what the restart finds, forwarded rows kept included
        assert left is not None
        assert left.readings > 0, "killed after forwarding ended"
        d.start()
        d.wait_ready(60)
        pub.join(300)
        wait_for(lambda: db.count() >= n * fields, 240, what="every reading stored")
        wait_for(lambda: getattr(read_state(spool), "readings", None) == 0, 10, what="spool empty")
        distinct = "SELECT count(*), count(DISTINCT (sensor, metric, ts_ns)) FROM readings"
        assert db.rows(distinct) == [(n * fields, n * fields)]
        text = http_get(d.metrics_url() + "/metrics")[1]
        assert metric_value(text, "ingestd_spool_readings") == 0
        assert metric_value(text, "ingestd_readings_spooled") == 0  # this run's: all left
        # What the killed run left is recovered, all of it.
        assert metric_value(text, "ingestd_readings_recovered_total") == left.readings
        assert d.stop() == 0, d.logs()[-3000:]
