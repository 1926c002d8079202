"""A fleet of 500,000 series: 100,000 devices x 5 metrics, each device one
message a round. Round 1 is all first sight; then ingestd is restarted on
the same database and round 2 (every series known to the database, none to
the new process) is timed the same way: the rate, peak RSS, and the seconds
from the process's start to its connection and to its first commit.

    .venv/bin/python -m bench.huge                      # 100,000 devices
    .venv/bin/python -m bench.huge --devices 20000      # smaller

Broker as config/mosquitto.conf says, QoS 1, acknowledged after commit,
SQLite; timed as bench.bench times ingestd (to its exit after a stop at the
last commit, rollups closed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import bench
from bench.bench import T0, Scenario
from tests.support.brokers import Mosquitto
from tests.support.mqtt import publish

METRICS = 5


@dataclass(frozen=True)
class Wide(Scenario):
    per_message: int = METRICS

    @property
    def readings_per_message(self) -> int:
        return self.per_message


def _preload(port: int, devices: int, round_no: int) -> None:
    def messages() -> Iterator[tuple[str, bytes]]:
        for d in range(devices):
            ts = T0 + round_no * 60 + d * 0.0001
            values = [(d * 7 + k + round_no) % 100 / 4 for k in range(METRICS)]
            fields = ", ".join(f'"m{k}": {v}' for k, v in enumerate(values))
            yield f"sensors/dev{d}/telemetry", ("{" + f'"ts": {ts:.4f}, {fields}' + "}").encode()

    publish(port, messages(), inflight=1000)


def _startup(log: Path) -> tuple[float, float]:
    """Seconds from the 'starting' line to 'connected to broker' and to 'ready'."""
    at: dict[str, float] = {}
    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        e = json.loads(line)
        if e.get("msg") in ("starting", "connected to broker", "ready") and e["msg"] not in at:
            at[e["msg"]] = dt.datetime.fromisoformat(e["timestamp"]).timestamp()
    return at["connected to broker"] - at["starting"], at["ready"] - at["starting"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=100_000)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ingestd-huge-"))
    fast = (("INGESTD_MQTT__BROKER_MAX_INFLIGHT", "1000"),)
    rows = []
    broker = None
    try:
        for round_no, label in ((1, "first sight"), (2, "after a restart, every series known")):
            # A broker of its own each round (Mosquitto 2.0.11 delivered about
            # half of a second backlog of 100,000 topics to the same session).
            if broker is not None:
                broker.kill()
            broker = Mosquitto(
                work / f"broker{round_no}",
                max_inflight=1000,
                extra="queue_qos0_messages true\nmax_queued_bytes 0\nautosave_interval 3600\n",
            ).start()
            sc = Wide(
                f"{args.devices:,} devices x {METRICS} metrics, {label}", "ingestd", 1, 1000, fast
            )
            bench.preload = lambda b, messages, qos, w, batch=0, payload="json", r=round_no: (
                _preload(b.port, args.devices, r)
            )
            res = bench.run_ingestd(sc, broker, args.devices, work)
            logs = sorted(work.glob("bench-ingestd-*.log"))
            connected, ready = _startup(logs[0])
            size = (work / "ingestd.db").stat().st_size / 1e6
            rows.append((sc.name, res, connected, ready, size))
            print(
                f"{sc.name}: {res.rate:,.0f} readings/s, RSS {res.rss_mb:.1f} MB", file=sys.stderr
            )
    finally:
        if broker is not None:
            broker.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        "| run | readings | readings/s | CPU s | peak RSS MB | start to connected s "
        "| start to ready s | DB MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r, c, rd, size in rows:
        print(
            f"| {name} | {r.readings:,} | {r.rate:,.0f} | {r.cpu:.2f} | {r.rss_mb:.1f} | "
            f"{c:.2f} | {rd:.2f} | {size:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
