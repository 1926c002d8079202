"""Loss upstream of ingestd, made visible: what the broker drops, gaps in the
devices' message counters, and routes or sensors that fall silent.

ingestd cannot prevent these, so it reports them where an operator looks: a
warning log line (once per change, or a count per interval), metrics, and
/readyz's `upstream` detail. Everything here runs on the event loop; the
HTTP thread reads the plain values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from ingestd.config import Settings
from ingestd.devices import DeviceState
from ingestd.events import NS
from ingestd.routes import RouteTable

log = structlog.get_logger("ingestd.upstream")

# Mosquitto's running total of messages it dropped (all clients) since it
# started. Mosquitto 2.x publishes it every sys_interval (10 s by default) but
# only when it changed, retained with a 60 s message expiry: a broker that
# dropped nothing for a minute has no retained value for a new subscriber.
BROKER_DROPPED = "$SYS/broker/publish/messages/dropped"
# "<n> seconds": published every sys_interval, so always retained. Subscribed
# before BROKER_DROPPED (the broker sends retained values in filter order, and
# each $SYS round publishes uptime first): a restart is known before the count.
BROKER_UPTIME = "$SYS/broker/uptime"
# In the order to subscribe to them.
WATCHED = (BROKER_UPTIME, BROKER_DROPPED)
# Mosquitto's max_inflight_messages when nobody set it.
STOCK_BROKER_INFLIGHT = 20
# Repeated warnings (drops, gaps) are summed over this many seconds.
REPORT_INTERVAL = 60.0
# Sensors named in one staleness line, at most.
NAMED = 10


@dataclass
class UpstreamState:
    broker_dropped: int | None = None  # the broker's own counter, as last seen
    drops_seen: int = 0  # its increase while ingestd watched
    broker_uptime: int | None = None  # seconds, as last seen
    broker_restarts: int = 0  # seen from its uptime going back
    silent_routes: list[str] = field(default_factory=list)
    stale_sensors: int = 0


class UpstreamWatch:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = UpstreamState()
        self.started_ns = time.time_ns()
        self._unreported_drops = 0
        self._drops_reported_at = -REPORT_INTERVAL
        self._gaps_reported = (0, 0)
        self._gaps_reported_at = -REPORT_INTERVAL
        self._stale: set[tuple[int, int, str]] = set()

        self._new_broker_life = False  # restarted: its next count starts from 0

    def reconfigure(self, settings: Settings) -> None:
        """A reload: routes' expect_within from the next check on."""
        self.settings = settings

    # -- what ingestd cannot check about the broker --------------------------------

    def announce(self) -> None:
        """One start-up line on the broker settings ingestd relies on and cannot
        read: its in-flight window and its queue limit (no client can read
        Mosquitto's max_queued_messages, whose default of 1000 drops the rest
        of a burst that a client falls behind)."""
        m = self.settings.mqtt
        watched = "counted from the first after start (ingestd_broker_drops_seen_total)"
        if not m.watch_broker_drops:
            watched = "NOT watched (mqtt.watch_broker_drops = false): such loss goes unseen"
        if m.protocol == "3.1.1" and m.broker_max_inflight == STOCK_BROKER_INFLIGHT:
            log.warning(
                "the broker's in-flight window in use is Mosquitto's stock 20 "
                "(mqtt.broker_max_inflight), and a broker left at its defaults also "
                "queues at most 1000 messages per client and drops the rest of a burst "
                "that ingestd falls behind. Give the broker config/mosquitto.conf's "
                "settings and set mqtt.broker_max_inflight to its max_inflight_messages; "
                "see README, Broker settings",
                broker_max_inflight=m.broker_max_inflight,
                broker_drops=watched,
            )
        else:
            (log.info if m.watch_broker_drops else log.warning)(
                "the broker cannot be confirmed lossless: no client can read its queue "
                "limit (Mosquitto's max_queued_messages drops beyond it, 1000 by "
                "default); config/mosquitto.conf has the settings ingestd needs",
                window=m.max_inflight if m.protocol == "5" else m.broker_max_inflight,
                broker_drops=watched,
            )

    # -- the broker's drop counter and uptime ($SYS) -------------------------------

    def side_topics(self) -> dict[str, Callable[[bytes, bool], None]]:
        """The $SYS topics watched (WATCHED) with their handlers of (payload, retained)."""
        return {BROKER_UPTIME: self.broker_uptime, BROKER_DROPPED: self.broker_dropped}

    def broker_uptime(self, payload: bytes, retained: bool) -> None:
        try:
            uptime = int(payload.split()[0])
        except (ValueError, IndexError):
            return
        s = self.state
        # Uptime only grows in one broker's life, and samples arrive in order:
        # less than last seen is a new life, whose drop counter began at 0
        # (counted whole even when it is higher than the old life's last).
        if s.broker_uptime is not None and uptime < s.broker_uptime:
            s.broker_restarts += 1
            self._new_broker_life = True
            log.info(
                "the broker restarted (its uptime went back)",
                uptime=uptime,
                last_uptime=s.broker_uptime,
            )
        s.broker_uptime = uptime

    def broker_dropped(self, payload: bytes, retained: bool) -> None:
        """A value of the broker's drop counter. `retained`: sent because ingestd
        subscribed (the count before it watched); otherwise published live,
        after the subscription, because the count changed."""
        try:
            total = int(payload.strip())
        except ValueError:
            return
        s = self.state
        new_life, self._new_broker_life = self._new_broker_life, False
        if s.broker_dropped is None and retained:
            s.broker_dropped = total
            if total:
                log.warning(
                    "the broker has dropped messages since it started (before ingestd "
                    "watched; some may have been for ingestd)",
                    dropped=total,
                    topic=BROKER_DROPPED,
                )
            return
        if s.broker_dropped is None:
            # No retained value when ingestd subscribed: the count had not
            # changed for a minute (Mosquitto expires it), and this change came
            # after the subscription. Counting from 0 may include drops long
            # before ingestd started; taking it as the baseline would miss the
            # first burst ingestd itself fell behind.
            if total:
                log.info(
                    "counting the broker's drops from 0: it held no retained count when "
                    "ingestd subscribed (Mosquitto's expires a minute after it last changed)",
                    broker_total=total,
                    topic=BROKER_DROPPED,
                )
            increase = total
        elif new_life or total < s.broker_dropped:  # restarted: the counter began again
            increase = total
        else:
            increase = total - s.broker_dropped
        s.broker_dropped = total
        if increase <= 0:
            return
        s.drops_seen += increase
        self._unreported_drops += increase
        self._report_drops()

    def _report_drops(self) -> None:
        now = time.monotonic()
        if not self._unreported_drops or now - self._drops_reported_at < REPORT_INTERVAL:
            return
        log.warning(
            "the broker is dropping messages: its queue for a client that falls behind (or "
            "is away) is full, and what it drops is lost for good. Give the broker the "
            "settings in config/mosquitto.conf (max_queued_messages, max_inflight_messages) "
            "and restart it; see README, Troubleshooting",
            dropped=self._unreported_drops,
            broker_total=self.state.broker_dropped,
            topic=BROKER_DROPPED,
            scope="broker-wide",
        )
        self._unreported_drops = 0
        self._drops_reported_at = now

    # -- the periodic check (monitor tick) ------------------------------------------------

    def check(
        self,
        tables: Sequence[tuple[RouteTable, DeviceState]],
        gaps: tuple[int, int] = (0, 0),
        now_ns: int | None = None,
    ) -> None:
        """Once a second: the broker's drops, the devices' counter gaps (`gaps`:
        sequence gaps and missing, this process's totals), silent routes and
        stale sensors in each pipeline's table."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        self._report_drops()
        self._report_gaps(*gaps)
        silent: list[str] = []
        for table, devices in tables:
            for r in table.routes:
                expect = r.options.expect_within
                if not expect:
                    continue
                last = devices.route_seen.get(r.index, self.started_ns)
                if now_ns - last > expect * NS:
                    silent.append(r.pattern)
        if silent != self.state.silent_routes:
            new = sorted(set(silent) - set(self.state.silent_routes))
            back = sorted(set(self.state.silent_routes) - set(silent))
            if new:
                log.warning(
                    "route silent: no message within its expect_within; check the "
                    "topic (a typo is total silence) and the publishers",
                    routes=new,
                )
            if back:
                log.info("route heard from again", routes=back)
            self.state.silent_routes = silent
        self._check_sensors(tables, now_ns)

    def _check_sensors(self, tables: Sequence[tuple[RouteTable, DeviceState]], now_ns: int) -> None:
        stale: set[tuple[int, int, str]] = set()
        for i, (table, devices) in enumerate(tables):
            limits = {
                r.index: r.options.expect_within * NS
                for r in table.routes
                if r.options.expect_within
            }
            if limits:
                stale.update(
                    (i, *key)
                    for key, seen in devices.sensor_seen.items()
                    if key[0] in limits and now_ns - seen > limits[key[0]]
                )
        new = stale - self._stale
        back = self._stale - stale
        if new:
            names = sorted(s for _, _, s in new)
            log.warning(
                "sensors stale: silent longer than their route's expect_within",
                count=len(new),
                sensors=names[:NAMED],
                more=max(0, len(names) - NAMED),
            )
        if back:
            names = sorted(s for _, _, s in back)
            log.info("sensors heard from again", count=len(back), sensors=names[:NAMED])
        self._stale = stale
        self.state.stale_sensors = len(stale)

    def _report_gaps(self, gaps: int, missing: int) -> None:
        now = time.monotonic()
        if gaps == self._gaps_reported[0] or now - self._gaps_reported_at < REPORT_INTERVAL:
            return
        log.warning(
            "gaps in devices' message counters: messages lost before they reached "
            "ingestd (device, network or broker); see `ingestd sensors`",
            gaps=gaps - self._gaps_reported[0],
            missing=missing - self._gaps_reported[1],
            total_gaps=gaps,
            total_missing=missing,
        )
        self._gaps_reported = (gaps, missing)
        self._gaps_reported_at = now

    def detail(self) -> dict[str, object]:
        """/readyz's `upstream`: loss and silence outside ingestd (not readiness)."""
        s = self.state
        return {
            "broker_drops_seen": s.drops_seen,
            "silent_routes": list(s.silent_routes),
            "stale_sensors": s.stale_sensors,
        }
