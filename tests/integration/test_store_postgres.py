"""The PostgreSQL store against a real server: the schema contract, concurrent
instances, partitions and retention, and the CLI's reader."""

from __future__ import annotations

import asyncio
import time

import pytest

from ingestd.errors import StoreError
from ingestd.events import NS, Reading, Rejected, SensorStatus
from ingestd.store.postgres import SCHEMA_VERSION, PostgresReader, PostgresStore
from ingestd.store.postgres.schema import DAY_NS, partitions
from tests.helpers import PgReader

NOW = time.time()


def _readings(sensor: str, n: int, start_ns: int, value: float = 1.0) -> list[Reading]:
    return [Reading(sensor, "t", start_ns + i * NS, value + i) for i in range(n)]


async def test_instances_starting_at_once_migrate_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    for s in stores:
        await s.close()
    db = PgReader(pg_url)
    # Each migration once, however many instances started at once.
    assert db.rows("SELECT version FROM ingestd_schema ORDER BY 1") == [
        (v,) for v in range(1, SCHEMA_VERSION + 1)
    ]
    # The contract users query: the readings view's columns.
    cols = db.rows(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'readings' "
        "ORDER BY ordinal_position"
    )
    assert [c for (c,) in cols] == [
        "sensor", "metric", "ts", "value", "tags", "unit", "ts_ns", "seq",
    ]  # fmt: skip


async def test_two_instances_creating_the_same_series_at_once_both_commit(pg_url: str) -> None:
    a, b = PostgresStore(pg_url), PostgresStore(pg_url)
    await a.open()
    await b.open()
    t0 = int(NOW) * NS
    # The same 200 new series from both, in opposite orders, at the same moment.
    keys = [f"s{i}" for i in range(200)]

    async def write(store: PostgresStore, order: list[str], offset: int) -> None:
        async with store.batch() as tx:
            await tx.add_readings([Reading(k, "t", t0 + offset, 1.0) for k in order])

    await asyncio.gather(write(a, keys, 0), write(b, keys[::-1], 1))
    await a.close()
    await b.close()
    db = PgReader(pg_url)
    assert db.count("series") == 200
    assert db.count() == 400


async def test_batches_are_idempotent_and_conflicts_quarantined(pg_url: str) -> None:
    t0 = int(NOW) * NS
    async with PostgresStore(pg_url) as store:
        first = _readings("a", 100, t0)
        async with store.batch() as tx:
            await tx.add_readings(first)
            await tx.add_rejected([Rejected("x", b"bad", "reason", NOW)])
            await tx.set_status(SensorStatus({"a": (7, 1, 3)}, {"a": 60.0}))
        assert (tx.inserted, tx.duplicates) == (100, 0)
        # A redelivery (and the same quarantine record again): nothing new.
        changed = Reading("a", "t", t0, 99.0)
        async with store.batch() as tx:
            await tx.add_readings([*first[:50], changed])
            await tx.add_rejected([Rejected("x", b"bad", "reason", NOW)])
        assert (tx.inserted, tx.duplicates, len(tx.conflicts)) == (0, 50, 1)
        assert "conflict: a different value (1) is stored" in tx.conflicts[0].reason
    db = PgReader(pg_url)
    assert db.count() == 100
    assert db.count("quarantine") == 2  # the reason once, the conflict once

    def read() -> None:  # the CLI's reader is synchronous: off this loop
        reader = PostgresReader(pg_url)
        try:
            (row,) = list(reader.sensors("a*"))
            assert (row.sensor, row.value, row.seq_gaps, row.seq_missing) == ("a", 100.0, 1, 3)
            assert len(list(reader.readings("a", "t", 0, 2**62, None))) == 100
            assert len(list(reader.readings("a", "t", 0, 2**62, 7))) == 7
            totals = reader.totals()
            assert (totals.readings, totals.series, totals.quarantined) == (100, 1, 2)
            with pytest.raises(StoreError, match="pg_dump"):
                reader.backup("/tmp/x.dump")
        finally:
            reader.close()

    await asyncio.to_thread(read)


async def test_partitions_ahead_and_retention_drops_whole_ones(pg_url: str) -> None:
    day0 = int(NOW) // 86400 * 86400
    clock = [float(day0 + 3600)]
    store = PostgresStore(pg_url, partition_days=1, partitions_ahead=2, clock=lambda: clock[0])
    async with store:
        names = await _partition_names(pg_url)
        assert len(names) == 3  # today and two ahead
        # Readings 10 days old (before any partition: the default one), today, tomorrow.
        async with store.batch() as tx:
            await tx.add_readings(_readings("old", 5, (day0 - 10 * 86400) * NS))
            await tx.add_readings(_readings("now", 5, (day0 + 60) * NS))
            await tx.add_readings(_readings("next", 5, (day0 + 86400 + 60) * NS))
            await tx.add_readings(_readings("later", 5, (day0 + 2 * 86400 + 60) * NS))
        # Three days on: partitions ahead again; a cutoff a day and a half ago drops
        # the first day's partition whole, deletes from the one it cuts through,
        # and deletes the old rows from the default partition.
        clock[0] += 3 * 86400
        done = await store.upkeep(clock[0] - 1.5 * 86400, 2)
        assert (done.readings_deleted, done.detail) == (15, {"partitions_dropped": 1})
    db = PgReader(pg_url)
    assert db.rows("SELECT DISTINCT sensor FROM readings") == [("later",)]
    lows = sorted(lo for _, lo, _ in await _partitions(pg_url))
    assert lows[0] == (day0 + 86400) * NS
    assert lows[-1] == (day0 + 5 * 86400) * NS  # two ahead of the new today


async def _partitions(url: str) -> list[tuple[str, int, int]]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return await partitions(conn)
    finally:
        await conn.close()


async def _partition_names(url: str) -> list[str]:
    return [name for name, _, _ in await _partitions(url)]


def test_day_ns() -> None:
    assert DAY_NS == 86400 * NS


async def test_a_hypertable_where_timescaledb_is_installed(pg_url: str) -> None:
    """TimescaleDB: samples is a hypertable, retention drops chunks. Runs only
    where the extension exists (Debian does not package it; this machine lacks
    it): the partitioned table above is what runs here."""
    db = PgReader(pg_url)
    if not db.rows("SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'")[0][0]:
        pytest.skip("the timescaledb extension is not installed on this PostgreSQL")
    db.rows("CREATE EXTENSION IF NOT EXISTS timescaledb")
    day0 = int(NOW) // 86400 * 86400
    async with PostgresStore(pg_url) as store:
        assert store.hypertable
        async with store.batch() as tx:
            await tx.add_readings(_readings("old", 5, (day0 - 10 * 86400) * NS))
            await tx.add_readings(_readings("now", 5, day0 * NS))
        done = await store.upkeep(day0 - 86400, 100)
        assert done.readings_deleted == 5
    assert db.rows("SELECT DISTINCT sensor FROM readings") == [("now",)]
