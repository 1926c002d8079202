"""How fast `ingestd import` loads a file into SQLite.

    .venv/bin/python -m bench.import_speed                   # 10 million readings
    .venv/bin/python -m bench.import_speed --readings 1000000 --format influx

Writes a file of the given format (csv: what `ingestd query --format csv`
writes; influx: line protocol, two fields a line), 100 sensors x 2 metrics,
one reading every 30 s each, then runs `ingestd import` on it as a user
does (a fresh process, interpreter start included) into a fresh database
with the shipped defaults (`store.synchronous = "full"`), and reports
readings per second. Then imports it again: every reading a duplicate.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SENSORS, METRICS, STEP = 100, ("temperature", "humidity"), 30
T0 = 1_700_000_000
NS = 1_000_000_000

CONFIG = """
[store]
path = "{db}"
[[routes]]
topic = "lp/{{sensor}}"
format = "influx"
"""


def write_file(path: Path, readings: int, fmt: str) -> None:
    per_sensor = readings // (SENSORS * len(METRICS))
    with open(path, "w", newline="") as f:
        if fmt == "csv":
            f.write("sensor,metric,time,ts,value,tags,unit,ts_ns\n")
        for i in range(per_sensor):
            t = T0 + i * STEP
            iso = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))
            value = 20.0 + (i % 100) / 10
            if fmt == "csv":
                f.writelines(
                    f"s{s:03d},{m},{iso},{t},{value!r},,,{t * NS}\n"
                    for s in range(SENSORS)
                    for m in METRICS
                )
            else:
                f.writelines(
                    f"env,sensor=s{s:03d} temperature={value!r},humidity={value!r} {t * NS}\n"
                    for s in range(SENSORS)
                )


def run_import(config: Path, data: Path, fmt: str) -> tuple[float, str]:
    args = [sys.executable, "-m", "ingestd", "import", "-c", str(config), "-f", fmt, str(data)]
    if fmt == "influx":
        args += ["--topic", "lp/x"]
    started = time.monotonic()
    done = subprocess.run(args, check=True, capture_output=True, cwd=REPO, text=True)
    return time.monotonic() - started, done.stderr.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readings", type=int, default=10_000_000)
    p.add_argument("--format", choices=("csv", "influx"), default="csv")
    p.add_argument("--dir", type=Path, default=None, help="where to put the file and database")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        data = Path(tmp) / f"readings.{args.format}"
        db = Path(tmp) / "import.db"
        config = Path(tmp) / "ingestd.toml"
        config.write_text(CONFIG.format(db=db))
        started = time.monotonic()
        write_file(data, args.readings, args.format)
        size = data.stat().st_size
        print(
            f"file: {args.readings:,} readings, {size / 1e6:,.0f} MB of {args.format} "
            f"(written in {time.monotonic() - started:.1f} s)"
        )
        for label in ("fresh database", "again (all duplicates)"):
            seconds, summary = run_import(config, data, args.format)
            print(
                f"{label}: {seconds:.1f} s, {args.readings / seconds:,.0f} readings/s "
                "(process start included)"
            )
            print(f"  {summary}")
        print(f"database: {db.stat().st_size / 1e6:,.0f} MB")


if __name__ == "__main__":
    main()
