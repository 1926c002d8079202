"""A corrupt SQLite file under the daemon: set aside (never deleted), a fresh
database started, readings flowing, and the batch that found it stored in the
fresh file before anything of it is acknowledged."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

from ingestd.events import NS, Reading
from ingestd.store.sqlite import SqliteStore
from tests.support.brokers import Mosquitto
from tests.support.daemon import DaemonFactory, DaemonProcess
from tests.support.damage import corrupt_page, overwrite_header
from tests.support.db import DbReader
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.waiting import wait_for

T0 = 1_700_000_000


def _telemetry(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [
        (f"sensors/s{i % 10}/telemetry", b'{"ts": %d, "x": %d}' % (T0 + i, i))
        for i in range(start, start + n)
    ]


def _corrupt_line(d: DaemonProcess) -> dict[str, object]:
    for line in d.logs().splitlines():
        if "database file corrupt" in line:
            return dict(json.loads(line))
    raise AssertionError(f"no corrupt-file line in the log:\n{d.logs()}")


def _count(db: DbReader) -> int:
    """Readings stored, or -1 while the file at the path is the corrupt one."""
    try:
        return db.count()
    except sqlite3.DatabaseError:
        return -1


def _aside(path: Path) -> Path:
    """The database file set aside (its -wal and -shm go beside it, renamed)."""
    found = path.parent.glob(f"{path.name}.corrupt-*")
    (aside,) = [p for p in found if not p.name.endswith(("-wal", "-shm"))]
    return aside


def test_a_header_overwritten_is_set_aside_at_start_and_readings_flow(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    path = tmp_path / "ingestd.db"
    db = DbReader(path)
    d = daemons(mosquitto.port).start()
    d.wait_ready()
    publish(mosquitto.port, _telemetry(10))
    wait_for(lambda: db.count() == 10, 10, what="10 readings")
    assert d.stop() == 0
    before = overwrite_header(path)
    d.start()
    d.wait_ready()
    publish(mosquitto.port, _telemetry(10, start=10))
    wait_for(lambda: db.count() == 10, 10, what="10 readings in a fresh database")
    text = http_get(d.metrics_url() + "/metrics")[1]
    assert d.stop() == 0
    assert metric_value(text, "ingestd_store_corrupt_files_total") == 1
    assert db.rows("SELECT min(value), max(value) FROM readings") == [(10.0, 19.0)]
    line = _corrupt_line(d)
    aside = _aside(path)
    assert aside.read_bytes()[16:] == before[16:]  # moved whole, nothing deleted
    assert (line["level"], line["path"], line["set_aside"]) == ("error", str(path), str(aside))
    assert "header is not an SQLite database's" in str(line["found"])
    assert str(line["next"]).startswith(f"sqlite3 {aside} .recover")
    assert "ingestd import" in str(line["next"])
    assert "sequence counters" in str(line["lost"])


async def _filled(path: Path, n: int) -> None:
    async with SqliteStore(path) as store, store.batch() as tx:
        await tx.add_readings(
            [Reading("old", "x", (T0 - n + i) * NS, float(i), "t") for i in range(n)]
        )


def test_a_corrupt_page_met_while_running_sends_the_batch_to_a_fresh_file(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    path = tmp_path / "ingestd.db"
    db = DbReader(path)
    asyncio.run(_filled(path, 20_000))
    corrupt_page(path, "samples", "root")  # every insert into samples meets it
    # The check at start reads the header only: the page is met by the first batch.
    d = daemons(
        mosquitto.port, INGESTD_STORE__CHECK_SECONDS="0", INGESTD_STORE__RETRY_MAX_DELAY="0.5"
    ).start()
    d.wait_ready()
    publish(mosquitto.port, _telemetry(50))
    wait_for(lambda: _count(db) == 50, 15, what="50 readings in a fresh database")
    text = http_get(d.metrics_url() + "/metrics")[1]
    assert d.stop() == 0
    assert metric_value(text, "ingestd_store_corrupt_files_total") == 1
    assert metric_value(text, "ingestd_store_errors_total", 'condition="database corrupt"') >= 1
    assert metric_value(text, "ingestd_readings_duplicate_total") == 0
    assert metric_value(text, "ingestd_readings_unexplained") == 0
    assert db.rows("SELECT count(DISTINCT value) FROM readings WHERE sensor != 'old'") == [(50,)]
    line = _corrupt_line(d)
    assert line["when"] == "while writing a batch"
    assert "malformed" in str(line["found"])
    assert _aside(path).stat().st_size > 0
    logs = d.logs()
    assert '"condition": "database corrupt"' in logs
    assert "store available again" in logs
