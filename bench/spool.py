"""Store-and-forward: how fast ingestd spools while PostgreSQL is away, and how
fast it forwards the spool once the database is back, against ingestd writing
to PostgreSQL directly in the same run.

    .venv/bin/python -m bench.spool                 # 3 rounds of 100,000 messages
    .venv/bin/python -m bench.spool --messages 20000 --rounds 1

Per round: a fresh Mosquitto (set up as config/mosquitto.conf says: 1000 in
flight, unlimited queue) and a database of its own on one durable PostgreSQL.

- direct: the backlog preloaded, then ingestd started with the database up,
  timed from its connection to the last reading committed (bench.bench's
  "ingestd -> PostgreSQL" scenario).
- spooling: ingestd started and ready, PostgreSQL stopped, one message to
  make it spool; then the backlog published (mosquitto_pub, C, concurrently)
  and timed from the publish to the last reading acknowledged into the spool.
- forwarding: PostgreSQL started again, timed from its start to the last
  spooled reading committed (nothing live meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.bench import _PG as CLUSTER
from bench.bench import (
    PY,
    REPO,
    SHIPPED_CONFIG,
    Scenario,
    postgres_database,
    preload,
    register_session,
    run_one,
)
from tests.support.brokers import Mosquitto
from tests.support.mqtt import publish
from tests.support.postgres import Postgres
from tests.support.waiting import wait_for

DIRECT = Scenario(
    "ingestd -> PostgreSQL, QoS 1 ack after commit", "ingestd", 1, 1000, store="postgres"
)


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def run_spool(messages: int) -> tuple[float, float, float]:
    """(spooling readings/s, forwarding readings/s, peak spool MB)."""
    work = Path(tempfile.mkdtemp(prefix="ingestd-bench-spool-"))
    broker = Mosquitto(
        work / "broker", max_inflight=1000, extra="max_queued_bytes 0\nautosave_interval 3600\n"
    ).start()
    database, url = postgres_database()
    pg = CLUSTER[0]
    proc = None
    try:
        register_session(broker.port, "bench-spool", 1)
        config = work / "ingestd.toml"
        config.write_text(SHIPPED_CONFIG.read_text())
        log = work / "ingestd.log"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")},
            "INGESTD_MQTT__PORT": str(broker.port),
            "INGESTD_MQTT__CLIENT_ID": "bench-spool",
            "INGESTD_STORE__URL": url,
            "INGESTD_STORE__PATH": str(work / "ingestd.db"),
            "INGESTD_STORE__RETRY_MAX_DELAY": "0.5",
            "INGESTD_DAEMON__LOG_FORMAT": "json",
            "INGESTD_METRICS__PORT": "0",
        }
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [PY, "-m", "ingestd", "--config", str(config)],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        wait_for(lambda: '"msg": "ready"' in log.read_text(), 30, what="ingestd ready")
        metrics = next(
            json.loads(x)["url"].removesuffix("/metrics")
            for x in log.read_text().splitlines()
            if '"metrics listening"' in x
        )
        pg.stop()
        publish(broker.port, [("sensors/first/telemetry", b'{"ts": 1700000000, "temperature": 1}')])
        wait_for(lambda: "spooling: batches" in log.read_text(), 30, what="spooling")
        expected = messages * 2 + 1
        started = time.monotonic()
        preload(broker, messages, 1, work)
        wait_for(
            lambda: _metric(metrics, "ingestd_readings_spooled") >= expected,
            600,
            interval=0.02,
            what="the backlog spooled",
        )
        spool_seconds = time.monotonic() - started
        size = _metric(metrics, "ingestd_spool_bytes") / 1e6
        started = time.monotonic()
        pg.start()
        wait_for(
            lambda: _metric(metrics, "ingestd_readings_committed_total") >= expected,
            600,
            interval=0.02,
            what="the spool forwarded",
        )
        forward_seconds = time.monotonic() - started
        return messages * 2 / spool_seconds, messages * 2 / forward_seconds, size
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        if not _running(pg):
            pg.start()
        pg.sql(f'DROP DATABASE "{database}" WITH (FORCE)')
        broker.kill()
        shutil.rmtree(work, ignore_errors=True)


def _running(pg: Postgres) -> bool:
    try:
        pg.sql("SELECT 1")
    except Exception:
        return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    direct: list[float] = []
    spooling: list[float] = []
    forwarding: list[float] = []
    sizes: list[float] = []
    try:
        for r in range(args.rounds):
            d = run_one(DIRECT, args.messages)
            direct.append(d.rate)
            s, f, mb = run_spool(args.messages)
            spooling.append(s)
            forwarding.append(f)
            sizes.append(mb)
            print(
                f"round {r + 1}: direct {d.rate:,.0f}, spooling {s:,.0f}, "
                f"forwarding {f:,.0f} readings/s; spool {mb:.1f} MB",
                file=sys.stderr,
            )
    finally:
        for pg in CLUSTER:
            pg.cleanup()
    med = statistics.median
    print(
        f"\n{args.messages:,} messages (2 readings each), {args.rounds} round(s), medians:\n\n"
        "| phase | readings/s (median) | min-max |\n|---|---:|---:|\n"
        f"| direct to PostgreSQL (baseline) | {med(direct):,.0f} | "
        f"{min(direct):,.0f}-{max(direct):,.0f} |\n"
        f"| spooling (PostgreSQL stopped; publisher concurrent) | {med(spooling):,.0f} | "
        f"{min(spooling):,.0f}-{max(spooling):,.0f} |\n"
        f"| forwarding the spool (PostgreSQL back) | {med(forwarding):,.0f} | "
        f"{min(forwarding):,.0f}-{max(forwarding):,.0f} |\n\n"
        f"spool size for the backlog: {med(sizes):.1f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
