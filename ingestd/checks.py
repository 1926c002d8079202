"""The processor stage: units, clocks and limits, between decoding and storage.

In order: the device clock check (a timestamp too far in the future or
implausibly old is quarantined), then per series the scaling (`value * scale
+ offset`, and the unit label) and the limits on the scaled value, as
`ingestd.metric_rules` resolves them (a sensor rule, the route's, the
global). The functions are pure; `Processor` is the bus stage around them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from operator import attrgetter

import structlog

from ingestd.bus import EventBus, Subscription
from ingestd.config import Limit, ProcessorSettings, Scaling, Settings
from ingestd.events import NS, Decoded, Processed, Reading, Rejected, reading_payload
from ingestd.metric_rules import Applied, MetricRules

log = structlog.get_logger("ingestd.checks")
_NEVER = 2**63  # beyond any int64 nanosecond time
_STAMP = attrgetter("ts_ns")


def apply_rules(
    readings: list[Reading], rules: MetricRules, now: float, rejected: list[Rejected]
) -> list[Reading]:
    """Readings scaled (`value * scale + offset`, and the unit) and within
    their limit [min, max], as `rules` resolve them per series; the rest are
    appended to `rejected`, stamped with `now`, the time they were judged.

    A scaled result that is not a finite number (a huge value times a large
    scale) is quarantined: a double cannot hold it, and JSON cannot show it.
    """
    if not rules.active:
        return readings
    cache, resolve, scoped = rules.cache, rules.resolve, rules.scoped
    kept: list[Reading] = []
    keep = kept.append
    for r in readings:
        # RecentCache.recent, inlined: this runs per reading.
        key = (r.topic, r.sensor, r.metric) if scoped else r.metric
        a = cache.get(key)
        if a is None:
            a = cache[key] = resolve(r.topic, r.sensor, r.metric)
        elif cache.warm:
            cache.move_to_end(key)
        s = a.scaling
        if s is not None:
            value = r.value * s.scale + s.offset
            if not math.isfinite(value):
                why = f"{r.metric}={r.value:g} scaled by {s.scale:g} + {s.offset:g}"
                rejected.append(
                    Rejected(
                        r.topic,
                        reading_payload(r),
                        f"{why} is not a finite number{_where(a.scaling_key)}",
                        now,
                        "out_of_range",
                    )
                )
                continue
            r = Reading(  # noqa: PLW2901
                r.sensor, r.metric, r.ts_ns, value, r.topic, r.tags, s.unit or r.unit, r.seq
            )
        if a.lo <= r.value <= a.hi:
            keep(r)
            continue
        rejected.append(
            Rejected(r.topic, reading_payload(r), _violation(r, a), now, "out_of_range")
        )
    return kept


def apply_limits(
    readings: list[Reading], limits: Mapping[str, Limit], rejected: list[Rejected], now: float
) -> list[Reading]:
    """Readings within their metric's [min, max] of `limits` alone (no scaling)."""
    rules = MetricRules(ProcessorSettings(limits=dict(limits), report_unmatched_after=0))
    return apply_rules(readings, rules, now, rejected)


def apply_scaling(
    readings: list[Reading], scaling: Mapping[str, Scaling], now: float, rejected: list[Rejected]
) -> list[Reading]:
    """Readings scaled by `scaling` alone (no limits)."""
    rules = MetricRules(ProcessorSettings(scaling=dict(scaling), report_unmatched_after=0))
    return apply_rules(readings, rules, now, rejected)


def apply_clock(
    readings: list[Reading], now: float, max_future: float, max_age: float, rejected: list[Rejected]
) -> list[Reading]:
    """Readings whose device time is within [now - max_age, now + max_future];
    the rest are quarantined (0 turns a check off)."""
    latest = int((now + max_future) * NS) if max_future else _NEVER
    earliest = int((now - max_age) * NS) if max_age else -_NEVER
    if not readings:
        return readings
    stamps = list(map(_STAMP, readings))
    if earliest <= min(stamps) and max(stamps) <= latest:  # all within: the common case
        return readings
    kept: list[Reading] = []
    for r in readings:
        if earliest <= r.ts_ns <= latest:
            kept.append(r)
            continue
        ts = r.ts_ns / NS
        if r.ts_ns > latest:
            why = (
                f"timestamp {ts:.3f} is {ts - now:,.0f} s in the future "
                f"(processor.max_future_seconds = {max_future:g})"
            )
        else:
            why = (
                f"timestamp {ts:.3f} is {(now - ts) / 86400:,.1f} days old "
                f"(processor.max_age_days = {max_age / 86400:g})"
            )
        hint = _unit_hint(r.ts_ns, earliest, latest)
        rejected.append(Rejected(r.topic, reading_payload(r), why + hint, now, "clock"))
    return kept


# A device time in another unit than the route reads is off by a power of 1000.
_UNIT_STEPS = (
    (1000, "milliseconds"),
    (1_000_000, "microseconds"),
    (1_000_000_000, "nanoseconds"),
)


def _unit_hint(ts_ns: int, earliest: int, latest: int) -> str:
    """Why a time out of range may be a unit mix-up: the factor of 1000 that
    would make it plausible, and what that time would be; else ''."""
    # The route's own unit is not known here: the factor and the direction
    # are what is sure (milliseconds read as seconds, or nanoseconds as
    # microseconds, look the same from here).
    for factor, _ in _UNIT_STEPS:
        for plausible, unit in (
            (ts_ns // factor, f"{factor:,} times finer than the route reads"),
            (ts_ns * factor, f"{factor:,} times coarser than the route reads"),
        ):
            if earliest <= plausible <= latest:
                return (
                    f"; it would be {_iso(plausible)} in a unit {unit}: "
                    "check the route's timestamp_unit"
                )
    return ""


def _iso(ts_ns: int) -> str:
    return (
        datetime.fromtimestamp(ts_ns / NS, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def process(
    readings: list[Reading],
    settings: ProcessorSettings,
    now: float,
    rejected: list[Rejected],
    rules: MetricRules | None = None,
) -> list[Reading]:
    """The clock check, then scaling and limits (`rules`: as resolved for the
    daemon's routes; default: `settings`' alone, no route's)."""
    out = apply_clock(
        readings, now, settings.max_future_seconds, settings.max_age_days * 86400.0, rejected
    )
    return apply_rules(out, rules if rules is not None else MetricRules(settings), now, rejected)


def process_guarded(
    readings: list[Reading],
    settings: ProcessorSettings,
    now: float,
    rejected: list[Rejected],
    rules: MetricRules | None = None,
) -> list[Reading]:
    """`process`, but a reading whose processing raises (a bug of ours) is
    quarantined with the error instead of stopping the daemon, which would stop
    again on every redelivery of the same message."""
    mark = len(rejected)
    try:
        return process(readings, settings, now, rejected, rules)
    except Exception:
        del rejected[mark:]
    kept: list[Reading] = []
    for r in readings:
        mark = len(rejected)
        try:
            kept.extend(process([r], settings, now, rejected, rules))
        except Exception as exc:
            del rejected[mark:]
            log.error(
                "processing a reading failed; quarantined (please report this as a bug)",
                topic=r.topic,
                metric=r.metric,
                error=repr(exc),
            )
            rejected.append(
                Rejected(
                    r.topic,
                    reading_payload(r),
                    f"internal error: processing failed (a bug in ingestd): {exc!r}",
                    now,
                    "internal",
                )
            )
    return kept


def _violation(r: Reading, a: Applied) -> str:
    if r.value < a.lo:
        return f"{r.metric}={r.value:g} is below the limit min={a.lo:g}{_where(a.limit_key)}"
    return f"{r.metric}={r.value:g} is above the limit max={a.hi:g}{_where(a.limit_key)}"


def _where(key: str) -> str:
    """Which key a reason comes from, where it is scoped (a global key's
    reasons read as they always did: replay compares them)."""
    return (
        ""
        if key.startswith("processor.limits.") or key.startswith("processor.scaling.")
        else (f" ({key})")
    )


class Processor:
    """Validates each decoded chunk and passes it on, in order."""

    def reconfigure(self, settings: Settings) -> None:
        """A reload: new limits, scaling and clock checks from the next chunk
        on; what unchanged keys matched is kept (`KeyUsage.carry`)."""
        self.settings = settings.processor
        old = getattr(self, "rules", None)
        self.rules = MetricRules(settings.processor, settings.routes)
        if old is not None:
            self.rules.usage.carry(old.usage)

    def __init__(
        self,
        inbox: Subscription,
        bus: EventBus,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inbox = inbox
        self.bus = bus
        self.reconfigure(settings)  # settings and rules are replaced whole by a reload
        self.clock = clock
        self.rejected = 0

    async def run(self) -> None:
        while True:
            chunk: Decoded = await self.inbox.get()
            rejected = list(chunk.rejected)
            now, rules = self.clock(), self.rules
            kept = process_guarded(chunk.readings, self.settings, now, rejected, rules)
            if rules.usage.watching:
                rules.usage.watch(now, len(chunk.readings))
            moved = len(rejected) - len(chunk.rejected)
            self.rejected += moved
            await self.bus.publish(
                Processed(
                    kept,
                    rejected,
                    chunk.deliveries,
                    chunk.acks,
                    chunk.epoch,
                    flush=chunk.flush,
                    last=chunk.last,
                    status=chunk.status,
                    gaps=chunk.gaps,
                    rejected_readings=moved,
                )
            )
            if chunk.last:
                return
