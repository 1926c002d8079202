"""The SQLite side of rollups (`ingestd.store.rollups`): which rows a batch
inserted, the merge of its aggregates, counters' increases, the views."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import aiosqlite

from ingestd import rollups
from ingestd.events import Reading
from ingestd.pending import Closing, dense, pack
from ingestd.rollups import CONTEXT, Key, Point, RollupPlan, Row

Record = tuple[int, int, int, float]  # series_id, ts_ns, seq, value

_RETURNING = 256
_INSERT_RETURNING = (
    "INSERT OR IGNORE INTO samples (series_id, ts_ns, seq, value) VALUES {values} "
    "RETURNING series_id, ts_ns, seq, value"
)


def _add(a: str, b: str) -> str:
    """`ingestd.rollups.add_sums` in SQL: a sum already +-Infinity stays so
    (inf + -inf is NaN, which SQLite stores as NULL); SQLite's addition
    itself goes to +-Infinity past the range."""
    return f"CASE WHEN abs({a}) = 9e999 THEN {a} ELSE {a} + {b} END"


_MERGE_HEAD = (
    "INSERT INTO rollups (width, series_id, bucket, n, min, max, sum, first_ns, first_value, "
    "last_ns, last_value, increase) VALUES "
)
_MERGE_TAIL = (
    " ON CONFLICT (width, series_id, bucket) DO UPDATE SET n = n + excluded.n, "
    "min = min(min, excluded.min), max = max(max, excluded.max), "
    f"sum = {_add('sum', 'excluded.sum')}, "
    "first_value = CASE WHEN excluded.first_ns < first_ns THEN excluded.first_value "
    "ELSE first_value END, first_ns = min(first_ns, excluded.first_ns), "
    "last_value = CASE WHEN excluded.last_ns >= last_ns THEN excluded.last_value "
    "ELSE last_value END, last_ns = max(last_ns, excluded.last_ns), "
    "increase = CASE WHEN excluded.increase IS NULL THEN increase "
    f"ELSE {_add('coalesce(increase, 0)', 'excluded.increase')} END"
)
_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
MERGE = _MERGE_HEAD + _ROW + _MERGE_TAIL
# Rows a statement: a multi-row upsert costs a quarter less per row than one
# row a step (7.5 against 10.0 ms for 4,000 rows over 40,000 series).
_MERGE_ROWS = 32
_MERGE_MANY = _MERGE_HEAD + ", ".join([_ROW] * _MERGE_ROWS) + _MERGE_TAIL
_ADD_INCREASE = (
    f"UPDATE rollups SET increase = {_add('coalesce(increase, 0)', '?')} "
    "WHERE width = ? AND series_id = ? AND bucket = ?"
)
# Around a batch's own readings of one counter series: the CONTEXT stored
# before them (part 0) and after them (2), and how many are stored in their
# time range (1: its own, unless a late batch landed among others). A batch
# asks for all its counter series' in one statement (a compound SELECT of up
# to _WINDOWS_PER_QUERY, under SQLite's 500 terms).
_AROUND = (
    "SELECT ?{s}, 0, * FROM (SELECT ts_ns, seq, value FROM samples "
    "WHERE series_id = ?{s} AND ts_ns < ?{lo} "
    f"ORDER BY ts_ns DESC, seq DESC LIMIT {CONTEXT}) "
    "UNION ALL SELECT ?{s}, 1, count(*), 0, 0.0 FROM samples "
    "WHERE series_id = ?{s} AND ts_ns BETWEEN ?{lo} AND ?{hi} "
    "UNION ALL SELECT ?{s}, 2, * FROM (SELECT ts_ns, seq, value FROM samples "
    f"WHERE series_id = ?{{s}} AND ts_ns > ?{{hi}} ORDER BY ts_ns, seq LIMIT {CONTEXT})"
)
_WINDOW = (
    "SELECT * FROM (SELECT ts_ns, seq, value FROM samples WHERE series_id = ?1 AND ts_ns < ?2 "
    f"ORDER BY ts_ns DESC, seq DESC LIMIT {CONTEXT}) "
    "UNION ALL SELECT ts_ns, seq, value FROM samples "
    "WHERE series_id = ?1 AND ts_ns BETWEEN ?2 AND ?3 "
    "UNION ALL SELECT * FROM (SELECT ts_ns, seq, value FROM samples "
    f"WHERE series_id = ?1 AND ts_ns > ?3 ORDER BY ts_ns, seq LIMIT {CONTEXT})"
)
_WINDOWS_PER_QUERY = 100


async def insert_returning(conn: aiosqlite.Connection, rows: Sequence[Record]) -> list[Record]:
    """Insert `rows` (INSERT OR IGNORE), returning those inserted: the batch's
    new readings when some of its keys were stored already."""
    new: list[Record] = []
    for start in range(0, len(rows), _RETURNING):
        part = rows[start : start + _RETURNING]
        sql = _INSERT_RETURNING.format(values=", ".join(["(?, ?, ?, ?)"] * len(part)))
        async with conn.execute(sql, list(chain.from_iterable(part))) as cur:
            new += [(int(a), int(b), int(c), float(d)) for a, b, c, d in await cur.fetchall()]
    return new


def counter_series(
    rows: Sequence[Record], readings: Sequence[Reading], counters: frozenset[str]
) -> set[int]:
    """The series among `rows` (aligned with `readings`) whose metric is a counter."""
    if not counters:
        return set()
    return {row[0] for row, r in zip(rows, readings, strict=True) if r.metric in counters}


def params(key: Key, row: Row, counter: bool) -> tuple[object, ...]:
    return (*key, *row[:8], row[8] if counter else None)


_PEND = "INSERT INTO rollup_pending (readings, records) VALUES (?, ?)"
_PENDING = "SELECT id, records FROM rollup_pending ORDER BY id"
_CLOSED = "DELETE FROM rollup_pending WHERE id <= ?"


async def roll(
    conn: aiosqlite.Connection, plan: RollupPlan, new: Sequence[Record], counters: set[int]
) -> int:
    """Fold a batch's new readings into the rollups, in its transaction: a
    counter's now (its increase needs its neighbours, counted); gauges' now
    if dense (`ingestd.pending.dense`), else into `rollup_pending` (closed
    later, `close`). The gauges' readings left pending."""
    if not new:
        return 0
    gauges = new
    if counters:
        gauges = [r for r in new if r[0] not in counters]
        mine = [r for r in new if r[0] in counters]
        rows = rollups.aggregate(mine, plan.widths)
        await merge(conn, [params(k, row, True) for k, row in rows.items()])
        changes = await increase_changes(conn, plan, mine, counters)
        if changes:
            await conn.executemany(_ADD_INCREASE, [(d, *k) for k, d in sorted(changes.items())])
    if gauges and dense(gauges, len(plan.widths)):
        rows = rollups.aggregate(gauges, plan.widths)
        await merge(conn, [params(k, row, False) for k, row in rows.items()])
        return 0
    if gauges:
        await conn.execute(_PEND, (len(gauges), pack(gauges)))
    return len(gauges)


async def close(conn: aiosqlite.Connection, plan: RollupPlan, most: int) -> int:
    """Close pending rows, oldest first, up to `most` readings (at least one
    pending row), in the caller's transaction: merged into the rollups a piece
    at a time (`Closing.pieces`) and deleted. The readings closed (0: none
    pending)."""
    closing = Closing()
    readings, last = 0, None
    async with conn.execute(_PENDING) as cur:
        while readings < most and (got := await cur.fetchmany(64)):
            for id_, blob in got:
                readings, last = readings + closing.add(blob), id_
                if readings >= most:
                    break
    if last is None:
        return 0
    for rows in closing.pieces(plan.widths):
        await merge(conn, [params(k, row, False) for k, row in rows.items()])
    await conn.execute(_CLOSED, (last,))
    return readings


async def merge(conn: aiosqlite.Connection, rows: Sequence[tuple[object, ...]]) -> None:
    """Merge rollup rows (`params`) into the stored ones. (In any order: a
    transaction on SQLite has the file to itself.)"""
    whole = len(rows) - len(rows) % _MERGE_ROWS
    if whole:
        await conn.executemany(
            _MERGE_MANY,
            [
                list(chain.from_iterable(rows[i : i + _MERGE_ROWS]))
                for i in range(0, whole, _MERGE_ROWS)
            ],
        )
    if whole < len(rows):
        await conn.executemany(MERGE, rows[whole:])


async def increase_changes(
    conn: aiosqlite.Connection, plan: RollupPlan, new: Sequence[Record], counters: set[int]
) -> dict[Key, float]:
    mine = rollups.counter_points(new, counters)
    sids = sorted(mine)
    around: dict[int, tuple[list[Point], list[int], list[Point]]] = {
        sid: ([], [], []) for sid in sids
    }
    for start in range(0, len(sids), _WINDOWS_PER_QUERY):
        part = sids[start : start + _WINDOWS_PER_QUERY]
        sql = " UNION ALL ".join(
            _AROUND.format(s=3 * i + 1, lo=3 * i + 2, hi=3 * i + 3) for i in range(len(part))
        )
        args = [x for sid in part for x in (sid, mine[sid][0][0], mine[sid][-1][0])]
        async with conn.execute(sql, args) as cur:
            for sid, where, ts, seq, value in await cur.fetchall():
                before, inside, after = around[int(sid)]
                if where == 1:
                    inside.append(int(ts))
                else:
                    (before if where == 0 else after).append((int(ts), int(seq), float(value)))
    changes: dict[Key, float] = {}
    for sid in sids:
        own = mine[sid]
        before, inside, after = around[sid]
        window = rollups.window_of(own, before, inside[0], after)
        if window is None:  # others stored among the batch's own: read them all
            async with conn.execute(_WINDOW, (sid, own[0][0], own[-1][0])) as cur:
                window = sorted((int(a), int(b), float(c)) for a, b, c in await cur.fetchall())
        for k, d in rollups.increase_changes(window, own, plan.widths, sid).items():
            changes[k] = changes.get(k, 0.0) + d
    return changes


async def create_views(conn: aiosqlite.Connection, widths: Sequence[int]) -> None:
    """`rollup_<interval>` for each configured interval (kept for others)."""
    for width in widths:
        await conn.execute(
            f"CREATE VIEW IF NOT EXISTS rollup_{rollups.interval_name(width)} AS "
            + rollups.view(width)
        )
