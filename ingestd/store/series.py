"""The series ids a store keeps in memory: a bounded cache of the most
recently used (sensor, metric, tags, unit) keys."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ingestd.recent import RecentCache

# Series ids a store keeps in memory (the most recent); one not held is looked
# up (or made) in the database, through its index, by the batch that needs it.
SERIES_KEPT = 262144


def series_key(
    sensor: str, metric: str, tags: str, unit: str, shared: dict[str, str]
) -> tuple[str, str, str, str]:
    """A series' key as a store keeps it, its strings shared through `shared`,
    a dict of the caller's for one open or one batch: a device's metrics then
    hold one sensor string, not one each as the database returns them, and a
    metric's name is held once a batch (~210 bytes a series held where the
    database's own strings took ~450). Not `sys.intern`: on CPython 3.12 an
    interned string is immortal, and a flood of new ids would grow memory
    past the cache's bound."""
    return (
        shared.setdefault(sensor, sensor),
        shared.setdefault(metric, metric),
        shared.setdefault(tags, tags),
        shared.setdefault(unit, unit),
    )


def series_cache(rows: Iterable[Sequence[Any]]) -> RecentCache[tuple[str, str, str, str], int]:
    """The series ids a store starts with: (sensor, metric, tags, unit, id)
    rows, the most recent first (at most SERIES_KEPT)."""
    cache: RecentCache[tuple[str, str, str, str], int] = RecentCache(SERIES_KEPT)
    shared: dict[str, str] = {}
    for sensor, metric, tags, unit, sid in reversed(list(rows)):
        cache[series_key(sensor, metric, tags, unit, shared)] = sid
    return cache
