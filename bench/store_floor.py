"""What storing bench.bench's backlog costs plain `sqlite3` alone: the floor
under ingestd's CPU a message that its SQLite store sets, beside
`mosquitto_sub`'s (the floor for receiving and acknowledging).

The backlog's rows (8 sensors x 2 metrics, a reading of each metric a
message) are inserted in the statements ingestd's store makes of them
(`ingestd.store.sqlite.rows.statements`: each batch grouped by series, in
multi-row statements of 1,024, 128, 16 and 1 rows), into ingestd's schema,
WAL, synchronous FULL, a transaction a batch of 500 messages (half of the
broker's window of 1,000 in flight, where ingestd's batches close). No
broker, no decoding, no rollups: the SQLite library's own work and the least
Python that drives it.

    .venv/bin/python -m bench.store_floor               # 5 rounds, 100,000 messages
"""

from __future__ import annotations

import argparse
import resource
import sqlite3
import statistics
import tempfile
from pathlib import Path

from ingestd.store.sqlite.rows import statements
from ingestd.store.sqlite.schema import MIGRATIONS

SENSORS = 8
T0_NS = 1_780_000_000_000_000_000


def rows(messages: int) -> list[tuple[int, int, int, float]]:
    """(series_id, ts_ns, seq, value) of each message's two readings, in the
    order the backlog arrives (the sensors' messages interleaved)."""
    out = []
    for i in range(messages):
        sensor, k = i % SENSORS, i // SENSORS
        ts = T0_NS + k * 1_000_000
        out.append((2 * sensor + 1, ts, 0, 20 + (k % 100) / 10))
        out.append((2 * sensor + 2, ts, 0, float(k % 100)))
    return out


def one_round(messages: int, per_batch: int) -> float:
    """CPU seconds (user and system) a message to store the backlog."""
    with tempfile.TemporaryDirectory(prefix="ingestd-floor-") as work:
        db = sqlite3.connect(Path(work) / "floor.db", isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        for script in MIGRATIONS:
            db.executescript(f"BEGIN;\n{script}\nCOMMIT;")
        db.executemany(
            "INSERT INTO series (id, sensor, metric) VALUES (?, ?, ?)",
            [(s + 1, f"dev{s // 2}", f"m{s % 2}") for s in range(2 * SENSORS)],
        )
        backlog = rows(messages)
        step = 2 * per_batch
        before = resource.getrusage(resource.RUSAGE_SELF)
        for start in range(0, len(backlog), step):
            db.execute("BEGIN IMMEDIATE")
            for sql, groups in statements(backlog[start : start + step]):
                db.executemany(sql, groups)
            db.execute("COMMIT")
        after = resource.getrusage(resource.RUSAGE_SELF)
        stored = db.execute("SELECT count(*) FROM samples").fetchone()[0]
        db.close()
    assert stored == len(backlog), f"stored {stored} of {len(backlog)}"
    used = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return used / messages


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=500, help="messages a transaction (default 500)")
    a = p.parse_args()
    runs = [one_round(a.messages, a.batch) * 1e6 for _ in range(a.rounds)]
    print(
        f"plain sqlite3 storing {a.messages:,} messages of 2 readings ({SENSORS} sensors), "
        f"{a.batch} messages a transaction: {statistics.median(runs):.2f} us CPU a message "
        f"(median of {a.rounds}; {min(runs):.2f}-{max(runs):.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
