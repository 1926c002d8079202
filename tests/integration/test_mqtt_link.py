"""The adapter against a real Mosquitto: manual ack, redelivery, paused reads."""

from __future__ import annotations

import asyncio

import paho.mqtt.client as paho

from ingestd.mqtt_link import MqttLink
from tests.helpers import Mosquitto, publish


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
