"""Baseline (b): the common hand-written script.

paho-mqtt `on_message` -> `json.loads` -> sqlite3 INSERT per reading and a
commit per message, with sqlite3's default settings. Prints one JSON line:
{"count", "first", "last", "cpu", "rss_kb"} (messages committed; "first" is the
time the connection was established).
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from bench.consumers import arguments, paho_consume


def main(port: int, expect: int, qos: int, client_id: str, db: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS readings (sensor TEXT, metric TEXT, ts REAL, value REAL)"
    )

    def handle(msg: Any, _n: int) -> None:
        sensor = msg.topic.split("/")[1]
        data = json.loads(msg.payload)
        ts = data.pop("ts", time.time())
        for metric, value in data.items():
            conn.execute("INSERT INTO readings VALUES (?, ?, ?, ?)", (sensor, metric, ts, value))
        conn.commit()

    paho_consume(port, client_id, qos, expect, handle)


if __name__ == "__main__":
    a = arguments(db=True)
    main(a.port, a.expect, a.qos, a.client_id, a.db)
