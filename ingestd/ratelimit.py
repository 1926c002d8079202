"""Per-device rate limits: a token bucket per (route, sensor), and the policy.

A route's `rate_limit` (readings/s per sensor, bursts of `rate_burst`) keeps
what each sensor's bucket allows; the rest is dropped or quarantined
(`rate_policy`), and counted either way. Applied in the decode stage: it
needs the route and the device's clock. Buckets are kept by recency: one
forgotten starts again full (a burst, not a cliff).
"""

from __future__ import annotations

from ingestd.events import NS, Reading
from ingestd.recent import RecentCache


class RateLimiter:
    def __init__(self, kept: int) -> None:
        # (route, sensor) -> [tokens, last refill time]
        self.buckets: RecentCache[tuple[int, str], list[float]] = RecentCache(kept)

    def allow(self, route: int, sensor: str, rate: float, burst: float, n: int, now: float) -> int:
        """How many of `n` readings from this sensor the route's rate limit lets
        through now (a token bucket of `burst`, refilled at `rate`/s)."""
        key = (route, sensor)
        bucket = self.buckets.recent(key)
        if bucket is None:
            bucket = self.buckets[key] = [burst, now]
        tokens = min(burst, bucket[0] + max(now - bucket[1], 0.0) * rate)
        allowed = min(n, int(tokens))
        bucket[0], bucket[1] = tokens - allowed, now
        return allowed

    def keep(
        self, route: int, rate: float, burst: float, readings: list[Reading], before: int
    ) -> list[str]:
        """Keep what each sensor's token bucket allows of `readings[before:]`
        (one message's), in place; the sensors that had readings over (empty:
        all kept). What becomes of the rest (dropped or quarantined, by the
        route's `rate_policy`) is the caller's.

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
        allowed = {
            s: self.allow(route, s, rate, burst, n, latest[s] / NS) for s, n in per_sensor.items()
        }
        if all(allowed[s] == n for s, n in per_sensor.items()):
            return []
        kept: list[Reading] = []
        for r in fresh:
            if allowed[r.sensor] > 0:
                allowed[r.sensor] -= 1
                kept.append(r)
        del readings[before:]
        readings.extend(kept)
        return sorted(s for s in per_sensor if allowed[s] == 0)
