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
    last_ts = 0.0
    sent = 0
    while sent < a.count:
        due = min(a.count, int((time.monotonic() - start) * a.rate) + 1)
        while sent < due:
            # Strictly increasing per publisher, so no two records share a key.
            ts = max(time.time(), last_ts + 1e-6)
            last_ts = ts
            out.write(f'{{"ts": {ts:.6f}, "temperature": 21.5, "humidity": {sent % 100}}}\n')
            sent += 1
        out.flush()
        time.sleep(0.001)


if __name__ == "__main__":
    main()
