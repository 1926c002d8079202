"""MQTT packets as bytes, without I/O: the PUBLISH parser of the adapter's fast
path, the PUBACK encoder, and the arithmetic of the packet-size bound.

`ingestd.mqtt.link` hands `parse_publishes` the bytes already in its read
buffer. Complete QoS 0/1 PUBLISH packets without MQTT 5 properties come back as
tuples, which the adapter turns into `FastMessage`s (the attributes of paho's
`MQTTMessage` that ingestd reads); everything else (another packet type, QoS
2, properties, a malformed packet, one not wholly in the buffer) is left where
it starts, for paho. That skips paho's per-packet Python (an `MQTTMessage`
with a `threading.Condition`, a log call, callback matching) for the common
packet: most of ingestd's reading speed (issue 16, measured in bench/).
`tests/unit/test_mqtt_fastpath.py` feeds the same byte streams (fuzzed, split
at every byte, QoS 0/1/2, MQTT 3.1.1 and 5 with properties) to both parsers
and compares the messages.

A PUBLISH bigger than `max_packet_size` (issue 22) is read past by the adapter
instead of being buffered whole; `parse_skipped` names its topic, packet id and
payload size from the start of it that was kept, and it is handed on as an
`OversizedMessage`.

Nothing here reads a socket, a clock or a library's internals.
"""

from __future__ import annotations

import struct

_PUBACK = struct.Struct("!BBH")

# What a packet may hold beyond its payload before it is refused unread: the
# longest topic MQTT allows (65,535 bytes and its length), a packet id, the
# fixed header, and ~64 KiB of MQTT 5 properties. A payload over
# input.max_payload_bytes that fits in this headroom still arrives whole and
# is quarantined by decode (too_large); only bigger packets are skipped.
PACKET_HEADROOM = 128 * 1024
# MQTT's largest packet: a Remaining Length of 268,435,455 in four bytes, the
# command byte and those four.
MQTT_MAX_PACKET = 268_435_455 + 5
# Of a skipped PUBLISH, the start of its payload that is handed on.
PREVIEW_BYTES = 1024
# Of a skipped packet at most this much of its start is kept: its topic, packet
# id, properties and the first PREVIEW_BYTES of its payload.
_SKIP_KEEP = PACKET_HEADROOM


def max_packet_size(max_payload_bytes: int) -> int:
    """The largest packet (fixed header included) ingestd takes from the broker:
    the payload limit plus `PACKET_HEADROOM`, at most what MQTT allows. Sent as
    MQTT 5's Maximum Packet Size and enforced by the adapter on 3.1.1 alike."""
    return min(max_payload_bytes + PACKET_HEADROOM, MQTT_MAX_PACKET)


def _varint_size(n: int) -> int:
    return 1 if n < 0x80 else 2 if n < 0x4000 else 3 if n < 0x20_0000 else 4


def max_remaining_length(packet_size: int) -> int:
    """The largest Remaining Length a packet of at most `packet_size` bytes in
    all (command byte, the Remaining Length's own bytes, the rest) can have."""
    remaining = packet_size - 2
    while remaining > 0 and 1 + _varint_size(remaining) + remaining > packet_size:
        remaining -= 1
    return remaining


def pubacks(mids: list[int]) -> bytes:
    """The PUBACK packets for these QoS 1 packet ids, back to back (one write)."""
    pack = _PUBACK.pack
    return b"".join([pack(0x40, 2, mid) for mid in mids])


class FastMessage:
    """A received PUBLISH as the fast path gives it: the attributes of paho's
    `MQTTMessage` that ingestd reads, and nothing that costs per message."""

    __slots__ = ("_topic", "dup", "mid", "payload", "properties", "qos", "retain", "timestamp")

    def __init__(
        self,
        topic: bytes,
        payload: bytes,
        qos: int,
        retain: bool,
        dup: bool,
        mid: int,
        timestamp: float,
    ) -> None:
        self._topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.mid = mid
        self.timestamp = timestamp
        self.properties = None

    @property
    def topic(self) -> str:
        """As paho's: raises UnicodeDecodeError for a topic that is not UTF-8."""
        return self._topic.decode("utf-8")


class OversizedMessage(FastMessage):
    """A PUBLISH over the maximum packet size, skipped while reading: its topic,
    qos and packet id as sent, `payload` the first `PREVIEW_BYTES` of it only,
    and `size` the size of the payload it had."""

    __slots__ = ("size",)

    def __init__(
        self,
        topic: bytes,
        preview: bytes,
        size: int,
        qos: int,
        retain: bool,
        dup: bool,
        mid: int,
        timestamp: float,
    ) -> None:
        super().__init__(topic, preview, qos, retain, dup, mid, timestamp)
        self.size = size


def parse_skipped(
    command: int, head: bytes | bytearray, length: int, v5: bool
) -> tuple[bytes, int, int, bytes]:
    """(topic, packet id, payload size, payload preview) of a PUBLISH whose
    variable header starts `head` and whose Remaining Length is `length`. What
    `head` does not hold is left out (an empty topic or preview), never guessed."""
    qos = (command >> 1) & 3
    if len(head) < 2:
        return b"", 0, length, b""
    tlen = (head[0] << 8) | head[1]
    topic = bytes(head[2 : 2 + tlen])
    j = 2 + tlen
    mid = 0
    if qos:
        mid = (head[j] << 8) | head[j + 1] if j + 2 <= len(head) else 0
        j += 2
    if v5:
        props = shift = 0
        while j < len(head) and shift <= 21:
            byte = head[j]
            j += 1
            props |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        j += props
    j = min(j, length)
    return topic, mid, length - j, bytes(head[j : j + PREVIEW_BYTES])


class SkippedPublish:
    """A PUBLISH over the bound being read past: fed what is read of it, it
    keeps its start and counts what is left (`left`) of its Remaining Length."""

    __slots__ = ("command", "head", "left", "length")

    def __init__(self, command: int, length: int) -> None:
        self.command = command
        self.length = length  # Remaining Length
        self.left = length
        self.head = bytearray()

    def feed(self, data: bytes) -> None:
        self.left -= len(data)
        room = _SKIP_KEEP - len(self.head)
        if room > 0:
            self.head += data[:room]

    def message(self, v5: bool, timestamp: float) -> OversizedMessage:
        """What was read past, once `left` is 0."""
        command = self.command
        topic, mid, size, preview = parse_skipped(command, self.head, self.length, v5)
        qos, retain, dup = (command >> 1) & 3, bool(command & 1), bool(command & 8)
        return OversizedMessage(topic, preview, size, qos, retain, dup, mid, timestamp)


Parsed = tuple[bytes, bytes, int, bool, bool, int, int]


def parse_publishes(buf: bytes, pos: int, v5: bool, out: list[Parsed]) -> int:
    """Parse the complete QoS 0/1 PUBLISH packets at `buf[pos:]` into `out`
    (topic, payload, qos, retain, dup, mid, end position); return the position of the first
    packet left for paho: another type, QoS 2, MQTT 5 properties present, a
    malformed one (paho reports it), or one not wholly in the buffer."""
    end = len(buf)
    while pos < end:
        first = buf[pos]
        if first & 0xF0 != 0x30:
            return pos
        qos = (first >> 1) & 3
        if qos > 1:
            return pos
        # Remaining length: 1-4 bytes, 7 bits each.
        length = 0
        shift = 0
        i = pos + 1
        while True:
            if i >= end or i - pos > 4:
                return pos
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
        stop = i + length
        if stop > end or length < 2:
            return pos
        tlen = (buf[i] << 8) | buf[i + 1]
        if not tlen:
            return pos  # MQTT 3.1.1 refuses an empty topic, MQTT 5 needs an alias
        j = i + 2 + tlen
        mid = 0
        if qos:
            if j + 2 > stop:
                return pos
            mid = (buf[j] << 8) | buf[j + 1]
            j += 2
        elif j > stop:
            return pos
        if v5:
            if j >= stop or buf[j] != 0:
                return pos  # properties (or a malformed length): paho decodes them
            j += 1
        topic = buf[i + 2 : i + 2 + tlen]
        out.append((topic, buf[j:stop], qos, bool(first & 1), bool(first & 8), mid, stop))
        pos = stop
    return pos
