"""What a batch's size costs the SQLite store alone: the readings of a SenML
fleet (200 devices x 2 metrics, packs of 50 records) written through the
store's own batches of each size given, with rollups as configured by
default, in a fresh database each run. Reported: readings/s, the process's
CPU a reading (every thread: SQLite's own included), and the bytes it wrote
to disk a reading (/proc/self/io: the write-ahead log and its checkpoints).

    .venv/bin/python -m bench.batches                        # 12,500 against 25,000
    .venv/bin/python -m bench.batches --sizes 5000,50000 --rounds 5

No broker, no decoding: each commit writes the last B-tree page of every
series its batch touched (and the rollup rows of each), so what a reading
costs falls as a batch holds more readings of each series. The daemon's
batch.max_readings sets the size (see config/ingestd.toml).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from ingestd.config import Settings
from ingestd.events import Reading
from ingestd.store.sqlite import SqliteStore

T0_NS = 1_780_000_000_000_000_000


def written() -> int:
    """Bytes this process has caused to be written to storage."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["write_bytes"])


def fleet(total: int) -> list[Reading]:
    """SenML packs of 25 times x 2 metrics, 200 devices in turn, 1 ms apart."""
    out: list[Reading] = []
    for pack in range(total // 50):
        sensor = f"urn:dev:site3:dev{pack % 200}"
        for k in range(25):
            ts = T0_NS + (pack * 25 + k) * 1_000_000
            for metric in ("temperature", "humidity"):
                out.append(Reading(sensor, metric, ts, 21.5 + k / 4, "senml/site3", "", "Cel"))
    return out


async def run(readings: list[Reading], size: int, rollups: bool) -> tuple[float, float, float]:
    """Seconds, CPU seconds and bytes written for `readings` in batches of `size`."""
    plan = Settings().rollup_plan() if rollups else None
    with tempfile.TemporaryDirectory(prefix="ingestd-batches-") as d:
        async with SqliteStore(Path(d) / "ingestd.db", rollups=plan) as store:
            wall, cpu, wrote = time.perf_counter(), time.process_time(), written()
            for start in range(0, len(readings), size):
                async with store.batch() as batch:
                    await batch.add_readings(readings[start : start + size])
            return time.perf_counter() - wall, time.process_time() - cpu, written() - wrote


async def main_async(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    readings = fleet(args.readings)
    n = len(readings)
    results: dict[int, list[tuple[float, float, float]]] = {s: [] for s in sizes}
    for r in range(args.rounds):
        for size in sizes if r % 2 == 0 else sizes[::-1]:  # the order alternating
            wall, cpu, wrote = await run(readings, size, not args.no_rollups)
            results[size].append((wall, cpu, wrote))
            print(
                f"round {r + 1}: batches of {size:,}: {n / wall:,.0f} readings/s, "
                f"{cpu / n * 1e6:.2f} us CPU and {wrote / n:,.0f} bytes written a reading",
                flush=True,
            )
    print(f"\n{n:,} readings of 400 series, {args.rounds} rounds, medians:\n")
    print("| batch | readings/s | CPU us a reading | bytes written a reading |")
    print("|---:|---:|---:|---:|")
    for size, rs in results.items():
        rate = statistics.median(n / w for w, _, _ in rs)
        cpu = statistics.median(c / n * 1e6 for _, c, _ in rs)
        wrote = statistics.median(b / n for _, _, b in rs)
        print(f"| {size:,} | {rate:,.0f} | {cpu:.2f} | {wrote:,.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="12500,25000", help="batch sizes, comma-separated")
    p.add_argument("--readings", type=int, default=500_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-rollups", action="store_true")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
