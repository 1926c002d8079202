"""The PostgreSQL side of rollups (`ingestd.rollups`): the merge of a batch's
aggregates in one statement, counters' increases under a per-series lock,
the views."""

from __future__ import annotations

import sys
from array import array
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import asyncpg

from ingestd import rollups
from ingestd.pending import Closing, columns, dense, pack
from ingestd.rollups import CONTEXT, Key, Point, RollupPlan, Row

Record = tuple[int, int, int, float]  # series_id, ts_ns, seq, value

# float8 additions as SQLite's and Python's (`ingestd.rollups.add_sums`):
# past the type's range the sum is +-Infinity, where PostgreSQL raises (a
# close stuck behind those readings for ever, a batch retried for ever); and
# a sum already infinite stays so (inf + -inf would be NaN). No product or
# quotient: those raise on underflow (5e-324 * 0.5).
_MAX = f"{sys.float_info.max!r}::float8"
_INF = "'Infinity'::float8"


def _add(a: str, b: str) -> str:
    return (
        f"CASE WHEN abs({a}) = {_INF} THEN {a} "
        f"WHEN sign({a}) = sign({b}) AND abs({a}) > {_MAX} - abs({b}) THEN sign({a}) * {_INF} "
        f"ELSE {a} + {b} END"
    )


# In key order (sorted before): instances merging into the same buckets lock
# the rows in the same order, so one waits for the other, never a deadlock.
_INTO = (
    "INSERT INTO rollups AS r (width, series_id, bucket, n, min, max, sum, first_ns, "
    "first_value, last_ns, last_value, increase) "
)
_ON_CONFLICT = (
    " ON CONFLICT (width, series_id, bucket) DO UPDATE SET n = r.n + excluded.n, "
    "min = least(r.min, excluded.min), max = greatest(r.max, excluded.max), "
    f"sum = {_add('r.sum', 'excluded.sum')}, "
    "first_value = CASE WHEN excluded.first_ns < r.first_ns THEN excluded.first_value "
    "ELSE r.first_value END, first_ns = least(r.first_ns, excluded.first_ns), "
    "last_value = CASE WHEN excluded.last_ns >= r.last_ns THEN excluded.last_value "
    "ELSE r.last_value END, last_ns = greatest(r.last_ns, excluded.last_ns), "
    "increase = CASE WHEN excluded.increase IS NULL THEN r.increase "
    f"ELSE {_add('coalesce(r.increase, 0)', 'excluded.increase')} END"
)
_MERGE = (
    _INTO + "SELECT * FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::bigint[], "
    "$5::float8[], $6::float8[], $7::float8[], $8::bigint[], $9::float8[], $10::bigint[], "
    "$11::float8[], $12::float8[])" + _ON_CONFLICT
)
# Many rows (a close's) go through a temporary table filled by COPY: binary
# rows, where arrays of parameters cost asyncpg a type check per element
# (measured: building and sending the arrays was 39% of the daemon's time on
# a 20,000-device fleet).
_MERGE_TABLE = "CREATE TEMP TABLE IF NOT EXISTS ingestd_merge (LIKE rollups) ON COMMIT DELETE ROWS"
_MERGE_FROM_TABLE = (
    _INTO + "SELECT * FROM ingestd_merge ORDER BY width, series_id, bucket" + _ON_CONFLICT
)
_COPY_ABOVE = 256  # rows
_GAUGE: tuple[Any, ...] = (None,)  # a gauge's increase
_COLUMNS = (
    "width", "series_id", "bucket", "n", "min", "max", "sum", "first_ns", "first_value",
    "last_ns", "last_value", "increase",
)  # fmt: skip
_ADD_INCREASE = (
    f"UPDATE rollups AS r SET increase = {_add('coalesce(r.increase, 0)', 'u.d')} "
    "FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::float8[]) AS u(w, s, b, d) "
    "WHERE r.width = u.w AND r.series_id = u.s AND r.bucket = u.b"
)
# A counter series' increases are derived from its neighbouring readings:
# one transaction at a time per series (what it reads after the lock includes
# what the one before committed). The key's high bits keep it apart from
# other advisory locks (the primary role's).
_LOCK = "SELECT pg_advisory_xact_lock(x) FROM unnest($1::bigint[]) AS x ORDER BY x"
_LOCK_SPACE = 0x526F6C6C << 32  # "Roll"
# Around a batch's own readings of each counter series: the CONTEXT stored
# before them (part 0) and after them (2), and how many are stored in their
# time range (1: its own, unless a late batch landed among others).
_AROUND = (
    "SELECT w.sid, s.part, s.ts_ns, s.seq, s.value "
    "FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS w(sid, lo, hi) "
    "CROSS JOIN LATERAL ("
    "(SELECT 0 AS part, ts_ns, seq, value FROM samples WHERE series_id = w.sid AND ts_ns < w.lo "
    f"ORDER BY ts_ns DESC, seq DESC LIMIT {CONTEXT}) "
    "UNION ALL (SELECT 1, count(*), 0, 0.0::float8 FROM samples "
    "WHERE series_id = w.sid AND ts_ns BETWEEN w.lo AND w.hi) "
    "UNION ALL (SELECT 2, ts_ns, seq, value FROM samples WHERE series_id = w.sid "
    f"AND ts_ns > w.hi ORDER BY ts_ns, seq LIMIT {CONTEXT})) AS s"
)
# The whole window, for series whose range holds readings of others.
_WINDOW = (
    "SELECT w.sid, s.ts_ns, s.seq, s.value "
    "FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS w(sid, lo, hi) "
    "CROSS JOIN LATERAL ("
    f"(SELECT ts_ns, seq, value FROM samples WHERE series_id = w.sid AND ts_ns < w.lo "
    f"ORDER BY ts_ns DESC, seq DESC LIMIT {CONTEXT}) "
    "UNION ALL (SELECT ts_ns, seq, value FROM samples "
    "WHERE series_id = w.sid AND ts_ns BETWEEN w.lo AND w.hi) "
    f"UNION ALL (SELECT ts_ns, seq, value FROM samples WHERE series_id = w.sid "
    f"AND ts_ns > w.hi ORDER BY ts_ns, seq LIMIT {CONTEXT})) AS s"
)


_PEND = "INSERT INTO rollup_pending (readings, records) VALUES ($1, $2)"
# Pending rows, oldest first (their counts), locked: instances close one at a
# time, in order. (Taking rows another was closing, SKIP LOCKED, could commit
# a newer reading's merge before an older one's, and a row settles a tie of
# times by the order of merges.)
_PENDING = "SELECT id, readings FROM rollup_pending ORDER BY id LIMIT 1000 FOR UPDATE"
_CLOSED = "DELETE FROM rollup_pending WHERE id = ANY($1::bigint[]) RETURNING id, records"


async def roll(conn: Any, plan: RollupPlan, new: Sequence[Record], counters: set[int]) -> int:
    """Fold a batch's new readings into the rollups, in its transaction: a
    counter's now; gauges' now if dense (`ingestd.pending.dense`), else into
    `rollup_pending` (`close`). The gauges' readings left pending."""
    if not new:
        return 0
    gauges = new
    if counters:
        gauges = [r for r in new if r[0] not in counters]
        mine = [r for r in new if r[0] in counters]
        if mine:
            # Each counter series' lock before any of its rows: a batch that
            # locked a row first and waited for the series (held by one that
            # then needs that row for a neighbour's delta) was a deadlock.
            await conn.execute(_LOCK, [_LOCK_SPACE | s for s in sorted({r[0] for r in mine})])
            await merge_rows(conn, rollups.aggregate(mine, plan.widths), True)
            await _counted(conn, plan, mine, counters)
    if not gauges:
        return 0
    if not _pends(plan, gauges):
        await merge_rows(conn, rollups.aggregate(gauges, plan.widths), False)
        return 0
    await conn.execute(_PEND, len(gauges), pack(gauges))
    return len(gauges)


def _pends(plan: RollupPlan, gauges: Sequence[Record]) -> bool:
    """Are gauges' readings left pending, not merged by the batch (dense)?"""
    return not dense(gauges, len(plan.widths))


def pending_copy(plan: RollupPlan, new: Sequence[Record], counters: set[int]) -> bytes | None:
    """The pending row `roll` would write for `new`, where that row is all it
    would write (no counter's readings, not dense): a batch can send it with
    the readings themselves, in one statement. Else None."""
    if counters or not new or not _pends(plan, new):
        return None
    return pack(new)


async def close(conn: Any, plan: RollupPlan, most: int) -> int:
    """Close pending rows, oldest first, up to `most` readings (at least one
    pending row), in the caller's transaction: their readings copied into a
    temporary table and aggregated by the server into the rollups (`_CLOSE`),
    and the rows deleted. Another instance's close is waited for (rows it
    took are gone then). The readings closed (0: none pending)."""
    ids: list[int] = []
    total = 0
    for id_, readings in await conn.fetch(_PENDING):
        ids.append(id_)
        total += readings
        if total >= most:
            break
    if not ids:
        return 0
    blobs: list[bytes] = []
    for start in range(0, len(ids), 16):  # the bytes of 16 at a time
        blobs += [blob for _, blob in sorted(await conn.fetch(_CLOSED, ids[start : start + 16]))]
    taken = sum(len(b) // 32 for b in blobs)
    await conn.execute(_CLOSE_TABLE)
    await conn.copy_to_table("ingestd_close", source=_copy_binary(blobs), format="binary")
    try:
        async with conn.transaction():  # a savepoint
            await conn.execute(_CLOSE, list(plan.widths))
    except asyncpg.NumericValueOutOfRangeError:
        # A float8 sum overflowed (readings near 1e308), which PostgreSQL
        # raises: this close aggregated by ingestd, as SQLite's is (a sum in
        # order, +-Infinity past the range).
        closing = Closing()
        for blob in blobs:
            closing.add(blob)
        await _through_table(conn, (_gauge_records(p.items()) for p in closing.pieces(plan.widths)))
    return taken


# A close's readings, in the order they were pending (`ord`), aggregated by
# the server: a wide fleet's close is a row per series and interval, which
# ingestd aggregating and copying them cost a fifth of its event loop (py-spy,
# 20,000-device fleet) while the server waited. first and last by (time, ord):
# a tie of times keeps the earlier first and takes the later last, as merges
# in order do (`ingestd.pending.merged`); a window, not a sorted subquery, so
# that is defined, not the plan's. Times are >= 0 (1970 on,
# `ingestd.formats.common`): `/` is the floor `rollups.bucket_of` takes.
_CLOSE_TABLE = (
    "CREATE TEMP TABLE IF NOT EXISTS ingestd_close "
    "(series_id bigint, ts_ns bigint, ord bigint, value float8) ON COMMIT DELETE ROWS"
)
_BUCKET = "ts_ns / (w * 1000000000::bigint) * w"
_CLOSE = (
    _INTO + "SELECT w, series_id, b, count(*), min(value), max(value), sum(value), "
    "min(ts_ns), min(f), max(ts_ns), min(l), NULL FROM ("
    f"SELECT w, series_id, {_BUCKET} AS b, ts_ns, value, "
    "first_value(value) OVER x AS f, last_value(value) OVER x AS l "
    "FROM ingestd_close CROSS JOIN unnest($1::int[]) AS u(w) "
    f"WINDOW x AS (PARTITION BY w, series_id, {_BUCKET} ORDER BY ts_ns, ord "
    "ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) AS s "
    "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3" + _ON_CONFLICT
)
# A close's transaction: memory for its sort and window (the default 4 MB
# spilled them to disk: a close of 100,000 readings of one series 0.9 s, with
# 64 MB 0.14-0.23 s), and at least a minute for its statements, which
# aggregate up to a close's readings where a batch's
# (`store.statement_timeout_ms`) write one batch: a timeout a batch fits in
# failed every close, the backlog growing.
_CLOSE_MEMORY = "64MB"
CLOSE_TIMEOUT_MS = 60_000


def close_settings(statement_timeout_ms: int) -> str:
    """SET LOCAL of a close's transaction, `store.statement_timeout_ms` given
    (0: none)."""
    limit = max(statement_timeout_ms, CLOSE_TIMEOUT_MS) if statement_timeout_ms else 0
    return f"SET LOCAL work_mem = '{_CLOSE_MEMORY}'; SET LOCAL statement_timeout = {limit}"


# COPY BINARY: a header, tuples of 4 fields (a length and 8 big-endian bytes
# each), a trailer.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_TUPLE = b"\x00\x04" + (b"\x00\x00\x00\x08" + bytes(8)) * 4


async def _copy_binary(blobs: list[bytes]) -> AsyncIterator[bytes]:
    """Pending rows' readings as `ingestd_close`'s tuples, a pending row at a
    time: each byte of a column placed by one slice assignment, not a value
    at a time. (The rows' bytes, 32 a reading, are kept to the close's end,
    for an overflow's aggregate by ingestd.)"""
    yield _COPY_HEADER
    size, first = len(_TUPLE), 0
    for blob in blobs:
        sids, stamps, _, values = columns(blob)
        n = len(sids)
        out = bytearray(_TUPLE * n)
        order = array("q", range(first, first + n))
        for k, column in enumerate((sids, stamps, order, values)):
            if sys.byteorder == "little":
                column.byteswap()
            data = column.tobytes()
            at = 6 + 12 * k
            for b in range(8):
                out[at + b :: size] = data[b::8]
        first += n
        yield bytes(out)
    yield b"\xff\xff"


async def merge_rows(conn: Any, rows: dict[Key, Row], counter: bool) -> None:
    """Merge rows into the stored ones, in key order."""
    if not rows:
        return
    # In key order: sorted here, or by the server as it reads the table.
    many = len(rows) > _COPY_ABOVE
    items = rows.items() if many else sorted(rows.items())
    records = [key + tuple(row) for key, row in items] if counter else _gauge_records(items)
    if many:
        await _through_table(conn, [records])
    else:
        await conn.execute(_MERGE, *map(list, zip(*records, strict=True)))


def _gauge_records(rows: Iterable[tuple[Key, Row]]) -> list[tuple[Any, ...]]:
    """Gauge rows as the table's records (no increase)."""
    return [key + tuple(row[:8]) + _GAUGE for key, row in rows]


async def _through_table(conn: Any, parts: Iterable[list[tuple[Any, ...]]]) -> None:
    """Rows copied into the temporary table, part by part, then merged as one
    statement in key order (the server sorts them as it reads the table)."""
    await conn.execute(_MERGE_TABLE)
    for records in parts:
        await conn.copy_records_to_table("ingestd_merge", records=records, columns=_COLUMNS)
    await conn.execute(_MERGE_FROM_TABLE)
    await conn.execute("TRUNCATE ingestd_merge")  # a second merge in the transaction


async def _counted(conn: Any, plan: RollupPlan, new: Sequence[Record], counters: set[int]) -> None:
    """Counters' increases: what the batch's readings change around them."""
    changes = await _increase_changes(conn, plan, new, counters)
    if changes:
        items = sorted(changes.items())
        await conn.execute(
            _ADD_INCREASE,
            [k[0] for k, _ in items],
            [k[1] for k, _ in items],
            [k[2] for k, _ in items],
            [d for _, d in items],
        )


async def _increase_changes(
    conn: Any, plan: RollupPlan, new: Sequence[Record], counters: set[int]
) -> dict[Key, float]:
    mine = rollups.counter_points(new, counters)
    if not mine:
        return {}
    sids = sorted(mine)  # (locked by `roll`)
    found = await conn.fetch(
        _AROUND, sids, [mine[s][0][0] for s in sids], [mine[s][-1][0] for s in sids]
    )
    around: dict[int, tuple[list[Point], list[int], list[Point]]] = {s: ([], [], []) for s in sids}
    for sid, where, ts, seq, value in found:
        before, inside, after = around[sid]
        if where == 1:
            inside.append(ts)
        else:
            (before if where == 0 else after).append((ts, seq, value))
    windows: dict[int, list[Point]] = {}
    for sid in sids:
        window = rollups.window_of(mine[sid], around[sid][0], around[sid][1][0], around[sid][2])
        if window is not None:
            windows[sid] = window
    whole = [s for s in sids if s not in windows]
    if whole:  # others stored among a batch's own: read those ranges whole
        found = await conn.fetch(
            _WINDOW, whole, [mine[s][0][0] for s in whole], [mine[s][-1][0] for s in whole]
        )
        for s in whole:
            windows[s] = []
        for sid, ts, seq, value in found:
            windows[sid].append((ts, seq, value))
        for s in whole:
            windows[s].sort()
    changes: dict[Key, float] = {}
    for sid in sids:
        for k, d in rollups.increase_changes(windows[sid], mine[sid], plan.widths, sid).items():
            changes[k] = changes.get(k, 0.0) + d
    return changes


async def create_views(conn: Any, widths: Sequence[int]) -> None:
    """`rollup_<interval>` for each configured interval, one instance at a time."""
    if not widths:
        return
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_SPACE)
        for width in widths:
            await conn.execute(
                f"CREATE OR REPLACE VIEW rollup_{rollups.interval_name(width)} AS "
                + rollups.view(width)
            )
