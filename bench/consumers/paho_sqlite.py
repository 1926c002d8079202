"""Baseline (b): the common hand-written script.

paho-mqtt `on_message` -> `json.loads` -> sqlite3 INSERT per reading and a
commit per message, with sqlite3's default settings. Prints one JSON line:
{"count", "first", "last", "cpu", "rss_kb"} (messages committed; "first" is the
time the connection was established).
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


def main(port: int, expect: int, qos: int, client_id: str, db: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS readings (sensor TEXT, metric TEXT, ts REAL, value REAL)"
    )
    state = {"count": 0, "first": 0.0, "last": 0.0}

    def on_message(client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        sensor = msg.topic.split("/")[1]
        data = json.loads(msg.payload)
        ts = data.pop("ts", time.time())
        for metric, value in data.items():
            conn.execute("INSERT INTO readings VALUES (?, ?, ?, ?)", (sensor, metric, ts, value))
        conn.commit()
        state["count"] += 1
        if state["count"] >= expect:
            state["last"] = time.time()
            client.disconnect()

    def on_connect(client: mqtt.Client, *_a: Any) -> None:
        state["first"] = time.time()  # timed from the connection, like every consumer
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
