"""Caches bounded by recency: the one shape for per-device state held in memory.

Anything ingestd keeps per topic, per sensor or per device (route matches,
rate-limit buckets, sequence counters, Homie descriptions and states, names
already formatted or validated) grows with the number of distinct ids the
broker delivers, which untrusted devices choose. Such a cache is a
`RecentCache`: it holds at most `bound` entries, a hit makes an entry the most
recent, and an insert past the bound forgets the least recently used one
entry, never all of them at once: a flood of new ids costs each old entry
only its own place, in order of disuse, and what a busy device uses stays.

Memory: the bound is per cache, in entries (65,536 for each per-device
cache today), so what ingestd holds stops growing once the caches are full,
whatever the number of ids. Measured per entry (tracemalloc, CPython 3.11;
the cache's own OrderedDict slot and link included):

- route match, per topic: ~0.43 KB (the `RouteMatch`, its topic and captured
  strings): ~27 MB
- rate-limit bucket, per (route, sensor): ~0.2 KB: ~13 MB
- sequence counter, per sensor: ~0.2 KB: ~13 MB
- Homie: state of a device not described ~0.1 KB (~7 MB); formatted names
  per value topic ~0.4 KB (~26 MB); a description ~0.35 KB + ~0.25 KB per
  property (65,536 devices of 10 properties: ~180 MB, the one cache whose
  entries the devices size, each at most one `max_payload_bytes` document)
- SenML name found valid: ~0.15 KB: ~10 MB

Measured whole: 1,000,000 distinct device ids through a JSON route with
`sequence_field` and a rate limit and Homie `$state` (3,000,000 messages,
`python -m bench.distinct_ids`, the decode path) peak at 140 MB RSS; through
the daemon, with the stores' series ids bounded the same way (262,144),
1,000,000 new ids on a route with `sequence_field` and `expect_within`
peak at 234 MB (`python -m bench.daemon_ids --ids 1000000 --sequence`).

Eviction is a cost, not a loss of data: what an entry held is either
recomputed (a route match, a name) or already stored (sequence counters are
written as deltas and added in the store, so a sensor forgotten and seen again
keeps its stored counts).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class RecentCache(OrderedDict[K, V]):
    """A mapping that keeps at most `bound` entries, the most recently used.

    `cache[key] = value` inserts (or replaces) an entry as the most recent
    and, past the bound, forgets the least recently used one. `recent(key)`
    is a lookup that counts as a use. `warm` is set once the cache has held
    half its bound: from then on a use moves an entry (a hit then costs one
    `move_to_end`, ~35 ns; before, nothing). Nothing is evicted before the
    cache is full, so an entry used at least once in the half before that
    (as a busy device is) has its uses counted before any eviction, and the
    busiest stays: a flood of new ids evicts first what was used least
    recently. Entries used only while the cache was less than half full
    stand in the order they were inserted until their next use.

    A hot path may inline a hit, with plain lookups (`cache[key]`, `get`,
    `in` do not touch recency):

        found = cache.get(key)
        if found is not None and cache.warm:
            cache.move_to_end(key)
    """

    __slots__ = ("_warm_at", "bound", "warm")

    def __init__(self, bound: int) -> None:
        if bound < 1:
            raise ValueError(f"a RecentCache holds at least one entry (bound {bound})")
        super().__init__()
        self.bound = bound
        self.warm = False
        self._warm_at = max(1, bound // 2)

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) >= self._warm_at:
            self.warm = True
            if len(self) > self.bound:
                self.popitem(last=False)

    def recent(self, key: K) -> V | None:
        """The entry's value, counted as a use; None if not held."""
        found = self.get(key)
        if found is not None and self.warm:
            self.move_to_end(key)
        return found


def kept_in(holder: dict[str, Any], key: str, bound: int) -> RecentCache[Any, Any]:
    """The RecentCache at `holder[key]` (a format's state in its route table),
    made empty, of `bound` entries, the first time it is asked for."""
    cache: RecentCache[Any, Any] | None = holder.get(key)
    if cache is None:
        cache = holder[key] = RecentCache(bound)
    return cache
