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

import msgspec

from ingestd.bus import EventBus, Subscription
from ingestd.config import Limit, ProcessorSettings, Scaling
from ingestd.events import Decoded, Processed, Reading, Rejected

_encode = msgspec.json.encode


def apply_limits(
    readings: list[Reading], limits: Mapping[str, Limit], rejected: list[Rejected]
) -> list[Reading]:
    """Readings within their metric's [min, max]; the rest are appended to `rejected`."""
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
        payload = _encode({"sensor": r.sensor, "metric": r.metric, "ts": r.ts, "value": r.value})
        rejected.append(Rejected(r.topic, payload, _violation(r, limits[r.metric]), r.ts,
                                 "out_of_range"))
    return kept


def apply_scaling(readings: list[Reading], scaling: Mapping[str, Scaling]) -> list[Reading]:
    """Readings of a scaled metric as `value * scale + offset`, with its unit."""
    if not scaling:
        return readings
    get = scaling.get
    out: list[Reading] = []
    for r in readings:
        s = get(r.metric)
        if s is None:
            out.append(r)
            continue
        out.append(Reading(r.sensor, r.metric, r.ts, r.value * s.scale + s.offset, r.topic,
                           r.tags, s.unit or r.unit))
    return out


def apply_clock(readings: list[Reading], now: float, max_future: float, max_age: float,
                rejected: list[Rejected]) -> list[Reading]:
    """Readings whose device time is within [now - max_age, now + max_future];
    the rest are quarantined (0 turns a check off)."""
    latest = now + max_future if max_future else math.inf
    earliest = now - max_age if max_age else -math.inf
    if all(earliest <= r.ts <= latest for r in readings):
        return readings
    kept: list[Reading] = []
    for r in readings:
        if earliest <= r.ts <= latest:
            kept.append(r)
            continue
        if r.ts > latest:
            why = (f"timestamp {r.ts:.3f} is {r.ts - now:,.0f} s in the future "
                   f"(processor.max_future_seconds = {max_future:g})")
        else:
            why = (f"timestamp {r.ts:.3f} is {(now - r.ts) / 86400:,.1f} days old "
                   f"(processor.max_age_days = {max_age / 86400:g})")
        payload = _encode({"sensor": r.sensor, "metric": r.metric, "ts": r.ts, "value": r.value})
        rejected.append(Rejected(r.topic, payload, why, now, "clock"))
    return kept


def process(readings: list[Reading], settings: ProcessorSettings, now: float,
            rejected: list[Rejected]) -> list[Reading]:
    """Scaling, then the clock check, then limits."""
    out = apply_scaling(readings, settings.scaling)
    out = apply_clock(out, now, settings.max_future_seconds, settings.max_age_days * 86400.0,
                      rejected)
    return apply_limits(out, settings.limits, rejected)


def _violation(r: Reading, limit: Limit) -> str:
    if limit.min is not None and r.value < limit.min:
        return f"{r.metric}={r.value:g} is below the limit min={limit.min:g}"
    return f"{r.metric}={r.value:g} is above the limit max={limit.max:g}"


class Processor:
    """Validates each decoded chunk and passes it on, in order."""

    def __init__(self, inbox: Subscription, bus: EventBus, settings: ProcessorSettings,
                 clock: Callable[[], float] = time.time) -> None:
        self.inbox = inbox
        self.bus = bus
        self.settings = settings  # replaced whole by a reload
        self.clock = clock
        self.rejected = 0

    async def run(self) -> None:
        while True:
            chunk: Decoded = await self.inbox.get()
            rejected = list(chunk.rejected)
            kept = process(chunk.readings, self.settings, self.clock(), rejected)
            self.rejected += len(rejected) - len(chunk.rejected)
            await self.bus.publish(
                Processed(kept, rejected, chunk.deliveries, chunk.acks, chunk.epoch,
                          flush=chunk.flush, last=chunk.last)
            )
            if chunk.last:
                return
