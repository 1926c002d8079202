"""The stores hold series ids by recency, bounded (a fleet of a million ids
must not hold a million in memory): a series not held is found again in the
database, never made twice, on both engines."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ingestd.events import Reading
from ingestd.store import series
from ingestd.store.base import Store


def reading(sensor: str, ts_ns: int, value: float = 1.0) -> Reading:
    return Reading(sensor, "t", ts_ns, value, f"s/{sensor}", "", "")


async def test_a_series_forgotten_is_found_again_not_made_twice(
    new_store: Callable[[], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(series, "SERIES_KEPT", 10)
    async with new_store() as store:
        for i in range(100):
            async with store.batch() as tx:
                await tx.add_readings([reading(f"s{i}", 10**18 + i)])
        assert len(store.series_ids) == 10  # type: ignore[attr-defined]
        async with store.batch() as tx:
            # s0 was forgotten long ago: a new reading and a redelivered one.
            await tx.add_readings([reading("s0", 10**18 + 1000), reading("s0", 10**18)])
        assert (tx.inserted, tx.duplicates, tx.conflicts) == (1, 1, [])
    async with new_store() as store:  # and at open, only the most recent
        assert len(store.series_ids) == 10  # type: ignore[attr-defined]
        async with store.batch() as tx:
            await tx.add_readings([reading("s1", 10**18 + 1)])  # forgotten, redelivered
        assert (tx.inserted, tx.duplicates) == (0, 1)


async def test_an_open_holds_the_most_recent_series_with_their_ids(
    new_store: Callable[[], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    # More than one read of 4,096 rows at open, and evictions of an eighth.
    monkeypatch.setattr(series, "SERIES_KEPT", 5000)
    async with new_store() as store:
        async with store.batch() as tx:
            # Names in the order a batch makes them (it sorts new keys).
            await tx.add_readings([reading(f"s{i:05}", 10**18 + i) for i in range(9000)])
        made = dict(store.series_ids)  # type: ignore[attr-defined]
        assert len(made) <= 5000
    async with new_store() as store:
        held = dict(store.series_ids)  # type: ignore[attr-defined]
        assert len(held) == 5000
        assert {k[0] for k in held} == {f"s{i:05}" for i in range(4000, 9000)}
        assert all(made[k] == v for k, v in held.items() if k in made)
        assert list(held.values()) == sorted(held.values())  # the oldest first
        async with store.batch() as tx:
            await tx.add_readings([reading(f"s{i:05}", 10**18 + i) for i in range(0, 9000, 7)])
        assert (tx.inserted, tx.duplicates) == (0, len(range(0, 9000, 7)))


@pytest.mark.parametrize("new_store", ["postgres"], indirect=True)
async def test_a_key_forgotten_by_another_batch_mid_lookup_is_still_used(
    new_store: Callable[[], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two PostgreSQL batches in flight (the writer's default): A finds one key
    # known and one new; while A makes the new one (an await), B commits new
    # series and the cache forgets its oldest eighth, the key A counted as
    # known among them. A used to fail on a KeyError, and the daemon exited.
    monkeypatch.setattr(series, "SERIES_KEPT", 8)
    async with new_store() as store:
        async with store.batch() as tx:
            await tx.add_readings([reading(f"old{i}", 10**18 + i) for i in range(8)])
        assert ("old0", "t", "", "") in store.series_ids  # type: ignore[attr-defined]
        async with store.batch() as a:
            begin = a._begin  # type: ignore[attr-defined]  # noqa: SLF001

            async def b_commits_meanwhile() -> None:
                async with store.batch() as b:
                    await b.add_readings([reading("newB", 10**18)])
                assert ("old0", "t", "", "") not in store.series_ids  # type: ignore[attr-defined]
                await begin()

            a._begin = b_commits_meanwhile  # type: ignore[attr-defined]  # noqa: SLF001
            await a.add_readings([reading("old0", 2 * 10**18), reading("nA", 2 * 10**18)])
        assert a.inserted == 2
