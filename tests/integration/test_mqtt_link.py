"""The adapter against a real Mosquitto: manual ack, redelivery, paused reads,
packets over the maximum packet size."""

from __future__ import annotations

import asyncio

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingestd.mqtt.link import MqttLink
from ingestd.mqtt.wire import OversizedMessage
from tests.support.brokers import Mosquitto
from tests.support.mqtt import publish
from tests.support.waiting import wait_for


async def _collect(
    port: int, *, ack: bool, client_id: str, seconds: float, pause_after: int | None = None
) -> list[paho.MQTTMessage]:
    got: list[paho.MQTTMessage] = []
    link: MqttLink | None = None

    def on_message(m: paho.MQTTMessage) -> None:
        got.append(m)
        assert link is not None
        if ack:
            link.ack(m.mid, m.qos)
        if pause_after is not None and len(got) == pause_after:
            link.pause_reading()

    link = MqttLink(
        on_message=on_message,
        manual_ack=True,
        hostname="127.0.0.1",
        port=port,
        identifier=client_id,
        clean_session=False,
    )
    async with link:
        await link.subscribe("t/#", 1)
        await asyncio.sleep(seconds)
    return got


async def test_unacknowledged_messages_are_redelivered(mosquitto: Mosquitto) -> None:
    # Create the persistent session first so the broker queues for it.
    await _collect(mosquitto.port, ack=True, client_id="link-a", seconds=0.2)
    publish(mosquitto.port, [(f"t/{i}", str(i).encode()) for i in range(10)])
    first = await _collect(mosquitto.port, ack=False, client_id="link-a", seconds=0.5)
    assert sorted(int(m.payload) for m in first) == list(range(10))
    again = await _collect(mosquitto.port, ack=True, client_id="link-a", seconds=0.5)
    assert sorted(int(m.payload) for m in again) == list(range(10)), "not acked: redelivered"
    assert all(m.dup for m in again)
    after = await _collect(mosquitto.port, ack=True, client_id="link-a", seconds=0.3)
    assert after == [], "acknowledged: gone from the session"


async def test_paused_link_reads_nothing_more(mosquitto: Mosquitto) -> None:
    broker = Mosquitto(mosquitto.dir.parent / "b2", max_inflight=0).start()
    got: list[paho.MQTTMessage] = []
    link: MqttLink | None = None
    subscribed = False

    def on_message(m: paho.MQTTMessage) -> None:
        got.append(m)
        assert link is not None
        link.ack(m.mid, m.qos)
        if subscribed and len(got) == 5:
            link.pause_reading()

    try:
        link = MqttLink(
            on_message=on_message,
            manual_ack=True,
            hostname="127.0.0.1",
            port=broker.port,
            identifier="link-p",
            clean_session=False,
        )
        async with link:
            await link.subscribe("t/#", 1)
            subscribed = True
            messages = [(f"t/{i}", b"x" * 1000) for i in range(2000)]
            await asyncio.to_thread(publish, broker.port, messages)
            await asyncio.sleep(0.5)
            # Reading stops within the packets one wake-up had already taken.
            paused_at = len(got)
            assert 5 <= paused_at < 2000
            await asyncio.sleep(0.5)
            assert len(got) == paused_at, "nothing is read while paused"
            link.resume_reading()
            deadline = asyncio.get_running_loop().time() + 10
            while len(got) < 2000 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            assert len(got) == 2000
    finally:
        broker.kill()


async def _ack_then_close(port: int, *, confirm: bool) -> None:
    """Ack 500 messages (the last 300 right before closing) with thousands unread."""
    got: list[paho.MQTTMessage] = []
    held: list[tuple[int, int]] = []
    reached = asyncio.Event()
    link: MqttLink | None = None

    def on_message(m: paho.MQTTMessage) -> None:
        assert link is not None
        got.append(m)
        if len(got) <= 200:
            link.ack(m.mid, m.qos)
        elif len(got) <= 500:
            held.append((m.mid, m.qos))
        if len(got) == 500:
            link.pause_reading()
            reached.set()

    link = MqttLink(
        on_message=on_message,
        manual_ack=True,
        hostname="127.0.0.1",
        port=port,
        identifier="link-rst",
        clean_session=False,
    )
    async with link:
        await reached.wait()
        await asyncio.sleep(0.2)  # the broker keeps sending: unread data piles up
        for mid, qos in held:
            link.ack(mid, qos)
        if confirm:
            async with asyncio.timeout(5):
                assert await link.confirm_processed()


async def _drain_count(port: int) -> int:
    got = 0
    link: MqttLink | None = None

    def on_message(m: paho.MQTTMessage) -> None:
        nonlocal got
        got += 1
        assert link is not None
        link.ack(m.mid, m.qos)

    link = MqttLink(
        on_message=on_message,
        manual_ack=True,
        hostname="127.0.0.1",
        port=port,
        identifier="link-rst",
        clean_session=False,
    )
    async with link:
        await asyncio.sleep(3)
    return got


async def test_acks_sent_just_before_closing_are_not_lost(mosquitto: Mosquitto) -> None:
    """Closing with unread data sends RST, and the broker drops acks it had not read.

    confirm_processed() waits for a PINGRESP (reading and discarding meanwhile),
    so every acknowledgement has been processed before the socket closes.
    """
    broker = Mosquitto(mosquitto.dir.parent / "rst", max_inflight=1000).start()
    try:
        setup = MqttLink(
            on_message=lambda m: None,
            manual_ack=True,
            hostname="127.0.0.1",
            port=broker.port,
            identifier="link-rst",
            clean_session=False,
        )
        async with setup:
            await setup.subscribe("t/#", 1)
        messages = [(f"t/{i}", b"x" * 200) for i in range(20_000)]
        await asyncio.to_thread(publish, broker.port, messages)
        await _ack_then_close(broker.port, confirm=True)
        assert await _drain_count(broker.port) == 20_000 - 500, "every ack reached the broker"
    finally:
        broker.kill()


BIG = 64 * 1024 * 1024
LIMIT = 300_000  # the link's maximum packet size in these tests


def _big_payload() -> bytes:
    return bytes(range(256)) * (BIG // 256)


def _publish_v5(port: int, messages: list[tuple[str, bytes]]) -> None:
    """MQTT 5 publisher whose messages carry a user property (so the skipped
    packet has properties to read past)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = ("origin", "test")
        infos = [client.publish(t, p, qos=1, properties=props) for t, p in messages]
        for info in infos:
            info.wait_for_publish(60)
    finally:
        client.disconnect()
        client.loop_stop()


async def _receive_big(
    port: int,
    *,
    v5: bool,
    ask_broker: bool,
    client_id: str,
    publisher_v5: bool = False,
    qos: int = 1,
) -> list[paho.MQTTMessage]:
    """Subscribe with a link bounded at LIMIT, publish a 64 MB message and ten
    small ones, and return what the link handed on (acknowledging each)."""
    got: list[paho.MQTTMessage] = []
    link: MqttLink | None = None

    def on_message(m: paho.MQTTMessage) -> None:
        got.append(m)
        assert link is not None
        link.ack(m.mid, m.qos)

    properties = None
    if v5 and ask_broker:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.MaximumPacketSize = LIMIT
    link = MqttLink(
        on_message=on_message,
        manual_ack=True,
        max_packet_size=LIMIT,
        hostname="127.0.0.1",
        port=port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else False,
        clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
    )
    messages = [("big/one", _big_payload())] + [(f"t/{i}", str(i).encode()) for i in range(10)]
    async with link:
        await link.subscribe([("big/#", qos), ("t/#", qos)])
        if publisher_v5:
            await asyncio.to_thread(_publish_v5, port, messages)
        else:
            await asyncio.to_thread(publish, port, messages, qos=qos)
        deadline = asyncio.get_running_loop().time() + 30
        while len(got) < (10 if v5 and ask_broker else 11):
            assert asyncio.get_running_loop().time() < deadline, f"got {len(got)}"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # nothing more arrives
        assert link.connected, "the connection outlives the big packet"
    return got


def _check_skipped(got: list[paho.MQTTMessage], qos: int = 1) -> None:
    big, *small = got
    assert isinstance(big, OversizedMessage)
    assert big.topic == "big/one"
    assert big.qos == qos
    assert big.mid
    assert big.size == BIG
    assert big.payload == _big_payload()[:1024], "the first KiB is kept"
    assert [m.payload for m in small] == [str(i).encode() for i in range(10)]


@pytest.mark.parametrize("qos", [1, 2])
async def test_v311_packet_over_the_bound_is_skipped_unread_and_handed_on(
    mosquitto: Mosquitto, qos: int
) -> None:
    got = await _receive_big(mosquitto.port, v5=False, ask_broker=False, client_id="big-3", qos=qos)
    _check_skipped(got, qos)
    # Acknowledged like any message (QoS 2: PUBREC, and the PUBREL completed):
    # not redelivered to the next connection.
    again = await _collect(mosquitto.port, ack=True, client_id="big-3", seconds=0.5)
    assert again == []


async def test_v5_packet_the_broker_sends_anyway_is_skipped_past_its_properties(
    mosquitto: Mosquitto,
) -> None:
    # No Maximum Packet Size in CONNECT: the link's own bound still holds.
    got = await _receive_big(
        mosquitto.port, v5=True, ask_broker=False, client_id="big-5s", publisher_v5=True
    )
    _check_skipped(got)


async def test_a_bound_smaller_than_one_read_still_skips(mosquitto: Mosquitto) -> None:
    got: list[paho.MQTTMessage] = []

    def on_message(m: paho.MQTTMessage) -> None:
        got.append(m)
        link.ack(m.mid, m.qos)

    link = MqttLink(
        on_message=on_message,
        manual_ack=True,
        max_packet_size=1000,  # under the 64 KiB the skip reads at a time
        hostname="127.0.0.1",
        port=mosquitto.port,
        identifier="big-small",
    )
    async with link:
        await link.subscribe("t/#", 1)
        await asyncio.to_thread(publish, mosquitto.port, [("t/a", b"z" * 200_000), ("t/b", b"ok")])
        deadline = asyncio.get_running_loop().time() + 10
        while len(got) < 2:
            assert asyncio.get_running_loop().time() < deadline, f"got {len(got)}"
            await asyncio.sleep(0.05)
        assert link.connected
    assert isinstance(got[0], OversizedMessage)
    assert got[0].size == 200_000
    assert got[1].payload == b"ok"


async def test_v5_maximum_packet_size_makes_the_broker_drop_it(mosquitto: Mosquitto) -> None:
    got = await _receive_big(mosquitto.port, v5=True, ask_broker=True, client_id="big-5")
    assert [m.payload for m in got] == [str(i).encode() for i in range(10)]
    # Mosquitto says so in its log (a notice), and counts it nowhere we can read.
    wait_for(
        lambda: "Dropping too large outgoing PUBLISH for big-5" in mosquitto.log.read_text(),
        5,
        what="the broker's log line",
    )
