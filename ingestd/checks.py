"""The processor stage: units, clocks and limits, between decoding and storage.

In order: per-metric scaling (`value * scale + offset`, and the unit label),
the device clock check (a timestamp too far in the future or implausibly old
is quarantined), then per-metric limits on the scaled value. The functions
are pure; `Processor` is the bus stage around them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import structlog

from ingestd.bus import EventBus, Subscription
from ingestd.config import Limit, ProcessorSettings, Scaling, Settings
from ingestd.events import NS, Decoded, Processed, Reading, Rejected, reading_payload

log = structlog.get_logger("ingestd.checks")
_NEVER = 2**63  # beyond any int64 nanosecond time


def apply_limits(
    readings: list[Reading], limits: Mapping[str, Limit], rejected: list[Rejected], now: float
) -> list[Reading]:
    """Readings within their metric's [min, max]; the rest are appended to `rejected`
    (stamped with `now`, the time they were judged, like every quarantine record)."""
    if not limits:
        return readings
    bounds = {
        metric: (
            -math.inf if lim.min is None else lim.min,
            math.inf if lim.max is None else lim.max,
        )
        for metric, lim in limits.items()
    }
    get = bounds.get
    kept: list[Reading] = []
    keep = kept.append
    for r in readings:
        b = get(r.metric)
        if b is None or b[0] <= r.value <= b[1]:
            keep(r)
            continue
        rejected.append(
            Rejected(
                r.topic, reading_payload(r), _violation(r, limits[r.metric]), now, "out_of_range"
            )
        )
    return kept


def apply_scaling(
    readings: list[Reading], scaling: Mapping[str, Scaling], now: float, rejected: list[Rejected]
) -> list[Reading]:
    """Readings of a scaled metric as `value * scale + offset`, with its unit.

    A result that is not a finite number (a huge value times a large scale)
    is quarantined: a double cannot hold it, and JSON cannot show it.
    """
    if not scaling:
        return readings
    get = scaling.get
    out: list[Reading] = []
    for r in readings:
        s = get(r.metric)
        if s is None:
            out.append(r)
            continue
        value = r.value * s.scale + s.offset
        if not math.isfinite(value):
            rejected.append(
                Rejected(
                    r.topic,
                    reading_payload(r),
                    f"{r.metric}={r.value:g} scaled by {s.scale:g} "
                    f"+ {s.offset:g} is not a finite number",
                    now,
                    "out_of_range",
                )
            )
            continue
        out.append(
            Reading(r.sensor, r.metric, r.ts_ns, value, r.topic, r.tags, s.unit or r.unit, r.seq)
        )
    return out


def apply_clock(
    readings: list[Reading], now: float, max_future: float, max_age: float, rejected: list[Rejected]
) -> list[Reading]:
    """Readings whose device time is within [now - max_age, now + max_future];
    the rest are quarantined (0 turns a check off)."""
    latest = int((now + max_future) * NS) if max_future else _NEVER
    earliest = int((now - max_age) * NS) if max_age else -_NEVER
    if all(earliest <= r.ts_ns <= latest for r in readings):
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
    for factor, finer in _UNIT_STEPS:
        for plausible, unit in (
            (ts_ns // factor, f"{factor:,} times finer than the route reads ({finer} as seconds?)"),
            (
                ts_ns * factor,
                f"{factor:,} times coarser than the route reads (seconds as {finer}?)",
            ),
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
    readings: list[Reading], settings: ProcessorSettings, now: float, rejected: list[Rejected]
) -> list[Reading]:
    """Scaling, then the clock check, then limits."""
    out = apply_scaling(readings, settings.scaling, now, rejected)
    out = apply_clock(
        out, now, settings.max_future_seconds, settings.max_age_days * 86400.0, rejected
    )
    return apply_limits(out, settings.limits, rejected, now)


def process_guarded(
    readings: list[Reading], settings: ProcessorSettings, now: float, rejected: list[Rejected]
) -> list[Reading]:
    """`process`, but a reading whose processing raises (a bug of ours) is
    quarantined with the error instead of stopping the daemon, which would stop
    again on every redelivery of the same message."""
    mark = len(rejected)
    try:
        return process(readings, settings, now, rejected)
    except Exception:
        del rejected[mark:]
    kept: list[Reading] = []
    for r in readings:
        mark = len(rejected)
        try:
            kept.extend(process([r], settings, now, rejected))
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


def _violation(r: Reading, limit: Limit) -> str:
    if limit.min is not None and r.value < limit.min:
        return f"{r.metric}={r.value:g} is below the limit min={limit.min:g}"
    return f"{r.metric}={r.value:g} is above the limit max={limit.max:g}"


class Processor:
    """Validates each decoded chunk and passes it on, in order."""

    def reconfigure(self, settings: Settings) -> None:
        """A reload: new limits, scaling and clock checks from the next chunk on."""
        self.settings = settings.processor

    def __init__(
        self,
        inbox: Subscription,
        bus: EventBus,
        settings: ProcessorSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inbox = inbox
        self.bus = bus
        self.settings = settings  # replaced whole by a reload
        self.clock = clock
        self.rejected = 0

    async def run(self) -> None:
        while True:
            chunk: Decoded = await self.inbox.get()
            rejected = list(chunk.rejected)
            kept = process_guarded(chunk.readings, self.settings, self.clock(), rejected)
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
