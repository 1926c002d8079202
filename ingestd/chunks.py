"""Received messages into decoded chunks: what the source hands the bus.

Each message gets its receive time (wall clock, strictly increasing, so no
two share one), is checked for what the link already refused (over the
maximum packet size, a topic that is not UTF-8), and is marked retained or
read before (a redelivery this process read, or committed before a restart,
for formats that must tell: `Format.tells_redeliveries`). The chunk is then
decoded in arrival order with the pipeline's device state, and carries what
must be stored with its readings (sensor status, the packets read, the
filters the session holds).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from typing import cast

import msgspec
import paho.mqtt.client as paho
import structlog

from ingestd.config import Settings
from ingestd.decode import decode_all, too_large
from ingestd.devices import DeviceState
from ingestd.events import NS, Decoded, Rejected
from ingestd.mqtt.link import ARRIVAL_CLOCK, raw_topic
from ingestd.mqtt.wire import OversizedMessage, max_packet_size
from ingestd.routes import RouteTable
from ingestd.store.base import SUBSCRIPTIONS
from ingestd.window import InFlightWindow

log = structlog.get_logger("ingestd.source")

# Packets skipped for their size are logged at most this often (seconds): a
# flood of them is one line per interval, with a count.
OVERSIZE_LOG_INTERVAL = 10.0


class Chunker:
    def __init__(
        self,
        settings: Settings,
        table: RouteTable,
        devices: DeviceState,
        window: InFlightWindow,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.settings = settings
        self.table = table
        self.devices = devices
        self.window = window
        self.clock_ns = clock_ns
        self.manual_ack = settings.mqtt.ack == "after_commit"
        self._last_received_ns = 0
        self.received = 0
        # For formats that must tell a redelivery read already
        # (tells_redeliveries): QoS 1/2 packet id -> CRC-32 of the topic and
        # payload last read under it in this process (at most 65,535: ids are
        # 16 bits); and, after a restart, the (id, CRC) of the last messages
        # committed before it (from the store), until the broker's
        # redeliveries are over.
        self._read_packets: dict[int, int] = {}
        self.committed_packets: set[tuple[int, int]] = set()
        self.oversized_skipped = 0
        self.max_packet_size = max_packet_size(settings.input.max_payload_bytes)
        self._oversize_logged = -OVERSIZE_LOG_INTERVAL
        self._oversize_unlogged = 0
        # The filters the session holds, to store with the next chunk (JSON).
        self.filters_to_store: bytes | None = None

    def make(self, messages: list[paho.MQTTMessage], epoch: int) -> Decoded:
        """The chunk of `messages` (received on connection `epoch`)."""
        self.received += len(messages)
        # paho stamps each message with a monotonic clock on arrival; turn that
        # into wall-clock nanoseconds so readings without a device timestamp
        # get their own receive time, not the chunk's. Strictly increasing: no
        # two messages share a receive time, so their readings never collide.
        offset = self.clock_ns() - int(ARRIVAL_CLOCK() * NS)
        last = self._last_received_ns
        deliveries: list[tuple[str, bytes, int]] = []
        bad_topics: list[Rejected] = []
        # Positions in `deliveries` flagged retained (decoded in arrival order
        # with the rest: a description before what follows it), and those
        # sent again (DUP) that this process read already.
        retained_at: set[int] = set()
        read_before: set[int] = set()
        packets: list[tuple[int, int]] = []
        table = self.table
        tracking = table.tells_redeliveries
        for m in messages:
            now = offset + int(m.timestamp * NS)
            if now <= last:
                now = last + 1
            last = now
            # paho hands out bytes (typed bytes | bytearray); no copy needed.
            payload = cast(bytes, m.payload)
            if isinstance(m, OversizedMessage):
                bad_topics.append(self._oversized(m, now))
                continue
            try:
                topic = m.topic
            except UnicodeDecodeError:
                shown = raw_topic(m).decode("utf-8", "backslashreplace")
                bad_topics.append(
                    Rejected(shown, payload, "topic is not valid UTF-8", now / NS, "bad_topic")
                )
                continue
            at = len(deliveries)
            if m.retain:
                retained_at.add(at)
            if tracking and m.qos and self._read_again(m, topic, payload, packets):
                read_before.add(at)
            deliveries.append((topic, payload, now))
        self._last_received_ns = last
        devices = self.devices
        counts = devices.counts
        gaps, missing = counts.sequence_gaps, counts.sequence_missing
        readings, rejected = decode_all(
            table, devices, deliveries, retained_at=retained_at, read_before=read_before
        )
        found = (counts.sequence_gaps - gaps, counts.sequence_missing - missing)
        self.window.readings += len(readings)
        if bad_topics:
            rejected.extend(bad_topics)
        acks = [(m.mid, m.qos) for m in messages if m.qos] if self.manual_ack else []
        status = devices.take_status(table.stateful)
        if self.filters_to_store is not None:
            held = {SUBSCRIPTIONS: (self.filters_to_store, b"")}
            status = msgspec.structs.replace(status, devices={**status.devices, **held})
            self.filters_to_store = None
        if packets:
            status = msgspec.structs.replace(status, packets=tuple(packets))
        return Decoded(readings, rejected, len(messages), acks, epoch, status=status, gaps=found)

    def _oversized(self, m: OversizedMessage, received_ns: int) -> Rejected:
        """The quarantine record of a packet the link skipped for its size;
        counted, and logged at most once per OVERSIZE_LOG_INTERVAL."""
        topic = raw_topic(m).decode("utf-8", "backslashreplace")  # type: ignore[arg-type]
        self.oversized_skipped += 1
        self._oversize_unlogged += 1
        now = time.monotonic()
        if now - self._oversize_logged >= OVERSIZE_LOG_INTERVAL:
            log.warning(
                "PUBLISH over the maximum packet size skipped while reading and quarantined "
                "(too_large); raise input.max_payload_bytes if such payloads are expected",
                topic=topic,
                payload_bytes=m.size,
                max_packet_size=self.max_packet_size,
                skipped=self._oversize_unlogged,
            )
            self._oversize_logged = now
            self._oversize_unlogged = 0
        limit = self.settings.input.max_payload_bytes
        return too_large(topic, m.payload, m.size, limit, received_ns, skipped=True)

    def _read_again(
        self, m: paho.MQTTMessage, topic: str, payload: bytes, packets: list[tuple[int, int]]
    ) -> bool:
        """For a QoS 1/2 message of a route whose format tells redeliveries:
        whether the broker sent again one this process read already, or that
        was committed before a restart. A packet id is unique among a
        session's unacknowledged messages and kept on redelivery; what it
        carried (CRC-32 of topic and payload) tells a message read before from
        a later one reusing the id. Records it (`packets`, for the store)."""
        match = self.table.match(topic)
        if match is None or not match.fmt.tells_redeliveries:
            return False
        carried = zlib.crc32(payload, zlib.crc32(raw_topic(m)))
        mid = m.mid
        again = False
        if m.dup:
            again = (
                self._read_packets.get(mid) == carried or (mid, carried) in self.committed_packets
            )
        elif self.committed_packets:
            self.committed_packets = set()  # the broker's redeliveries are over
        self._read_packets[mid] = carried
        packets.append((mid, carried))
        return again
