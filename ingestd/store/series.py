"""The series ids a store keeps in memory: a bounded cache of the most
recently used (sensor, metric, tags, unit) keys."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

from ingestd.events import Reading
from ingestd.pending import SeriesKey

# Series ids a store keeps in memory (the most recent); one not held is looked
# up (or made) in the database, through its index, by the batch that needs it.
SERIES_KEPT = 262144


def series_key(sensor: str, metric: str, tags: str, unit: str, shared: dict[str, str]) -> SeriesKey:
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


class SeriesIds(dict[SeriesKey, int]):
    """Series ids by key, at most `bound`: past it, the eighth held longest
    is forgotten (looked up again in the database when next needed).

    A plain dict: a store's lookups never count as uses (a batch reads it
    with `[]`, `get` and `in`), so insertion order is the order to forget in,
    and an OrderedDict's links (~56 bytes an entry, ~15 MB at SERIES_KEPT)
    bought nothing. An eighth at a time, deleted from the front in place: one
    entry at a time made each deletion skip the dead slots before it.
    (Copying what is kept into a fresh, smaller table instead was measured
    too: no lower peak RSS, as each copy briefly held two tables.)"""

    __slots__ = ("bound",)

    def __init__(self, bound: int = SERIES_KEPT) -> None:
        super().__init__()
        self.bound = bound

    def __setitem__(self, key: SeriesKey, value: int) -> None:
        dict.__setitem__(self, key, value)
        if len(self) > self.bound:
            for old in list(islice(self, max(1, self.bound // 8))):
                del self[old]

    def update(self, other: Mapping[SeriesKey, int]) -> None:  # type: ignore[override]
        for key, value in other.items():
            self[key] = value


def held_ids(
    readings: Iterable[Reading], known: Mapping[SeriesKey, int], new: Mapping[SeriesKey, int]
) -> tuple[dict[SeriesKey, int], list[SeriesKey]]:
    """The ids of the readings' series that `known` (the store's cache) or
    `new` (the batch's own) hold, taken now, and the keys of those neither
    holds, sorted (the order new series are made in)."""
    ids: dict[SeriesKey, int] = {}
    missing: set[SeriesKey] = set()
    for r in readings:
        key = (r.sensor, r.metric, r.tags, r.unit)
        if key not in ids:
            sid = known.get(key) or new.get(key)
            if sid is None:
                missing.add(key)
            else:
                ids[key] = sid
    return ids, sorted(missing)


def series_cache() -> SeriesIds:
    return SeriesIds(SERIES_KEPT)


def remember(cache: SeriesIds, rows: Iterable[Sequence[Any]], shared: dict[str, str]) -> None:
    """Series rows (sensor, metric, tags, unit, id) into `cache`, the oldest
    first; `shared` holds their strings for the whole load (series_key)."""
    for sensor, metric, tags, unit, sid in rows:
        cache[series_key(sensor, metric, tags, unit, shared)] = sid
