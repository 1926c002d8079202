"""The daemon: wires the components and runs them under one TaskGroup.

Phases, as in uvicorn's Server: startup (open the store, build the pipeline),
main loop (TaskGroup supervising source, processor, writer, logger and store
maintenance), shutdown (stop intake, drain the bus, commit, acknowledge,
disconnect), with a forced exit on a second signal or when
`daemon.stop_timeout` runs out. Alongside, from start to exit: the health
monitor (`observe.health`: systemd watchdog and STATUS=) and the HTTP
endpoints (`observe.endpoints`).
SIGHUP reloads the configuration (see `_reload`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from pathlib import Path

import structlog

from ingestd import __version__
from ingestd.backoff import Backoff
from ingestd.config import Settings, load_settings
from ingestd.errors import ConfigError, StopTimeout, StoreError, StoreUnavailable
from ingestd.events import DUPLICATES_ARE
from ingestd.observe.endpoints import MetricsServer
from ingestd.observe.health import Health, HealthMonitor
from ingestd.observe.log import configure_logging
from ingestd.observe.metrics import Metrics
from ingestd.observe.systemd import SystemdNotifier, monotonic_usec
from ingestd.observe.upstream import UpstreamWatch
from ingestd.pipeline import Pipeline
from ingestd.primary import Primacy, split
from ingestd.spool import Spool
from ingestd.store import Store, open_store

log = structlog.get_logger("ingestd")

EXIT_OK = 0
EXIT_FAILURE = 1

# Settings a reload applies to the running daemon; any other change is logged
# as needing a restart.
LIVE_KEYS = (
    "daemon.log_level",
    "daemon.log_format",
    "daemon.stop_timeout",
    "daemon.stall_timeout",
    "routes",
    "processor.",
    "batch.",
    "store.retry_min_delay",
    "store.retry_max_delay",
    "store.retention_days",
    "store.maintenance_interval",
    "store.retention_batch",
)


# While the store cannot be opened, its reason is logged again this often.
STORE_WAIT_LOG = 30.0


class Daemon:
    def __init__(
        self,
        settings: Settings,
        notifier: SystemdNotifier | None = None,
        config_path: Path | None = None,
        *,
        handle_signals: bool = True,
    ) -> None:
        """`handle_signals`: take SIGTERM/SIGINT/SIGHUP (the process's own daemon);
        off where the daemon runs inside another program's loop (tests)."""
        self.settings = settings
        self.handle_signals = handle_signals
        self._boot_settings = settings
        self.config_path = config_path
        self.notifier = notifier or SystemdNotifier()
        self.stop = asyncio.Event()
        self._signals = 0
        self._stop_started = 0.0
        self.ready = asyncio.Event()
        self.health = Health(settings.daemon.stall_timeout)
        self.metrics = Metrics(self.health)
        self._pipeline: Pipeline | None = None  # once the store is open
        self._primacy: Primacy | None = None  # in a shared group with ordered routes
        self.upstream = UpstreamWatch(settings)
        self.health.upstream = self.upstream
        self._reloading: asyncio.Task[None] | None = None

    # -- signals -------------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)

    def _on_reload_signal(self) -> None:
        if self.stop.is_set():
            return
        if self._reloading is not None and not self._reloading.done():
            log.warning("reload already in progress; SIGHUP ignored")
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload(), name="reload")

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("stopping", signal=sig.name, stop_timeout=self.settings.daemon.stop_timeout)
            self.request_stop()
            return
        log.error(
            "second signal: forcing exit; unacknowledged messages stay with the broker",
            signal=sig.name,
        )
        os._exit(128 + sig.value)

    def request_stop(self) -> None:
        if not self.stop.is_set():
            self._stop_started = time.monotonic()
            self.notifier.notify("STOPPING=1", "STATUS=draining and stopping")
            self.stop.set()

    # -- phases ----------------------------------------------------------------

    async def run(self) -> int:
        if self.handle_signals:
            self._install_signals()
        s = self.settings
        store = open_store(s.store, s.rollup_plan())
        store.owner = s.mqtt.client_id  # whose device state it loads and writes
        log.info(
            "starting",
            version=__version__,
            pid=os.getpid(),
            store=store.where,
            broker=f"{s.mqtt.host}:{s.mqtt.port}",
            routes=len(s.routes),
        )
        self.upstream.announce()
        if not s.rollups.enabled:
            log.warning(
                "rollups are off ([rollups] enabled = false): readings stored meanwhile are "
                "not in the rollup_* views; once they are on again, 'ingestd rollups rebuild "
                "--since <when they went off>' adds them"
            )
        server = self._start_metrics_server()
        monitor = asyncio.get_running_loop().create_task(
            HealthMonitor(self.health, self.notifier, self.upstream, self.ready, self.stop).run(),
            name="monitor",
        )
        spool_path = s.store.spool_path
        spool = (
            Spool(spool_path, s.store.spool.max_bytes, s.store.min_free_bytes)
            if spool_path
            else None
        )
        try:
            if spool is not None and not await self._open_spool(spool):
                spool = None
            if not await self._open_store(store):
                return EXIT_OK
            return await self._main(store, spool)
        except StoreError as exc:
            log.error("store failed; exiting", path=store.where, error=str(exc))
            return EXIT_FAILURE
        finally:
            if spool is not None:
                await spool.close()
            monitor.cancel()
            if self._reloading is not None:
                self._reloading.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
            if server is not None:
                await asyncio.to_thread(server.close)
            await store.close()
            self.notifier.close()

    def _start_metrics_server(self) -> MetricsServer | None:
        m = self.settings.metrics
        if not m.enabled:
            return None
        try:
            server = MetricsServer(m.host, m.port, self.metrics).start()
        except OSError as exc:
            # Ingestion matters more than its metrics: go on without them.
            log.error(
                "cannot listen for metrics; running without /metrics and health endpoints",
                host=m.host,
                port=m.port,
                error=str(exc),
            )
            return None
        log.info(
            "metrics listening",
            url=f"http://{server.host}:{server.port}/metrics",
            host=server.host,
            port=server.port,
        )
        return server

    async def _open_store(self, store: Store) -> bool:
        """Open the store, waiting out what keeps it closed; False if stopped first.

        The reason is logged in words that say what to do, again every
        STORE_WAIT_LOG seconds while it lasts (a single line scrolls away), and
        /readyz and the metrics say the store is not available meanwhile.
        """
        backoff = Backoff(self.settings.store.retry_min_delay, self.settings.store.retry_max_delay)
        reported: str | None = None
        reported_at = 0.0
        attempts = 0
        while True:
            try:
                await store.open()
                self.health.store_problem = None
                if reported is not None:
                    log.warning("store open after all", path=store.where, attempts=attempts)
                else:
                    log.info("store open", path=store.where)
                if store.needs_rebuild:
                    log.warning(
                        "the store holds readings but no rollups (a database from before "
                        "them): run 'ingestd rollups rebuild' to compute their history",
                        path=store.where,
                    )
                return True
            except StoreUnavailable as exc:
                attempts += 1
                problem = store.advice(exc)
                self.health.store_problem = problem
                now = time.monotonic()
                if problem != reported or now - reported_at >= STORE_WAIT_LOG:
                    log.error(
                        f"cannot open the store: {problem}; retrying",
                        path=store.where,
                        error=str(exc),
                        attempts=attempts,
                    )
                    reported, reported_at = problem, now
                self.notifier.notify(f"STATUS=waiting for the store: {exc.condition}")
            try:
                async with asyncio.timeout(backoff.next()):
                    await self.stop.wait()
                return False
            except TimeoutError:
                continue

    async def _open_spool(self, spool: Spool) -> bool:
        """Open the local spool (before the store: it may hold batches an
        earlier run acknowledged); False if it cannot be opened (ingestd goes
        on without it, as with store.spool.enabled = false)."""
        try:
            await spool.open()
        except StoreUnavailable as exc:
            log.error(
                "cannot open the spool; running without it: while the store is away, "
                "batches are held unacknowledged (the broker keeps the rest), and what "
                "an earlier run spooled there is forwarded at the next start that opens it",
                spool=str(spool.path),
                error=str(exc),
            )
            return False
        state = spool.state()
        if state.batches:
            log.warning(
                "the spool holds batches an earlier run acknowledged; forwarding them",
                spool=str(spool.path),
                readings=state.readings,
                bytes=state.bytes,
            )
        return True

    async def _main(self, store: Store, spool: Spool | None = None) -> int:
        member, primary = split(self.settings)
        pipeline = Pipeline.build(
            member,
            store,
            upstream=self.upstream,
            on_commit=self.metrics.observe_commit,
            spool=spool,
        )
        self.health.loop = asyncio.get_running_loop()
        self.health.pipeline = self._pipeline = pipeline
        if primary is not None:
            self._primacy = Primacy(
                primary,
                self.health,
                self.stop,
                on_commit=self.metrics.observe_commit,
                stop_timeout=self._drain_left,
                device_log=pipeline.source.devices.device_log,
            )
        source = pipeline.source

        def on_ready() -> None:
            if not self.ready.is_set():
                self.ready.set()
                self.notifier.notify("READY=1", f"STATUS=ingesting from {source.broker}")
                log.info("ready", broker=source.broker, subscriptions=len(source.subscriptions))

        failed = False
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(pipeline.run(self.stop, on_ready, self._drain_left), name="member")
                if self._primacy is not None:
                    tg.create_task(self._primacy.run(), name="primacy")
        except* StopTimeout:
            log.error(
                "stop timeout exceeded; exiting with work in flight (it stays unacknowledged "
                "and the broker redelivers it)",
                in_flight=sum(p.window.in_flight for p in self.health.running()),
                stop_timeout=self.settings.daemon.stop_timeout,
            )
            failed = True
        except* Exception as group:
            for exc in group.exceptions:
                log.error("component failed; stopping", error=repr(exc), exc_info=exc)
            failed = True
        if failed:
            return EXIT_FAILURE
        tally = self.health.take_tally()
        writer = pipeline.writer
        log.info(
            "stopped",
            committed=tally.accounting.committed,
            duplicates=tally.accounting.duplicate,
            **({"duplicates_are": DUPLICATES_ARE} if tally.accounting.duplicate else {}),
            quarantined=writer.quarantined,
            batches=tally.batches,
            received=tally.accounting.messages_received,
            stale_acks=source.stale_acks,
            readings=dataclasses.asdict(tally.accounting),
            in_flight_peak=pipeline.window.peak,
            window=pipeline.window.limit,
            seconds=round(time.monotonic() - self._stop_started, 3),
        )
        return EXIT_OK

    def _drain_left(self) -> float:
        """Seconds left of daemon.stop_timeout since the stop was asked."""
        return self.settings.daemon.stop_timeout - (time.monotonic() - self._stop_started)

    # -- reload ----------------------------------------------------------------

    async def _reload(self) -> None:
        """SIGHUP: re-read the config file (and the environment it started with).

        What can change live is applied between chunks, so nothing in flight
        is lost or stored twice; what needs a restart is named in the log. An
        invalid file is rejected with its error and the running config kept.
        """
        self.notifier.notify(
            "RELOADING=1",
            f"MONOTONIC_USEC={monotonic_usec()}",
            "STATUS=reloading the configuration",
        )
        log.info("reloading configuration", path=str(self.config_path or "defaults"))
        try:
            new = await asyncio.to_thread(load_settings, self.config_path)
        except ConfigError as exc:
            self.health.reload_failures += 1
            log.error("reload rejected; the running configuration is kept", error=str(exc))
        else:
            self._apply(new)
            self.health.reloads += 1
        finally:
            self.notifier.notify("READY=1", "STATUS=configuration reloaded")

    def _apply(self, new: Settings) -> None:
        old = self.settings
        changed = _changed_keys(old, new)
        live = [k for k in changed if k.startswith(LIVE_KEYS)]
        restart = [
            k for k in _changed_keys(self._boot_settings, new) if not k.startswith(LIVE_KEYS)
        ]
        self.settings = new
        if (
            new.daemon.log_level != old.daemon.log_level
            or new.daemon.log_format != old.daemon.log_format
        ):
            configure_logging(new.daemon.log_level, new.daemon.log_format)
        self.health.stall_timeout = new.daemon.stall_timeout
        # One way in for every component: between chunks, nothing in flight is
        # lost or stored twice.
        member, primary = split(new)
        self.upstream.reconfigure(new)
        if self._pipeline is not None:
            self._pipeline.reconfigure(member)
        if self._primacy is not None and primary is not None:
            self._primacy.reconfigure(primary)
        elif (self._primacy is not None) != (primary is not None):
            restart.append("routes (which need the shared group's primary)")
        log.info("configuration reloaded", applied=live)
        if restart:
            log.warning("changed settings need a restart to apply", keys=restart)


def _changed_keys(old: Settings, new: Settings) -> list[str]:
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    out: list[str] = []
    for section in a.keys() | b.keys():
        x, y = a.get(section), b.get(section)
        if isinstance(x, dict) and isinstance(y, dict) and section != "processor":
            out += [f"{section}.{k}" for k in sorted(x.keys() | y.keys()) if x.get(k) != y.get(k)]
        elif x != y:
            out.append("routes" if section == "routes" else f"{section}.limits")
    return sorted(out)
