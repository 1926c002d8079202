"""`ingestd rollups rebuild`: every rollup bucket computed again from the raw
readings still kept (after a config change, to add an interval, or to check
that the incremental ones agree), in one transaction, idempotently.

Buckets from the start of the coarsest interval containing `--since` on are
replaced; older ones (whose raw readings may be gone) are kept. The writers
wait meanwhile (SQLite's write lock; on PostgreSQL the rollups table is
locked), so what they commit after it is folded in as usual.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ingestd import rollups
from ingestd.config import Settings
from ingestd.errors import DataCommandError
from ingestd.rollups import NS, Key, RollupPlan, Row

_INSERT = (
    "INSERT INTO rollups (width, series_id, bucket, n, min, max, sum, first_ns, first_value, "
    "last_ns, last_value, increase) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_RAW = (
    "SELECT series_id, ts_ns, value FROM samples WHERE ts_ns >= {p} ORDER BY series_id, ts_ns, seq"
)
_LEVELS = (
    "SELECT id, (SELECT value FROM samples AS s WHERE s.series_id = series.id "
    "AND s.ts_ns < {p} ORDER BY ts_ns DESC, seq DESC LIMIT 1) FROM series WHERE id IN ({ids})"
)
_CHUNK = 5000
_COLUMNS = [
    "width", "series_id", "bucket", "n", "min", "max", "sum", "first_ns", "first_value",
    "last_ns", "last_value", "increase",
]  # fmt: skip


def start_of(plan: RollupPlan, since: float | None) -> int:
    """The first bucket start (Unix seconds) rebuilt: `since` taken back to
    the start of the coarsest interval's bucket."""
    if since is None:
        return 0
    coarsest = max(plan.widths)
    return int(since) // coarsest * coarsest


def _counters(series: Iterable[tuple[int, str]], plan: RollupPlan) -> set[int]:
    return {int(sid) for sid, metric in series if metric in plan.counters}


def _params(items: Sequence[tuple[Key, Row]]) -> Iterator[tuple[Any, ...]]:
    for key, row in items:
        yield (*key, *row)


def rebuild_sqlite(path: str, plan: RollupPlan, start: int) -> int:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        counters = _counters(conn.execute("SELECT id, metric FROM series"), plan)
        levels: dict[int, float] = {}
        if counters and start:
            ids = ", ".join(str(s) for s in sorted(counters))
            for sid, value in conn.execute(_LEVELS.format(p="?", ids=ids), (start * NS,)):
                if value is not None:
                    levels[int(sid)] = float(value)
        marks = ", ".join("?" * len(plan.widths))
        conn.execute(
            f"DELETE FROM rollups WHERE bucket >= ? AND width IN ({marks})", (start, *plan.widths)
        )
        raw = conn.execute(_RAW.format(p="?"), (start * NS,))
        rebuilt = rollups.Rebuild(plan.widths, counters, levels)
        written = 0
        while True:  # a chunk of raw rows at a time, never the whole table
            chunk = raw.fetchmany(_CHUNK)
            done = rebuilt.feed(chunk) if chunk else rebuilt.finish()
            conn.cursor().executemany(_INSERT, _params(done))
            written += len(done)
            if not chunk:
                break
        conn.execute("COMMIT")
        return written
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()


async def rebuild_postgres(url: str, password: str | None, plan: RollupPlan, start: int) -> int:
    from ingestd.store.postgres.connect import connect_writable  # noqa: PLC0415

    conn = await connect_writable(
        url, password=password, server_settings={"application_name": "ingestd rollups"}
    )
    try:
        await conn.execute("SET statement_timeout = 0")
        async with conn.transaction():
            await conn.execute("LOCK TABLE rollups IN EXCLUSIVE MODE")
            series = await conn.fetch("SELECT id, metric FROM series")
            counters = _counters(((r[0], r[1]) for r in series), plan)
            levels: dict[int, float] = {}
            if counters and start:
                ids = ", ".join(str(s) for s in sorted(counters))
                for sid, value in await conn.fetch(_LEVELS.format(p="$1", ids=ids), start * NS):
                    if value is not None:
                        levels[int(sid)] = float(value)
            await conn.execute(
                "DELETE FROM rollups WHERE bucket >= $1 AND width = ANY($2::int[])",
                start,
                list(plan.widths),
            )
            cursor = await conn.cursor(_RAW.format(p="$1"), start * NS)
            rebuilt = rollups.Rebuild(plan.widths, counters, levels)
            written = 0
            while True:  # a chunk of raw rows at a time, never the whole table
                chunk = [(r[0], r[1], r[2]) for r in await cursor.fetch(_CHUNK)]
                done = rebuilt.feed(chunk) if chunk else rebuilt.finish()
                await conn.copy_records_to_table(
                    "rollups", records=list(_params(done)), columns=_COLUMNS
                )
                written += len(done)
                if not chunk:
                    break
        return written
    finally:
        await conn.close()


async def rebuild(settings: Settings, since: float | None) -> str:
    """Rebuild the rollups of the configured store; what was done, in words."""
    plan = settings.rollup_plan()
    if not plan:
        raise DataCommandError("rollups are off ([rollups] enabled = false, or no intervals)")
    from ingestd.store import open_store  # noqa: PLC0415

    store = open_store(settings.store, plan, tool=True)
    await store.open()  # the schema migrated and the views made, as the daemon would
    await store.close()
    start = start_of(plan, since)
    began = time.monotonic()
    if settings.store.postgres:
        rows = await rebuild_postgres(settings.store.url, settings.store.password(), plan, start)
    else:
        rows = rebuild_sqlite(str(settings.store.path), plan, start)
    names = ", ".join(rollups.interval_name(w) for w in plan.widths)
    since_text = "all" if not start else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))
    return (
        f"rollups rebuilt ({names}) from {since_text}: {rows:,} rows "
        f"in {time.monotonic() - began:.1f} s"
    )
