"""Baseline (c): the hand-written script done better, as the issue measured it.

paho-mqtt's own loop, `json.loads`, `executemany` of the message's readings and
a commit every 1,000 messages; acknowledged on receive (paho's default), no
validation. Prints one JSON line: {"count", "first", "last", "cpu", "rss_kb"}.
"""

from __future__ import annotations

import json
import resource
import sqlite3
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.consumers import arguments

COMMIT_EVERY = 1000


def main(port: int, expect: int, qos: int, client_id: str, db: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS readings (sensor TEXT, metric TEXT, ts REAL, value REAL)"
    )
    state = {"count": 0, "first": 0.0, "last": 0.0}
    insert = "INSERT INTO readings VALUES (?, ?, ?, ?)"

    def on_message(client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        sensor = msg.topic.split("/")[1]
        data = json.loads(msg.payload)
        ts = data.pop("ts", time.time())
        conn.executemany(insert, [(sensor, k, ts, v) for k, v in data.items()])
        state["count"] += 1
        if state["count"] % COMMIT_EVERY == 0 or state["count"] >= expect:
            conn.commit()
        if state["count"] >= expect:
            state["last"] = time.time()
            client.disconnect()

    def on_connect(client: mqtt.Client, *_a: Any) -> None:
        state["first"] = time.time()
        client.subscribe("sensors/+/+", qos)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_message = on_message
    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_forever()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps({**state, "cpu": usage.ru_utime + usage.ru_stime, "rss_kb": usage.ru_maxrss}),
        flush=True,
    )


if __name__ == "__main__":
    a = arguments(db=True)
    main(a.port, a.expect, a.qos, a.client_id, a.db)
