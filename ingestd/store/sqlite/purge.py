"""SQLite upkeep: retention in small transactions, and WAL checkpoints."""

from __future__ import annotations

import asyncio
from typing import Any

import aiosqlite


async def delete_samples(conn: aiosqlite.Connection, cutoff_ns: int, batch: int) -> int:
    """Delete samples older than `cutoff_ns`, at most `batch` rows per transaction,
    walking each series along its (series_id, ts_ns, seq) key."""
    async with conn.execute("SELECT id FROM series ORDER BY id") as cur:
        series = [row[0] for row in await cur.fetchall()]
    deleted = 0
    for sid in series:
        while True:
            # The batch-th oldest expired timestamp bounds this transaction.
            async with conn.execute(
                "SELECT ts_ns FROM samples WHERE series_id = ? AND ts_ns < ? ORDER BY ts_ns "
                "LIMIT 1 OFFSET ?",
                (sid, cutoff_ns, batch - 1),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                cur2 = await conn.execute(
                    "DELETE FROM samples WHERE series_id = ? AND ts_ns < ?", (sid, cutoff_ns)
                )
            else:
                cur2 = await conn.execute(
                    "DELETE FROM samples WHERE series_id = ? AND ts_ns <= ?", (sid, row[0])
                )
            deleted += cur2.rowcount
            await cur2.close()
            await asyncio.sleep(0)  # let the writer in between batches
            if row is None:
                break
    return deleted


async def delete_quarantine(conn: aiosqlite.Connection, cutoff: float, batch: int) -> int:
    """Delete quarantine records received before `cutoff`, `batch` per transaction."""
    deleted = 0
    while True:
        cur = await conn.execute(
            "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine "
            "WHERE received_at < ? ORDER BY received_at LIMIT ?)",
            (cutoff, batch),
        )
        n = cur.rowcount
        await cur.close()
        deleted += n
        if n < batch:
            return deleted
        await asyncio.sleep(0)


async def checkpoint(conn: aiosqlite.Connection) -> dict[str, Any]:
    """A passive WAL checkpoint (never waits on the writer)."""
    async with conn.execute("PRAGMA wal_checkpoint(PASSIVE)") as cur:
        busy, wal_pages, moved = await cur.fetchone() or (0, 0, 0)
    return {"wal_pages": wal_pages, "checkpointed": moved, "busy": busy}


async def delete_rollups(conn: aiosqlite.Connection, cutoffs: dict[int, int], batch: int) -> int:
    """Delete rollups of each width (seconds) whose bucket starts before its
    cutoff (Unix seconds), `batch` rows per transaction."""
    deleted = 0
    for width, cutoff in sorted(cutoffs.items()):
        while True:
            cur = await conn.execute(
                "DELETE FROM rollups WHERE (width, series_id, bucket) IN (SELECT width, "
                "series_id, bucket FROM rollups WHERE width = ? AND bucket < ? LIMIT ?)",
                (width, cutoff, batch),
            )
            n = cur.rowcount
            await cur.close()
            deleted += n
            if n < batch:
                break
            await asyncio.sleep(0)
    return deleted
