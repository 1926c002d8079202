"""bench/RESULTS.md from one command: the benchmark (bench.bench, with the
latency run), the fleet-shaped loads (bench.fleet), 500,000 series
(bench.huge) and SenML packs against the code when the fleet-scale issue was
filed (bench.against), one after the other on this machine, each table as
its module prints it.

    .venv/bin/python -m bench.results             # about 26 minutes, the 2 cores quiet
    .venv/bin/python -m bench.results --quick     # 1 round each, smaller: a smoke run

Each part runs as its own process (its progress on stderr); a part that
fails stops the run and leaves RESULTS.md as it was.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).with_name("RESULTS.md")
# The code when the fleet-scale issue was filed (the commit added bench/fleet.py
# alone): SenML's speed-up since, measured against it in the same run.
ISSUE_FILED = "53e9ff7"
BENCH_FIX = "6cbf528"  # its bench's device times (bench.against)
AGAINST = f"SenML as devices send it, against {ISSUE_FILED} in the same run"
AGAINST_ARGS = ["bench.against", ISSUE_FILED, "--fix", BENCH_FIX, "--only", "SenML"]


def parts(quick: bool) -> list[tuple[str, list[str]]]:
    """(heading, module and arguments) of each part, in the order run."""
    if quick:
        return [
            ("Throughput and latency", ["bench.bench", "--quick", "--latency-rate", "5000",
                                        "--latency-seconds", "3"]),
            ("Fleets: wide, and SenML as devices send it", ["bench.fleet", "--rounds", "1",
                                                            "--messages", "20000",
                                                            "--held", "400000"]),
            ("500,000 series (here 20,000)", ["bench.huge", "--devices", "4000"]),
            (AGAINST, [*AGAINST_ARGS, "--rounds", "1"]),
        ]  # fmt: skip
    return [
        ("Throughput and latency", ["bench.bench", "--rounds", "5", "--latency-rate", "20000",
                                    "--latency-seconds", "10"]),
        ("Fleets: wide, and SenML as devices send it", ["bench.fleet", "--rounds", "3"]),
        ("500,000 series: 100,000 devices x 5 metrics", ["bench.huge"]),
        (AGAINST, [*AGAINST_ARGS, "--rounds", "4"]),
    ]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round each, smaller loads")
    p.add_argument("--out", type=Path, default=OUT, help=f"default {OUT}")
    a = p.parse_args()
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    started = time.monotonic()
    sections = []
    for heading, argv in parts(a.quick):
        print(f"bench.results: {' '.join(argv)}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", *argv], cwd=root, env=env, stdout=subprocess.PIPE, check=False
        )
        if done.returncode != 0:
            print(f"bench.results: {argv[0]} failed (exit {done.returncode})", file=sys.stderr)
            return 1
        body = done.stdout.decode().strip()
        took = time.monotonic() - t0
        sections.append(
            f"## {heading}\n\nCommand: `python -m {' '.join(argv)}` ({took:.0f} s)\n\n{body}\n"
        )
    mosquitto = subprocess.run(
        ["mosquitto", "-h"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    head = (
        f"# Benchmark results\n\nMeasured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on "
        f"{os.cpu_count()} cores ({platform.machine()}), CPython {platform.python_version()}, "
        f"{mosquitto[0] if mosquitto else 'mosquitto'}, broker and consumer on one machine. "
        f"Written by `python -m bench.results{' --quick' if a.quick else ''}` "
        f"in {time.monotonic() - started:.0f} s.\n"
    )
    a.out.write_text(head + "\n" + "\n".join(sections))
    print(f"bench.results: wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
