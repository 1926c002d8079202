"""The daemon: wires the components and runs them under one TaskGroup.

Phases, as in uvicorn's Server: startup (open the store, build the pipeline),
main loop (TaskGroup supervising source, processor, writer and logger),
shutdown (stop intake, drain the bus, commit, acknowledge, disconnect), with
a forced exit on a second signal or when `daemon.stop_timeout` runs out.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import structlog

from ingestd import __version__
from ingestd.bus import EventBus
from ingestd.config import Settings, route_table
from ingestd.errors import StoreError, StoreUnavailable
from ingestd.events import BatchCommitted, Decoded, Processed
from ingestd.flow import InFlightWindow
from ingestd.observe.event_log import EventLogger
from ingestd.observe.systemd import SystemdNotifier
from ingestd.process import Processor
from ingestd.source import Backoff, MqttSource
from ingestd.store import SqliteStore
from ingestd.writer import BatchWriter

log = structlog.get_logger("ingestd")

EXIT_OK = 0
EXIT_FAILURE = 1


class StopTimeout(Exception):
    """The pipeline did not drain within daemon.stop_timeout."""


class Daemon:
    def __init__(self, settings: Settings, notifier: SystemdNotifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or SystemdNotifier()
        self.stop = asyncio.Event()
        self._signals = 0
        self._stop_started = 0.0
        self.ready = asyncio.Event()

    # -- signals -------------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("stopping", signal=sig.name, stop_timeout=self.settings.daemon.stop_timeout)
            self.request_stop()
            return
        log.error("second signal: forcing exit; unacknowledged messages stay with the broker",
                  signal=sig.name)
        os._exit(128 + sig.value)

    def request_stop(self) -> None:
        if not self.stop.is_set():
            self._stop_started = time.monotonic()
            self.notifier.notify("STOPPING=1", "STATUS=draining and stopping")
            self.stop.set()

    # -- phases ----------------------------------------------------------------

    async def run(self) -> int:
        self._install_signals()
        s = self.settings
        log.info("starting", version=__version__, pid=os.getpid(), store=str(s.store.path),
                 broker=f"{s.mqtt.host}:{s.mqtt.port}", routes=len(s.routes))
        store = SqliteStore(
            s.store.path, synchronous=s.store.synchronous, busy_timeout_ms=s.store.busy_timeout_ms
        )
        try:
            if not await self._open_store(store):
                return EXIT_OK
            return await self._main(store)
        except StoreError as exc:
            log.error("store failed; exiting", path=str(store.path), error=str(exc))
            return EXIT_FAILURE
        finally:
            await store.close()
            self.notifier.close()

    async def _open_store(self, store: SqliteStore) -> bool:
        backoff = Backoff(self.settings.store.retry_min_delay, self.settings.store.retry_max_delay)
        reported: str | None = None
        while True:
            try:
                await store.open()
                log.info("store open", path=str(store.path))
                return True
            except StoreUnavailable as exc:
                if str(exc) != reported:
                    reported = str(exc)
                    log.error("cannot open the store; retrying", path=str(store.path),
                              error=reported)
                self.notifier.notify(f"STATUS=waiting for the store: {exc.condition}")
            try:
                async with asyncio.timeout(backoff.next()):
                    await self.stop.wait()
                return False
            except TimeoutError:
                continue

    async def _main(self, store: SqliteStore) -> int:
        s = self.settings
        bus = EventBus()
        window = InFlightWindow(
            s.mqtt.max_inflight,
            broker_limit=s.mqtt.broker_max_inflight if s.mqtt.protocol == "3.1.1" else 0,
        )
        stage_q, observer_q = s.bus.stage_queue_size, s.bus.observer_queue_size
        to_processor = bus.subscribe(
            "processor", [Decoded], policy="block", maxsize=stage_q
        )
        to_writer = bus.subscribe(
            "writer", [Processed], policy="block", maxsize=stage_q
        )
        to_logger = bus.subscribe(
            "logger", [Processed, BatchCommitted], policy="drop", maxsize=observer_q
        )
        source = MqttSource(s, route_table(s), bus, window)
        processor = Processor(to_processor, bus, s.processor.limits)
        writer = BatchWriter(
            store, to_writer, bus, window, source.acknowledge,
            max_readings=s.batch.max_readings,
            max_delay=s.batch.max_delay_ms / 1000,
            retry_min_delay=s.store.retry_min_delay,
            retry_max_delay=s.store.retry_max_delay,
        )
        event_logger = EventLogger(to_logger)

        def on_ready() -> None:
            if not self.ready.is_set():
                self.ready.set()
                self.notifier.notify("READY=1", f"STATUS=ingesting from {source.broker}")
                log.info("ready", broker=source.broker, subscriptions=len(source.subscriptions))

        failed = False
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(source.run(self.stop, on_ready), name="source")
                tg.create_task(processor.run(), name="processor")
                writer_task = tg.create_task(writer.run(), name="writer")
                logger_task = tg.create_task(event_logger.run(), name="logger")
                tg.create_task(self._supervise_stop(writer_task, logger_task), name="stop")
        except* StopTimeout:
            log.error("stop timeout exceeded; exiting with work in flight (it stays unacknowledged "
                      "and the broker redelivers it)", in_flight=window.in_flight,
                      stop_timeout=s.daemon.stop_timeout)
            failed = True
        except* Exception as group:
            for exc in group.exceptions:
                log.error("component failed; stopping", error=repr(exc), exc_info=exc)
            failed = True
        if failed:
            return EXIT_FAILURE
        log.info("stopped", committed=writer.committed, duplicates=writer.duplicates,
                 quarantined=writer.quarantined, batches=writer.batches,
                 received=source.received, stale_acks=source.stale_acks,
                 in_flight_peak=window.peak, window=window.limit,
                 seconds=round(time.monotonic() - self._stop_started, 3))
        return EXIT_OK

    async def _supervise_stop(
        self, writer_task: asyncio.Task[None], logger_task: asyncio.Task[None]
    ) -> None:
        """After a stop request: bound the drain by stop_timeout, then end the observers."""
        await self.stop.wait()
        remaining = self.settings.daemon.stop_timeout - (time.monotonic() - self._stop_started)
        try:
            async with asyncio.timeout(max(remaining, 0)):
                await asyncio.wait({writer_task})
        except TimeoutError:
            raise StopTimeout from None
        logger_task.cancel()
