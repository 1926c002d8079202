"""The PostgreSQL store under faults, and many instances writing one database.

Each test that stops, kills or restarts PostgreSQL runs a cluster of its own
(`own_pg`); the promise under test is the same as with SQLite: hold the batch,
stop acknowledging, retry, say so once per state change, resume; never exit
because the database is away; every reading stored exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.support.brokers import BrokerFactory, Mosquitto
from tests.support.daemon import DaemonFactory
from tests.support.metrics import http_get
from tests.support.mqtt import publish
from tests.support.postgres import PgReader, Postgres
from tests.support.waiting import wait_for

NOW = time.time()
FAST = {
    "INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000",
    "INGESTD_MQTT__MAX_INFLIGHT": "1000",
    "INGESTD_STORE__RETRY_MAX_DELAY": "0.5",
}


def stream(n: int, start: int = 0, sensors: int = 50) -> Iterator[tuple[str, bytes]]:
    """Message i: sensor s<i % sensors>, x = i, y = -i, at a distinct time today
    (so the day's partitions take them)."""
    for i in range(start, start + n):
        yield (
            f"sensors/s{i % sensors}/telemetry",
            b'{"ts": %.3f, "x": %d, "y": %d}' % (NOW - 3600 + i / 1000, i, -i),
        )


def exactly_once(db: PgReader, n: int) -> list[tuple[object, ...]]:
    rows = db.rows(
        "SELECT metric, count(*), count(DISTINCT (sensor, ts_ns)), sum(value) FROM readings "
        "GROUP BY metric ORDER BY metric"
    )
    assert rows == [("x", n, n, n * (n - 1) / 2), ("y", n, n, -n * (n - 1) / 2)]
    return rows


def publisher(port: int, n: int, start: int = 0) -> threading.Thread:
    t = threading.Thread(
        target=publish,
        args=(port, stream(n, start)),
        kwargs={"inflight": 1000},
        daemon=True,
    )
    t.start()
    return t


def test_postgres_down_at_start_is_waited_out(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory, own_pg: Postgres
) -> None:
    url = own_pg.create_db("ingest")
    own_pg.stop()
    daemon = daemons(mosquitto.port, INGESTD_STORE__URL=url, **FAST).start()
    base = daemon.metrics_url()
    wait_for(lambda: "cannot open the store" in daemon.logs(), 15, what="the reason logged")
    status, body = http_get(base + "/readyz")
    assert status == 503
    assert "does not answer" in json.loads(body)["detail"], body
    time.sleep(2)
    assert daemon.proc is not None
    assert daemon.proc.poll() is None, "the daemon must wait, not exit"
    own_pg.start()
    daemon.wait_ready(timeout=30)
    publish(mosquitto.port, stream(1000))
    db = PgReader(url)
    wait_for(lambda: db.count() == 2000, 30, what="1000 messages stored")
    assert daemon.stop() == 0
    exactly_once(db, 1000)
    assert "postgresql://postgres@127.0.0.1" in daemon.logs()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["restart", "kill -9", "restart, spool off"])
def test_postgres_restarted_mid_stream_loses_and_doubles_nothing(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    own_pg: Postgres,
    how: str,
    record_property: Callable[[str, object], None],
) -> None:
    n = 30_000
    b = brokers(tmp_path / "broker", max_inflight=1000).start()
    url = own_pg.create_db("ingest")
    db = PgReader(url)
    spool = "true" if "spool off" not in how else "false"
    daemon = daemons(
        b.port, INGESTD_STORE__URL=url, INGESTD_STORE__SPOOL__ENABLED=spool, **FAST
    ).start()
    daemon.wait_ready()
    pub = publisher(b.port, n)
    wait_for(lambda: db.count("readings WHERE metric = 'x'") >= n // 4, 60, what="a quarter")
    at_fault = db.count("readings WHERE metric = 'x'")
    if how.startswith("restart"):
        own_pg.restart()
    else:
        own_pg.kill()
        time.sleep(1)
        own_pg.start()
    pub.join(120)
    wait_for(lambda: db.count("readings WHERE metric = 'x'") == n, 120, what="all stored")
    base = daemon.metrics_url()
    text = http_get(base + "/metrics")[1]
    assert daemon.stop() == 0, daemon.logs()
    rows = exactly_once(db, n)
    assert db.count("quarantine") == 0
    logs = daemon.logs()
    # Without the spool ingestd holds the batch (the broker keeps the rest);
    # with it, it spools (the default): either way every reading once.
    what = "spooling batches to local disk" if spool == "true" else "holding the batch"
    # The outage is in the log either way: a batch that met it says the store
    # is unavailable, then available again; a restart that fell between
    # batches (ingestd idle through it: on 2026-12-07, a slow machine, 8 of 51
    # runs of the restart cases, at b23d5de as since) shows as the idle
    # connections found closed by the server.
    if logs.count(f"store unavailable; {what}") >= 1:
        assert "store available again" in logs
    else:
        assert "store connection closed by the server; reconnecting" in logs, logs
    record_property("postgres_fault", f"{how} at {at_fault:,} of {n:,}: stored {rows}")
    print(f"\n{how} at {at_fault:,}/{n:,} messages: stored {rows}; {text.count('condition')}")


def _terminate_busy_writers(url: str, pub: threading.Thread, most: int) -> int:
    """pg_terminate_backend on ingestd's connections that are in a statement or
    a transaction, polled every 5 ms while `pub` publishes (at most 60 s, at
    most `most` of them); how many were killed."""

    async def run() -> int:
        conn = await asyncpg.connect(url, timeout=10)
        killed = 0
        deadline = time.monotonic() + 60
        try:
            while pub.is_alive() and time.monotonic() < deadline and killed < most:
                killed += await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'ingestd' AND datname = current_database() "
                    "AND state <> 'idle'"
                )
                await asyncio.sleep(0.005)
        finally:
            await conn.close()
        return killed

    return asyncio.run(run())


@pytest.mark.slow
def test_connections_killed_during_commits_lose_and_double_nothing(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    own_pg: Postgres,
    record_property: Callable[[str, object], None],
) -> None:
    """pg_terminate_backend on the writer's connections, again and again, while
    they write (a batch of readings alone is one COPY, its own commit): commits
    die with their outcome unknown; the batch is written again and the keys
    make that safe. Only connections in the middle of a statement or a
    transaction are killed: an idle one would only be replaced before use."""
    n = 30_000
    b = brokers(tmp_path / "broker", max_inflight=1000).start()
    url = own_pg.create_db("ingest")
    db = PgReader(url)
    daemon = daemons(b.port, INGESTD_STORE__URL=url, **FAST).start()
    daemon.wait_ready()
    pub = publisher(b.port, n)
    killed = _terminate_busy_writers(own_pg.url("ingest"), pub, most=40)
    pub.join(120)
    wait_for(lambda: db.count("readings WHERE metric = 'x'") == n, 120, what="all stored")
    assert daemon.stop() == 0, daemon.logs()
    rows = exactly_once(db, n)
    assert killed >= 5, f"only {killed} connections killed: the stream ended too soon"
    assert db.count("quarantine") == 0
    assert "connection lost" in daemon.logs()
    record_property("terminated", f"{killed} connections killed; stored {rows}")
    print(f"\n{killed} writer connections terminated: stored {rows}")


def test_a_statement_timeout_is_waited_out(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory, pg_url: str
) -> None:
    db = PgReader(pg_url)
    daemon = daemons(
        mosquitto.port,
        INGESTD_STORE__URL=pg_url,
        INGESTD_STORE__STATEMENT_TIMEOUT_MS="300",
        INGESTD_STORE__RETRY_MAX_DELAY="0.3",
    ).start()
    daemon.wait_ready()
    lock = db.hold_lock(3.0)
    publish(mosquitto.port, stream(500))
    wait_for(lambda: "statement timeout" in daemon.logs(), 10, what="the timeout reported")
    assert db.count() == 0
    lock.join()
    wait_for(lambda: db.count() == 1000, 20, what="all stored after the lock")
    assert daemon.stop() == 0
    exactly_once(db, 500)
    assert daemon.logs().count("store unavailable; ") == 1, "once per state"


@pytest.mark.slow
def test_three_instances_in_one_shared_group_store_every_reading_once(
    tmp_path: Path,
    brokers: BrokerFactory,
    daemons: DaemonFactory,
    pg_url: str,
    record_property: Callable[[str, object], None],
) -> None:
    """Scale-out: one broker, one PostgreSQL, three daemons in one shared group;
    100,000 QoS 1 messages from four publishers; one daemon killed -9 mid-stream
    and restarted. Every reading stored exactly once."""
    n, publishers = 100_000, 4
    b = brokers(tmp_path / "broker", max_inflight=1000).start()
    db = PgReader(pg_url)
    env = {**FAST, "INGESTD_STORE__URL": pg_url, "INGESTD_MQTT__SHARED_GROUP": "ingest"}
    fleet = [daemons(b.port, workdir=tmp_path / f"d{i}", **env).start() for i in range(3)]
    for d in fleet:
        d.wait_ready()
    per = n // publishers
    threads = [
        threading.Thread(
            target=publish,
            args=(b.port, stream(per, start=k * per)),
            kwargs={"inflight": 1000, "client_id": f"pub{k}"},
            daemon=True,
        )
        for k in range(publishers)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    wait_for(lambda: db.count("readings WHERE metric = 'x'") >= n // 3, 120, what="a third")
    victim = fleet[1]
    victim.kill()  # SIGKILL: its window of unacknowledged messages is with the broker
    at_kill = db.count("readings WHERE metric = 'x'")
    for t in threads:
        t.join(180)
    # What Mosquitto does with a dead member's share: measured, not assumed.
    time.sleep(5)
    while_away = db.count("readings WHERE metric = 'x'")
    victim = daemons(b.port, workdir=tmp_path / "d1", **env).start()
    victim.wait_ready()
    wait_for(lambda: db.count("readings WHERE metric = 'x'") == n, 180, what="all stored")
    elapsed = time.monotonic() - started
    for d in (fleet[0], fleet[2], victim):
        assert d.stop() == 0, d.logs()
    rows = exactly_once(db, n)
    assert db.count("quarantine") == 0
    report = (
        f"sent {n:,} messages ({2 * n:,} readings) from {publishers} publishers to 3 "
        f"instances; one killed at {at_kill:,} stored; {while_away:,} stored while it was "
        f"away (publishing done); after its restart: {rows}; {elapsed:.1f} s"
    )
    record_property("scale_out", report)
    print("\n" + report)


def test_the_data_commands_read_postgresql(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory, pg_url: str
) -> None:
    daemon = daemons(mosquitto.port, INGESTD_STORE__URL=pg_url).start()
    daemon.wait_ready()
    publish(mosquitto.port, [*stream(100, sensors=2), ("sensors/a/telemetry", b"{bad")])
    db = PgReader(pg_url)
    wait_for(lambda: db.count() == 200 and db.count("quarantine") == 1, 20, what="stored")
    assert daemon.stop() == 0
    config = tmp_path / "cli.toml"
    config.write_text(f'[store]\nurl = "{pg_url}"\n[metrics]\nenabled = false\n')

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ingestd", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin"},
        )

    listed = run("sensors", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    sensors = json.loads(listed.stdout)
    assert [(r["sensor"], r["metric"]) for r in sensors] == [
        ("s0", "x"), ("s0", "y"), ("s1", "x"), ("s1", "y"),
    ]  # fmt: skip
    rows = json.loads(
        run("query", "--sensor", "s1", "--since", "2h", "--metric", "x", "--format", "json").stdout
    )
    assert [r["value"] for r in rows] == [float(i) for i in range(1, 100, 2)]
    stats = json.loads(run("stats", "--json").stdout)
    assert (stats["readings"], stats["quarantined"], stats["series"]) == (200, 1, 4)
    assert "postgresql://postgres@127.0.0.1" in stats["path"]
    assert "{bad" in run("quarantine", "--since", "1h").stdout
    refused = run("backup", str(tmp_path / "x.db"))
    assert refused.returncode == 1
    assert "pg_dump" in refused.stderr

    # --db takes the URL too, for every data command, over a config that says SQLite.
    sqlite_config = tmp_path / "sqlite.toml"
    sqlite_config.write_text(f'[store]\npath = "{tmp_path / "none.db"}"\n')

    def run_db(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "ingestd",
                *args,
                "--config",
                str(sqlite_config),
                "--db",
                pg_url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin"},
        )

    assert json.loads(run_db("sensors", "-f", "json").stdout) == sensors
    got = run_db("query", "-s", "s1", "--since", "2h", "-m", "x", "-f", "json")
    assert json.loads(got.stdout) == rows, got.stderr
    stats_db = json.loads(run_db("stats", "--json").stdout)
    assert stats_db["source"] == "database"
    assert (stats_db["readings"], stats_db["quarantined"], stats_db["series"]) == (200, 1, 4)
    assert stats_db["path"] == stats["path"]
    assert "{bad" in run_db("quarantine", "--since", "1h").stdout
    refused = run_db("backup", str(tmp_path / "x.db"))
    assert (refused.returncode, "pg_dump" in refused.stderr) == (1, True), refused.stderr
    assert not (tmp_path / "none.db").exists()


@pytest.mark.slow
def test_a_full_disk_under_postgresql_is_waited_out(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory, own_pg: Postgres
) -> None:
    """The database's tables on a 4 MB tablespace: it fills (SQLSTATE 53100),
    the batch is held and nothing acknowledged; given room, all is stored once."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = Path(tempfile.mkdtemp(prefix="ingestd-pgspace-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        shutil.chown(mnt, "postgres", "postgres")
        own_pg.sql(f"CREATE TABLESPACE small LOCATION '{mnt}'")
        url = own_pg.create_db("ingest")
        own_pg.sql("ALTER DATABASE ingest SET default_tablespace = small")
        n = 60_000
        b = brokers(tmp_path / "broker", max_inflight=1000).start()
        db = PgReader(url)
        daemon = daemons(b.port, INGESTD_STORE__URL=url, **FAST).start()
        daemon.wait_ready()
        publisher(b.port, n).join(120)
        wait_for(lambda: "disk full" in daemon.logs(), 60, what="the disk to fill")
        full_at = db.count("readings WHERE metric = 'x'")
        time.sleep(2)
        assert daemon.proc is not None
        assert daemon.proc.poll() is None, "a full disk is waited out"
        assert db.count("readings WHERE metric = 'x'") == full_at
        subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True)
        wait_for(lambda: db.count("readings WHERE metric = 'x'") == n, 120, what="all stored")
        assert daemon.stop() == 0, daemon.logs()
        rows = exactly_once(db, n)
        print(f"\ndisk full at {full_at:,}/{n:,} messages; after room was made: {rows}")
    finally:
        own_pg.stop("immediate")
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)
