"""What a new user sees in the first minute of the quick start: a summary line
within seconds of the first messages (not a whole interval after "ready")."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.support.brokers import Mosquitto
from tests.support.daemon import DaemonFactory, DaemonProcess
from tests.support.db import DbReader
from tests.support.mqtt import publish
from tests.support.waiting import wait_for


def _lines(daemon: DaemonProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in daemon.logs().splitlines() if line.startswith("{")]


def _quick_start_burst(port: int, n: int = 20) -> None:
    publish(port, ((f"sensors/s{i % 4}/temperature", b"%.1f" % (20 + i / 10)) for i in range(n)))


def test_first_summary_comes_soon_after_the_first_commit(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    # The default interval (60 s): the first summary must not wait for it.
    daemon = daemons(mosquitto.port).start()
    daemon.wait_ready()
    db = DbReader(tmp_path / "ingestd.db")
    _quick_start_burst(mosquitto.port)
    wait_for(lambda: db.count() == 20, 20, what="the readings")
    committed = time.monotonic()
    wait_for(
        lambda: any(e["msg"] == "summary" for e in _lines(daemon)), 15, what="the first summary"
    )
    assert time.monotonic() - committed < 12
    summary = next(e for e in _lines(daemon) if e["msg"] == "summary")
    assert summary["messages"] == 20
    assert summary["readings"] == 20
    # Then the interval as before: no second summary within seconds.
    time.sleep(6)
    assert sum(e["msg"] == "summary" for e in _lines(daemon)) == 1
    assert daemon.stop() == 0
