"""PostgreSQL's close aggregates pending readings in the server
(`ingestd.store.postgres.rolling.close`): its rows must be the ones ingestd's
own aggregate (`ingestd.rollups.aggregate`, SQLite's close) makes of the same
readings in the same order, ties of times included."""

from __future__ import annotations

import asyncio
import math
import random

import asyncpg
import pytest

from ingestd.pending import pack
from ingestd.rollups import NS, RollupPlan, aggregate
from ingestd.store.postgres import PostgresStore
from ingestd.store.postgres.rolling import close

PLAN = RollupPlan(widths=(60, 3600))
T0 = 1_699_920_000  # a whole day (2023-11-14, UTC)


def _pending(rng: random.Random) -> list[list[tuple[int, int, int, float]]]:
    """Pending rows of 1-300 records: 40 series, times from a small set (many
    ties, across a minute's, 90 s's, an hour's and a day's edge), seq 0-2, any
    value."""
    edges = (0, 59, 60, 61, 89, 90, 3599, 3600, 86399, 86400)
    stamps = [(T0 + s) * NS + k for s in edges for k in (0, 1)]
    return [
        [
            (rng.randrange(1, 41), rng.choice(stamps), rng.randrange(3), _value(rng))
            for _ in range(rng.randrange(1, 300))
        ]
        for _ in range(rng.randrange(5, 40))
    ]


def _value(rng: random.Random) -> float:
    """Mostly any value; now and then the smallest float8s (a product of them
    underflows, which PostgreSQL raises) or one that sums inexactly."""
    special = (5e-324, -5e-324, 2.2250738585072014e-308, 0.30000000000000004)
    return rng.choice(special) if rng.random() < 0.1 else rng.uniform(-1e6, 1e6)


@pytest.mark.parametrize(
    "widths",
    [
        (60, 3600),
        # Widths that do not divide each other (60 and 90), a day; one alone.
        (60, 90, 3600, 86400),
        (3600,),
    ],
)
def test_the_servers_close_makes_ingestds_rows(pg_url: str, widths: tuple[int, ...]) -> None:
    """Every interval's rows are those of ingestd's own aggregate of the same
    readings in the same order, with the readings' times on buckets' edges."""
    plan = RollupPlan(widths=widths)

    async def run() -> None:
        store = PostgresStore(pg_url)
        await store.open()
        await store.close()
        conn = await asyncpg.connect(pg_url)
        try:
            for seed in range(12):
                rng = random.Random(seed)
                rows = _pending(rng)
                for records in rows:
                    await conn.execute(
                        "INSERT INTO rollup_pending (readings, records) VALUES ($1, $2)",
                        len(records), pack(records),
                    )  # fmt: skip
                everything = [r for records in rows for r in records]
                # Closes of a few pending rows each, then one of the rest: a row
                # merged into across closes (the stored merge) and in one.
                most = rng.choice([1, 250, len(everything)])
                closed = 0
                while True:
                    async with conn.transaction():
                        n = await close(conn, plan, most)
                    if n == 0:
                        break
                    closed += n
                assert closed == len(everything)
                want = aggregate(everything, plan.widths)
                got = {
                    (r[0], r[1], r[2]): list(r[3:11])
                    for r in await conn.fetch("SELECT * FROM rollups")
                }
                assert set(got) == set(want)
                for key, row in want.items():
                    n, lo, hi, total, first_ns, first, last_ns, last = got[key]
                    # A sum's order is the merges' (last bits), the rest exact.
                    assert math.isclose(total, row[3], rel_tol=1e-9, abs_tol=1e-6), key
                    assert (n, lo, hi, first_ns, first, last_ns, last) == (
                        row[0], row[1], row[2], row[4], row[5], row[6], row[7],
                    ), (seed, key)  # fmt: skip
                await conn.execute("TRUNCATE rollups")
        finally:
            await conn.close()

    asyncio.run(run())


def test_a_close_outlasts_a_batchs_statement_timeout(pg_url: str) -> None:
    """`store.statement_timeout_ms` bounds a batch's statements. A close
    aggregates up to 100,000 readings in one statement, longer than a batch
    takes: with a timeout a batch fits in, it failed every pass and the
    pending readings grew without end. It has at least a minute."""

    async def run() -> None:
        async with PostgresStore(pg_url, rollups=PLAN):  # the schema, at the default timeout
            pass
        conn = await asyncpg.connect(pg_url)
        try:
            for k in range(200):  # one series: the longest close of a chunk
                records = [(1, (T0 + k) * NS + i, 0, float(i)) for i in range(500)]
                await conn.execute(
                    "INSERT INTO rollup_pending (readings, records) VALUES ($1, $2)",
                    len(records), pack(records),
                )  # fmt: skip
        finally:
            await conn.close()
        store = PostgresStore(pg_url, rollups=PLAN, statement_timeout_ms=20)
        async with store:
            assert await store.close_rollups(100_000) == 100_000

    asyncio.run(run())


def test_a_close_whose_sum_overflows_is_aggregated_by_ingestd(pg_url: str) -> None:
    """PostgreSQL raises where a float8 sum overflows; that close is then
    ingestd's aggregate, exactly (sums included: in order, +-Infinity past
    the range), for every series in it, not only the one that overflowed."""
    records = [
        (1, T0 * NS, 0, 1e308), (2, T0 * NS, 0, 0.1), (3, T0 * NS, 0, 0.30000000000000004),
        (1, T0 * NS + 1, 0, 1e308), (2, T0 * NS + 1, 0, 0.2), (4, T0 * NS, 0, 1e308),
        (1, T0 * NS + 2, 0, -1e308), (4, T0 * NS + 1, 0, -1e308), (5, T0 * NS, 0, 5e-324),
    ]  # fmt: skip

    async def run() -> None:
        async with PostgresStore(pg_url, rollups=PLAN):
            pass
        conn = await asyncpg.connect(pg_url)
        try:
            for k in range(0, len(records), 2):
                part = records[k : k + 2]
                await conn.execute(
                    "INSERT INTO rollup_pending (readings, records) VALUES ($1, $2)",
                    len(part), pack(part),
                )  # fmt: skip
            async with conn.transaction():
                assert await close(conn, PLAN, 1000) == len(records)
            stored = await conn.fetch("SELECT * FROM rollups")
        finally:
            await conn.close()
        got = {(r[0], r[1], r[2]): list(r[3:11]) for r in stored}
        want = {k: v[:8] for k, v in aggregate(records, PLAN.widths).items()}
        assert got == want
        assert got[(60, 1, T0 // 60 * 60)][3] == float("inf")  # 1e308 + 1e308 - 1e308, in order
        assert got[(60, 2, T0 // 60 * 60)][3] == 0.1 + 0.2  # 0.30000000000000004, not 0.3

    asyncio.run(run())
