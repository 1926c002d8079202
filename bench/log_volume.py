"""Log volume at a steady rate: how many bytes and lines the daemon writes.

    .venv/bin/python -m bench.log_volume --rate 5000 --seconds 60

A fresh Mosquitto and ingestd (JSON logs at info, as journald gets them); a
paced publisher (`bench.paced | mosquitto_pub -l`, QoS 1) for the given time;
then the log's bytes and lines by level and message, and bytes per hour at
that rate. Run it from two checkouts to compare (PYTHONPATH picks the tree).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.brokers import Mosquitto
from tests.support.config import SHIPPED_CONFIG
from tests.support.waiting import wait_for

PY = sys.executable


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=float, default=5000)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument(
        "--broker-inflight", type=int, default=20, help="the broker's window (Mosquitto's default)"
    )
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ingestd-logvol-"))
    broker = Mosquitto(work / "broker", max_inflight=a.broker_inflight).start()
    log = work / "ingestd.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")},
        "INGESTD_MQTT__PORT": str(broker.port),
        "INGESTD_MQTT__CLIENT_ID": "logvol",
        "INGESTD_MQTT__BROKER_MAX_INFLIGHT": str(a.broker_inflight),
        "INGESTD_STORE__PATH": str(work / "ingestd.db"),
        "INGESTD_DAEMON__LOG_FORMAT": "json",
        "INGESTD_METRICS__PORT": "0",
    }
    try:
        with log.open("wb") as fh:
            daemon = subprocess.Popen(
                [PY, "-m", "ingestd", "--config", str(SHIPPED_CONFIG)],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: '"msg": "ready"' in log.read_text(), 20, what="ready")
        count = int(a.rate * a.seconds)
        started = time.monotonic()
        paced = subprocess.Popen(
            [PY, "-m", "bench.paced", "--rate", str(a.rate), "--count", str(count)],
            stdout=subprocess.PIPE,
        )
        pub = subprocess.Popen(
            [
                "mosquitto_pub",
                "-p",
                str(broker.port),
                "-q",
                "1",
                "-l",
                "-t",
                "sensors/s1/telemetry",
            ],
            stdin=paced.stdout,
        )
        pub.wait()
        elapsed = time.monotonic() - started
        time.sleep(1)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    finally:
        broker.kill()
    text = log.read_text()
    size = len(text.encode())
    by: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            by[("?", line[:40])] += 1
            continue
        by[(e.get("level", "?"), e.get("msg", "?"))] += 1
    print(
        f"{count:,} messages at {a.rate:,.0f}/s over {elapsed:.1f} s: log {size:,} bytes, "
        f"{sum(by.values()):,} lines; {size / elapsed * 3600 / 1e6:,.1f} MB per hour"
    )
    for (level, msg), n in by.most_common(12):
        print(f"  {n:>8,}  {level:<8} {msg}")
    summaries = [line for line in text.splitlines() if '"msg": "summary"' in line]
    if summaries:
        print("the busiest summary line:")
        print(max(summaries, key=lambda line: json.loads(line).get("messages", 0)))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
