"""The MQTT source: connect, subscribe, turn deliveries into decoded chunks.

It owns the broker connection for the daemon's whole life: a broker that is
down at start or drops the connection is retried with exponential backoff
and jitter, and each state change is logged once. It never gives up.

Messages are taken from paho's callback into an inbox; once per loop tick the
inbox becomes `Decoded` chunks on the bus (`ingestd.chunks`); what the
session subscribes to is `ingestd.subscribing`'s. Publishing waits when the
processor is behind, and the in-flight window pauses the socket when too many
messages are unsettled: that is the whole of ingestd's backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingestd.backoff import Backoff
from ingestd.bus import EventBus
from ingestd.chunks import Chunker
from ingestd.config import Settings, route_table
from ingestd.devices import DeviceState
from ingestd.events import control
from ingestd.formats.sparkplug_host import HostState
from ingestd.mqtt.connect import connect_problem, tls_context, tls_problem
from ingestd.mqtt.link import MqttLink
from ingestd.mqtt.wire import max_packet_size
from ingestd.observe.upstream import UpstreamWatch
from ingestd.routes import RouteTable
from ingestd.subscribing import Subscriber
from ingestd.window import InFlightWindow

log = structlog.get_logger("ingestd.source")

# How long a stop waits for the broker to confirm our last acknowledgements.
ACK_CONFIRM_TIMEOUT = 3.0
# Backpressure is logged at most this often (seconds), with a count.
BACKPRESSURE_LOG_INTERVAL = 10.0
# A connection that lasted less than this (and less than reconnect_max_delay)
# does not reset the backoff: a broker that accepts and then drops us at
# once (another client taking our client id over, an ACL) must not be
# hammered at the shortest delay.
STABLE_CONNECTION = 10.0


class MqttSource:
    def __init__(
        self,
        settings: Settings,
        table: RouteTable,
        bus: EventBus,
        window: InFlightWindow,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
        upstream: UpstreamWatch | None = None,
        devices: DeviceState | None = None,
    ) -> None:
        self.mqtt = settings.mqtt
        self.settings = settings
        # Received messages into chunks, decoded with what the pipeline learned
        # of devices (kept across reloads: only the route table is swapped).
        self.chunks = Chunker(
            settings, table, devices if devices is not None else DeviceState(), window, clock_ns
        )
        self.subscriber = Subscriber(settings, table, self.chunks, upstream)
        self.bus = bus
        self.window = window
        self.upstream = upstream
        # Awaited before each connection; raises to stop (the primary role's
        # pipeline: the role is still this member's).
        self.before_connect: Callable[[], Awaitable[None]] | None = None
        self.manual_ack = self.mqtt.ack == "after_commit"
        self.broker = f"{self.mqtt.host}:{self.mqtt.port}"
        tls = self.mqtt.tls
        self._tls = (
            tls_context(tls.ca_file, tls.cert_file, tls.key_file, tls.insecure)
            if tls.enabled
            else None
        )
        self._inbox: list[paho.MQTTMessage] = []
        self._wake = asyncio.Event()
        self._link: MqttLink | None = None
        host_id = self.mqtt.sparkplug_host_id
        self._host = HostState(host_id) if host_id else None  # Sparkplug host STATE
        self._epoch = 0
        self._connected_at = 0.0
        self._paused_at = 0.0
        self._pause_logged = -BACKPRESSURE_LOG_INTERVAL
        self._pauses = 0
        self._draining = False
        self.connected = False
        self.reconnects = 0
        self.stale_acks = 0

    # What the chunker holds, as the pipeline and the metrics ask for it.

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        return self.subscriber.plan

    @property
    def table(self) -> RouteTable:
        return self.chunks.table

    @property
    def devices(self) -> DeviceState:
        return self.chunks.devices

    @property
    def received(self) -> int:
        return self.chunks.received

    @property
    def oversized_skipped(self) -> int:
        return self.chunks.oversized_skipped

    @property
    def max_packet_size(self) -> int:
        return self.chunks.max_packet_size

    # -- acknowledgement (called by the writer after a commit) -------------------

    def acknowledge(self, epoch: int, acks: list[tuple[int, int]]) -> None:
        """Acknowledge committed messages, in the order they were received.

        Acks from an earlier connection are void: the broker redelivers those
        messages, and storage is idempotent on (sensor, metric, ts).
        """
        link = self._link
        if not acks:
            return
        if link is None or epoch != self._epoch or not link.connected:
            self.stale_acks += len(acks)
            return
        link.ack_many(acks)

    # -- reload ---------------------------------------------------------------------

    def reconfigure(self, settings: Settings) -> None:
        """A reload: new routes (and subscriptions) if they changed."""
        if settings.routes != self.settings.routes:
            self.update_routes(settings)
        self.settings = settings

    def update_routes(self, settings: Settings) -> None:
        """Apply a reloaded config's routes: decode with the new table from the
        next chunk on, and change the live subscriptions to match
        (`Subscriber.replan`)."""
        table = route_table(settings)
        self.settings = settings
        self.chunks.table = table
        link = self._link
        self.subscriber.replan(settings, table, link if self.connected else None)

    # -- the connection loop ------------------------------------------------------

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None]) -> None:
        backoff = Backoff(self.mqtt.reconnect_min_delay, self.mqtt.reconnect_max_delay)
        last_error: str | None = None
        down_since = time.monotonic()
        short_lived = 0
        stop_waiter = asyncio.ensure_future(stop.wait())
        session: asyncio.Future[None] | None = None
        try:
            while not stop.is_set():
                session = asyncio.ensure_future(self._session(stop, on_ready))
                await asyncio.wait({session, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not session.done() and not self.connected:
                    # Stopped while connecting: nothing was received on this link.
                    session.cancel()
                    await asyncio.gather(session, return_exceptions=True)
                    break
                # Connected: the session drains and disconnects by itself.
                error = (await asyncio.gather(session, return_exceptions=True))[0]
                if error is None:
                    break
                if not isinstance(error, aiomqtt.MqttError):
                    raise error
                if self.connected:
                    self.connected = False
                    down_since = time.monotonic()
                    lived = down_since - self._connected_at
                    short_lived = self._connection_lost(error, lived, backoff, short_lived)
                    last_error = str(error)
                elif str(error) != last_error:
                    last_error = str(error)
                    self._connection_failed(error)
                delay = backoff.next()
                log.debug(
                    "reconnecting",
                    broker=self.broker,
                    delay=round(delay, 3),
                    down_for=round(time.monotonic() - down_since, 3),
                )
                await asyncio.wait({stop_waiter}, timeout=delay)
        finally:
            stop_waiter.cancel()
            if session is not None and not session.done():
                # Cancelled from outside (a primary's lost term): the connection
                # goes with the task, not left to the broker to find dead.
                session.cancel()
                await asyncio.gather(session, return_exceptions=True)
            self.connected = False
            self.subscriber.cancel()
        # Whatever was received is handed on; then every stage finishes and returns.
        await self._publish_inbox()
        await self.bus.publish(control(last=True, epoch=self._epoch))

    def _connection_lost(
        self, error: BaseException, lived: float, backoff: Backoff, short_lived: int
    ) -> int:
        """Report a connection that ended after `lived` seconds; the backoff
        starts over after a stable one. Returns the count of short-lived
        connections in a row, this one included (0 after a stable one)."""
        log.warning(
            "broker connection lost",
            broker=self.broker,
            error=str(error),
            connected_seconds=round(lived, 1),
        )
        if lived >= max(STABLE_CONNECTION, self.mqtt.reconnect_max_delay):
            backoff.reset()
            return 0
        short_lived += 1
        if short_lived >= 2 or "taken over" in str(error).lower():
            log.warning(
                "the broker keeps closing the connection soon after accepting "
                "it: most likely another client is connected with the same "
                "mqtt.client_id, and each connection takes the session over "
                "from the other. Give every ingestd its own client_id; "
                "reconnecting with backoff meanwhile",
                client_id=self.mqtt.client_id,
                times=short_lived,
                connected_seconds=round(lived, 1),
            )
        return short_lived

    def _connection_failed(self, error: BaseException) -> None:
        """Report a connection attempt that failed (a broker certificate that
        failed verification, refused, or no broker)."""
        refused = connect_problem(error)
        untrusted = tls_problem(error, self.mqtt.tls.ca_file) if self._tls is not None else None
        if untrusted is not None:
            log.error(
                f"configuration problem: {untrusted}; retrying with backoff",
                broker=self.broker,
                error=str(error),
                ca_file=str(self.mqtt.tls.ca_file) if self.mqtt.tls.ca_file else None,
            )
        elif refused is not None:
            log.error(
                f"broker refused the connection: {refused}; retrying with backoff",
                broker=self.broker,
                error=str(error),
                client_id=self.mqtt.client_id,
                username=self.mqtt.username,
            )
        else:
            log.warning(
                "broker unreachable; retrying with backoff",
                broker=self.broker,
                error=str(error),
            )

    def _make_link(self) -> MqttLink:
        s = self.mqtt
        v5 = s.protocol == "5"
        # Bigger packets are refused before they are read whole: by the broker
        # (MQTT 5), or skipped unread by the link (3.1.1) and quarantined.
        packet_limit = max_packet_size(self.settings.input.max_payload_bytes)
        self.chunks.max_packet_size = packet_limit
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.ReceiveMaximum = s.max_inflight
            properties.MaximumPacketSize = packet_limit
            if s.persistent_session and s.session_expiry:
                properties.SessionExpiryInterval = s.session_expiry
        password = s.password.get_secret_value() if s.password is not None else None
        will = self._host.will() if self._host is not None else None
        side: dict[str, Callable[[bytes, bool], None]] = {}
        if s.watch_broker_drops and self.upstream is not None:
            side = self.upstream.side_topics()
        return MqttLink(
            on_message=self._on_message,
            manual_ack=self.manual_ack,
            side_topics=side,
            max_packet_size=packet_limit,
            hostname=s.host,
            port=s.port,
            username=s.username,
            password=password,
            identifier=s.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else not s.persistent_session,
            clean_start=not s.persistent_session if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=s.keepalive,
            properties=properties,
            tls_context=self._tls,
            tls_insecure=s.tls.insecure if self._tls is not None else None,
            timeout=10,
            will=will,
        )

    async def _session(self, stop: asyncio.Event, on_ready: Callable[[], None]) -> None:
        # Never connect while the pipeline is full: a persistent session's
        # backlog starts flowing right after CONNACK.
        await self.window.wait_room()
        if self.before_connect is not None:
            await self.before_connect()
        link = self._make_link()
        # Wired before connecting, so the backlog is bounded from its first message.
        self.window.on_flow(lambda: self._pause(link), lambda: self._resume(link))
        async with link:
            self._epoch += 1
            self._link = link
            self._connected_at = time.monotonic()
            if self._epoch > 1:
                self.reconnects += 1
            self.connected = True
            log.info(
                "connected to broker",
                broker=self.broker,
                epoch=self._epoch,
                protocol=self.mqtt.protocol,
                max_packet_size=link.max_packet_size,
            )
            link_lost = asyncio.ensure_future(link.wait_disconnected())
            link_lost.add_done_callback(lambda _f: self._wake.set())
            stop_cb = asyncio.ensure_future(stop.wait())
            stop_cb.add_done_callback(lambda _f: self._wake.set())
            # The pump runs while we subscribe: the SUBACK may sit behind a backlog
            # that only drains as the pipeline commits it.
            pump = asyncio.ensure_future(self._pump(link, stop, link_lost))
            try:
                if await self.subscriber.subscribe(link, link_lost, pump):
                    if self._host is not None:
                        await self._host.publish(link, True)
                    on_ready()
                await pump
            finally:
                stop_cb.cancel()
                if stop.is_set() and link.connected and self._host is not None:
                    await self._host.publish(link, False)
                await self.subscriber.connection_ended()
                if not link_lost.done():
                    link_lost.cancel()
                elif not link_lost.cancelled():
                    link_lost.exception()  # seen; it only matters if the pump raised it
                if not pump.done():
                    pump.cancel()
                    await asyncio.gather(pump, return_exceptions=True)

    async def _pump(
        self, link: MqttLink, stop: asyncio.Event, link_lost: asyncio.Future[None]
    ) -> None:
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            await self._publish_inbox()
            if link_lost.done():
                # Let the connection loop see why (it raises MqttError).
                link_lost.result()
                raise aiomqtt.MqttError("disconnected by the broker")
            if stop.is_set():
                self._draining = True
                link.pause_reading()
                await self._publish_inbox()
                await self.bus.publish(control(last=False, epoch=self._epoch))
                # Settle everything received on this link so its acks go out
                # before DISCONNECT; the daemon bounds this by stop_timeout.
                await self.window.wait_idle()
                if self.manual_ack:
                    await self._confirm_acks(link)
                return

    async def _confirm_acks(self, link: MqttLink) -> None:
        confirmed = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ACK_CONFIRM_TIMEOUT):
                confirmed = await link.confirm_processed()
        if confirmed:
            log.debug("acknowledgements confirmed by the broker", discarded=link.discarded)
        elif not link.acks.unconfirmed:
            # The broker went away during the stop (stopped with ingestd, as the
            # quick start's Ctrl-C does), but it had confirmed every acknowledgement.
            log.info(
                "broker gone during the stop; every acknowledgement was already confirmed",
                broker=self.broker,
            )
        else:
            log.warning(
                "the broker did not confirm the last acknowledgements; it may "
                "redeliver some messages",
                broker=self.broker,
                unconfirmed_ack_writes=link.acks.unconfirmed,
            )

    def _pause(self, link: MqttLink) -> None:
        link.pause_reading()
        self._paused_at = time.monotonic()
        self._pauses += 1
        if self._paused_at - self._pause_logged >= BACKPRESSURE_LOG_INTERVAL:
            log.warning(
                "in-flight window full: reading from the broker paused until the store "
                "catches up (the broker holds the rest)",
                window=self.window.limit,
                pauses=self._pauses,
            )
            self._pause_logged = self._paused_at
            self._pauses = 0

    def _resume(self, link: MqttLink) -> None:
        if self._draining:
            return  # stopping: what is not read stays with the broker
        link.resume_reading()
        paused_for = time.monotonic() - self._paused_at
        if paused_for >= BACKPRESSURE_LOG_INTERVAL:
            log.warning("reading from the broker resumed", paused_seconds=round(paused_for, 1))

    async def _send_commands(self) -> None:
        """What decoding asked to send (Sparkplug rebirth requests), QoS 0 as
        the specification has commands. Without a connection they are dropped:
        the format asks again when the node's data goes on arriving unresolved."""
        commands, self.devices.commands = self.devices.commands, []
        link = self._link
        if link is None or not link.connected:
            return
        for topic, payload in commands:
            try:
                await link.publish(topic, payload, qos=0)
            except aiomqtt.MqttError as exc:
                log.warning("could not send a command", topic=topic, error=str(exc))
                return

    def _on_message(self, message: paho.MQTTMessage) -> None:
        self._inbox.append(message)
        self.window.take(1, 1 if (message.qos and self.manual_ack) else 0)
        if len(self._inbox) == 1:
            self._wake.set()

    async def _publish_inbox(self) -> None:
        # In chunks (InFlightWindow.chunk_size: the sizing rule is there).
        size = self.window.chunk_size
        while self._inbox:
            messages = self._inbox[:size]
            del self._inbox[:size]
            await self._publish_chunk(messages)

    async def _publish_chunk(self, messages: list[paho.MQTTMessage]) -> None:
        chunk = self.chunks.make(messages, self._epoch)
        if self.devices.commands:
            await self._send_commands()
        await self.bus.publish(chunk)
