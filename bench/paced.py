"""A paced line generator for `mosquitto_pub -l`: JSON records stamped with the
wall-clock time at which they are written, at a fixed rate, for a fixed count.

    python -m bench.paced --rate 1500 --count 15000 | mosquitto_pub -l -t ...
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=float, required=True, help="lines per second")
    p.add_argument("--count", type=int, required=True)
    a = p.parse_args()
    out = sys.stdout
    start = time.monotonic()
    last_us = 0
    sent = 0
    while sent < a.count:
        due = min(a.count, int((time.monotonic() - start) * a.rate) + 1)
        while sent < due:
            # Strictly increasing per publisher, so no two records share a key:
            # whole microseconds, written exactly. (A float ts + 1e-6 printed
            # with 6 decimals could repeat the last one: 2 of 400,000 did.)
            us = max(time.time_ns() // 1000, last_us + 1)
            last_us = us
            ts = f"{us // 1_000_000}.{us % 1_000_000:06d}"
            out.write(f'{{"ts": {ts}, "temperature": 21.5, "humidity": {sent % 100}}}\n')
            sent += 1
        out.flush()
        time.sleep(0.001)


if __name__ == "__main__":
    main()
