"""The one adapter over aiomqtt and paho-mqtt internals.

aiomqtt 2.5 gives us connection management, TLS and the asyncio socket
plumbing, but not three things an at-least-once ingester needs:

1. manual acknowledgement (upstream issue #345): paho-mqtt 2.x has
   `manual_ack_set(True)` and `ack(mid, qos)` on the wrapped paho client;
2. flow control: aiomqtt's `max_queued_incoming_messages` *discards* messages
   when full. We pause reading from the socket instead (remove the reader),
   so TCP and the broker hold what we cannot take yet;
3. cheap delivery: aiomqtt wraps each message in `Message`/`Topic` objects and
   its iterator creates a task per message. We take paho's message straight
   from its `on_message` callback, in the event-loop thread, and batch it.

Everything here that reaches into a private attribute is listed in
`REQUIRED_INTERNALS`; `tests/unit/test_mqtt_link.py` fails loudly if an
upgrade of either library removes one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

# (object, attribute) pairs this module depends on beyond the public API.
REQUIRED_INTERNALS: tuple[tuple[type[Any], str], ...] = (
    (aiomqtt.Client, "_on_socket_open"),
    (aiomqtt.Client, "_on_socket_close"),
    (aiomqtt.Client, "_misc_loop"),
    (paho.Client, "manual_ack_set"),
    (paho.Client, "ack"),
    (paho.Client, "loop_read"),
    (paho.Client, "_send_pingreq"),
)
# paho.Client instance attributes: `_ping_t` is non-zero while a PINGREQ is unanswered.
REQUIRED_PAHO_ATTRS = ("_ping_t",)
# Instance attributes of aiomqtt.Client (set in __init__) we rely on.
REQUIRED_INSTANCE_ATTRS = ("_client", "_disconnected", "_loop", "_misc_task")

# The clock paho stamps `MQTTMessage.timestamp` with on arrival (monotonic).
ARRIVAL_CLOCK: Callable[[], float] = paho.time_func

MessageHandler = Callable[[paho.MQTTMessage], None]

# Packets read per socket wake-up before yielding to the event loop.
_READS_PER_WAKEUP = 256


class MqttLink(aiomqtt.Client):
    """An aiomqtt client with manual acks, pausable reading and a direct callback.

    `on_message` is called in the event-loop thread for every PUBLISH with
    paho's `MQTTMessage`; it must not block.
    """

    def __init__(self, *, on_message: MessageHandler, manual_ack: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handler = on_message
        self._received = 0
        self._discarding = False
        self.discarded = 0
        self._paused = False
        self._fd: int | None = None
        paho_client: paho.Client = self._client
        paho_client.manual_ack_set(manual_ack)
        paho_client.on_message = self._deliver

    def _deliver(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        self._received += 1
        if self._discarding:
            self.discarded += 1  # not acknowledged: the broker redelivers it next session
            return
        self._handler(message)

    def ack(self, mid: int, qos: int) -> bool:
        """Send PUBACK (QoS 1) or PUBCOMP (QoS 2); False if the connection is gone."""
        rc = self._client.ack(mid, qos)
        return bool(rc == paho.MQTT_ERR_SUCCESS)

    def pause_reading(self) -> None:
        """Stop reading from the socket; the broker keeps what we do not read."""
        self._paused = True
        if self._fd is not None:
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._fd is not None:
            self._loop.add_reader(self._fd, self._read)

    async def confirm_processed(self) -> bool:
        """Return once the broker has processed everything sent so far (our acks).

        Closing a socket that still holds unread data makes the kernel send RST
        instead of FIN, and the broker's kernel then drops whatever it had not
        read yet: the last acknowledgements would be lost and those messages
        redelivered. So before DISCONNECT: read again, discarding (without
        acknowledging) what arrives, and wait for a PINGREQ's PINGRESP: the
        broker handles a connection's packets in order. False if the connection
        is gone first; bound it with `asyncio.timeout`.
        """
        client: paho.Client = self._client
        self._discarding = True
        if self._paused:
            self._paused = False
            if self._fd is not None:
                self._loop.add_reader(self._fd, self._read)

        async def until_no_ping_outstanding() -> bool:
            while client._ping_t != 0:
                if not self.connected:
                    return False
                await asyncio.sleep(0.005)
            return True

        # A keepalive ping already in flight would be answered first: let it.
        if not await until_no_ping_outstanding():
            return False
        if client._send_pingreq() != paho.MQTT_ERR_SUCCESS:
            return False
        return await until_no_ping_outstanding()

    @property
    def connected(self) -> bool:
        fut: asyncio.Future[None] = self._disconnected
        return not fut.done()

    async def wait_disconnected(self) -> None:
        """Return on a clean disconnect; raise aiomqtt.MqttError on a lost connection."""
        fut: asyncio.Future[None] = self._disconnected
        await asyncio.shield(fut)

    # -- socket plumbing (replaces aiomqtt.Client._on_socket_open) --------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho calls this from the executor thread that runs connect().
        fd = sock.fileno()

        def register() -> None:
            self._fd = fd
            if not self._paused:
                self._loop.add_reader(fd, self._read)
            self._misc_task = self._loop.create_task(self._misc_loop())

        self._loop.call_soon_threadsafe(register)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._fd = None
        super()._on_socket_close(client, userdata, sock)

    def _read(self) -> None:
        client: paho.Client = self._client
        try:
            for _ in range(_READS_PER_WAKEUP):
                before = self._received
                rc = client.loop_read()
                if rc != paho.MQTT_ERR_SUCCESS or self._paused:
                    break
                sock = client.socket()
                # TLS sockets may hold decrypted bytes the selector cannot see.
                if sock is not None and hasattr(sock, "pending") and sock.pending() > 0:
                    continue
                if self._received == before:
                    break  # a partial packet, or a control packet: wait for the selector
        except Exception as exc:
            fut: asyncio.Future[None] = self._disconnected
            if not fut.done():
                fut.set_exception(exc)
