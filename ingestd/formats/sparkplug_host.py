"""The Sparkplug host application STATE ingestd publishes of itself.

With `mqtt.sparkplug_host_id` set, ingestd is a Sparkplug 3.0 host
application: edge nodes watch `spBv1.0/STATE/<host_id>` (retained, QoS 1,
JSON `{"online": ..., "timestamp": ...}`) to know whether the host that
stores their data is there. The source publishes it online once subscribed
and offline on a clean stop; each connection's will says offline for it, with
the same timestamp as that connection's birth (the specification pairs them
so). The decoder (`sparkplug`) reads no STATE topic as data, ours or another
host's.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiomqtt
import structlog

log = structlog.get_logger("ingestd.formats.sparkplug_host")


class HostState:
    """The STATE of one host id, its timestamp the current connection's."""

    def __init__(self, host_id: str) -> None:
        self.topic = f"spBv1.0/STATE/{host_id}"
        self._timestamp_ms = 0

    def will(self) -> aiomqtt.Will:
        """A new connection's will (offline); stamps the connection's timestamp."""
        self._timestamp_ms = int(time.time() * 1000)
        return aiomqtt.Will(self.topic, self.payload(False), qos=1, retain=True)

    def payload(self, online: bool) -> bytes:
        return json.dumps({"online": online, "timestamp": self._timestamp_ms}).encode()

    async def publish(self, client: aiomqtt.Client, online: bool) -> None:
        """Publish it (retained, QoS 1) within 5 s; a failure is logged, not raised."""
        try:
            await asyncio.wait_for(
                client.publish(self.topic, self.payload(online), qos=1, retain=True), 5
            )
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("could not publish the Sparkplug host STATE", error=str(exc))
            return
        log.info("sparkplug host state", topic=self.topic, online=online)
