"""Fails loudly if an aiomqtt or paho-mqtt upgrade removes what the adapter uses."""

from __future__ import annotations

import asyncio
import inspect
import select
import socket
import time

import aiomqtt
import paho.mqtt.client as paho
import pytest

from ingestd.mqtt import internals, wire
from ingestd.mqtt import link as mqtt_link
from ingestd.mqtt.buffered import BufferedSocket, PacketTooLarge


def test_private_attributes_the_adapter_relies_on_still_exist() -> None:
    for owner, name in internals.REQUIRED_INTERNALS:
        assert hasattr(owner, name), (
            f"{owner.__module__}.{owner.__name__}.{name} is gone: ingestd/mqtt/link.py must be "
            "updated for this aiomqtt/paho-mqtt version"
        )


async def test_instance_attributes_and_callback_wiring() -> None:
    client = aiomqtt.Client("127.0.0.1", 1)
    for name in internals.REQUIRED_INSTANCE_ATTRS:
        assert hasattr(client, name), f"aiomqtt.Client().{name} is gone"
    assert isinstance(client._client, paho.Client)
    assert isinstance(client._disconnected, asyncio.Future)
    # aiomqtt must look the socket callback up on self, so our override is used.
    link = mqtt_link.MqttLink(on_message=lambda m: None, manual_ack=True, hostname="127.0.0.1")
    opened, closed = link._client.on_socket_open, link._client.on_socket_close
    assert getattr(opened, "__func__", None) is mqtt_link.MqttLink._on_socket_open
    assert getattr(closed, "__func__", None) is mqtt_link.MqttLink._on_socket_close
    assert link._client._manual_ack is True
    for name in internals.REQUIRED_PAHO_ATTRS:
        assert hasattr(link._client, name), f"paho.Client().{name} is gone"


def test_paho_signatures_we_call() -> None:
    assert list(inspect.signature(paho.Client.ack).parameters) == ["self", "mid", "qos"]
    assert list(inspect.signature(paho.Client.manual_ack_set).parameters) == ["self", "on"]
    # MQTTMessage.timestamp is stamped with this clock on arrival.
    assert mqtt_link.ARRIVAL_CLOCK is time.monotonic
    assert aiomqtt.__version__.startswith("2.5"), "adapter written against aiomqtt 2.5"


def test_buffered_socket_serves_small_reads_from_one_large_read() -> None:
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        buffered = BufferedSocket(b)
        with pytest.raises(BlockingIOError):
            buffered.recv(1)  # nothing sent yet: the caller's non-blocking contract holds
        a.sendall(b"\x30\x05hello\x30\x03abc")
        assert wait_readable(b)
        assert buffered.recv(1) == b"\x30"
        assert buffered.pending() == 11  # the rest came with the first read
        assert buffered.recv(1) == b"\x05"
        assert buffered.recv(5) == b"hello"
        assert buffered.recv(1) == b"\x30"
        assert buffered.recv(1) == b"\x03"
        assert buffered.recv(10) == b"abc"  # a short read, as from the socket itself
        assert buffered.pending() == 0
        a.sendall(b"\x30" + b"x" * 99_999)
        a.close()
        assert wait_readable(b)
        assert buffered.recv(1) == b"\x30"
        got = b""
        while True:  # large reads pass through; then EOF reads as b""
            try:
                chunk = buffered.recv(99_999 - len(got) or 1)
            except BlockingIOError:
                assert wait_readable(b)
                continue
            if not chunk:
                break
            got += chunk
        assert got == b"x" * 99_999
        assert buffered.fileno() == b.fileno()  # everything else goes to the socket
    finally:
        a.close()
        b.close()


def wait_readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 5)[0])


def test_max_remaining_length_fits_the_whole_packet_in_the_bound() -> None:
    for size in (10, 129, 130, 131, 16_386, 16_387, 300_000, wire.MQTT_MAX_PACKET):
        r = wire.max_remaining_length(size)
        assert 1 + wire._varint_size(r) + r <= size
        assert 1 + wire._varint_size(r + 1) + r + 1 > size
    assert wire.max_remaining_length(wire.MQTT_MAX_PACKET) == 268_435_455
    assert wire.max_packet_size(262_144) == 262_144 + wire.PACKET_HEADROOM
    assert wire.max_packet_size(10**9) == wire.MQTT_MAX_PACKET


def test_buffered_socket_refuses_a_read_over_its_limit() -> None:
    a, b = socket.socketpair()
    try:
        buffered = BufferedSocket(b, limit=1000)
        with pytest.raises(PacketTooLarge):
            buffered.recv(1001)
        a.sendall(b"x" * 10)
        assert wait_readable(b)
        assert buffered.recv(1000) == b"x" * 10
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("v5", [False, True])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_parse_skipped_reads_the_variable_header_and_keeps_a_preview(v5: bool, qos: int) -> None:
    topic, payload = "big/topic/é".encode(), bytes(range(256)) * 20
    head = len(topic).to_bytes(2, "big") + topic
    if qos:
        head += (4242).to_bytes(2, "big")
    if v5:
        props = b"\x26\x00\x01k\x00\x01v"  # a user property
        head += bytes([len(props)]) + props
    packet = head + payload
    command = 0x30 | (qos << 1)
    for kept in (len(packet), len(head) + 10, 3):
        got = wire.parse_skipped(command, bytearray(packet[:kept]), len(packet), v5)
        t, mid, size, preview = got
        if kept >= len(head):
            assert (t, mid, size) == (topic, 4242 if qos else 0, len(payload))
            assert preview == payload[: min(wire.PREVIEW_BYTES, kept - len(head))]
        else:  # what was not kept is left out, not guessed
            assert preview == b""
            assert t == topic[:1]
