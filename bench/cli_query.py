"""How fast the CLI gets data out of a large database.

    .venv/bin/python -m bench.cli_query                 # 10 million readings
    .venv/bin/python -m bench.cli_query --readings 1000000

Builds a database through ingestd's own store (100 sensors x 2 metrics, one
reading every 30 s each, so 10M readings span about 17 days), then times the
commands as a user runs them, each a fresh process (interpreter start
included), 5 times, and reports the median: a one-day query for one sensor
(CSV), `sensors`, and `stats` from the database.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ingestd.events import NS, Reading
from ingestd.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent
SENSORS, METRICS, STEP = 100, ("temperature", "humidity"), 30.0
T0 = 1_700_000_000.0


async def build(path: Path, readings: int) -> float:
    per_series = readings // (SENSORS * len(METRICS))
    started = time.monotonic()
    async with SqliteStore(path, synchronous="normal") as store:
        chunk = 2000  # samples per series per transaction: 400,000 readings
        for start in range(0, per_series, chunk):
            rows = [
                Reading(f"s{s:03d}", m, int((T0 + i * STEP) * NS), 20.0 + (i % 100) / 10)
                for s in range(SENSORS)
                for m in METRICS
                for i in range(start, min(start + chunk, per_series))
            ]
            async with store.batch() as tx:
                await tx.add_readings(rows)
    return time.monotonic() - started


def timed(args: list[str], runs: int = 5) -> tuple[float, int]:
    times, lines = [], 0
    for _ in range(runs):
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "ingestd", *args], check=True, capture_output=True, cwd=REPO
        ).stdout
        times.append(time.monotonic() - started)
        lines = out.count(b"\n")
    return statistics.median(times), lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--readings", type=int, default=10_000_000)
    p.add_argument("--db", type=Path, default=None, help="reuse (or build) this database")
    a = p.parse_args()
    db = a.db or Path(tempfile.mkdtemp(prefix="ingestd-cli-")) / "big.db"
    if not db.exists():
        seconds = asyncio.run(build(db, a.readings))
        print(
            f"built {a.readings:,} readings in {seconds:.1f} s "
            f"({a.readings / seconds:,.0f}/s, {db.stat().st_size / 1e6:,.0f} MB)"
        )
    config = str(REPO / "config" / "ingestd.toml")
    day = T0 + 5 * 86400
    base = ["--config", config, "--db", str(db)]
    noop = timed(["--version"])[0]
    print(f"interpreter start (ingestd --version): {noop * 1000:.0f} ms")
    for label, args in [
        (
            "query, one sensor, one day, CSV",
            [
                "query",
                "--sensor",
                "s042",
                "--since",
                str(day),
                "--until",
                str(day + 86400),
                "-f",
                "csv",
            ],
        ),
        (
            "query, one sensor and metric, one day, JSON",
            [
                "query",
                "--sensor",
                "s042",
                "--metric",
                "temperature",
                "--since",
                str(day),
                "--until",
                str(day + 86400),
                "-f",
                "json",
            ],
        ),
        ("sensors (last value of 200 series)", ["sensors"]),
        ("stats from the database", ["stats"]),
    ]:
        seconds, lines = timed([*args[:1], *base, *args[1:]])
        print(f"{label}: {seconds * 1000:.0f} ms median of 5 ({lines:,} lines out)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
