"""The SQLite side of rollups (`ingestd.store.rollups`): which rows a batch
inserted, the merge of its aggregates, counters' increases, the views."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import aiosqlite

from ingestd import rollups
from ingestd.events import Reading
from ingestd.rollups import CONTEXT, Key, RollupPlan, Row

Record = tuple[int, int, int, float]  # series_id, ts_ns, seq, value

_RETURNING = 256
_INSERT_RETURNING = (
    "INSERT OR IGNORE INTO samples (series_id, ts_ns, seq, value) VALUES {values} "
    "RETURNING series_id, ts_ns, seq, value"
)
MERGE = (
    "INSERT INTO rollups (width, series_id, bucket, n, min, max, sum, first_ns, first_value, "
    "last_ns, last_value, increase) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (width, series_id, bucket) DO UPDATE SET n = n + excluded.n, "
    "min = min(min, excluded.min), max = max(max, excluded.max), sum = sum + excluded.sum, "
    "first_value = CASE WHEN excluded.first_ns < first_ns THEN excluded.first_value "
    "ELSE first_value END, first_ns = min(first_ns, excluded.first_ns), "
    "last_value = CASE WHEN excluded.last_ns >= last_ns THEN excluded.last_value "
    "ELSE last_value END, last_ns = max(last_ns, excluded.last_ns), "
    "increase = CASE WHEN excluded.increase IS NULL THEN increase "
    "ELSE coalesce(increase, 0) + excluded.increase END"
)
_ADD_INCREASE = (
    "UPDATE rollups SET increase = coalesce(increase, 0) + ? "
    "WHERE width = ? AND series_id = ? AND bucket = ?"
)
_WINDOW = (
    "SELECT * FROM (SELECT ts_ns, seq, value FROM samples WHERE series_id = ?1 AND ts_ns < ?2 "
    f"ORDER BY ts_ns DESC, seq DESC LIMIT {CONTEXT}) "
    "UNION ALL SELECT ts_ns, seq, value FROM samples "
    "WHERE series_id = ?1 AND ts_ns BETWEEN ?2 AND ?3 "
    "UNION ALL SELECT * FROM (SELECT ts_ns, seq, value FROM samples "
    f"WHERE series_id = ?1 AND ts_ns > ?3 ORDER BY ts_ns, seq LIMIT {CONTEXT})"
)


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


async def roll(
    conn: aiosqlite.Connection, plan: RollupPlan, new: Sequence[Record], counters: set[int]
) -> None:
    """Fold a batch's new readings into the rollups, in its transaction."""
    if not new:
        return
    rows = rollups.aggregate(new, plan.widths)
    await conn.executemany(
        MERGE, [params(k, row, k[1] in counters) for k, row in sorted(rows.items())]
    )
    if counters:
        changes = await increase_changes(conn, plan, new, counters)
        if changes:
            await conn.executemany(_ADD_INCREASE, [(d, *k) for k, d in sorted(changes.items())])


async def increase_changes(
    conn: aiosqlite.Connection, plan: RollupPlan, new: Sequence[Record], counters: set[int]
) -> dict[Key, float]:
    by_series: dict[int, list[Record]] = {}
    for r in new:
        if r[0] in counters:
            by_series.setdefault(r[0], []).append(r)
    changes: dict[Key, float] = {}
    for sid, own in by_series.items():
        lo = min(r[1] for r in own)
        hi = max(r[1] for r in own)
        async with conn.execute(_WINDOW, (sid, lo, hi)) as cur:
            window = sorted((int(a), int(b), float(c)) for a, b, c in await cur.fetchall())
        mine = {(r[1], r[2]) for r in own}
        for k, d in rollups.increase_changes(window, mine, plan.widths, sid).items():
            changes[k] = changes.get(k, 0.0) + d
    return changes


async def create_views(conn: aiosqlite.Connection, widths: Sequence[int]) -> None:
    """`rollup_<interval>` for each configured interval (kept for others)."""
    for width in widths:
        await conn.execute(
            f"CREATE VIEW IF NOT EXISTS rollup_{rollups.interval_name(width)} AS "
            + rollups.view(width)
        )
