"""PostgreSQL failover: store.url names a primary and its streaming standby;
the primary goes away mid-stream and the standby is promoted.

The daemon waits the outage out as any other (the batch held, nothing
acknowledged, retries), then finds the promoted standby among the URL's hosts
(target_session_attrs=read-write) and commits there. With synchronous
replication every batch the daemon acknowledged is on the standby already:
every reading stored once. (Asynchronous replication can lose acknowledged
commits on failover; README "Failover" says so.)
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.support.brokers import BrokerFactory
from tests.support.daemon import DaemonFactory
from tests.support.metrics import http_get
from tests.support.mqtt import publish
from tests.support.postgres import PgReader, Postgres
from tests.support.waiting import wait_for

NOW = time.time()
DEVICES = 500
FAST = {
    "INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000",
    "INGESTD_MQTT__MAX_INFLIGHT": "1000",
    "INGESTD_STORE__RETRY_MAX_DELAY": "0.5",
}


@pytest.fixture
def replicated() -> Iterator[tuple[Postgres, Postgres]]:
    """A primary with a database `ingest`, and its synchronous standby."""
    primary = Postgres().start()
    standby: Postgres | None = None
    try:
        primary.create_db("ingest")
        standby = primary.standby(synchronous=True)
        yield primary, standby
    finally:
        primary.cleanup()
        if standby is not None:
            standby.cleanup()


def stream(n: int) -> Iterator[tuple[str, bytes]]:
    """Message i: device d<i % DEVICES>, x = i, y = -i, at a distinct time today."""
    for i in range(n):
        yield (
            f"sensors/d{i % DEVICES}/telemetry",
            b'{"ts": %.3f, "x": %d, "y": %d}' % (NOW - 3600 + i / 1000, i, -i),
        )


def _wait_for_a_write(url: str) -> bool:
    """Until one of ingestd's connections is in a statement or a transaction
    (polled every 2 ms, at most 10 s): the fault then meets a commit in
    flight, whose outcome the daemon cannot know. Whether one was seen."""

    async def run() -> bool:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'ingestd' AND state <> 'idle'"
                ):
                    return True
                await asyncio.sleep(0.002)
            return False
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop", "kill -9"])
def test_a_standby_promoted_mid_stream_loses_and_doubles_nothing(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    replicated: tuple[Postgres, Postgres],
    how: str,
    record_property: Callable[[str, object], None],
) -> None:
    n = 20_000
    primary, standby = replicated
    url = (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/ingest"
        "?target_session_attrs=read-write"
    )
    # The standby answers reads throughout (hot standby), and is what is left.
    db = PgReader(standby.url("ingest"))
    b = brokers(tmp_path / "broker", max_inflight=1000).start()
    daemon = daemons(b.port, INGESTD_STORE__URL=url, **FAST).start()
    daemon.wait_ready()
    started = time.monotonic()
    pub = threading.Thread(
        target=publish, args=(b.port, stream(n)), kwargs={"inflight": 1000}, daemon=True
    )
    pub.start()
    x = "readings WHERE metric = 'x'"
    wait_for(lambda: db.count(x) >= n // 4, 60, what="a quarter stored")
    writing = _wait_for_a_write(primary.url("ingest"))
    failed = time.monotonic()
    if how == "stop":
        primary.stop("fast")  # a clean shutdown: the standby is sent all the WAL
    else:
        primary.kill()  # postmaster and backends at once
    at_fault = db.count(x)
    time.sleep(2)  # the daemon meets the outage: no host takes writes
    assert daemon.proc is not None
    assert daemon.proc.poll() is None, "it waits, it does not exit"
    during = db.count(x)
    standby.promote()
    promoted = time.monotonic()
    wait_for(lambda: db.count(x) > during, 60, what="a commit on the promoted standby")
    resumed = time.monotonic()
    pub.join(180)
    assert not pub.is_alive(), "the broker did not take every message"
    wait_for(lambda: db.count(x) == n, 120, what="every message stored")
    finished = time.monotonic()
    metrics = http_get(daemon.metrics_url() + "/metrics")[1]
    assert daemon.stop() == 0, daemon.logs()

    stored = sum(int(r[1]) for r in db.rows("SELECT metric, count(*) FROM readings GROUP BY 1"))
    rows = db.rows(
        "SELECT metric, count(*), count(DISTINCT (sensor, ts_ns)), count(DISTINCT sensor), "
        "sum(value) FROM readings GROUP BY metric ORDER BY metric"
    )
    half = n * (n - 1) / 2
    assert rows == [("x", n, n, DEVICES, half), ("y", n, n, DEVICES, -half)]
    assert db.count("quarantine") == 0
    assert during == at_fault, "nothing commits while no host takes writes"
    logs = daemon.logs()
    assert "store unavailable; spooling batches to local disk" in logs
    assert "store available again" in logs
    assert "the store is on another server now" in logs
    assert f"127.0.0.1:{standby.port}" in logs
    waited = re.findall(
        r'ingestd_store_errors_total\{condition="([^"]+)"\} ([1-9][0-9.e+]*)', metrics
    )
    assert waited, metrics
    figures = (
        f"{how} at {at_fault:,} of {n:,} messages{' during a write' * writing}: "
        f"sent {2 * n:,}, stored {stored:,}, distinct {rows[0][2] + rows[1][2]:,}; "
        f"first commit on the promoted standby {resumed - promoted:.1f} s after promote, "
        f"{resumed - failed:.1f} s after the primary went; stream {finished - started:.1f} s; "
        f"failed attempts {waited}"
    )
    record_property("failover", figures)
    print("\n" + figures)


COUNTED = """
[[routes]]
topic = "counted/{sensor}/telemetry"
format = "json"
sequence_field = "seq"
qos = 1
"""
PLAIN = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"
qos = 1
"""


def _counted_and_plain(n: int) -> Iterator[tuple[str, bytes]]:
    """Device `dev` counting 1..n (its sequence_field), each message followed
    by a plain one from one of the DEVICES."""
    for i in range(1, n + 1):
        yield "counted/dev/telemetry", b'{"ts": %.3f, "seq": %d, "t": %d}' % (NOW - i, i, i)
        yield (
            f"sensors/d{i % DEVICES}/telemetry",
            b'{"ts": %.3f, "x": %d}' % (NOW - 3600 + i / 1000, i),
        )


def _subscribed_as_primary(log: str) -> bool:
    return any(
        '"role": "primary"' in line and '"msg": "subscribed"' in line for line in log.splitlines()
    )


@pytest.mark.slow
def test_the_primary_role_moves_to_the_promoted_standby(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    replicated: tuple[Postgres, Postgres],
    record_property: Callable[[str, object], None],
) -> None:
    """A member of a shared group holding the primary role (a device with a
    sequence_field) when the primary server is killed -9: the role's lock
    connection dies with it, the term ends (the role's session keeps what was
    not acknowledged), and a new term is taken on the promoted standby. The
    counted device's stream is stored once, with no gap and no doubt."""
    n = 3_000
    primary, standby = replicated
    url = (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/ingest"
        "?target_session_attrs=read-write"
    )
    db = PgReader(standby.url("ingest"))
    b = brokers(tmp_path / "broker", max_inflight=1000).start()
    daemon = daemons(
        b.port,
        COUNTED + PLAIN,
        INGESTD_STORE__URL=url,
        INGESTD_MQTT__SHARED_GROUP="ingest",
        INGESTD_MQTT__PRIMARY_CLIENT_ID="ingestd-counted",
        **FAST,
    ).start()
    daemon.wait_ready()
    wait_for(lambda: _subscribed_as_primary(daemon.logs()), 30, what="the primary role")
    pub = threading.Thread(
        target=publish,
        args=(b.port, _counted_and_plain(n)),
        kwargs={"inflight": 1000},
        daemon=True,
    )
    pub.start()
    counted = "readings WHERE sensor = 'dev'"
    wait_for(lambda: db.count(counted) >= n // 4, 60, what="a quarter of the counted device")
    primary.kill()
    at_fault = db.count(counted)
    time.sleep(2)
    standby.promote()
    pub.join(120)
    assert not pub.is_alive(), "the broker did not take every message"
    wait_for(lambda: db.count("readings") == 2 * n, 120, what="every message stored")
    assert daemon.stop() == 0, daemon.logs()

    assert db.rows(f"SELECT count(*), count(DISTINCT ts_ns) FROM {counted}") == [(n, n)]
    assert db.rows(
        "SELECT last_seq, seq_gaps, seq_missing FROM sensor_status WHERE sensor = 'dev'"
    ) == [(n, 0, 0)]
    assert db.count("quarantine") == 0
    assert db.rows("SELECT epoch FROM primary_role") == [(2,)]
    logs = daemon.logs()
    assert logs.count('"msg": "primary role taken"') == 2, logs
    assert '"msg": "primary role lost' in logs
    figures = f"primary role: killed at {at_fault:,} of {n:,} counted; term 2 on the standby"
    record_property("failover_primary_role", figures)
    print("\n" + figures)
