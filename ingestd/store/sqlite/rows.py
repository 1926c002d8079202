"""A batch's rows into `samples`."""

from __future__ import annotations

from itertools import chain
from operator import itemgetter

import aiosqlite

ROWS_PER_INSERT = 256  # 1,024 parameters, well under SQLite's limit of 32,766
_INSERT_ONE = "INSERT OR IGNORE INTO samples (series_id, ts_ns, seq, value) VALUES (?, ?, ?, ?)"
_INSERT_MANY = "INSERT OR IGNORE INTO samples (series_id, ts_ns, seq, value) VALUES " + ", ".join(
    ["(?, ?, ?, ?)"] * ROWS_PER_INSERT
)
_KEY = itemgetter(0, 1, 2)


async def insert(conn: aiosqlite.Connection, rows: list[tuple[int, int, int, float]]) -> int:
    """How many of the rows (series_id, ts_ns, seq, value) were new: a stored
    key is skipped, and of two with one key the first is stored.

    In key order (a stable sort, so that first stays first): each series'
    rows go in one after another, the B-tree's leaf found once per run of
    them. A commit writes every leaf page it changed, one per series in a
    batch of a fleet's readings; in order, fewer and cheaper (plain sqlite3,
    1,000-row batches, synchronous FULL, CPU a row, two people's runs: 400
    series 7.6 -> 5.5 us and 4.8 -> 3.9; 40,000 series arriving in random
    order 12.0 -> 9.3 and 8.5 -> 8.0). Multi-row statements: ~30% less work
    per row than one row per step.
    """
    keyed = sorted(rows, key=_KEY)
    whole = len(keyed) - len(keyed) % ROWS_PER_INSERT
    groups = [
        list(chain.from_iterable(keyed[i : i + ROWS_PER_INSERT]))
        for i in range(0, whole, ROWS_PER_INSERT)
    ]
    changed = 0
    for sql, params in ((_INSERT_MANY, groups), (_INSERT_ONE, keyed[whole:])):
        if params:
            cur = await conn.executemany(sql, params)
            changed += cur.rowcount
            await cur.close()
    return changed
