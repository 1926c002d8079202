"""The series cache's keys share their strings (a device's sensor once for
all its metrics) without making them immortal: on CPython 3.12 `sys.intern`
pins a string for good, and a flood of new device ids through a bounded cache
grew memory without bound (bench.daemon_ids on 3.12.1: RSS 206 -> 239 -> 277
MB at 250k / 500k / 750k ids, against a flat 211 before interning)."""

from __future__ import annotations

import gc
import sys
import weakref

from ingestd.store import series


def _fresh(*parts: str) -> str:
    """A string built at run time: a new object each call, never a constant."""
    return "".join(parts)


def test_a_devices_metrics_share_one_sensor_string() -> None:
    rows = [(_fresh("dev", "1"), _fresh("m", str(k)), "", _fresh("C", "el"), k) for k in range(5)]
    assert rows[0][0] is not rows[1][0]
    cache = series.series_cache()
    series.remember(cache, rows, {})
    keys = list(cache)
    assert len({id(k[0]) for k in keys}) == 1, "one sensor string for the device's 5 series"
    assert len({id(k[3]) for k in keys}) == 1, "one unit string"
    assert dict(cache) == {(r[0], r[1], r[2], r[3]): r[4] for r in rows}


def test_a_key_evicted_from_the_cache_frees_its_strings() -> None:
    class Probe(str):  # a str that can be watched (str itself takes no weak reference)
        __slots__ = ("__weakref__",)

    cache = series.SeriesIds(4)
    sensor = _fresh("review-28-", "device-", "000001")
    key = series.series_key(sensor, "t", "", "", {})
    # An immortal object's reference count is pinned at a huge value (3.12).
    assert sys.getrefcount(key[0]) < 1_000_000, "the sensor string is immortal: never freed"
    cache[key] = 1
    probe = Probe(_fresh("probe-", "device"))
    watched = weakref.ref(probe)
    cache[series.series_key(probe, "t", "", "", {})] = 2
    del key, sensor, probe
    for i in range(10):  # evicts both
        cache[series.series_key(f"other-{i}", "t", "", "", {})] = i
    gc.collect()
    assert watched() is None, "an evicted key's sensor string is still held"


def test_the_cache_keeps_its_bound_forgetting_the_longest_held_first() -> None:
    cache = series.SeriesIds(16)
    for i in range(16):
        cache[(f"s{i}", "t", "", "")] = i
    assert len(cache) == 16
    _ = cache[("s0", "t", "", "")]  # a lookup is not a use: s0 stays first to go
    cache.update({("s16", "t", "", ""): 16})
    # Past the bound, the two (an eighth) held longest go, in one step.
    assert [k[0] for k in cache] == [f"s{i}" for i in range(2, 17)]
    for i in range(17, 1000):
        cache[(f"s{i}", "t", "", "")] = i
        assert len(cache) <= 16
    assert cache[("s999", "t", "", "")] == 999
    assert ("s983", "t", "", "") not in cache
    assert all(cache[k] == int(k[0][1:]) for k in cache)
