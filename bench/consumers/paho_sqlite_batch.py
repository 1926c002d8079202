"""Baseline (c): the hand-written script done better, as the issue measured it.

paho-mqtt's own loop, `json.loads`, `executemany` of the message's readings and
a commit every 1,000 messages; acknowledged on receive (paho's default), no
validation. Prints one JSON line: {"count", "first", "last", "cpu", "rss_kb"}.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from bench.consumers import arguments, paho_consume

COMMIT_EVERY = 1000


def main(port: int, expect: int, qos: int, client_id: str, db: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS readings (sensor TEXT, metric TEXT, ts REAL, value REAL)"
    )
    insert = "INSERT INTO readings VALUES (?, ?, ?, ?)"

    def handle(msg: Any, n: int) -> None:
        sensor = msg.topic.split("/")[1]
        data = json.loads(msg.payload)
        ts = data.pop("ts", time.time())
        conn.executemany(insert, [(sensor, k, ts, v) for k, v in data.items()])
        if n % COMMIT_EVERY == 0 or n >= expect:
            conn.commit()

    paho_consume(port, client_id, qos, expect, handle)


if __name__ == "__main__":
    a = arguments(db=True)
    main(a.port, a.expect, a.qos, a.client_id, a.db)
