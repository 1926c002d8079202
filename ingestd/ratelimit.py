"""Per-device rate limits: a token bucket per (route, sensor), and the policy.

A route's `rate_limit` (readings/s per sensor, bursts of `rate_burst`) keeps
what each sensor's bucket allows; the rest is dropped or quarantined
(`rate_policy`), and counted either way. Applied in the decode stage: it
needs the route and the device's clock. Buckets are kept by recency: one
forgotten starts again full (a burst, not a cliff).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ingestd.events import NS, Reading, Rejected
from ingestd.recent import RecentCache

if TYPE_CHECKING:
    from ingestd.devices import DecodeCounts
    from ingestd.routes import RouteMatch, RouteOptions


class RateLimiter:
    def __init__(self, kept: int) -> None:
        # (route, sensor) -> [tokens, last refill time]
        self.buckets: RecentCache[tuple[int, str], list[float]] = RecentCache(kept)

    def allow(self, route: int, sensor: str, options: RouteOptions, n: int, now: float) -> int:
        """How many of `n` readings from this sensor the route's rate limit lets
        through now (a token bucket of `rate_burst`, refilled at `rate_limit`/s)."""
        key = (route, sensor)
        bucket = self.buckets.recent(key)
        if bucket is None:
            bucket = self.buckets[key] = [options.rate_burst, now]
        tokens = min(options.rate_burst, bucket[0] + max(now - bucket[1], 0.0) * options.rate_limit)
        allowed = min(n, int(tokens))
        bucket[0], bucket[1] = tokens - allowed, now
        return allowed

    def apply(
        self,
        counts: DecodeCounts,
        match: RouteMatch,
        topic: str,
        payload: bytes,
        received_at: float,
        readings: list[Reading],
        before: int,
        rejected: list[Rejected],
    ) -> None:
        """Keep what each sensor's token bucket allows of `readings[before:]`
        (one message's); drop or quarantine the rest.

        The bucket runs on the device's clock (the readings' time, which is the
        receive time only where the device sends none): a backlog delivered at
        once after an outage was produced at the device's pace and passes.
        """
        fresh = readings[before:]
        per_sensor: dict[str, int] = {}
        latest: dict[str, int] = {}
        for r in fresh:
            per_sensor[r.sensor] = per_sensor.get(r.sensor, 0) + 1
            if r.ts_ns > latest.get(r.sensor, -1):
                latest[r.sensor] = r.ts_ns
        opts = match.options
        allowed = {
            s: self.allow(match.route, s, opts, n, latest[s] / NS) for s, n in per_sensor.items()
        }
        if all(allowed[s] == n for s, n in per_sensor.items()):
            return
        kept: list[Reading] = []
        for r in fresh:
            if allowed[r.sensor] > 0:
                allowed[r.sensor] -= 1
                kept.append(r)
        excess = len(fresh) - len(kept)
        del readings[before:]
        readings.extend(kept)
        if opts.rate_policy == "quarantine":
            counts.rate_quarantined += excess
            over = ", ".join(sorted(s for s in per_sensor if allowed[s] == 0))
            rejected.append(
                Rejected(
                    topic,
                    payload,
                    f"rate limit: {excess} reading(s) over {opts.rate_limit:g}/s "
                    f"(burst {opts.rate_burst:g}) from {over}",
                    received_at,
                    "rate_limited",
                )
            )
        else:
            counts.rate_dropped += excess
