"""The SQLite store and the batch writer against real database files."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ingestd.bus import EventBus
from ingestd.config import RouteSettings
from ingestd.devices import DeviceState
from ingestd.errors import StoreError, StoreUnavailable
from ingestd.events import NS, Processed, Reading, Rejected, SensorStatus
from ingestd.routes import RouteTable
from ingestd.store.sqlite import SCHEMA_VERSION, SqliteStore
from ingestd.store.sqlite.rows import in_thread
from ingestd.window import InFlightWindow
from ingestd.writer import BatchWriter
from tests.support.db import hold_exclusive_lock
from tests.support.decoding import Decoding
from tests.support.harness import until


def readings(n: int, sensor: str = "s", t0: int = 10**9) -> list[Reading]:
    return [Reading(sensor, "temperature", (t0 + i) * NS, float(i), "t") for i in range(n)]


def db_rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as c:
        return list(c.execute(sql).fetchall())


def writer_on(
    store: SqliteStore,
    window: InFlightWindow,
    acknowledge: Callable[[int, list[tuple[int, int]]], None] = lambda e, a: None,
    *,
    max_readings: int = 1000,
    max_delay: float = 5.0,
    retry_max_delay: float = 0.1,
) -> tuple[EventBus, BatchWriter]:
    """A bus and a BatchWriter on `store`, its inbox on that bus."""
    bus = EventBus()
    inbox = bus.subscribe("writer", [Processed], policy="block", maxsize=4)
    writer = BatchWriter(
        store,
        inbox,
        bus,
        window,
        acknowledge,
        max_readings=max_readings,
        max_delay=max_delay,
        retry_min_delay=0.05,
        retry_max_delay=retry_max_delay,
    )
    return bus, writer


async def test_schema_is_created_versioned_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "x.db"
    async with SqliteStore(path):
        pass
    assert db_rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert db_rows(path, "PRAGMA journal_mode") == [("wal",)]
    names = {n for (n,) in db_rows(path, "SELECT name FROM sqlite_master")}
    assert {"series", "samples", "readings", "quarantine"} <= names
    # Reopening does not migrate again.
    async with SqliteStore(path):
        pass
    assert db_rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA user_version = 999")
    with pytest.raises(StoreError, match="newer than this ingestd understands"):
        await SqliteStore(path).open()


async def test_batch_commits_and_is_idempotent_on_sensor_metric_ts(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    async with SqliteStore(path) as store:
        async with store.batch() as tx:
            await tx.add_readings(readings(100))
            await tx.add_rejected([Rejected("a/b", b"\xff", "bad", 1.0)])
        assert (tx.inserted, tx.duplicates, tx.quarantined) == (100, 0, 1)
        async with store.batch() as tx:
            await tx.add_readings(readings(150))
        assert (tx.inserted, tx.duplicates) == (50, 100)
    assert db_rows(path, "SELECT count(*) FROM readings") == [(150,)]
    quarantined = db_rows(path, "SELECT topic, payload, reason FROM quarantine")
    assert quarantined == [("a/b", b"\xff", "bad")]
    # First write wins.
    assert db_rows(path, "SELECT value FROM readings WHERE ts = 1e9 + 5") == [(5.0,)]


async def test_an_error_rolls_the_whole_batch_back(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    async with SqliteStore(path) as store:
        with pytest.raises(RuntimeError):
            async with store.batch() as tx:
                await tx.add_readings(readings(10, sensor="new"))
                raise RuntimeError("boom")
        # (This compared a 2-tuple with the keys, which never matched: it could not fail.)
        assert [k for k in store.series_ids if k[0] == "new"] == [], "no id from a rollback"
        async with store.batch() as tx:
            await tx.add_readings(readings(3, sensor="new"))
    assert db_rows(path, "SELECT count(*) FROM readings") == [(3,)]
    assert db_rows(path, "SELECT count(*) FROM series") == [(1,)]


async def test_cancellation_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    async with SqliteStore(path) as store:
        entered = asyncio.Event()

        async def slow_batch() -> None:
            async with store.batch() as tx:
                await tx.add_readings(readings(10))
                entered.set()
                await asyncio.sleep(10)

        task = asyncio.create_task(slow_batch())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with store.batch() as tx:
            await tx.add_readings(readings(2, sensor="after"))
    assert db_rows(path, "SELECT sensor, count(*) FROM readings GROUP BY 1") == [("after", 2)]


async def test_a_batch_cancelled_while_its_begin_waits_in_the_queue_leaves_no_transaction(
    tmp_path: Path,
) -> None:
    """A batch's BEGIN goes with its first statement, one step queued on the
    connection's thread. Cancelled while that step still waits behind another,
    the batch is rolled back after the step has run, not judged by
    in_transaction read before it ran: else the BEGIN would leave the
    connection in a transaction and every later batch would fail."""
    path = tmp_path / "x.db"
    async with SqliteStore(path) as store:
        async with store.batch() as tx:
            await tx.add_readings(readings(3))  # the series known: the fused step
        conn = store._conn  # noqa: SLF001 - its queue, held up below
        assert conn is not None
        busy = asyncio.ensure_future(in_thread(conn, lambda _db: time.sleep(0.5)))
        await asyncio.sleep(0.05)  # the thread is asleep

        async def write() -> None:
            async with store.batch() as tx:
                await tx.add_readings(readings(5, t0=2 * 10**9))

        task = asyncio.create_task(write())
        await asyncio.sleep(0.05)  # its step queued behind the sleep
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await busy
        async with store.batch() as tx:
            await tx.add_readings(readings(2, sensor="after"))
    assert db_rows(path, "SELECT sensor, count(*) FROM readings GROUP BY 1") == [
        ("after", 2),
        ("s", 3),
    ]


async def test_a_locked_database_is_reported_as_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    async with SqliteStore(path, busy_timeout_ms=100) as store:
        holder = hold_exclusive_lock(path, 1.0)
        with pytest.raises(StoreUnavailable) as info:
            async with store.batch() as tx:
                await tx.add_readings(readings(5))
        assert info.value.condition == "database locked"
        holder.join()
        async with store.batch() as tx:
            await tx.add_readings(readings(5))
    assert db_rows(path, "SELECT count(*) FROM readings") == [(5,)]


async def test_writer_holds_the_batch_through_a_lock_and_acks_once(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    acked: list[tuple[int, list[tuple[int, int]]]] = []
    async with SqliteStore(path, busy_timeout_ms=50) as store:
        window = InFlightWindow(100)
        window.take(2, 2)
        bus, writer = writer_on(
            store, window, lambda e, a: acked.append((e, a)), max_delay=0.05, retry_max_delay=0.2
        )
        task = asyncio.create_task(writer.run())
        holder = hold_exclusive_lock(path, 1.5)
        started = time.monotonic()
        await bus.publish(Processed(readings(40), [], 2, [(1, 1), (2, 1)], 7))
        await asyncio.sleep(0.5)
        assert acked == [], "nothing is acknowledged while the store is locked"
        assert not writer.store_available
        await asyncio.to_thread(holder.join)
        await bus.publish(Processed([], [], 0, [], 7, flush=True, last=True))
        await asyncio.wait_for(task, 10)
        assert time.monotonic() - started >= 1.4
    assert acked == [(7, [(1, 1), (2, 1)])]
    assert window.in_flight == 0
    assert writer.store_available
    assert db_rows(path, "SELECT count(*) FROM readings") == [(40,)]


async def test_writer_flushes_by_size_age_and_saturation(tmp_path: Path) -> None:
    # Each flush is awaited by polling, with a deadline below max_delay where
    # the point is that it did not wait for the batch's age: a commit's fsync
    # on a loaded machine may take far longer than a fixed sleep allows.
    path = tmp_path / "x.db"
    max_delay = 1.0
    async with SqliteStore(path) as store:
        window = InFlightWindow(1000, broker_limit=3)
        bus, writer = writer_on(store, window, max_readings=50, max_delay=max_delay)
        task = asyncio.create_task(writer.run())
        # Size: 60 readings >= 50 commit at once.
        await bus.publish(Processed(readings(60, "size"), [], 1, [], 1))
        await until(lambda: writer.batches == 1, 0.8 * max_delay, "the batch at max_readings")
        # Age: 5 readings wait for max_delay.
        published = time.monotonic()
        await bus.publish(Processed(readings(5, "age"), [], 1, [], 1))
        await asyncio.sleep(0.3 * max_delay)
        assert writer.batches == 1
        await until(lambda: writer.batches == 2, 5 * max_delay, "the batch at max_delay")
        assert time.monotonic() - published >= 0.95 * max_delay
        # Saturation: the broker will send nothing more until we ack.
        window.take(3, 3)
        await bus.publish(Processed(readings(3, "sat"), [], 3, [(1, 1), (2, 1), (3, 1)], 1))
        await until(lambda: writer.batches == 3, 0.8 * max_delay, "the batch on a full window")
        await bus.publish(Processed([], [], 0, [], 1, flush=True, last=True))
        await asyncio.wait_for(task, 5)
    assert db_rows(path, "SELECT count(*) FROM readings") == [(68,)]


async def test_chunks_queued_together_never_make_a_batch_past_max_readings(
    tmp_path: Path,
) -> None:
    # Under load several chunks wait in the writer's inbox; it took them while
    # the batch was under max_readings, so 300 + 300 made one batch of 600.
    async with SqliteStore(tmp_path / "x.db") as store:
        bus, writer = writer_on(store, InFlightWindow(1000), max_readings=500)
        sizes: list[int] = []
        writer.on_commit = lambda event: sizes.append(event.size)
        for i in range(2):  # the inbox holds 4
            await bus.publish(Processed(readings(300, f"s{i}"), [], 1, [], 1))
        await bus.publish(Processed(readings(200, "s2"), [], 1, [], 1))
        await bus.publish(Processed([], [], 0, [], 1, flush=True, last=True))
        await asyncio.wait_for(writer.run(), 5)
    assert sizes == [300, 500]


async def test_large_batches_count_inserted_and_duplicates_exactly(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    async with SqliteStore(path) as store:
        async with store.batch() as tx:
            await tx.add_readings(readings(1000, "a") + readings(3, "b"))
        assert (tx.inserted, tx.duplicates) == (1003, 0)
        # 1,300 rows: whole multi-row groups plus a remainder, 1,000 of them repeats.
        async with store.batch() as tx:
            await tx.add_readings(readings(1300, "a"))
        assert (tx.inserted, tx.duplicates) == (300, 1000)
    assert db_rows(path, "SELECT sensor, count(*), sum(value) FROM readings GROUP BY 1") == [
        ("a", 1300, sum(range(1300))),
        ("b", 3, 3.0),
    ]


async def test_version_1_database_migrates_to_tags_and_units_keeping_its_data(
    tmp_path: Path,
) -> None:
    from ingestd.store.sqlite import MIGRATIONS

    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as c:  # a database as ingestd 0.1 left it
        c.executescript(MIGRATIONS[0] + "\nPRAGMA user_version = 1;")
        c.execute("INSERT INTO series (id, sensor, metric) VALUES (7, 'k', 'temperature')")
        c.executemany("INSERT INTO samples VALUES (7, ?, ?)", [(1e9 + i, i) for i in range(5)])
    async with SqliteStore(path) as store:
        assert store.series_ids == {("k", "temperature", "", ""): 7}
        async with store.batch() as tx:
            await tx.add_readings(
                [
                    Reading(
                        "k", "temperature", (10**9 + 5) * NS, 5.0
                    ),  # the same series, continued
                    Reading(
                        "k", "temperature", 10**9 * NS, 9.0, "", '{"room":"a"}', "Cel"
                    ),  # tagged
                ]
            )
    assert db_rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert db_rows(path, "SELECT count(*) FROM readings WHERE tags = ''") == [(6,)]
    assert db_rows(
        path,
        "SELECT value, unit FROM readings WHERE json_extract(nullif(tags, ''), '$.room') = 'a'",
    ) == [(9.0, "Cel")]
    assert db_rows(path, "SELECT id, tags, unit FROM series ORDER BY id") == [
        (7, "", ""),
        (8, '{"room":"a"}', "Cel"),
    ]


async def test_a_redelivery_is_a_duplicate_and_another_value_a_quarantined_conflict(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.db"
    t = 1_700_000_000 * NS
    first = [Reading("k", "t", t, 1.0, "a"), Reading("k", "t", t, 2.0, "a", seq=1)]
    async with SqliteStore(path) as store:
        async with store.batch() as tx:
            await tx.add_readings(first)
        assert (tx.inserted, tx.duplicates, tx.conflicts) == (2, 0, [])
        # The same message again (a redelivery): both duplicates, nothing quarantined.
        async with store.batch() as tx:
            await tx.add_readings(first)
        assert (tx.inserted, tx.duplicates, tx.conflicts) == (0, 2, [])
        # A different message claiming the same series and time with another value.
        async with store.batch(now=5.0) as tx:
            await tx.add_readings(
                [Reading("k", "t", t, 7.0, "b"), Reading("k", "t", t + 1, 8.0, "b")]
            )
        assert (tx.inserted, tx.duplicates) == (1, 0)
        assert [(c.topic, c.kind, c.received_at) for c in tx.conflicts] == [("b", "conflict", 5.0)]
        assert tx.conflicts[0].reason.startswith(
            "conflict: a different value (1) is stored for k t at this time"
        )
    # The conflict is in the quarantine, committed with the batch; the first value stays.
    assert db_rows(path, "SELECT topic, reason LIKE 'conflict:%' FROM quarantine") == [("b", 1)]
    assert db_rows(path, "SELECT ts_ns, seq, value FROM readings ORDER BY ts_ns, seq") == [
        (t, 0, 1.0),
        (t, 1, 2.0),
        (t + 1, 0, 8.0),
    ]


async def test_two_readings_of_one_batch_with_one_key_and_two_values(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "x.db") as store, store.batch() as tx:
        await tx.add_readings(
            [Reading("k", "t", NS, 1.0), Reading("k", "t", NS, 1.0), Reading("k", "t", NS, 3.0)]
        )
    assert (tx.inserted, tx.duplicates, len(tx.conflicts)) == (1, 1, 1)


async def test_nanoseconds_apart_are_two_readings_and_the_view_keeps_seconds(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.db"
    t = 1_700_000_000_123_456_789
    async with SqliteStore(path) as store, store.batch() as tx:
        await tx.add_readings([Reading("k", "t", t, 1.0), Reading("k", "t", t + 100, 2.0)])
    assert tx.inserted == 2
    assert db_rows(path, "SELECT ts_ns, value, typeof(ts) FROM readings ORDER BY ts_ns") == [
        (t, 1.0, "real"),
        (t + 100, 2.0, "real"),
    ]
    assert db_rows(path, "SELECT ts FROM readings LIMIT 1")[0][0] == pytest.approx(t / NS)


async def test_a_database_deleted_or_replaced_while_open_is_noticed_before_any_ack(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.db"
    async with SqliteStore(path) as store:
        async with store.batch() as tx:
            await tx.add_readings(readings(3))
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            p.unlink(missing_ok=True)
        with pytest.raises(StoreUnavailable, match="deleted or replaced") as info:
            async with store.batch() as tx:
                await tx.add_readings(readings(5))
        assert info.value.condition == "database replaced"
        # The retry writes to whatever is at the path now: a fresh database.
        async with store.batch() as tx:
            await tx.add_readings(readings(5))
        assert tx.inserted == 5
        # Replaced by another file: the same.
        other = tmp_path / "other.db"
        async with SqliteStore(other) as o, o.batch() as otx:
            await otx.add_readings(readings(1, "z"))
        other.rename(path)
        with pytest.raises(StoreUnavailable, match="deleted or replaced"):
            async with store.batch() as tx:
                await tx.add_readings(readings(6))
        async with store.batch() as tx:
            await tx.add_readings(readings(6))
        assert (tx.inserted, tx.duplicates) == (6, 0)
    assert db_rows(path, "SELECT sensor, count(*) FROM readings GROUP BY 1") == [("s", 6), ("z", 1)]


async def test_version_2_database_migrates_to_exact_times_keeping_its_data(
    tmp_path: Path,
) -> None:
    from ingestd.store.sqlite import MIGRATIONS

    path = tmp_path / "v2.db"
    with sqlite3.connect(path) as c:  # a database as ingestd 0.1 left it
        c.executescript(MIGRATIONS[0] + MIGRATIONS[1] + "\nPRAGMA user_version = 2;")
        c.execute("INSERT INTO series (id, sensor, metric, unit) VALUES (3, 'k', 't', 'Cel')")
        c.executemany(
            "INSERT INTO samples VALUES (3, ?, ?)",
            [(1_700_000_000.123456, 1.0), (1_700_000_001.5, 2.0)],
        )
    async with SqliteStore(path) as store:
        assert store.series_ids == {("k", "t", "", "Cel"): 3}
    assert db_rows(path, "SELECT sensor, ts_ns, seq, value, unit FROM readings ORDER BY ts_ns") == [
        ("k", 1_700_000_000_123_456_000, 0, 1.0, "Cel"),
        ("k", 1_700_000_001_500_000_000, 0, 2.0, "Cel"),
    ]


def _seq_table(kept: int) -> Decoding:
    spec = {"topic": "s/{sensor}", "format": "json", "sequence_field": "seq"}
    return Decoding(RouteTable([RouteSettings(**spec).compile(0)]), DeviceState(kept))


def _seq_chunk(t: Decoding, sensor: str, *numbers: int) -> tuple[list[Reading], SensorStatus]:
    msgs = [(f"s/{sensor}", b'{"seq": %d, "v": 1}' % n, 10**18 + n * NS) for n in numbers]
    found, rejected = t.decode(msgs)
    assert rejected == []
    return found, t.take_status()


async def test_a_sensor_evicted_from_memory_keeps_its_stored_sequence_counts(
    tmp_path: Path,
) -> None:
    """Sequence counts are written as deltas and added: a sensor's state
    forgotten (a cache of one sensor here) and rebuilt from nothing adds what
    it finds to the stored counts, never replaces them."""
    path = tmp_path / "x.db"
    t = _seq_table(kept=1)
    async with SqliteStore(path) as store:
        for sensor, numbers in (("a", (1, 5)), ("b", (1,)), ("a", (10, 12))):
            found, status = _seq_chunk(t, sensor, *numbers)
            async with store.batch() as tx:
                await tx.add_readings(found)
                await tx.set_status(status)
    rows = db_rows(path, "SELECT sensor, last_seq, seq_gaps, seq_missing FROM sensor_status")
    # a: 1 -> 5 (1 gap, 3 missing), forgotten, then 10 -> 12 (1 gap, 1 missing).
    assert sorted(rows) == [("a", 12, 2, 4), ("b", 1, 0, 0)]


async def test_the_writer_adds_up_the_gaps_of_the_chunks_it_batches(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    t = _seq_table(kept=10)
    async with SqliteStore(path) as store:
        bus, writer = writer_on(store, InFlightWindow(100))
        task = asyncio.create_task(writer.run())
        for numbers in ((1, 3), (4, 8), (9, 12)):  # 1+3+2 missing in 3 gaps
            found, status = _seq_chunk(t, "a", *numbers)
            await bus.publish(Processed(found, [], 1, [], 1, status=status))
        await bus.publish(Processed([], [], 0, [], 1, flush=True, last=True))
        await asyncio.wait_for(task, 5)
        assert writer.batches == 1
    rows = db_rows(path, "SELECT sensor, last_seq, seq_gaps, seq_missing FROM sensor_status")
    assert rows == [("a", 12, 3, 6)]
