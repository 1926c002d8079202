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
    assert cache.full
    for i in range(100_000):
        cache[i] = i
        if i % 500 == 0:
            assert cache.recent(-1) == -1
    assert len(cache) == 1000
    assert -1 in cache


def test_before_it_is_full_entries_stand_in_insertion_order() -> None:
    """Nothing is evicted below the bound, so a hit moves nothing until then;
    an entry used only before is evicted once, then kept by its uses."""
    cache: RecentCache[str, int] = RecentCache(2)
    cache["a"] = 1
    assert cache.recent("a") == 1
    assert not cache.full
    cache["b"] = 2
    assert cache.full
    cache["c"] = 3  # "a" goes, though used: it was used before the cache filled
    assert list(cache) == ["b", "c"]
    assert cache.recent("b") == 2  # now a use counts
    cache["a"] = 1
    assert list(cache) == ["b", "a"]


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
    full = False  # a hit moves an entry once the cache has filled
    for op, key in ops:
        if op == "get":
            assert cache.recent(key) == (key if key in model else None)
            if key in model and full:
                model.remove(key)
                model.append(key)
        else:
            cache[key] = key
            if key in model:
                model.remove(key)
            model.append(key)
            full = full or len(model) >= bound
            del model[:-bound]
        assert list(cache) == model
        assert cache.full == full
