"""Publishing from a test: paho-mqtt, waiting until the broker has acknowledged every
message."""

from __future__ import annotations

from collections.abc import Iterable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def publish(
    port: int,
    messages: Iterable[tuple[str, bytes]],
    *,
    qos: int = 1,
    inflight: int = 1000,
    client_id: str = "",
    retain: bool = False,
) -> int:
    """Publish and wait until every message is acknowledged by the broker.

    The in-flight window stays well under 65,535 so message ids never collide.
    """
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = []
        count = 0
        for topic, payload in messages:
            infos.append(client.publish(topic, payload, qos=qos, retain=retain))
            count += 1
            if len(infos) >= 5000:
                for info in infos:
                    info.wait_for_publish(30)
                infos.clear()
        for info in infos:
            info.wait_for_publish(30)
        return count
    finally:
        client.disconnect()
        client.loop_stop()
