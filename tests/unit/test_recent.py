"""RecentCache: bounded by recency, one entry evicted at a time, never cleared."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingestd.recent import RecentCache


def test_an_insert_past_the_bound_evicts_the_least_recently_used_one() -> None:
    cache: RecentCache[str, int] = RecentCache(3)
    cache["a"], cache["b"], cache["c"] = 1, 2, 3
    assert cache.recent("a") == 1  # used: now the most recent
    cache["d"] = 4
    assert list(cache) == ["c", "a", "d"]  # "b" alone went
    cache["c"] = 30  # a replacement is a use too
    cache["e"] = 5
    assert dict(cache) == {"d": 4, "c": 30, "e": 5}
    assert cache.recent("zz") is None


def test_a_flood_of_new_keys_costs_a_used_key_nothing() -> None:
    cache: RecentCache[int, int] = RecentCache(1000)
    cache.update((-k, -k) for k in range(2, 1001))
    cache[-1] = -1
    assert cache.warm
    for i in range(100_000):
        cache[i] = i
        if i % 500 == 0:
            assert cache.recent(-1) == -1
    assert len(cache) == 1000
    assert -1 in cache


def test_uses_count_from_half_full_on() -> None:
    """Below half the bound a hit moves nothing (nothing is near eviction);
    from half full on, a use makes an entry the most recent."""
    cache: RecentCache[str, int] = RecentCache(4)
    cache["a"] = 1
    assert cache.recent("a") == 1
    assert not cache.warm
    cache["b"] = 2
    assert cache.warm
    assert cache.recent("a") == 1  # now a use counts
    cache["c"] = 3
    cache["d"] = 4
    cache["e"] = 5  # "b" goes: "a" was used since
    assert list(cache) == ["a", "c", "d", "e"]


def test_a_busy_entry_inserted_first_outlives_a_flood_of_new_ones() -> None:
    """Found by review: with uses counted only once the cache was full, the
    busiest entry, inserted first, was the first evicted."""
    cache: RecentCache[int, int] = RecentCache(1000)
    cache[-1] = -1
    for i in range(100_000):
        cache[i] = i
        if i % 10 == 0:
            assert cache.recent(-1) == -1


def test_update_keeps_the_bound() -> None:
    cache: RecentCache[int, int] = RecentCache(10)
    cache.update((i, i) for i in range(100))
    assert list(cache) == list(range(90, 100))


def test_a_cache_holds_at_least_one_entry() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RecentCache(0)


@given(
    st.integers(1, 8),
    st.lists(st.tuples(st.sampled_from(["get", "put"]), st.integers(0, 15)), max_size=200),
)
def test_it_behaves_as_a_least_recently_used_list(bound: int, ops: list[tuple[str, int]]) -> None:
    cache: RecentCache[int, int] = RecentCache(bound)
    model: list[int] = []  # least recent first
    warm = False  # a hit moves an entry once the cache has held half its bound
    for op, key in ops:
        if op == "get":
            assert cache.recent(key) == (key if key in model else None)
            if key in model and warm:
                model.remove(key)
                model.append(key)
        else:
            cache[key] = key
            if key in model:
                model.remove(key)
            model.append(key)
            warm = warm or len(model) >= max(1, bound // 2)
            del model[:-bound]
        assert list(cache) == model
        assert cache.warm == warm
