"""The PUBLISH fast path against paho: the same byte streams, read by one
MqttLink with the fast path and one without (paho parses every packet), over
a real socket pair, must give the same messages in the same order, the same
acknowledgements and the same end (an error where paho finds one).

Streams: QoS 0, 1 and 2 PUBLISH (QoS 2 with its PUBREL), MQTT 3.1.1 and 5
(with and without properties), control packets between them, cut at every
byte, and fuzzed (random streams of valid and broken packets).
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from typing import Any

import paho.mqtt.client as paho
import pytest

from ingestd.mqtt.buffered import BufferedSocket
from ingestd.mqtt.link import MqttLink
from ingestd.mqtt.wire import parse_publishes


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(
    topic: bytes,
    payload: bytes,
    qos: int = 0,
    mid: int = 1,
    *,
    retain: bool = False,
    dup: bool = False,
    v5: bool = False,
    props: bytes = b"",
) -> bytes:
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    if v5:
        body += varint(len(props)) + props
    body += payload
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (8 if dup else 0)
    return bytes([first]) + varint(len(body)) + body


def pubrel(mid: int) -> bytes:
    return struct.pack("!BBH", 0x62, 2, mid)


PINGRESP = b"\xd0\x00"
# MQTT 5 properties: message expiry 60 s, content type, a user property.
PROPS = b"\x02\x00\x00\x00\x3c" + b"\x03\x00\x10application/json" + b"\x26\x00\x04site\x00\x03lab"


def stream(v5: bool, rng: random.Random, n: int = 40) -> bytes:
    parts = []
    for k in range(n):
        qos = rng.choice([0, 0, 1, 1, 1, 2])
        mid = k + 1
        topic = rng.choice([b"sensors/a/telemetry", b"s/\xc3\xa9/x", b"t", b"x" * 300])
        payload = rng.choice(
            [b"", b"21.5", b'{"t": 1}', bytes(rng.randrange(256) for _ in range(200))]
        )
        props = PROPS if v5 and rng.random() < 0.3 else b""
        parts.append(
            publish(
                topic,
                payload,
                qos,
                mid,
                retain=rng.random() < 0.2,
                dup=rng.random() < 0.1,
                v5=v5,
                props=props,
            )
        )
        if qos == 2:
            parts.append(pubrel(mid))
        if rng.random() < 0.1:
            parts.append(PINGRESP)
    return b"".join(parts)


class Reader:
    """An MqttLink reading from one end of a socket pair, as in the daemon."""

    def __init__(self, v5: bool, fast: bool, manual_ack: bool = True, pause_every: int = 0) -> None:
        self.got: list[tuple[bytes, bytes, int, bool, bool, int]] = []
        self.pause_every = pause_every  # the window filling up every n messages
        self.link = MqttLink(
            on_message=self._on,
            manual_ack=manual_ack,
            hostname="127.0.0.1",
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        )
        self.link.fast_path = fast
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        client: paho.Client = self.link._client
        client._sock = BufferedSocket(self.ours)
        # No event loop watches this socket: paho writes what it queues at once.
        client.on_socket_register_write = None
        client.on_socket_unregister_write = None
        self.error: str | None = None

    def _on(self, m: Any) -> None:
        assert not self.link._paused, "a message delivered while reading is paused"
        self.got.append(
            (bytes(m._topic), bytes(m.payload), m.qos, bool(m.retain), bool(m.dup), m.mid)
        )
        if self.pause_every and len(self.got) % (self.pause_every + 1) == self.pause_every:
            self.link.pause_reading()
            self.got.append((b"-- paused --", b"", 0, False, False, 0))

    def feed(self, data: bytes) -> None:
        if self.error is not None:
            return  # paho closed the connection on a protocol error: nothing more is read
        self.theirs.sendall(data)
        for _ in range(200):  # as the selector would call it while bytes are readable
            self.link._read()
            self.link._paused = False  # the window has room again (no selector here)
        fut: asyncio.Future[None] = self.link._disconnected
        if fut.done() and fut.exception() is not None:
            self.error = type(fut.exception()).__name__
        elif self.link._client._sock is None:
            self.error = "closed by paho"  # a protocol error: paho drops the connection

    def written(self) -> bytes:
        """What the client sent back (PUBACK, PUBREC, PUBCOMP)."""
        client: paho.Client = self.link._client
        for _ in range(100):
            if not client._out_packet or client.loop_write() != paho.MQTT_ERR_SUCCESS:
                break
        self.theirs.setblocking(False)
        out = b""
        try:
            while chunk := self.theirs.recv(65536):
                out += chunk
        except BlockingIOError:
            pass
        return out

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


async def both(
    data: bytes, cuts: list[int], v5: bool, manual_ack: bool = True, pause_every: int = 0
) -> tuple[int, int, str | None]:
    """(messages, of them by the fast path, the error) once both agree."""
    readers = [Reader(v5, fast, manual_ack, pause_every) for fast in (False, True)]
    try:
        for r in readers:
            last = 0
            for cut in [*cuts, len(data)]:
                r.feed(data[last:cut])
                last = cut
        slow, fast = readers
        assert fast.got == slow.got
        assert fast.error == slow.error
        assert fast.written() == slow.written()
        if slow.got and cuts == []:
            assert fast.link.fast_publishes > 0, "the fast path took part"
        return len(fast.got), fast.link.fast_publishes, fast.error
    finally:
        for r in readers:
            r.close()


@pytest.mark.parametrize("v5", [False, True])
async def test_same_messages_from_whole_streams(v5: bool) -> None:
    rng = random.Random(7 if v5 else 3)
    for _ in range(20):
        await both(stream(v5, rng), [], v5)


@pytest.mark.parametrize("v5", [False, True])
async def test_same_messages_with_the_stream_cut_at_every_byte(v5: bool) -> None:
    data = stream(v5, random.Random(11), n=6)
    for cut in range(1, len(data)):
        await both(data, [cut], v5)


@pytest.mark.parametrize("v5", [False, True])
async def test_a_full_window_stops_both_after_the_same_message(v5: bool) -> None:
    """The window pauses reading: the fast path takes not one message more."""
    rng = random.Random(13)
    for every in (1, 2, 3, 7):
        await both(stream(v5, rng), [], v5, pause_every=every)


@pytest.mark.parametrize("v5", [False, True])
async def test_same_acknowledgements_when_acking_on_receive(v5: bool) -> None:
    rng = random.Random(5)
    for _ in range(5):
        await both(stream(v5, rng), [], v5, manual_ack=False)


@pytest.mark.parametrize("v5", [False, True])
async def test_same_outcome_for_fuzzed_streams(v5: bool) -> None:
    rng = random.Random(2026 + v5)
    messages = by_fast_path = errors = 0
    for _ in range(300):
        data = bytearray(stream(v5, rng, n=8))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[i] ^= 1 << rng.randrange(8)
            elif op == 1:
                del data[i]
            else:
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        cuts = sorted(rng.sample(range(1, len(data)), k=min(3, len(data) - 1)))
        got, fast, error = await both(bytes(data), cuts, v5)
        messages += got
        by_fast_path += fast
        errors += error is not None
    # The fuzz reached both paths and both ends.
    assert messages > 1000
    assert by_fast_path > 200
    assert 30 < errors < 290


def test_the_parser_leaves_what_it_does_not_take_for_paho() -> None:
    ok = publish(b"a/b", b"1", 1, 7)
    out: list[Any] = []
    # QoS 2, a PINGRESP, an empty topic, a cut packet: left where they start.
    for rest in (publish(b"a", b"x", 2), PINGRESP, publish(b"", b"x"), ok[:-1]):
        out.clear()
        assert parse_publishes(ok + rest, 0, False, out) == len(ok)
        assert out == [(b"a/b", b"1", 1, False, False, 7, len(ok))]
    # MQTT 5: properties go to paho; none (a zero length) are read here.
    with_props = publish(b"a", b"x", 1, 2, v5=True, props=PROPS)
    out = []
    assert parse_publishes(with_props, 0, True, out) == 0
    plain = publish(b"a", b"x", 1, 2, v5=True)
    assert parse_publishes(plain, 0, True, out) == len(plain)
    assert out == [(b"a", b"x", 1, False, False, 2, len(plain))]
