"""Rollups kept by the store's batches, against an independent computation from
the readings stored: late readings, redeliveries, conflicts, counter resets
and glitches, on each engine."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestd import pending
from ingestd.events import Reading
from ingestd.rollups import RollupPlan, deltas
from ingestd.store.base import Store
from ingestd.store.postgres import PostgresStore
from ingestd.store.postgres.queries import PostgresReader
from ingestd.store.sqlite import SqliteStore
from ingestd.store.sqlite.queries import SqliteReader
from ingestd.tools.history import rollup_query
from ingestd.tools.rollups import rebuild_postgres, rebuild_sqlite
from tests.support.db import DbReader
from tests.support.postgres import PgReader

NS = 1_000_000_000
T0 = 1_700_000_000 // 3600 * 3600  # an hour's start
PLAN = RollupPlan((60, 3600), {60: 90.0, 3600: 0.0}, frozenset({"energy"}))


Engine = tuple[Callable[[], Store], Callable[[str], list[tuple[object, ...]]], Callable[[], int]]


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    """A store of the engine with the plan, what its database holds, and
    `ingestd rollups rebuild` of all of it."""
    if request.param == "sqlite":
        path = tmp_path / "x.db"
        return (
            lambda: SqliteStore(path, rollups=PLAN),
            DbReader(path).rows,
            lambda: rebuild_sqlite(str(path), PLAN, 0),
        )
    url = request.getfixturevalue("pg_url")
    return (
        lambda: PostgresStore(url, rollups=PLAN),
        PgReader(url).rows,
        lambda: asyncio.run(rebuild_postgres(url, None, PLAN, 0)),
    )


@pytest.fixture(params=["merged by the batch", "pending, closed"])
def gauge_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a gauge's readings reach the rollups: a dense batch merges
    its rows itself, a sparse one leaves its readings pending
    (`ingestd.pending.dense`); forced one way or the other."""
    monkeypatch.setattr(pending, "DENSE", 0 if request.param.startswith("merged") else 10**9)
    return str(request.param)


def gauge() -> list[Reading]:
    """3 hours of a 10 s gauge."""
    return [
        Reading("dev1", "temp", (T0 + 10 * i) * NS, float((i * 7) % 23) - 5.5)
        for i in range(3 * 360)
    ]


def counter() -> list[Reading]:
    """3 hours of a 60 s counter: a glitch (0 once) at minute 50, a reset at 100."""
    out, total = [], 1000.0
    for i in range(180):
        total += i % 5 + 1
        if i == 100:
            total = 3.0  # the meter restarted
        value = 0.0 if i == 50 else total
        out.append(Reading("dev1", "energy", (T0 + 60 * i + 5) * NS, value))
    return out


def batches(readings: list[Reading], late: set[int], size: int = 37) -> Iterator[list[Reading]]:
    on_time = [r for i, r in enumerate(readings) if i not in late]
    for i in range(0, len(on_time), size):
        yield on_time[i : i + size]


def expected(
    readings: list[Reading], counters: set[str]
) -> dict[tuple[int, str, int], tuple[Any, ...]]:
    """Every (width, metric, bucket) row, computed from the readings as stored."""
    by_metric: dict[str, list[Reading]] = defaultdict(list)
    for r in readings:
        by_metric[r.metric].append(r)
    out = {}
    for width in (60, 3600):
        for metric, unordered in by_metric.items():
            rs = sorted(unordered, key=lambda r: r.ts_ns)
            inc: dict[int, float] = defaultdict(float)
            if metric in counters:
                for r, d in zip(rs, deltas([r.value for r in rs]), strict=True):
                    inc[r.ts_ns // NS // width * width] += d
            buckets: dict[int, list[Reading]] = defaultdict(list)
            for r in rs:
                buckets[r.ts_ns // NS // width * width].append(r)
            for b, group in buckets.items():
                values = [r.value for r in group]
                out[(width, metric, b)] = (
                    len(values),
                    min(values),
                    max(values),
                    round(sum(values) / len(values), 9),
                    group[0].value,
                    group[-1].value,
                    round(inc[b], 9) if metric in counters else None,
                )
    return out


def stored(
    rows: Callable[[str], list[tuple[object, ...]]],
) -> dict[tuple[int, str, int], tuple[Any, ...]]:
    out = {}
    for width, view in ((60, "rollup_1m"), (3600, "rollup_1h")):
        found: list[Any] = rows(
            f"SELECT metric, bucket, count, min, max, mean, first, last, increase FROM {view}"
        )
        for metric, bucket, n, lo, hi, mean, first, last, inc in found:
            out[(width, str(metric), int(bucket))] = (
                n,
                lo,
                hi,
                round(float(mean), 9),
                first,
                last,
                None if inc is None else round(float(inc), 9),
            )
    return out


async def close_all(store: Store) -> None:
    """Close every pending reading into the rollups, as the daemon does."""
    while await store.close_rollups(1000):
        pass


def test_rollups_equal_an_independent_computation(engine: Engine, gauge_path: str) -> None:
    make, rows, rebuild = engine
    g, c = gauge(), counter()
    late_g, late_c = {1, 500}, {30, 51, 120}  # readings 2 hours late (and the glitch's neighbours)
    conflict = Reading("dev1", "temp", g[7].ts_ns, g[7].value + 100)

    async def run() -> None:
        async with make() as store:
            plan = list(batches(g, late_g)) + list(batches(c, late_c, 11))
            random.Random(5).shuffle(plan)  # the two series interleaved, each in order
            plan.sort(key=lambda b: (b[0].metric, b[0].ts_ns))
            order = [
                b
                for pair in zip(plan[: len(plan) // 2], plan[len(plan) // 2 :], strict=False)
                for b in pair
            ]
            order += plan[2 * (len(plan) // 2) :]
            for i, batch in enumerate(order):
                async with store.batch() as tx:
                    await tx.add_readings(batch)
                if i % 7 == 3:  # closes of a few pending rows now and then, as it goes
                    await store.close_rollups(50)
                if i == 10:
                    async with store.batch() as tx:  # a redelivery
                        await tx.add_readings(order[3])
            async with store.batch() as tx:  # the late ones, 2 hours on
                await tx.add_readings(
                    [g[i] for i in sorted(late_g)] + [c[i] for i in sorted(late_c)]
                )
            async with store.batch() as tx:  # a redelivery of those, and a conflict
                await tx.add_readings(
                    [g[i] for i in sorted(late_g)] + [c[i] for i in sorted(late_c)] + [conflict]
                )
            assert len(tx.conflicts) == 1  # written at the commit on PostgreSQL
            await close_all(store)

    asyncio.run(run())
    want = expected(g + c, {"energy"})
    got = stored(rows)
    assert set(got) == set(want)
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, list(wrong.items())[:5]
    # Computed again from the raw readings: the same rows.
    assert rebuild() == len(want)
    assert stored(rows) == got
    hourly = sorted(v[6] for k, v in want.items() if k[0] == 3600 and k[1] == "energy")
    # The glitch added nothing; the reset restarted from 0, not a negative spike.
    assert all(v is not None and v >= 0 for v in hourly)


def test_raw_retention_per_sensor_glob_leaves_the_rollups(engine: Engine, gauge_path: str) -> None:
    make, rows, rebuild = engine
    now = time.time()
    ages = (10.0, 3.0, 0.5)  # days

    async def run() -> None:
        async with make() as store:
            async with store.batch() as tx:
                await tx.add_readings(
                    [
                        Reading(sensor, "t", int((now - age * 86400) * NS), age)
                        for sensor in ("lab-1", "tmp-1", "x")
                        for age in ages
                    ]
                )
            store.keep = (("lab-*", 0.0), ("tmp-*", 1.0))  # forever; one day
            await store.upkeep(now - 5 * 86400, 100)  # the rest: 5 days
            await close_all(store)  # pending when their raw readings went: counted all the same

    asyncio.run(run())
    kept = sorted(rows("SELECT sensor, value FROM readings"))
    assert kept == [
        ("lab-1", 0.5), ("lab-1", 3.0), ("lab-1", 10.0), ("tmp-1", 0.5), ("x", 0.5), ("x", 3.0)
    ]  # fmt: skip
    # Every bucket's rollup is still there: raw retention never removes one.
    before = sorted(rows("SELECT * FROM rollup_1m"))
    assert len(before) == 9
    # Nor does a rebuild: buckets whose raw readings are gone keep their rollup.
    rebuild()
    assert sorted(rows("SELECT * FROM rollup_1m")) == before


def test_a_rebuild_keeps_pending_readings_whose_raw_readings_retention_took(
    engine: Engine, gauge_path: str
) -> None:
    """Readings still pending when retention deleted their raw readings: a
    rebuild counts them (it closes them first), as a close would have."""
    make, rows, rebuild = engine
    now = time.time()

    async def run() -> None:
        async with make() as store:
            async with store.batch() as tx:
                await tx.add_readings(
                    [Reading("x", "t", int((now - age * 86400) * NS), age) for age in (10.0, 0.5)]
                )
            await store.upkeep(now - 5 * 86400, 100)  # the 10-day-old one's raw reading goes

    asyncio.run(run())
    assert rows("SELECT value FROM readings") == [(0.5,)]
    rebuild()
    assert sorted(rows("SELECT count, min FROM rollup_1m")) == [(1, 0.5), (1, 10.0)]


def test_a_rebuild_from_a_time_credits_a_counter_as_the_daemon_did(engine: Engine) -> None:
    make, rows, _ = engine
    hour = T0 + 3600
    # 1000, then 0 once (a glitch) just before the hour, then 1001, 1002.
    points = [(hour - 120, 1000.0), (hour - 60, 0.0), (hour, 1001.0), (hour + 60, 1002.0)]

    async def run() -> None:
        async with make() as store:
            for ts, v in points:  # one batch each: the glitch decided by the next
                async with store.batch() as tx:
                    await tx.add_readings([Reading("m", "energy", ts * NS, v)])
            assert store.pending_readings == 0  # a counter's rows are kept by its batch

    asyncio.run(run())
    query = f"SELECT increase FROM rollup_1h WHERE bucket = {hour}"
    assert rows(query) == [(2.0,)]
    store_kind = "sqlite" if isinstance(make(), SqliteStore) else "postgres"
    if store_kind == "sqlite":
        rebuild_sqlite(str(make().path), PLAN, hour)  # type: ignore[attr-defined]
    else:
        asyncio.run(rebuild_postgres(make().url, None, PLAN, hour))  # type: ignore[attr-defined]
    assert rows(query) == [(2.0,)]


def test_a_counter_below_zero_adds_nothing_on_a_reset() -> None:
    assert deltas([-5.0, -10.0, -20.0, -3.0, -50.0]) == [0.0, 0.0, 0.0, 7.0, 0.0]
    assert deltas([5.0, 0.0, -2.0, 4.0]) == [0.0, 0.0, 0.0, 4.0]  # -2: a glitch


def test_many_counter_series_in_one_batch(engine: Engine) -> None:
    """Each batch holds readings of 12 counters (their windows are read in
    one statement), some late, some redelivered: every row as computed."""
    make, rows, _ = engine
    sensors = [f"m{i:02d}" for i in range(12)]
    readings = {
        s: [
            Reading(s, "energy", (T0 + 30 * i + k) * NS, float(0 if i % 17 == 16 else i * (k + 1)))
            for i in range(300)
        ]
        for k, s in enumerate(sensors)
    }
    late = {s: set(range(k * 7, k * 7 + 5)) for k, s in enumerate(sensors)}
    on_time = [r for s in sensors for i, r in enumerate(readings[s]) if i not in late[s]]
    on_time.sort(key=lambda r: (r.ts_ns, r.sensor))

    async def run() -> None:
        async with make() as store:
            for i in range(0, len(on_time), 97):
                async with store.batch() as tx:
                    await tx.add_readings(on_time[i : i + 97])
            again = [readings[s][i] for s in sensors for i in sorted(late[s])] + on_time[:50]
            for _ in range(2):  # late, then redelivered
                async with store.batch() as tx:
                    await tx.add_readings(again)
            await close_all(store)

    asyncio.run(run())
    found: list[Any] = rows(
        "SELECT sensor, bucket, count, min, max, first, last, increase FROM rollup_1m "
        "UNION ALL SELECT sensor, bucket + 1, count, min, max, first, last, increase "
        "FROM rollup_1h"
    )
    got = {
        (str(s), int(b)): (n, lo, hi, first, last, round(float(inc), 9))
        for s, b, n, lo, hi, first, last, inc in found
    }
    want = {}
    for s in sensors:
        for (width, _, bucket), v in expected(readings[s], {"energy"}).items():
            want[(s, bucket + (width == 3600))] = (v[0], v[1], v[2], v[4], v[5], v[6])
    assert got == want


def test_a_rebuild_takes_the_pending_readings_once(engine: Engine, gauge_path: str) -> None:
    """Pending readings before and after `--since`, some closed, some not: a
    rebuild from that time gives the rows of an independent computation, and
    leaves nothing pending to count again."""
    make, rows, _ = engine
    g = gauge()
    since = T0 + 3600

    async def run(after: bool) -> int:
        async with make() as store:
            if not after:
                for batch in batches(g, set(), 53):
                    async with store.batch() as tx:
                        await tx.add_readings(batch)
                    if batch[0].ts_ns < (T0 + 1800) * NS:
                        await close_all(store)  # the first half hour closed, the rest not
                return 0
            return await store.close_rollups(1000)

    asyncio.run(run(after=False))
    if isinstance(make(), SqliteStore):
        rebuild_sqlite(str(make().path), PLAN, since)  # type: ignore[attr-defined]
    else:
        asyncio.run(rebuild_postgres(make().url, None, PLAN, since))  # type: ignore[attr-defined]
    assert asyncio.run(run(after=True)) == 0
    assert stored(rows) == expected(g, set())


def test_query_every_adds_what_is_pending(engine: Engine, gauge_path: str) -> None:
    """Before any close, `query --every`'s rows (the reader's, with the
    pending readings merged in) are the independent computation's, for the
    interval kept, one summed from it, and a limit."""
    make, _, _ = engine
    g = gauge()

    async def run() -> None:
        async with make() as store:
            for batch in batches(g, set(), 29):
                async with store.batch() as tx:
                    await tx.add_readings(batch)
                if batch[0].ts_ns < (T0 + 3600) * NS:
                    await close_all(store)  # the first hour closed, the rest pending

    asyncio.run(run())
    store = make()
    reader = (
        SqliteReader(store.path) if isinstance(store, SqliteStore) else PostgresReader(store.url)  # type: ignore[attr-defined]
    )
    want = expected(g, set())
    try:
        for width in (60, 3600):
            rows = list(reader.rollup_rows("dev1", "temp", width, T0, T0 + 4 * 3600, None))
            got = {
                (width, r.metric, r.bucket): (
                    r.n,
                    r.min,
                    r.max,
                    round(r.sum / r.n, 9),
                    r.first,
                    r.last,
                    None,
                )
                for r in rows
            }
            assert got == {k: v for k, v in want.items() if k[0] == width}
        table = rollup_query(reader, "dev1", "temp", T0, T0 + 4 * 3600, "2h", (60, 3600), limit=1)
        assert [row[4] for row in table.rows] == [720]  # count: two hours of a 10 s gauge
    finally:
        reader.close()


def test_a_tie_of_times_across_a_pending_and_a_later_batch_keeps_the_readings_order(
    engine: Engine,
) -> None:
    """A reading pending, then a message that repeats it and adds another at
    the same time (seq 1) with enough others to make a dense batch: last is
    the seq 1 reading's, as `rebuild` (and the raw readings) say, not the
    one merged last. (A reviewer's case: the dense batch merged before the
    pending reading was closed, and last came out 1.0.)"""
    make, rows, rebuild = engine
    t = T0 + 30

    async def run() -> None:
        async with make() as store:
            async with store.batch() as tx:
                await tx.add_readings([Reading("tie", "temp", t * NS, 1.0)])
            amended = [
                Reading("tie", "temp", t * NS, 1.0),
                Reading("tie", "temp", t * NS, 5.0, seq=1),
                *(Reading("tie", "temp", (T0 + 10 + i) * NS, 20.0 + i) for i in range(7)),
            ]
            async with store.batch() as tx:
                await tx.add_readings(amended)
            await close_all(store)

    asyncio.run(run())
    query = f"SELECT count, first, last FROM rollup_1m WHERE bucket = {T0}"
    assert rows(query) == [(9, 20.0, 5.0)]
    rebuild()
    assert rows(query) == [(9, 20.0, 5.0)]


def test_sums_beyond_float8_are_infinite_and_closing_goes_on(
    engine: Engine, gauge_path: str
) -> None:
    """Readings near float8's limits are finite, so accepted; a sum past the
    range is +-Infinity on every engine, as Python's is, and a sum already
    infinite stays so. PostgreSQL's float8 arithmetic raised instead (on
    overflow; on underflow, for a product): in a close's sum (every pending
    row behind it stuck, the backlog growing), in a merge into a stored row,
    or in a counter's increase added by a batch (the batch retried for ever).
    SQLite stored inf + -inf, NaN, as NULL: a NOT NULL failure, for ever."""
    make, rows, _ = engine
    big, tiny = 1e308, 5e-324

    async def run() -> None:
        async with make() as store:
            for k in range(4):
                async with store.batch() as tx:
                    await tx.add_readings(
                        [
                            Reading("huge", "up", (T0 + k) * NS, big),
                            Reading("huge", "down", (T0 + k) * NS, -big),
                            Reading("huge", "both", (T0 + k) * NS, big if k < 2 else -big),
                            Reading("small", "tiny", (T0 + k) * NS, tiny),
                            Reading("small", "temp", (T0 + k) * NS, 1.5),
                        ]
                    )
                if k < 2:  # each alone, then merged into the stored row; the rest together
                    await close_all(store)
            # A counter that rose by 1.7e308, was reset, and rose by 1.6e308:
            # the increases added by two batches.
            energy = [(10 + i, v) for i, v in enumerate([0.0, 1.7e308, 1.0, 1.6e308])]
            for part in (energy[:2], energy[2:]):
                async with store.batch() as tx:
                    await tx.add_readings(
                        [Reading("huge", "energy", (T0 + s) * NS, v) for s, v in part]
                    )
            await close_all(store)
            assert await store.close_rollups(1000) == 0

    asyncio.run(run())
    got = rows(
        "SELECT sensor, metric, count, sum, increase FROM rollup_1m "
        f"WHERE bucket = {T0} ORDER BY sensor, metric"
    )
    inf = float("inf")
    assert got == [
        ("huge", "both", 4, inf, None),  # inf, then -inf merged into it
        ("huge", "down", 4, -inf, None),
        ("huge", "energy", 4, inf, inf),
        ("huge", "up", 4, inf, None),
        ("small", "temp", 4, 6.0, None),
        ("small", "tiny", 4, 4 * tiny, None),
    ]
