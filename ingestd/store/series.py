"""The series ids a store keeps in memory: a bounded cache of the most
recently used (sensor, metric, tags, unit) keys."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from sys import intern
from typing import Any

from ingestd.recent import RecentCache

# Series ids a store keeps in memory (the most recent); one not held is looked
# up (or made) in the database, through its index, by the batch that needs it.
SERIES_KEPT = 262144


def series_key(sensor: str, metric: str, tags: str, unit: str) -> tuple[str, str, str, str]:
    """A series' key as a store keeps it: the strings interned, shared by the
    keys that repeat them (a device's sensor, a metric's name): ~170 bytes a
    series held where the database's own strings took ~300."""
    return (intern(sensor), intern(metric), intern(tags), intern(unit))


def series_cache(rows: Iterable[Sequence[Any]]) -> RecentCache[tuple[str, str, str, str], int]:
    """The series ids a store starts with: (sensor, metric, tags, unit, id)
    rows, the most recent first (at most SERIES_KEPT)."""
    cache: RecentCache[tuple[str, str, str, str], int] = RecentCache(SERIES_KEPT)
    for sensor, metric, tags, unit, sid in reversed(list(rows)):
        cache[series_key(sensor, metric, tags, unit)] = sid
    return cache
