"""MqttLink: the one adapter over aiomqtt and paho-mqtt internals.

aiomqtt 2.5 gives us connection management, TLS and the asyncio socket
plumbing, over paho-mqtt's protocol code. What an at-least-once ingester needs
beyond them is added here, each piece by reaching into one or the other:

1. manual acknowledgement (open upstream, empicano/aiomqtt#345): paho-mqtt 2.x
   has `manual_ack_set(True)` and `ack(mid, qos)` on the wrapped client. The
   PUBACKs of a committed batch go out as one write (`ack_many`);
2. flow control: aiomqtt's `max_queued_incoming_messages` *discards* messages
   when full. We pause reading from the socket instead (remove the reader),
   so TCP and the broker hold what we cannot take yet;
3. cheap delivery: paho's message straight from its `on_message` callback, in
   the event-loop thread, without aiomqtt's `Message` object and task each;
4. cheap reading (issue 16, measured in bench/): paho's three or more `recv()`
   calls per packet are served from one large read (`ingestd.mqtt.buffered`),
   the complete QoS 0/1 PUBLISH packets in it are parsed by `ingestd.mqtt.wire`
   instead of paho, and of paho's per-packet log calls only warnings and
   errors are formatted. paho keeps everything else: CONNECT, SUBSCRIBE,
   keepalive, PUBREL, QoS 2, MQTT 5 properties, partial packets, TLS;
5. QoS 2 that survives a crash: paho answers a QoS 2 PUBLISH with PUBREC on
   arrival, and PUBREC hands ownership of the message to the receiver (MQTT
   4.3.3): a message not yet committed when the connection ends is never sent
   again, and a fresh client does not answer the broker's PUBREL for it, which
   wedges one of the broker's in-flight slots for good. With manual
   acknowledgement we hold PUBREC back until the commit (the message is handed
   over at once, like QoS 1), and answer every PUBREL with PUBCOMP;
6. a keepalive that outlives a pause: while reading is paused the broker's
   PINGRESP sits unread behind the messages we are not taking, and paho would
   drop a healthy connection after one keepalive. While paused, a PINGREQ that
   was written counts as the sign of life: a broker that is gone shows as a
   failed write;
7. a bound on what one packet can cost (issue 22): paho accumulates a packet
   whole, and Mosquitto sends PUBLISH packets up to 256 MB. Over MQTT 5 the
   caller asks the broker for none over `max_packet_size` (CONNECT's Maximum
   Packet Size, MQTT 5 3.1.2.11.4); for 3.1.1, or a broker that sends one
   anyway, paho asking our socket for more than the bound is the sign: the
   packet is read past in small reads, keeping its start, and handed on as an
   `OversizedMessage` (acknowledged like any other once it is quarantined, so
   the broker does not redeliver it forever).

Every private attribute touched here is listed in `ingestd.mqtt.internals`;
`tests/unit/test_mqtt_internals.py` fails loudly if an upgrade of either
library removes one.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Mapping
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from ingestd.mqtt.acks import AckConfirmations
from ingestd.mqtt.buffered import BufferedSocket, PacketTooLarge
from ingestd.mqtt.wire import (
    FastMessage,
    Parsed,
    SkippedPublish,
    max_remaining_length,
    parse_publishes,
    pubacks,
)

# The clock paho stamps `MQTTMessage.timestamp` with on arrival (monotonic).
ARRIVAL_CLOCK: Callable[[], float] = paho.time_func

MessageHandler = Callable[[paho.MQTTMessage], None]

# Packets read per socket wake-up before yielding to the event loop.
_READS_PER_WAKEUP = 256

# A packet over the bound is read past in reads of at most this much.
_SKIP_READ = 64 * 1024


def raw_topic(message: paho.MQTTMessage) -> bytes:
    """A message's topic as the broker sent it (paho's `topic` property raises on
    invalid UTF-8)."""
    return bytes(message._topic)


class MqttLink(aiomqtt.Client):
    """An aiomqtt client with manual acks, pausable reading and a direct callback.

    `on_message` is called in the event-loop thread for every PUBLISH with
    paho's `MQTTMessage`; it must not block.
    """

    def __init__(
        self,
        *,
        on_message: MessageHandler,
        manual_ack: bool,
        side_topics: Mapping[str, Callable[[bytes, bool], None]] | None = None,
        max_packet_size: int = 0,
        **kwargs: Any,
    ) -> None:
        """`side_topics`: topics whose payloads (and retain flags) go to their
        own callback, outside the pipeline (the broker's $SYS counters): not
        counted, not acknowledged (they arrive at QoS 0). `max_packet_size`
        (bytes, 0: no bound): a PUBLISH bigger than this is skipped unread and
        handed on as an `OversizedMessage`; for MQTT 5 it also belongs in the
        CONNECT properties (the caller's), so the broker sends none."""
        super().__init__(**kwargs)
        self.max_packet_size = max_packet_size
        self._max_remaining = max_remaining_length(max_packet_size) if max_packet_size else 0
        self._skip: SkippedPublish | None = None
        self.oversized = 0  # PUBLISH packets skipped on this connection
        self._handler = on_message
        self._side = {t.encode(): cb for t, cb in (side_topics or {}).items()}
        self._received = 0
        self._discarding = False
        self.discarded = 0
        # Acknowledgement writes, and which the broker is known to have processed.
        self.acks = AckConfirmations()
        self._paused = False
        self._fd: int | None = None
        # QoS 2 under manual acknowledgement (see the module docstring, 5).
        self.pubrels_completed = 0
        self._holding_pubrec = False
        self._held_mid: int | None = None
        paho_client: paho.Client = self._client
        paho_client.manual_ack_set(manual_ack)
        paho_client.on_message = self._deliver
        # paho's per-packet debug lines cost a call each; pass on what matters.
        paho_client._easy_log = self._paho_log  # type: ignore[method-assign]
        self._paho_logger = paho_client._logger
        self.fast_publishes = 0  # PUBLISH packets the fast path parsed (tests read it)
        self.fast_path = True  # off: paho parses every packet (the differential test)
        self._paho_handle_publish = paho_client._handle_publish
        self._paho_handle_pubrel = paho_client._handle_pubrel
        self._paho_send_pubrec = paho_client._send_pubrec
        if manual_ack:
            # Instance attributes shadow paho's methods; `_packet_handle` looks them up.
            paho_client._handle_publish = self._handle_publish  # type: ignore[method-assign]
            paho_client._handle_pubrel = self._handle_pubrel  # type: ignore[method-assign]
            paho_client._send_pubrec = self._send_pubrec  # type: ignore[method-assign]

    def _handle_publish(self) -> MQTTErrorCode:
        client: paho.Client = self._client
        if (client._in_packet["command"] & 0x06) != 0x04:  # QoS bits: not QoS 2
            return self._paho_handle_publish()
        self._holding_pubrec, self._held_mid = True, None
        try:
            rc = self._paho_handle_publish()
        finally:
            self._holding_pubrec = False
        mid = self._held_mid
        if mid is not None:
            message = client._in_messages.pop(mid, None)
            if message is not None:
                self._deliver(client, None, message)
        return rc

    def _send_pubrec(self, mid: int) -> MQTTErrorCode:
        if self._holding_pubrec:
            self._held_mid = mid  # sent by `ack` once the message is committed
            return paho.MQTT_ERR_SUCCESS
        return self._paho_send_pubrec(mid)

    def _handle_pubrel(self) -> MQTTErrorCode:
        client: paho.Client = self._client
        rc = self._paho_handle_pubrel()
        if rc != paho.MQTT_ERR_SUCCESS:
            return rc
        # We sent PUBREC only after the commit (or a previous connection did):
        # the message is stored, so complete it, known to this client or not.
        (mid,) = struct.unpack("!H", client._in_packet["packet"][:2])
        self.pubrels_completed += 1
        return client._send_pubcomp(mid)

    def _deliver(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        if self._side:
            side = self._side.get(message._topic)
            if side is not None:
                side(bytes(message.payload), bool(message.retain))
                return
        self._received += 1
        if self._discarding:
            self.discarded += 1  # not acknowledged: the broker redelivers it next session
            return
        self._handler(message)

    def _paho_log(self, level: int, fmt: str, *args: Any) -> None:
        if self._discarding and not self.acks.unconfirmed:
            # Stopping with every acknowledgement confirmed: the broker going away
            # now (it was stopped too) loses nothing.
            if self._paho_logger is not None:
                self._paho_logger.debug(fmt, *args)
            return
        if level in (paho.MQTT_LOG_WARNING, paho.MQTT_LOG_ERR) and self._paho_logger is not None:
            self._paho_logger.log(
                logging.WARNING if level == paho.MQTT_LOG_WARNING else logging.ERROR, fmt, *args
            )

    def ack_many(self, acks: list[tuple[int, int]]) -> bool:
        """Acknowledge these (mid, qos) in order: the PUBACKs in one write (one
        queued packet of them all), QoS 2's PUBRECs as `ack` sends them. False
        if the connection is gone."""
        client: paho.Client = self._client
        mids: list[int] = []
        ok = True
        for mid, qos in acks:
            if qos == 1:
                mids.append(mid)
                continue
            if mids:
                ok = self._queue_pubacks(client, mids) and ok
                mids = []
            ok = self.ack(mid, qos) and ok
        if mids:
            ok = self._queue_pubacks(client, mids) and ok
        self.acks.written()
        return ok

    @staticmethod
    def _queue_pubacks(client: paho.Client, mids: list[int]) -> bool:
        rc = client._packet_queue(0x40, pubacks(mids), 0, 0)
        return bool(rc == paho.MQTT_ERR_SUCCESS)

    def ack(self, mid: int, qos: int) -> bool:
        """Send PUBACK (QoS 1) or PUBREC (QoS 2: the broker answers PUBREL, and
        we PUBCOMP); False if the connection is gone."""
        rc = self._paho_send_pubrec(mid) if qos == 2 else self._client.ack(mid, qos)
        self.acks.written()
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
        self._add_reader()

    def _add_reader(self) -> None:
        if self._fd is None:
            return
        self._loop.add_reader(self._fd, self._read)
        if self._buffered():
            # Already read from the kernel: the selector will not report it.
            self._loop.call_soon(self._read)

    def _buffered(self) -> bool:
        sock = self._client.socket()
        return sock is not None and hasattr(sock, "pending") and sock.pending() > 0

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
            self._add_reader()

        async def until_no_ping_outstanding() -> bool:
            while client._ping_t != 0:
                if not self.connected:
                    return False
                await asyncio.sleep(0.005)
            return True

        # A keepalive ping already in flight would be answered first: let it.
        if not await until_no_ping_outstanding():
            return False
        covers = self.acks.sent
        if client._send_pingreq() != paho.MQTT_ERR_SUCCESS:
            return False
        confirmed = await until_no_ping_outstanding()
        if confirmed:
            self.acks.confirmed_up_to(covers)
        return confirmed

    @property
    def connected(self) -> bool:
        fut: asyncio.Future[None] = self._disconnected
        return not fut.done()

    async def wait_disconnected(self) -> None:
        """Return on a clean disconnect; raise aiomqtt.MqttError on a lost connection."""
        fut: asyncio.Future[None] = self._disconnected
        await asyncio.shield(fut)

    async def _misc_loop(self) -> None:
        """paho's periodic work (keepalive, retries), as aiomqtt runs it, except
        that while reading is paused the last PINGREQ written stands in for the
        PINGRESP we cannot read yet (see the module docstring, 6)."""
        client: paho.Client = self._client
        while True:
            if self._paused:
                with client._msgtime_mutex:
                    client._last_bytes_received = ARRIVAL_CLOCK()
            if client.loop_misc() != paho.MQTT_ERR_SUCCESS:
                return
            outstanding = client._ping_t != 0
            self.acks.answered(outstanding)
            if self.acks.wants_ping(outstanding, self._paused) and client._send_pingreq() == 0:
                self.acks.ping_sent()
            await asyncio.sleep(1)

    # -- socket plumbing (replaces aiomqtt.Client._on_socket_open) --------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho calls this from the executor thread that runs connect(), after
        # creating the socket and before sending CONNECT on it.
        client._sock = BufferedSocket(sock, self._max_remaining)
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

    def _fast_publishes(self, client: paho.Client) -> int:
        """Deliver the complete QoS 0/1 PUBLISH packets at the head of the read
        buffer (paho between packets); the number delivered."""
        sock = client._sock
        if not self.fast_path or type(sock) is not BufferedSocket:
            return 0
        if client._in_packet["command"] != 0:
            return 0  # paho is in the middle of a packet
        buf, pos = sock.buf, sock.pos
        if pos >= len(buf):
            return 0
        parsed: list[Parsed] = []
        parse_publishes(buf, pos, client._protocol == paho.MQTTv5, parsed)
        if not parsed:
            return 0
        now = ARRIVAL_CLOCK()
        with client._msgtime_mutex:
            client._last_bytes_received = now
        auto_ack = not client._manual_ack
        deliver = self._deliver
        taken = 0
        for topic, payload, qos, retain, dup, mid, end in parsed:
            sock.pos = end  # taken: the rest stays buffered for paho or for later
            deliver(client, None, FastMessage(topic, payload, qos, retain, dup, mid, now))  # type: ignore[arg-type]
            taken += 1
            if qos and auto_ack:
                client._send_puback(mid)
            if self._paused:
                break  # the window is full: not one message more than paho would take
        self.fast_publishes += taken
        return taken

    def _read(self) -> None:
        if self._paused:
            return  # a call_soon from before the pause
        client: paho.Client = self._client
        try:
            for _ in range(_READS_PER_WAKEUP):
                if self._skip is not None:
                    if not self._skip_some(client) or self._paused:
                        return
                    continue
                before = self._received
                if self._fast_publishes(client) and self._paused:
                    return
                try:
                    rc = client.loop_read()
                except PacketTooLarge:
                    if not self._start_skip(client):
                        return
                    continue
                if rc != paho.MQTT_ERR_SUCCESS or self._paused:
                    return
                # Our buffer (and TLS) may hold bytes the selector cannot see.
                if self._buffered():
                    continue
                if self._received == before:
                    return  # a partial packet, or a control packet: wait for the selector
            if self._buffered():
                self._loop.call_soon(self._read)  # yield to the loop, then go on
        except Exception as exc:
            fut: asyncio.Future[None] = self._disconnected
            if not fut.done():
                fut.set_exception(exc)

    # -- packets over the bound (see the module docstring, 7) ---------------------

    def _start_skip(self, client: paho.Client) -> bool:
        """Take over the packet paho has the fixed header of; False if the
        connection is closed instead (not a PUBLISH: a broken broker)."""
        packet = client._in_packet
        command, length = packet["command"], packet["remaining_length"]
        client._in_packet = {  # as paho leaves it between packets
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(),
            "to_process": 0,
            "pos": 0,
        }
        if command & 0xF0 != 0x30:
            log = self._paho_logger or logging.getLogger(__name__)
            log.error(
                "the broker sent a packet of type %d and %d bytes, over the maximum packet "
                "size of %d: closing the connection",
                command >> 4,
                length,
                self.max_packet_size,
            )
            client._loop_rc_handle(paho.MQTT_ERR_PROTOCOL)
            return False
        self._skip = SkippedPublish(command, length)
        return True

    def _skip_some(self, client: paho.Client) -> bool:
        """Read past some of the skipped packet; False when the socket has
        nothing more for now (or the connection is gone)."""
        skip = self._skip
        assert skip is not None
        try:
            # Never more than the socket's bound, or it would refuse our own read.
            data = client._sock_recv(min(skip.left, _SKIP_READ, self._max_remaining))
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._skip = None
            client._loop_rc_handle(paho.MQTT_ERR_CONN_LOST)
            return False
        skip.feed(data)
        now = ARRIVAL_CLOCK()
        with client._msgtime_mutex:
            client._last_bytes_received = now
        if skip.left:
            return True
        self._skip = None
        message = skip.message(client._protocol == paho.MQTTv5, now)
        qos, mid = message.qos, message.mid
        self.oversized += 1
        # With manual acknowledgement it is acknowledged once quarantined, as any
        # message; without, as paho would (it completes the PUBREL of a mid it
        # does not hold).
        if qos == 2 and not client._manual_ack:
            self._paho_send_pubrec(mid)
        self._deliver(client, None, message)  # type: ignore[arg-type]
        if qos == 1 and not client._manual_ack:
            client._send_puback(mid)
        return True
