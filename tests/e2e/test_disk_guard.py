"""The disk-space guard: a filesystem filled by another process pauses
ingestion (nothing acknowledged, /readyz says why) before SQLite meets a full
disk, and freeing it resumes it with nothing lost."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.brokers import Mosquitto
from tests.support.daemon import DaemonFactory
from tests.support.db import DbReader
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.waiting import wait_for

T0 = 1_700_000_000
MIB = 1 << 20


def _telemetry(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [
        (f"sensors/s{i % 10}/telemetry", b'{"ts": %d, "x": %d}' % (T0 + i, i))
        for i in range(start, start + n)
    ]


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("mount"), reason="a tmpfs of its own needs root"
)
def test_a_disk_filled_by_another_process_pauses_and_freeing_it_resumes_with_none_lost(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        path = disk / "ingestd.db"
        db = DbReader(path)
        d = daemons(
            mosquitto.port,
            INGESTD_STORE__PATH=str(path),
            INGESTD_STORE__MIN_FREE_BYTES=str(4 * MIB),
            INGESTD_STORE__RETRY_MAX_DELAY="0.5",
        ).start()
        d.wait_ready()
        publish(mosquitto.port, _telemetry(100))
        wait_for(lambda: db.count() == 100, 10, what="100 readings")
        # Another process leaves 2 MiB free: below the guard, far from full.
        st = os.statvfs(disk)
        filler = disk / "filler"
        size = st.f_bavail * st.f_frsize - 2 * MIB
        subprocess.run(["fallocate", "-l", str(size), str(filler)], check=True)
        time.sleep(1.2)  # the guard looks at most once a second: the next look sees it
        sender = threading.Thread(target=publish, args=(mosquitto.port, _telemetry(500, 100)))
        sender.start()
        wait_for(lambda: '"condition": "disk space low"' in d.logs(), 15, what="the pause")
        status, body = http_get(d.metrics_url() + "/readyz")
        assert status == 503, body
        assert "store unavailable (disk space low)" in body
        assert db.count() == 100  # nothing more written (nor acknowledged)
        filler.unlink()
        sender.join(30)
        wait_for(lambda: db.count() == 600, 30, what="every reading once space returned")
        text = http_get(d.metrics_url() + "/metrics")[1]
        assert d.stop() == 0
        assert metric_value(text, "ingestd_store_errors_total", 'condition="disk space low"') >= 1
        assert metric_value(text, "ingestd_readings_duplicate_total") == 0
        assert db.rows("SELECT count(DISTINCT value) FROM readings") == [(600,)]
        logs = d.logs()
        assert logs.count('"condition": "disk space low"') == 1  # said once
        assert "below store.min_free_bytes" in logs
        assert '"after": "disk space low"' in logs  # and once when it is over
        assert "disk full" not in logs  # SQLite never met the full disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
