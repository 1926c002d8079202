"""A batch's rows into `samples`."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from functools import cache
from itertools import chain
from operator import itemgetter
from typing import TypeVar, cast

import aiosqlite

# Rows a statement: 4,096 parameters at most, under SQLite's default limit of
# 32,766. The rest of a batch goes in statements of 128, 16 and 1 rows.
ROWS_PER_INSERT = 1024
_SIZES = (ROWS_PER_INSERT, 128, 16, 1)
_KEY = itemgetter(0, 1, 2)
T = TypeVar("T")


@cache
def _insert(rows: int) -> str:
    return "INSERT OR IGNORE INTO samples (series_id, ts_ns, seq, value) VALUES " + ", ".join(
        ["(?, ?, ?, ?)"] * rows
    )


async def in_thread(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """`fn` on the connection's own thread, as one step: what each of
    aiosqlite's methods queues (its `_execute`), so that several statements
    run back to back, without a trip through the event loop between them."""
    return cast(T, await conn._execute(fn, conn._conn))  # type: ignore[no-untyped-call]  # noqa: SLF001


def statements(rows: Sequence[tuple[int, int, int, float]]) -> list[tuple[str, list[list[float]]]]:
    """The rows' INSERT statements (`insert`), each with its parameter
    lists: the rows in key order (a stable sort), in statements of
    ROWS_PER_INSERT rows, then 128, 16 and 1."""
    keyed = sorted(rows, key=_KEY)
    work: list[tuple[str, list[list[float]]]] = []
    at = 0
    for size in _SIZES:
        end = at + (len(keyed) - at) // size * size
        if end > at:
            groups = [list(chain.from_iterable(keyed[i : i + size])) for i in range(at, end, size)]
            work.append((_insert(size), groups))
            at = end
    return work


async def insert(
    conn: aiosqlite.Connection, rows: list[tuple[int, int, int, float]], first: Sequence[str] = ()
) -> int:
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

    One step on the connection's thread (`in_thread`): the statements `first`
    (the batch's BEGIN, a savepoint), then the rows, a few large statements.
    The thread holds the GIL only to bind a statement's values, and the
    event loop, meanwhile decoding what arrived (a chunk of SenML packs:
    ~25 ms), lets it have the GIL only every switch interval: each statement
    costs a wait (`GIL_SWITCH_INTERVAL`), so few of them.
    """
    work = statements(rows)

    def run(db: sqlite3.Connection) -> int:
        for sql in first:
            db.execute(sql)
        changed = 0
        for sql, groups in work:
            cur = db.executemany(sql, groups)
            changed += cur.rowcount
            cur.close()
        return changed

    return await in_thread(conn, run)
