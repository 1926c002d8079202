"""The PostgreSQL store against a real server: the schema contract, concurrent
instances, partitions and retention, and the CLI's reader."""

from __future__ import annotations

import asyncio
import time

import pytest

from ingestd.bus import EventBus
from ingestd.config import RouteSettings
from ingestd.devices import DeviceState
from ingestd.errors import NotPrimary, StoreError, StoreUnavailable
from ingestd.events import NS, Processed, Reading, Rejected, SensorStatus
from ingestd.rollups import RollupPlan
from ingestd.routes import RouteTable
from ingestd.store.base import TIMEOUT
from ingestd.store.postgres import SCHEMA_VERSION, PostgresReader, PostgresStore
from ingestd.store.postgres.schema import DAY_NS, partitions
from ingestd.window import InFlightWindow
from ingestd.writer import BatchWriter
from tests.support.decoding import Decoding
from tests.support.postgres import PgReader

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
    # A pending row's bytes are stored as they are, not compressed (8).
    storage = "SELECT attstorage::text FROM pg_attribute WHERE attname = 'records' AND attrelid = "
    assert db.rows(storage + "'rollup_pending'::regclass") == [("e",)]
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


async def test_a_batch_of_new_series_and_another_instances_stores_each_under_its_own(
    pg_url: str,
) -> None:
    # b opened before a made s0..s49: its batch makes s50..s99 (ids from its
    # INSERT) and finds a's (looked up after it), mixed in one batch.
    a, b = PostgresStore(pg_url), PostgresStore(pg_url)
    await b.open()
    await a.open()
    t0 = int(NOW) * NS
    async with a.batch() as tx:
        await tx.add_readings([Reading(f"s{i}", "t", t0, -1.0) for i in range(50)])
    async with b.batch() as tx:
        await tx.add_readings([Reading(f"s{i}", "t", t0 + NS, float(i)) for i in range(99, -1, -1)])
    assert tx.inserted == 100
    await a.close()
    await b.close()
    db = PgReader(pg_url)
    assert db.count("series") == 100
    stored = db.rows("SELECT sensor, value FROM readings WHERE ts_ns = $1", t0 + NS)
    assert sorted(stored) == sorted((f"s{i}", float(i)) for i in range(100))


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
    store = PostgresStore(
        pg_url, partition_days=1, partitions_ahead=2, partitions_behind=7, clock=lambda: clock[0]
    )
    async with store:
        names = await _partition_names(pg_url)
        assert len(names) == 3  # today and two ahead
        # Readings 10 days old (past partitions_behind: the default partition),
        # today, tomorrow.
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


async def test_a_backlog_lands_in_partitions_of_its_own(pg_url: str) -> None:
    day0 = int(NOW) // 86400 * 86400
    clock = [float(day0 + 3600)]
    store = PostgresStore(
        pg_url, partition_days=1, partitions_ahead=2, partitions_behind=5, clock=lambda: clock[0]
    )
    db = PgReader(pg_url)
    async with store:
        # Known series first, so the backlog batch is the steady-state kind:
        # a COPY outside a transaction.
        async with store.batch() as tx:
            await tx.add_readings(_readings("dev", 1, (day0 + 60) * NS))
        # Delivered after an outage: readings from 3 days ago, and two days
        # (one batch spanning both), then 9 days ago (past partitions_behind).
        three_ago, two_ago = (day0 - 3 * 86400) * NS, (day0 - 2 * 86400) * NS
        async with store.batch() as tx:
            await tx.add_readings(_readings("dev", 10, three_ago + 100 * NS))
        async with store.batch() as tx:
            await tx.add_readings(
                _readings("dev", 5, three_ago + 86000 * NS, 50.0)
                + _readings("dev", 5, two_ago + 60 * NS, 60.0)
            )
        async with store.batch() as tx:
            await tx.add_readings(_readings("dev", 4, (day0 - 9 * 86400) * NS))
        lows = {lo: name for name, lo, _ in await _partitions(pg_url)}
        assert three_ago in lows
        assert two_ago in lows
        assert (day0 - 9 * 86400) * NS not in lows
        assert db.rows(f'SELECT count(*) FROM "{lows[three_ago]}"') == [(15,)]
        assert db.rows(f'SELECT count(*) FROM "{lows[two_ago]}"') == [(5,)]
        assert db.rows("SELECT count(*) FROM samples_default") == [(4,)]

        # The cache knows them now: more of the same backlog costs no DDL, and
        # a redelivery is a duplicate, as anywhere.
        async with store.batch() as tx:
            await tx.add_readings(_readings("dev", 10, three_ago + 100 * NS))
        assert (tx.inserted, tx.duplicates) == (0, 10)

        # Retention drops the backlog's partitions whole (and deletes the
        # default partition's old rows).
        done = await store.upkeep(day0 - 86400, 1000)
        assert done.detail == {"partitions_dropped": 2}
        assert done.readings_deleted == 24
    assert db.rows("SELECT count(*) FROM samples") == [(1,)]
    lows_after = sorted(lo for _, lo, _ in await _partitions(pg_url))
    assert lows_after[0] == day0 * NS


async def test_rows_already_in_the_default_partition_move_into_the_new_one(
    pg_url: str,
) -> None:
    day0 = int(NOW) // 86400 * 86400
    four_ago = (day0 - 4 * 86400) * NS
    # An older ingestd (partitions_behind = 0) put this backlog in the default partition.
    async with PostgresStore(pg_url, partitions_behind=0) as old, old.batch() as tx:
        await tx.add_readings(_readings("dev", 7, four_ago))
    db = PgReader(pg_url)
    assert db.rows("SELECT count(*) FROM samples_default") == [(7,)]
    async with PostgresStore(pg_url, partitions_behind=30) as store:
        async with store.batch() as tx:
            await tx.add_readings(_readings("dev", 3, four_ago + 1000 * NS))
        assert tx.inserted == 3
    lows = {lo: name for name, lo, _ in await _partitions(pg_url)}
    assert db.rows(f'SELECT count(*) FROM "{lows[four_ago]}"') == [(10,)]
    assert db.rows("SELECT count(*) FROM samples_default") == [(0,)]


async def test_a_backlog_in_a_batch_with_new_series_gets_its_partition_next_batch(
    pg_url: str,
) -> None:
    # New series open a transaction before the COPY: no DDL inside it (it may
    # hold locks the DDL waits for); the next batch outside one creates the
    # partition and moves these rows out of the default partition.
    day0 = int(NOW) // 86400 * 86400
    two_ago = (day0 - 2 * 86400) * NS
    db = PgReader(pg_url)
    async with PostgresStore(pg_url) as store:
        async with store.batch() as tx:
            await tx.add_readings(_readings("new", 5, two_ago))
        assert db.rows("SELECT count(*) FROM samples_default") == [(5,)]
        async with store.batch() as tx:
            await tx.add_readings(_readings("new", 1, (day0 + 60) * NS))
        assert store.partition_for(two_ago, two_ago) != "samples"
    assert db.rows("SELECT count(*) FROM samples_default") == [(0,)]
    assert db.count() == 6


async def test_a_fleets_batch_and_its_pending_copy_land_together_whichever_way_it_goes(
    pg_url: str,
) -> None:
    """Sparse gauges' readings go in with their pending copy as one statement.
    Where that fails (a key stored already; the partition it names dropped by
    another instance's retention) and the batch goes another way, each stored
    reading is still in the rollups once: closed, they agree with the raw."""
    import asyncpg

    day0 = int(NOW) // 86400 * 86400
    today, tomorrow = (day0 + 3600) * NS, (day0 + 86400 + 3600) * NS

    def fleet(start: int, k: int) -> list[Reading]:  # 50 series, a reading each
        return [Reading(f"dev{i}", "t", start + k * NS, float(i * 10 + k)) for i in range(50)]

    store = PostgresStore(
        pg_url, partition_days=1, partitions_ahead=2, rollups=RollupPlan(widths=(60, 3600))
    )
    async with store:
        async with store.batch() as tx:
            await tx.add_readings(fleet(today, 0))
        assert (tx.inserted, tx.pending) == (50, 50)
        async with store.batch() as tx:  # a redelivery and 50 new
            await tx.add_readings(fleet(today, 0) + fleet(today, 1))
        assert (tx.inserted, tx.duplicates, tx.pending) == (50, 50, 50)
        gone = store.partition_for(tomorrow, tomorrow)
        assert gone != "samples"
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(f'DROP TABLE "{gone}"')
        finally:
            await conn.close()
        async with store.batch() as tx:  # into the partition the store still lists
            await tx.add_readings(fleet(tomorrow, 0))
        assert (tx.inserted, tx.pending) == (50, 50)
        while await store.close_rollups(1000):
            pass
    db = PgReader(pg_url)
    assert db.count("samples") == 150
    assert db.count("rollup_pending") == 0
    raw = db.rows(
        "SELECT series_id, ts_ns / 60000000000 * 60, count(*), sum(value) FROM samples "
        "GROUP BY 1, 2 ORDER BY 1, 2"
    )
    rolled = db.rows("SELECT series_id, bucket, n, sum FROM rollups WHERE width = 60 ORDER BY 1, 2")
    assert len(raw) == 100  # 50 series, a minute today and one tomorrow
    assert rolled == raw
    assert db.rows("SELECT sum(n) FROM rollups WHERE width = 3600") == [(150,)]


async def test_a_partition_not_made_in_time_leaves_the_batch_to_the_default_one(
    pg_url: str,
) -> None:
    import asyncpg

    from ingestd.store.postgres.schema import PARTITION_LOCK

    day0 = int(NOW) // 86400 * 86400
    two_ago = (day0 - 2 * 86400) * NS
    async with PostgresStore(pg_url) as store:
        async with store.batch() as tx:
            await tx.add_readings(_readings("dev", 1, (day0 + 60) * NS))
        # Another instance busy creating partitions (for longer than the batch
        # path waits): the batch commits anyway, into the default partition.
        other = await asyncpg.connect(pg_url)
        try:
            await other.execute("SELECT pg_advisory_lock($1)", PARTITION_LOCK)
            started = time.monotonic()
            async with store.batch() as tx:
                await tx.add_readings(_readings("dev", 5, two_ago))
            assert tx.inserted == 5
            assert time.monotonic() - started < 10
        finally:
            await other.close()
        assert store.partition_for(two_ago, two_ago) == "samples"
    db = PgReader(pg_url)
    assert db.rows("SELECT count(*) FROM samples_default") == [(5,)]


async def test_instances_creating_the_same_backlog_partitions_at_once_all_commit(
    pg_url: str,
) -> None:
    day0 = int(NOW) // 86400 * 86400
    stores = [PostgresStore(pg_url) for _ in range(4)]
    for s in stores:
        await s.open()
    # Each instance its own series, all in the same three past days, at once.
    starts = [(day0 - d * 86400) * NS for d in (3, 4, 5)]

    async def write(store: PostgresStore, k: int, stamps: list[int]) -> None:
        async with store.batch() as tx:
            await tx.add_readings([Reading(f"s{k}", "t", t + k * NS, 1.0) for t in stamps])

    # Series made first (today): the racing batches are then COPYs outside a
    # transaction, the path that creates partitions.
    await asyncio.gather(*(write(s, k, [day0 * NS]) for k, s in enumerate(stores)))
    await asyncio.gather(*(write(s, k, starts) for k, s in enumerate(stores)))
    for s in stores:
        assert all(s.partition_for(t, t) != "samples" for t in starts)
        await s.close()
    db = PgReader(pg_url)
    assert db.count() == 4 + 4 * 3
    assert db.rows("SELECT count(*) FROM samples_default") == [(0,)]
    lows = sorted(lo for _, lo, _ in await _partitions(pg_url))
    assert lows == sorted(set(lows))  # each range once
    assert set(starts) <= set(lows)


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


class _Pipeline:
    """A BatchWriter over a PostgresStore, fed chunk by chunk, each chunk its
    own batch (flush=True); what it acknowledges, in order."""

    def __init__(self, store: PostgresStore) -> None:
        self.bus = EventBus()
        inbox = self.bus.subscribe("writer", [Processed], policy="block", maxsize=16)
        self.window = InFlightWindow(1000)
        self.acked: list[int] = []
        self.writer = BatchWriter(
            store,
            inbox,
            self.bus,
            self.window,
            lambda epoch, acks: self.acked.extend(mid for mid, _ in acks),
            max_readings=100_000,
            max_delay=5,
            retry_min_delay=0.05,
            retry_max_delay=0.1,
        )
        self.task = asyncio.create_task(self.writer.run())

    async def send(self, mid: int, rs: list[Reading], status: SensorStatus | None = None) -> None:
        self.window.take(1, 1)
        self.window.readings += len(rs)
        await self.bus.publish(
            Processed(rs, [], 1, [(mid, 1)], 1, flush=True, status=status or SensorStatus())
        )

    async def finish(self) -> None:
        await self.bus.publish(Processed([], [], 0, [], 1, flush=True, last=True))
        await asyncio.wait_for(self.task, 30)


async def _block_key(url: str, key_of: Reading) -> tuple[object, object]:
    """Another session inserts the sample key of `key_of` and keeps its
    transaction open: a batch holding that key waits for it, for real."""
    import asyncpg

    conn = await asyncpg.connect(url)
    tx = conn.transaction()
    await tx.start()
    sid = await conn.fetchval(
        "INSERT INTO series (sensor, metric) VALUES ($1, $2) "
        "ON CONFLICT (sensor, metric, tags, unit) DO UPDATE SET sensor = excluded.sensor "
        "RETURNING id",
        key_of.sensor,
        key_of.metric,
    )
    await conn.execute(
        "INSERT INTO samples (series_id, ts_ns, seq, value) VALUES ($1, $2, 0, $3)",
        sid,
        key_of.ts_ns,
        key_of.value,
    )
    return conn, tx


async def _until(check: object, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_batches_in_flight_commit_out_of_order_but_settle_in_order(pg_url: str) -> None:
    """Batch 1 is held by a row lock another session holds; batch 2 commits
    meanwhile (the pipeline is real), yet nothing is acknowledged until batch 1
    is in, and then in the order received."""
    t0 = int(NOW) * NS
    first, second = _readings("a", 50, t0), _readings("b", 50, t0)
    async with PostgresStore(pg_url) as store:
        assert store.concurrent_batches == 2
        blocker, blocked = await _block_key(pg_url, first[25])
        db = PgReader(pg_url)
        pipe = _Pipeline(store)
        await pipe.send(1, first)
        await pipe.send(2, second)
        # Batch 2 commits while batch 1 waits for the lock...
        await _until(lambda: db.rows("SELECT count(*) FROM readings WHERE sensor = 'b'") == [(50,)])
        await asyncio.sleep(0.3)
        # ...but is not acknowledged before batch 1.
        assert pipe.acked == []
        assert pipe.writer.committed == 0
        await blocked.rollback()  # type: ignore[attr-defined]
        await blocker.close()  # type: ignore[attr-defined]
        await _until(lambda: pipe.acked == [1, 2])
        assert (pipe.writer.committed, pipe.writer.duplicates, pipe.writer.batches) == (100, 0, 2)
        await pipe.finish()
    assert db.count() == 100
    assert pipe.window.in_flight == 0


async def test_a_batch_writing_a_sensors_state_waits_for_the_one_before(pg_url: str) -> None:
    """Per-sensor state is written in batch order: batch 2 carries a later
    sequence for sensor a than batch 1, so it is not let past batch 1."""
    t0 = int(NOW) * NS
    first, second = _readings("a", 50, t0), _readings("a", 50, t0 + 100 * NS)
    async with PostgresStore(pg_url) as store:
        blocker, blocked = await _block_key(pg_url, first[25])
        db = PgReader(pg_url)
        pipe = _Pipeline(store)
        await pipe.send(1, first, SensorStatus({"a": (5, 1, 2)}))
        await pipe.send(2, second, SensorStatus({"a": (9, 1, 3)}))
        await asyncio.sleep(0.5)
        assert db.count() == 0, "batch 2 must wait for batch 1, which writes a's state too"
        await blocked.rollback()  # type: ignore[attr-defined]
        await blocker.close()  # type: ignore[attr-defined]
        await _until(lambda: pipe.acked == [1, 2])
        await pipe.finish()
    assert db.count() == 100
    # The last writer's last_seq; the gaps each batch found, added up.
    assert db.rows("SELECT last_seq, seq_gaps, seq_missing FROM sensor_status") == [(9, 2, 5)]


async def test_a_redelivery_in_the_next_batch_in_flight_is_a_duplicate(pg_url: str) -> None:
    """The same readings in two batches in flight at once (a redelivery while
    the first is being written): stored once, counted once as duplicates, no
    deadlock between the two connections."""
    t0 = int(NOW) * NS
    rs = [Reading(f"s{i % 7}", "t", t0 + i * NS, float(i)) for i in range(3000)]
    async with PostgresStore(pg_url) as store:
        pipe = _Pipeline(store)
        for mid in range(1, 9):  # 8 batches, each the same 3,000 readings
            await pipe.send(mid, list(reversed(rs)) if mid % 2 else rs)
        await _until(lambda: pipe.acked == list(range(1, 9)), 30)
        await pipe.finish()
        writer = pipe.writer
    assert (writer.committed, writer.duplicates) == (3000, 7 * 3000)
    db = PgReader(pg_url)
    assert db.count() == 3000


async def test_a_batch_of_readings_alone_times_out_stores_nothing_and_is_retried(
    pg_url: str,
) -> None:
    """A batch of known series' readings is one COPY, its own transaction (no
    BEGIN ... COMMIT around it). Stopped by a statement timeout it stores
    nothing and leaves its connection good; written again it stores all, and
    once more (a redelivery) it counts them as duplicates."""
    t0 = int(NOW) * NS
    db = PgReader(pg_url)
    async with PostgresStore(pg_url, statement_timeout_ms=300) as store:
        async with store.batch() as tx:  # the series: a transaction of its own
            await tx.add_readings(_readings("c", 5, t0))
        assert tx.begun
        backends = _backends(db)
        assert len(backends) == store.concurrent_batches
        later = _readings("c", 200, t0 + 1000 * NS)
        lock = db.hold_lock(1.5)
        with pytest.raises(StoreUnavailable) as caught:
            async with store.batch() as tx:
                await tx.add_readings(later)
        assert caught.value.condition == TIMEOUT
        assert not tx.begun
        assert db.count() == 5
        await asyncio.to_thread(lock.join)
        async with store.batch() as tx:
            await tx.add_readings(later)
        assert (tx.begun, tx.inserted, tx.duplicates) == (False, 200, 0)
        async with store.batch() as tx:
            await tx.add_readings(later)
        assert (tx.inserted, tx.duplicates) == (0, 200)
        assert _backends(db) == backends  # the same connections throughout
    assert db.count() == 205


def _backends(db: PgReader) -> set[int]:
    return {
        pid
        for (pid,) in db.rows(
            "SELECT pid FROM pg_stat_activity "
            "WHERE application_name = 'ingestd' AND datname = current_database()"
        )
    }


async def test_a_sensor_evicted_from_memory_keeps_its_stored_sequence_counts(pg_url: str) -> None:
    """As on SQLite: a sensor's state forgotten (a cache of one sensor here) and
    rebuilt from nothing adds what it finds to the stored counts."""
    spec = {"topic": "s/{sensor}", "format": "json", "sequence_field": "seq"}
    t = Decoding(RouteTable([RouteSettings(**spec).compile(0)]), DeviceState(kept=1))
    async with PostgresStore(pg_url) as store:
        for sensor, numbers in (("a", (1, 5)), ("b", (1,)), ("a", (10, 12))):
            msgs = [(f"s/{sensor}", b'{"seq": %d, "v": 1}' % n, 10**18 + n * NS) for n in numbers]
            found, rejected = t.decode(msgs)
            assert rejected == []
            async with store.batch() as tx:
                await tx.add_readings(found)
                await tx.set_status(t.take_status())
    rows = PgReader(pg_url).rows(
        "SELECT sensor, last_seq, seq_gaps, seq_missing FROM sensor_status ORDER BY sensor"
    )
    assert rows == [("a", 12, 2, 4), ("b", 1, 0, 0)]


async def test_instances_adding_gaps_to_one_sensor_at_once_sum_them(pg_url: str) -> None:
    """Two instances of a shared group both follow sensor a (each sees part of
    its stream) and write the gaps they found at the same time: the stored
    counts are the sum, not whichever wrote last."""
    a, b = PostgresStore(pg_url), PostgresStore(pg_url)
    await a.open()
    await b.open()

    async def write(store: PostgresStore, gaps: int, missing: int, odd: int) -> None:
        for n in range(50):
            async with store.batch() as tx:
                # Each its own part of the stream: its own last numbers.
                await tx.set_status(SensorStatus({"a": (2 * n + odd, gaps, missing)}))

    try:
        await asyncio.gather(write(a, 1, 2, 0), write(b, 3, 5, 1))
    finally:
        await a.close()
        await b.close()
    rows = PgReader(pg_url).rows("SELECT seq_gaps, seq_missing FROM sensor_status")
    assert rows == [(50 * 1 + 50 * 3, 50 * 2 + 50 * 5)]


async def test_a_deposed_primary_commits_nothing_after_the_next_took_over(pg_url: str) -> None:
    """The primary role's fence: its batches read the term FOR SHARE; a member
    taking the role over (a new epoch) waits for a batch in progress, and every
    later batch of the old term is refused, rolled back whole."""
    db = PgReader(pg_url)
    old, new = PostgresStore(pg_url), PostgresStore(pg_url)
    await old.open()
    await new.open()
    db.rows(
        "INSERT INTO primary_role (grp, epoch, client_id, holder, since, renewed) "
        "VALUES ('role', 1, 'role', 'a', 0, 0)"
    )
    old.fence = ("role", 1)
    t0 = int(NOW) * NS
    # A batch of the old term in progress: the takeover waits for it.
    async with old.batch() as tx:
        await tx.add_readings(_readings("a", 10, t0))
        bump = asyncio.ensure_future(
            asyncio.to_thread(db.rows, "UPDATE primary_role SET epoch = 2 WHERE grp = 'role'")
        )
        await asyncio.sleep(0.5)
        assert not bump.done(), "the takeover waits for the old term's batch"
    await bump
    assert db.count() == 10
    new.fence = ("role", 2)
    with pytest.raises(NotPrimary, match="moved on"):
        async with old.batch() as tx:
            await tx.add_readings(_readings("b", 10, t0))
            await tx.set_status(SensorStatus(devices={("sparkplug", "n"): (b"\x01", b"birth")}))
    async with new.batch() as tx:
        await tx.add_readings(_readings("c", 10, t0))
    assert db.count() == 20
    assert db.rows("SELECT count(*) FROM readings WHERE sensor = 'b'") == [(0,)]
    assert db.count("device_state") == 0
    for s in (old, new):
        await s.close()
