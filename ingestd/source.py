"""The MQTT source: connect, subscribe, turn deliveries into decoded chunks.

It owns the broker connection for the daemon's whole life: a broker that is
down at start or drops the connection is retried with exponential backoff
and jitter, and each state change is logged once. It never gives up.

Messages are taken from paho's callback into an inbox; once per loop tick the
inbox becomes one `Decoded` chunk on the bus. Publishing waits when the
processor is behind, and the in-flight window pauses the socket when too many
messages are unsettled: that is the whole of ingestd's backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiomqtt
import msgspec
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingestd.backoff import Backoff
from ingestd.bus import EventBus
from ingestd.config import Settings, route_table
from ingestd.decode import decode_all, too_large
from ingestd.devices import DeviceState
from ingestd.events import NS, Decoded, Rejected, control
from ingestd.formats.sparkplug_host import HostState
from ingestd.mqtt.connect import connect_problem, tls_context
from ingestd.mqtt.link import ARRIVAL_CLOCK, MqttLink, raw_topic
from ingestd.mqtt.topics import filter_covers, subscription_plan
from ingestd.mqtt.wire import OversizedMessage, max_packet_size
from ingestd.observe.upstream import WATCHED, UpstreamWatch
from ingestd.routes import RouteTable
from ingestd.store.base import SUBSCRIPTIONS
from ingestd.window import InFlightWindow

log = structlog.get_logger("ingestd.source")

# How long a stop waits for the broker to confirm our last acknowledgements.
ACK_CONFIRM_TIMEOUT = 3.0
# Backpressure is logged at most this often (seconds), with a count.
BACKPRESSURE_LOG_INTERVAL = 10.0
# So are packets skipped for their size: a flood of them is one line per interval.
OVERSIZE_LOG_INTERVAL = 10.0
# A connection that lasted less than this (and less than reconnect_max_delay)
# does not reset the backoff: a broker that accepts and then drops us at
# once (another client taking our client id over, an ACL) must not be
# hammered at the shortest delay.
STABLE_CONNECTION = 10.0


def subscriptions(settings: Settings, table: RouteTable) -> list[tuple[str, int]]:
    """(filter, QoS) pairs for the routes, without overlap (routing to the most
    specific route happens on our side): `ingestd.mqtt.topics.subscription_plan`.

    In a shared group, the topics in which devices describe themselves (a
    format's `state_topics`, Homie's `$` topics) are subscribed outside the
    group as well, those the route's own filter covers: every member needs
    every description, and reading one again changes nothing.
    """
    wanted = [(r.subscription, settings.routes[r.index].qos) for r in table.routes]
    group = settings.mqtt.shared_group
    if not group:
        return subscription_plan(wanted)
    own = [
        (topic, settings.routes[r.index].qos)
        for r in table.routes
        if r.fmt.state_topics is not None
        for topic in r.fmt.state_topics(r.subscription)
        if filter_covers(r.subscription, topic)
    ]
    return subscription_plan(wanted, group, own)


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
        self.settings = settings.mqtt
        self.settings_root = settings
        self.table = table
        # What the pipeline learned of devices: kept across reloads (the table is swapped).
        self.devices = devices if devices is not None else DeviceState()
        self.subscriptions = subscriptions(settings, table)
        self.bus = bus
        self.window = window
        self.clock_ns = clock_ns
        self._last_received_ns = 0
        self.upstream = upstream
        # Awaited before each connection; raises to stop (the primary role's
        # pipeline: the role is still this member's).
        self.before_connect: Callable[[], Awaitable[None]] | None = None
        # The filters the broker's persistent session may hold for this client
        # id (kept in the store): those no route wants are unsubscribed at the
        # next connection, or a restart with a route removed or moved would
        # go on receiving (and quarantining) its messages.
        self.session_filters: set[str] = set()
        self._filters_to_store: bytes | None = None
        self.manual_ack = self.settings.ack == "after_commit"
        self.broker = f"{self.settings.host}:{self.settings.port}"
        tls = self.settings.tls
        self._tls = (
            tls_context(tls.ca_file, tls.cert_file, tls.key_file, tls.insecure)
            if tls.enabled
            else None
        )
        self._inbox: list[paho.MQTTMessage] = []
        self._wake = asyncio.Event()
        self._link: MqttLink | None = None
        host_id = self.settings.sparkplug_host_id
        self._host = HostState(host_id) if host_id else None  # Sparkplug host STATE
        self._epoch = 0
        self._connected_at = 0.0
        self._paused_at = 0.0
        self._pause_logged = -BACKPRESSURE_LOG_INTERVAL
        self._pauses = 0
        self._draining = False
        self._resubscribing: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Future[None] | None = None
        self.connected = False
        self.reconnects = 0
        self.received = 0
        self.stale_acks = 0
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
        if settings.routes != self.settings_root.routes:
            self.update_routes(settings)
        self.settings_root = settings

    def update_routes(self, settings: Settings) -> None:
        """Apply a reloaded config's routes: decode with the new table from the
        next chunk on, and change the live subscriptions to match.

        New filters are subscribed before old ones are unsubscribed, so a route
        that moves to a wider filter misses nothing (for the moment both are
        subscribed, a message may arrive twice: one with a device timestamp
        is stored once, one without gets a second receive time). Without a
        connection, the next one subscribes to the new list.
        """
        table = route_table(settings)
        new = subscriptions(settings, table)
        self.settings_root = settings
        old = dict(self.subscriptions)
        wanted = dict(new)
        added = [(t, q) for t, q in new if old.get(t) != q]
        removed = [t for t in old if t not in wanted]
        self.table, self.subscriptions = table, new
        log.info(
            "routes reloaded",
            routes=len(table.routes),
            subscribe=[t for t, _ in added],
            unsubscribe=removed,
        )
        link = self._link
        if link is not None and self.connected and (added or removed):
            task = asyncio.ensure_future(self._resubscribe(link, added, removed))
            self._resubscribing.add(task)
            task.add_done_callback(self._resubscribing.discard)

    async def _resubscribe(
        self, link: MqttLink, added: list[tuple[str, int]], removed: list[str]
    ) -> None:
        try:
            for topic, qos in added:
                # The SUBACK may queue behind a backlog the pipeline drains.
                await link.subscribe(topic, qos, timeout=math.inf)
            for topic in removed:
                await link.unsubscribe(topic, timeout=math.inf)
        except aiomqtt.MqttError as exc:
            # The connection went; the next one subscribes to the new list.
            log.warning("subscription change interrupted by a disconnect", error=str(exc))
            return
        log.info("subscriptions updated", topics=[t for t, _ in self.subscriptions])
        if self.settings.persistent_session:
            self._session_holds({t for t, _ in self.subscriptions})

    # -- the connection loop ------------------------------------------------------

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None]) -> None:
        backoff = Backoff(self.settings.reconnect_min_delay, self.settings.reconnect_max_delay)
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
            for task in list(self._resubscribing):
                task.cancel()
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
        if lived >= max(STABLE_CONNECTION, self.settings.reconnect_max_delay):
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
                client_id=self.settings.client_id,
                times=short_lived,
                connected_seconds=round(lived, 1),
            )
        return short_lived

    def _connection_failed(self, error: BaseException) -> None:
        """Report a connection attempt that failed (refused, or no broker)."""
        refused = connect_problem(error)
        if refused is not None:
            log.error(
                f"broker refused the connection: {refused}; retrying with backoff",
                broker=self.broker,
                error=str(error),
                client_id=self.settings.client_id,
                username=self.settings.username,
            )
        else:
            log.warning(
                "broker unreachable; retrying with backoff",
                broker=self.broker,
                error=str(error),
            )

    def _make_link(self) -> MqttLink:
        s = self.settings
        v5 = s.protocol == "5"
        # Bigger packets are refused before they are read whole: by the broker
        # (MQTT 5), or skipped unread by the link (3.1.1) and quarantined.
        packet_limit = max_packet_size(self.settings_root.input.max_payload_bytes)
        self.max_packet_size = packet_limit
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
                protocol=self.settings.protocol,
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
                if await self._subscribe(link, link_lost, pump):
                    if self._host is not None:
                        await self._host.publish(link, True)
                    on_ready()
                await pump
            finally:
                stop_cb.cancel()
                if stop.is_set() and link.connected and self._host is not None:
                    await self._host.publish(link, False)
                if self._watch is not None:  # belongs to this connection
                    self._watch.cancel()
                    await asyncio.gather(self._watch, return_exceptions=True)
                    self._watch = None
                if not link_lost.done():
                    link_lost.cancel()
                elif not link_lost.cancelled():
                    link_lost.exception()  # seen; it only matters if the pump raised it
                if not pump.done():
                    pump.cancel()
                    await asyncio.gather(pump, return_exceptions=True)

    async def _subscribe(
        self, link: MqttLink, link_lost: asyncio.Future[None], pump: asyncio.Future[None]
    ) -> bool:
        """Subscribe to every filter; False if the pump ended first (a stop).

        All filters in one SUBSCRIBE: Mosquitto answers a SUBSCRIBE that
        arrives while a persistent session's backlog flows only after the
        backlog, so a second one would hold readiness back until the backlog
        is drained (measured: READY at 99.5% of 100,000 queued messages)."""
        filters = list(self.subscriptions)
        if not filters:  # every route is the primary's (a shared group's member)
            log.info("subscribed", topics=[])
            self._watch_drops(link)
            self._forget_stale(link)
            return True
        request = asyncio.ensure_future(link.subscribe(filters, timeout=math.inf))
        waiting: set[asyncio.Future[Any]] = {request, link_lost, pump}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not request.done():
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
            if link_lost.done():
                link_lost.result()
                raise aiomqtt.MqttError("disconnected while subscribing")
            return False
        granted: list[Any] = list(request.result())
        for (topic, qos), code in zip(filters, granted, strict=False):
            value = code.value if hasattr(code, "value") else int(code)
            if value >= 0x80:
                log.error(
                    "subscription refused by the broker: these routes get nothing; "
                    "check the broker's ACLs for this user",
                    topic=topic,
                    qos=qos,
                    reason=str(code),
                    routes=self.routes_under(topic),
                    username=self.settings.username,
                )
        log.info("subscribed", topics=[t for t, _ in self.subscriptions])
        self._watch_drops(link)
        self._forget_stale(link)
        return True

    def _forget_stale(self, link: MqttLink) -> None:
        """Unsubscribe what the session still holds and no route wants, in the
        background (Mosquitto answers after a backlog, as for SUBSCRIBE), and
        keep the new list with the next chunk."""
        current = {t for t, _ in self.subscriptions}
        if not self.settings.persistent_session or current == self.session_filters:
            return
        stale = sorted(self.session_filters - current)
        task = asyncio.ensure_future(self._unsubscribe_stale(link, stale, current))
        self._resubscribing.add(task)
        task.add_done_callback(self._resubscribing.discard)

    async def _unsubscribe_stale(self, link: MqttLink, stale: list[str], current: set[str]) -> None:
        try:
            for topic in stale:
                await link.unsubscribe(topic, timeout=math.inf)
        except aiomqtt.MqttError as exc:
            log.warning("unsubscribing old filters interrupted by a disconnect", error=str(exc))
            return
        if stale:
            log.info(
                "unsubscribed filters the session held and no route uses any more",
                topics=stale,
            )
        self._session_holds(current)

    def _session_holds(self, current: set[str]) -> None:
        self.session_filters = set(current)
        self._filters_to_store = json.dumps(sorted(current)).encode()

    def _watch_drops(self, link: MqttLink) -> None:
        if self.settings.watch_broker_drops and self.upstream is not None:
            # In the background: Mosquitto answers a SUBSCRIBE made while a
            # session's backlog flows only after the backlog (measured: 3 s for
            # 100,000 messages), and readiness must not wait for a watch. Never
            # in a shared group: every instance wants the broker's counter.
            self._watch = asyncio.ensure_future(self._watch_broker(link))

    async def _watch_broker(self, link: MqttLink) -> None:
        try:
            await link.subscribe([(t, 0) for t in WATCHED], timeout=math.inf)
        except aiomqtt.MqttError as exc:
            log.debug("no watch on the broker's drop count", error=str(exc))

    def routes_under(self, subscription: str) -> list[str]:
        """The route topics a subscription filter serves."""
        group = self.settings_root.mqtt.shared_group
        bare = subscription.removeprefix(f"$share/{group}/") if group else subscription
        return [
            self.settings_root.routes[r.index].topic
            for r in self.table.routes
            if filter_covers(bare, r.subscription) or filter_covers(r.subscription, bare)
        ]

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
        else:
            log.warning(
                "the broker did not confirm the last acknowledgements; it may "
                "redeliver some messages",
                broker=self.broker,
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
        limit = self.settings_root.input.max_payload_bytes
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

    async def _publish_chunk(self, messages: list[paho.MQTTMessage]) -> None:
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
        if self._filters_to_store is not None:
            held = {SUBSCRIPTIONS: (self._filters_to_store, b"")}
            status = msgspec.structs.replace(status, devices={**status.devices, **held})
            self._filters_to_store = None
        if packets:
            status = msgspec.structs.replace(status, packets=tuple(packets))
        if devices.commands:
            await self._send_commands()
        await self.bus.publish(
            Decoded(readings, rejected, len(messages), acks, self._epoch, status=status, gaps=found)
        )
