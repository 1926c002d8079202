"""One pipeline: an MQTT session through decode, checks and batches into the
store, acknowledged after commit.

A daemon runs one; a member of a shared group that holds the primary role
(`ingestd.primary`) runs a second one for the routes only one reader can
follow, under the role's client id. Both are this same code: taking the role
over is, for that pipeline, what a restart is for a lone ingestd.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from ingestd.bus import EventBus
from ingestd.checks import Processor
from ingestd.closing import Closer
from ingestd.config import Settings, route_table
from ingestd.devices import DeviceState, SequenceState
from ingestd.errors import StopTimeout
from ingestd.events import BatchCommitted, Decoded, Processed, SensorStatus
from ingestd.forward import Forwarder
from ingestd.maintenance import Maintenance
from ingestd.observe.device_log import DeviceLog
from ingestd.observe.event_log import EventLogger
from ingestd.observe.upstream import UpstreamWatch
from ingestd.routes import RouteTable
from ingestd.source import MqttSource
from ingestd.spool import Spool
from ingestd.store import Store
from ingestd.store.base import PACKETS, SUBSCRIPTIONS, pack_packets, unpack_packets
from ingestd.window import InFlightWindow
from ingestd.writer import BatchWriter

log = structlog.get_logger("ingestd")


@dataclass
class Pipeline:
    """The running parts of one pipeline (reload and the health checks reach them)."""

    role: str  # "member" (or a lone ingestd), "primary"
    source: MqttSource
    processor: Processor
    writer: BatchWriter
    window: InFlightWindow
    bus: EventBus
    logger: EventLogger
    maintenance: Maintenance | None
    forwarder: Forwarder | None = None  # with a local spool
    closer: Closer | None = None  # with rollups (the member's)
    started_at: float = field(default_factory=time.time)

    @classmethod
    def build(
        cls,
        s: Settings,
        store: Store,
        *,
        role: str = "member",
        upstream: UpstreamWatch | None = None,
        on_commit: Callable[[BatchCommitted], None] | None = None,
        maintain: bool = True,
        device_log: DeviceLog | None = None,
        spool: Spool | None = None,
    ) -> Pipeline:
        """Wire a pipeline on an open store, its device state as last committed."""
        bus = EventBus()
        window = InFlightWindow(
            s.mqtt.max_inflight,
            broker_limit=s.mqtt.broker_max_inflight if s.mqtt.protocol == "3.1.1" else 0,
        )
        stage_q, observer_q = s.bus.stage_queue_size, s.bus.observer_queue_size
        to_processor = bus.subscribe("processor", [Decoded], policy="block", maxsize=stage_q)
        to_writer = bus.subscribe("writer", [Processed], policy="block", maxsize=stage_q)
        to_logger = bus.subscribe(
            "logger", [Processed, BatchCommitted], policy="drop", maxsize=observer_q
        )
        table = route_table(s)
        if spool is not None and spool.held is not None:
            # The spool's batches are newer than the store: their state first.
            _overlay(store, spool.held)
        devices, committed, held = _as_committed(store, table, device_log)
        source = MqttSource(s, table, bus, window, upstream=upstream, devices=devices)
        source.chunks.committed_packets = set(committed)
        source.subscriber.session_filters = held
        processor = Processor(to_processor, bus, s)
        writer = BatchWriter(
            store,
            to_writer,
            bus,
            window,
            source.acknowledge,
            max_readings=s.batch.max_readings,
            max_delay=s.batch.max_delay_ms / 1000,
            retry_min_delay=s.store.retry_min_delay,
            retry_max_delay=s.store.retry_max_delay,
        )
        writer.packets.extend(committed)
        writer.on_commit = on_commit

        logger = EventLogger(
            to_logger, s.daemon.log_summary_interval, _summary_fields(role, window, bus, writer)
        )
        maintenance = Maintenance(store, s.store) if maintain else None
        closer = Closer(store, s.rollups) if maintain and s.rollup_plan() else None
        forwarder = None
        if spool is not None:
            writer.spool, writer.spool_after = spool, s.store.spool.after_ms / 1000
            forwarder = Forwarder(
                store,
                spool,
                writer,
                retry_min_delay=s.store.retry_min_delay,
                retry_max_delay=s.store.retry_max_delay,
            )
        return cls(
            role, source, processor, writer, window, bus, logger, maintenance, forwarder, closer
        )

    def parts(self) -> list[object]:
        return [p for p in (self.source, self.processor, self.writer, self.maintenance) if p]

    def reconfigure(self, settings: Settings) -> None:
        self.source.reconfigure(settings)
        self.processor.reconfigure(settings)
        self.writer.reconfigure(settings)
        if self.maintenance is not None:
            self.maintenance.reconfigure(settings)
        if self.closer is not None:
            self.closer.reconfigure(settings)

    async def run(
        self, stop: asyncio.Event, on_ready: Callable[[], None], stop_timeout: Callable[[], float]
    ) -> None:
        """Run until `stop`, then drain: commit and acknowledge what was read.

        `stop_timeout()`: seconds left for the drain once stopped; past it,
        StopTimeout (what is in flight stays unacknowledged: redelivered).
        """
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.source.run(stop, on_ready), name=f"{self.role} source")
            tg.create_task(self.processor.run(), name=f"{self.role} processor")
            writer_task = tg.create_task(self.writer.run(), name=f"{self.role} writer")
            logger_task = tg.create_task(self.logger.run(), name=f"{self.role} logger")
            if self.maintenance is not None:
                tg.create_task(self.maintenance.run(stop), name="maintenance")
            if self.closer is not None:
                tg.create_task(
                    self.closer.run(stop, writer_task, stop_timeout), name="rollups closer"
                )
            observers = [logger_task]
            if self.forwarder is not None:
                observers.append(tg.create_task(self.forwarder.run(), name="forwarder"))
            tg.create_task(
                self._supervise_stop(stop, stop_timeout, writer_task, observers),
                name=f"{self.role} stop",
            )

    async def _supervise_stop(
        self,
        stop: asyncio.Event,
        stop_timeout: Callable[[], float],
        writer_task: asyncio.Task[None],
        others: list[asyncio.Task[None]],
    ) -> None:
        """After a stop request: bound the drain by stop_timeout, then end the
        logger and the forwarder (what it has not forwarded stays spooled)."""
        await stop.wait()
        try:
            async with asyncio.timeout(max(stop_timeout(), 0)):
                await asyncio.wait({writer_task})
        except TimeoutError:
            raise StopTimeout from None
        for task in others:
            task.cancel()


def _overlay(store: Store, status: SensorStatus) -> None:
    """Lay spooled batches' device state (`Spool.held`) over the store's: a
    restart goes on from the last batch acknowledged, not the last forwarded."""
    for sensor, (last, _, _) in status.sequences.items():
        store.sequences[sensor] = (last, 0, 0)  # only the last number is read
    for (name, device), (position, description) in status.devices.items():
        rows = store.devices.setdefault(name, [])
        before = next((r for r in rows if r[0] == device), None)
        if before is not None:
            rows.remove(before)
        if description is None and before is None:
            continue  # no description to go with it: unknown, as in the store
        kept = description if description is not None else before[2]  # type: ignore[index]
        rows.insert(0, (device, position, kept))
    if status.packets:
        rows = store.devices.setdefault(PACKETS[0], [])
        rows[:] = [r for r in rows if r[0] != PACKETS[1]]
        rows.insert(0, (PACKETS[1], pack_packets(status.packets), b""))


def _as_committed(
    store: Store, table: RouteTable, device_log: DeviceLog | None
) -> tuple[DeviceState, list[tuple[int, int]], set[str]]:
    """The device state, the last committed packets and the filters the
    session holds, as the store kept them (taken from it: it keeps no copy)."""
    devices = DeviceState()
    if device_log is not None:
        devices.device_log = device_log  # one budget of per-device lines per process
    # Device counters go on from what was committed: a gap across a restart
    # counts. Only the last number: the stored gap counts stay in the store,
    # which adds to them what this run finds.
    devices.sequences.update((sensor, SequenceState(v[0])) for sensor, v in store.sequences.items())
    store.sequences = {}  # seeded: the state keeps what it can hold, by recency
    # Stateful formats go on from their state at the last commit (a Sparkplug
    # node's BIRTH and sequence): a restart is not a rebirth.
    devices.restore(table.stateful, store.devices)
    # The last messages committed before: a redelivery among them after this
    # restart is not read again (formats with tells_redeliveries).
    own = store.devices.get(PACKETS[0], [])
    committed = [
        packet
        for device, position, _ in own
        if device == PACKETS[1]
        for packet in unpack_packets(position)
    ]
    # The filters this client id's session was last subscribed to.
    held = [position for device, position, _ in own if device == SUBSCRIPTIONS[1]]
    store.devices = {}
    return devices, committed, set(json.loads(held[0])) if held else set()


def _summary_fields(
    role: str, window: InFlightWindow, bus: EventBus, writer: BatchWriter
) -> Callable[[], dict[str, object]]:
    """What the logger's summary line says of the pipeline, read when it is written."""

    def now() -> dict[str, object]:
        fields: dict[str, object] = {
            "in_flight": window.in_flight,
            "in_flight_peak": window.take_recent_peak(),
            "window": window.limit,
            "backlog": sum(sub.depth for sub in bus.subscriptions if sub.policy == "block"),
        }
        if role != "member":
            fields["role"] = role
        if writer.spool is not None and len(writer.spool):
            state = writer.spool.state()
            fields["spool_readings"] = state.readings
            fields["spool_bytes"] = state.bytes
            fields["spool_oldest_age_s"] = round(time.time() - (state.oldest or time.time()), 1)
        return fields

    return now
