"""SQLite upkeep: retention in small transactions, and WAL checkpoints."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiosqlite

from ingestd.events import NS
from ingestd.rollups import RollupPlan
from ingestd.store import base
from ingestd.store.base import Upkeep, retention_exceptions


async def delete_samples(
    conn: aiosqlite.Connection,
    cutoff_ns: int | None,
    batch: int,
    rules: Sequence[tuple[str, float]] = (),
    now: float = 0.0,
) -> int:
    """Delete samples older than `cutoff_ns` (None: none), or than their own
    cutoff for series a retention rule (sensor glob, days) matches, at most
    `batch` rows per transaction, walking each series along its key."""
    async with conn.execute("SELECT id, sensor FROM series ORDER BY id") as cur:
        series = [(int(r[0]), str(r[1])) for r in await cur.fetchall()]
    own = retention_exceptions(series, cutoff_ns, rules, now)
    deleted = 0
    for sid, _ in series:
        cut = own.get(sid, cutoff_ns) if own else cutoff_ns
        if cut is None:
            continue
        while True:
            # The batch-th oldest expired timestamp bounds this transaction.
            async with conn.execute(
                "SELECT ts_ns FROM samples WHERE series_id = ? AND ts_ns < ? ORDER BY ts_ns "
                "LIMIT 1 OFFSET ?",
                (sid, cut, batch - 1),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                cur2 = await conn.execute(
                    "DELETE FROM samples WHERE series_id = ? AND ts_ns < ?", (sid, cut)
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


async def purge(
    conn: aiosqlite.Connection,
    cutoff: float | None,
    batch: int,
    keep: Sequence[tuple[str, float]],
    rollups: RollupPlan,
    now: float,
) -> Upkeep:
    """One upkeep pass: raw readings past their retention (global `cutoff`,
    Unix seconds, or a rule's), quarantine records past `cutoff`, each
    interval's rollups past its own, device state beyond its bound; then a
    checkpoint."""
    readings = quarantined = 0
    if cutoff is not None or keep:
        readings = await delete_samples(
            conn, None if cutoff is None else int(cutoff * NS), batch, keep, now
        )
    if cutoff is not None:
        quarantined = await delete_quarantine(conn, cutoff, batch)
    # Each interval's own retention, whatever the raw readings' is.
    rolled = await delete_rollups(conn, rollups.cutoffs(now), batch)
    await conn.execute(
        base.DEVICE_STATE_TRIM.format(all="-1", offset="?"), (base.DEVICE_STATE_KEPT,)
    )
    detail = await checkpoint(conn)
    if rolled:
        detail["rollups_deleted"] = rolled
    return Upkeep(readings, quarantined, detail)
