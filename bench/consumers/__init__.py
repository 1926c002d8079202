"""Baseline consumers for the benchmark: each runs as its own process."""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def arguments(*, db: bool = False) -> argparse.Namespace:
    """The command line every baseline consumer takes."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--expect", type=int, required=True, help="stop after this many messages")
    p.add_argument("--qos", type=int, default=1)
    p.add_argument("--client-id", required=True)
    if db:
        p.add_argument("--db", required=True)
    return p.parse_args()


def report(
    count: int, first: float, last: float, cpu: float | None = None, rss_kb: int | None = None
) -> None:
    """The one JSON line every consumer prints: {"count", "first", "last", "cpu",
    "rss_kb"}; CPU seconds and peak RSS from this process's getrusage() unless given."""
    if cpu is None or rss_kb is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu, rss_kb = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
    line = {"count": count, "first": first, "last": last, "cpu": cpu, "rss_kb": rss_kb}
    print(json.dumps(line), flush=True)


def paho_consume(
    port: int, client_id: str, qos: int, expect: int, handle: Callable[[Any, int], None]
) -> None:
    """paho's own loop on the consumer's persistent session: `handle(message, n)`
    for the n-th message (from 1), until `expect`; then `report`. Timed from the
    connection, like every consumer."""
    state = {"count": 0, "first": 0.0, "last": 0.0}

    def on_message(client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        state["count"] += 1
        handle(msg, int(state["count"]))
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
    report(int(state["count"]), state["first"], state["last"])
