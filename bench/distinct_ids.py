"""Memory with many distinct device ids: peak RSS of the decode path, in process.

    .venv/bin/python -m bench.distinct_ids --ids 1000000

Every id is new: a JSON route with `sequence_field` and a rate limit gets two
messages per id (counter 1 then 3: a gap, so each id has state for the store),
and a Homie route gets that id's `$state` (an id that never describes
itself). Chunks of 1,000 deliveries go through `decode_all` and the table's
status is taken after each, as the source does. Reported at checkpoints: the
peak RSS of this process (getrusage), the size of each per-device cache, and
the rate. With caches bounded by recency (`ingestd.recent`) the peak stops
growing once the caches are full, whatever the number of ids; the store's own
memory (series ids) is not part of this path.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time

import structlog

from ingestd.config import Settings, route_table
from ingestd.decode import decode_all
from ingestd.devices import DeviceState
from ingestd.events import NS

T0_NS = 1_700_000_000 * NS
ROUTES = [
    {
        "topic": "sensors/{sensor}/telemetry",
        "format": "json",
        "sequence_field": "seq",
        "rate_limit": 10.0,
        "rate_burst": 5.0,
    },
    {"topic": "homie/5/#", "format": "homie"},
]
CHUNK = 1000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ids", type=int, default=1_000_000)
    a = p.parse_args()
    # Each new Homie state is logged at info (the daemon's log, not this bench's).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    table = route_table(Settings(routes=ROUTES))
    state = DeviceState()
    decode_all(table, state, [("sensors/warmup/telemetry", b'{"seq": 0, "t": 1}', T0_NS)])
    print(f"{'ids':>10} {'peak RSS MB':>12} {'topics':>8} {'buckets':>8} {'seqs':>8} "
          f"{'homie states':>13} {'msgs/s':>9}")  # fmt: skip
    print(f"{0:>10,} {peak_rss_mb():>12.1f}")
    checkpoints = {10**k for k in range(4, 8)} | {a.ids}
    started, messages, gaps = time.perf_counter(), 0, 0
    for first in range(0, a.ids, CHUNK // 3):
        ids = range(first, min(first + CHUNK // 3, a.ids))
        chunk = []
        for i in ids:
            topic = f"sensors/d{i}/telemetry"
            ns = T0_NS + i * 10
            chunk.append((topic, b'{"seq": 1, "t": 21.5}', ns))
            chunk.append((topic, b'{"seq": 3, "t": 21.5}', ns + 1))
            chunk.append((f"homie/5/h{i}/$state", b"ready", ns + 2))
        readings, rejected = decode_all(table, state, chunk)
        assert len(readings) == 2 * len(ids), (len(readings), rejected[:1])
        status = state.take_status(table.stateful)
        gaps += sum(g for _, g, _ in status.sequences.values())
        messages += len(chunk)
        done = ids[-1] + 1
        if any(first < c <= done for c in checkpoints):
            rate = messages / (time.perf_counter() - started)
            homie = len(state.format_state.get("homie_states", ()))
            print(
                f"{done:>10,} {peak_rss_mb():>12.1f} {table.cached_topics:>8,} "
                f"{len(state.rate.buckets):>8,} {len(state.sequences):>8,} {homie:>13,} "
                f"{rate:>9,.0f}"
            )
    assert gaps == a.ids, gaps  # every id's gap reached the status, none lost to eviction
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
