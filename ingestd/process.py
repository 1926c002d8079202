"""The processor stage: validation between decoding and storage.

`apply_limits` is pure; `Processor` is the bus stage around it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec

from ingestd.bus import EventBus, Subscription
from ingestd.config import Limit
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


def _violation(r: Reading, limit: Limit) -> str:
    if limit.min is not None and r.value < limit.min:
        return f"{r.metric}={r.value:g} is below the limit min={limit.min:g}"
    return f"{r.metric}={r.value:g} is above the limit max={limit.max:g}"


class Processor:
    """Validates each decoded chunk and passes it on, in order."""

    def __init__(self, inbox: Subscription, bus: EventBus, limits: Mapping[str, Limit]) -> None:
        self.inbox = inbox
        self.bus = bus
        self.limits = dict(limits)
        self.rejected = 0

    async def run(self) -> None:
        while True:
            chunk: Decoded = await self.inbox.get()
            rejected = list(chunk.rejected)
            kept = apply_limits(chunk.readings, self.limits, rejected)
            self.rejected += len(rejected) - len(chunk.rejected)
            await self.bus.publish(
                Processed(kept, rejected, chunk.deliveries, chunk.acks, chunk.epoch,
                          flush=chunk.flush, last=chunk.last)
            )
            if chunk.last:
                return
