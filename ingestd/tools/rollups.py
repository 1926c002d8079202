"""`ingestd rollups rebuild`: every rollup bucket computed again from the raw
readings still kept (after a config change, to add an interval, or to check
that the incremental ones agree), in one transaction, idempotently.

Buckets from the start of the coarsest interval containing `--since` on are
computed again. A bucket replaces the stored one only if it counts at least as
many readings: one whose raw readings are gone, in whole or in part (raw
retention), keeps its rollup, which is history the raw readings no longer
hold. A counter's deltas start from the readings just before `--since`, so
the first one after it is credited as the daemon credited it. The writers
wait meanwhile (SQLite's write lock; on PostgreSQL the rollups table is
locked), so what they commit after it is folded in as usual.

The pending readings (not yet closed, `ingestd.closing`) are closed first, in
the same transaction (on PostgreSQL in the snapshot the raw readings are
read in): a rebuilt bucket then replaces a row that counts them, by the rule
above, so they are counted once, and kept where retention took their raw
readings.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ingestd import rollups
from ingestd.config import Settings
from ingestd.errors import DataCommandError
from ingestd.pending import PENDING, unpack
from ingestd.rollups import NS, Key, RollupPlan, Row
from ingestd.store.postgres.rolling import merge_rows
from ingestd.store.sqlite.rolling import MERGE

# A computed bucket replaces the stored one unless that counts more readings
# than the raw readings kept (history whose raw readings retention removed).
_REPLACE = (
    " ON CONFLICT (width, series_id, bucket) DO UPDATE SET n = excluded.n, min = excluded.min, "
    "max = excluded.max, sum = excluded.sum, first_ns = excluded.first_ns, "
    "first_value = excluded.first_value, last_ns = excluded.last_ns, "
    "last_value = excluded.last_value, increase = excluded.increase WHERE excluded.n >= rollups.n"
)
_INSERT = (
    "INSERT INTO rollups (width, series_id, bucket, n, min, max, sum, first_ns, first_value, "
    "last_ns, last_value, increase) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" + _REPLACE
)
_RAW = (
    "SELECT series_id, ts_ns, value FROM samples WHERE ts_ns >= {p} ORDER BY series_id, ts_ns, seq"
)
# A counter's readings just before the start: what its first delta after it needs.
_CONTEXT = (
    "SELECT ts_ns, value FROM samples WHERE series_id = {p1} AND ts_ns < {p2} "
    f"ORDER BY ts_ns DESC, seq DESC LIMIT {rollups.CONTEXT}"
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


def _params(items: Sequence[tuple[Key, Row]], start: int) -> list[tuple[Any, ...]]:
    """The rows to write: buckets from `start` on (the context's are not)."""
    return [(*key, *row) for key, row in items if key[2] >= start]


def _merges(pending: list[bytes], plan: RollupPlan) -> list[tuple[Key, Row]]:
    """The pending readings' rows, to merge (in key order)."""
    records = [r for blob in pending for r in unpack(blob)]
    return sorted(rollups.aggregate(records, plan.widths).items())


def _with_context(
    raw: Iterable[tuple[int, int, float]], context: dict[int, list[tuple[int, float]]]
) -> Iterator[tuple[int, int, float]]:
    """The raw rows, each counter series' context readings before its first
    (taken from `context` as they are given, so once across chunks)."""
    for row in raw:
        before = context.pop(row[0], None)
        if before:
            for ts, v in before:
                yield row[0], ts, v
        yield row


def rebuild_sqlite(path: str, plan: RollupPlan, start: int) -> int:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        pending = [b for (b,) in conn.execute(PENDING)]
        conn.execute("DELETE FROM rollup_pending")
        closed = _merges(pending, plan)
        conn.cursor().executemany(MERGE, [(*k, *row[:8], None) for k, row in closed])
        counters = _counters(conn.execute("SELECT id, metric FROM series"), plan)
        context: dict[int, list[tuple[int, float]]] = {}
        for sid in sorted(counters) if start else ():
            found = conn.execute(_CONTEXT.format(p1="?", p2="?"), (sid, start * NS)).fetchall()
            context[sid] = [(int(t), float(v)) for t, v in reversed(found)]
        raw = conn.execute(_RAW.format(p="?"), (start * NS,))
        rebuilt = rollups.Rebuild(plan.widths, counters)
        written = 0
        while True:  # a chunk of raw rows at a time, never the whole table
            chunk = raw.fetchmany(_CHUNK)
            done = rebuilt.feed(_with_context(chunk, context)) if chunk else rebuilt.finish()
            rows = _params(done, start)
            conn.cursor().executemany(_INSERT, rows)
            written += len(rows)
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
        # One snapshot (taken after the lock) for the pending readings and
        # the raw ones: those closed first are the raw readings' own.
        async with conn.transaction(isolation="repeatable_read"):
            await conn.execute("LOCK TABLE rollups IN EXCLUSIVE MODE")
            taken = await conn.fetch("DELETE FROM rollup_pending RETURNING id, records")
            pending = [b for _, b in sorted(taken)]
            await merge_rows(conn, dict(_merges(pending, plan)), False)
            series = await conn.fetch("SELECT id, metric FROM series")
            counters = _counters(((r[0], r[1]) for r in series), plan)
            context: dict[int, list[tuple[int, float]]] = {}
            for sid in sorted(counters) if start else ():
                found = await conn.fetch(_CONTEXT.format(p1="$1", p2="$2"), sid, start * NS)
                context[sid] = [(int(t), float(v)) for t, v in reversed(found)]
            await conn.execute("CREATE TEMP TABLE ingestd_rebuilt (LIKE rollups) ON COMMIT DROP")
            cursor = await conn.cursor(_RAW.format(p="$1"), start * NS)
            rebuilt = rollups.Rebuild(plan.widths, counters)
            written = 0
            while True:  # a chunk of raw rows at a time, never the whole table
                chunk = [(r[0], r[1], r[2]) for r in await cursor.fetch(_CHUNK)]
                done = rebuilt.feed(_with_context(chunk, context)) if chunk else rebuilt.finish()
                rows = _params(done, start)
                await conn.copy_records_to_table("ingestd_rebuilt", records=rows, columns=_COLUMNS)
                written += len(rows)
                if not chunk:
                    break
            await conn.execute(f"INSERT INTO rollups SELECT * FROM ingestd_rebuilt{_REPLACE}")
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
