"""The PostgreSQL store's upkeep: partitions ahead, retention by whole
partitions (or chunks), quarantine and device state trimmed, in small
transactions so the writer never waits long."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import Any, Protocol

from ingestd.events import NS
from ingestd.rollups import RollupPlan
from ingestd.store import base
from ingestd.store.base import Upkeep
from ingestd.store.postgres.schema import partitions


class Upkept(Protocol):
    """What upkeep asks of its store (`PostgresStore`)."""

    hypertable: bool

    async def connect(self) -> Any: ...
    async def ensure_partitions_ahead(self, conn: Any) -> None: ...
    def translate(self, exc: BaseException) -> Exception: ...

    rollups: RollupPlan
    keep: tuple[tuple[str, float], ...]


async def upkeep(store: Upkept, cutoff: float | None, rows_per_transaction: int) -> Upkeep:
    """Partitions ahead of need; retention drops whole partitions older than
    the cutoff and deletes, in small transactions, what is older in the
    partition that straddles it (and in the default partition)."""
    conn = await store.connect()
    try:
        # Upkeep is not held to the writer's statement timeout: counting a
        # large partition before dropping it may take a while.
        await conn.execute("SET statement_timeout = 0")
        await store.ensure_partitions_ahead(conn)
        quarantined = 0
        readings, dropped = await _raw_retention(conn, store, cutoff, rows_per_transaction)
        if cutoff is not None:
            quarantined = await _delete_in_batches(
                conn,
                "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine "
                "WHERE received_at < $1 ORDER BY received_at LIMIT $2)",
                cutoff,
                rows_per_transaction,
            )
        rolled = 0
        for width, keep in sorted(store.rollups.cutoffs(time.time()).items()):
            rolled += await _delete_in_batches(
                conn,
                "DELETE FROM rollups WHERE (width, series_id, bucket) IN (SELECT width, "
                f"series_id, bucket FROM rollups WHERE width = {int(width)} AND bucket < $1 "
                "LIMIT $2)",
                keep,
                rows_per_transaction,
            )
        await conn.execute(
            base.DEVICE_STATE_TRIM.format(all="ALL", offset="$1"), base.DEVICE_STATE_KEPT
        )
    except Exception as exc:
        raise store.translate(exc) from exc
    finally:
        with suppress(Exception):
            await conn.close(timeout=2)
    detail: dict[str, Any] = {"partitions_dropped": dropped}
    if rolled:
        detail["rollups_deleted"] = rolled
    return Upkeep(readings, quarantined, detail)


async def _raw_retention(
    conn: Any, store: Upkept, cutoff: float | None, rows_per_transaction: int
) -> tuple[int, int]:
    """Raw readings past the global cutoff (whole partitions or chunks where
    no rule keeps a series longer, else row by row sparing those) and past
    their own rule's: (readings deleted, partitions dropped)."""
    readings = dropped = 0
    series = await conn.fetch("SELECT id, sensor FROM series") if store.keep else []
    global_ns = None if cutoff is None else int(cutoff * NS)
    own = base.retention_exceptions(
        ((r[0], r[1]) for r in series), global_ns, store.keep, time.time()
    )
    longer = [s for s, c in own.items() if c is None or (global_ns or 0) > c]
    if cutoff is not None and store.hypertable and longer:
        # Chunks hold every series: row by row, sparing what a rule keeps.
        readings = await _delete_older_by_key(conn, int(cutoff * NS), rows_per_transaction, longer)
    elif cutoff is not None and store.hypertable:
        cutoff_ns = int(cutoff * NS)
        readings = await conn.fetchval("SELECT count(*) FROM samples WHERE ts_ns < $1", cutoff_ns)
        dropped = len(
            await conn.fetch("SELECT drop_chunks('samples', older_than => $1)", cutoff_ns)
        )
        # What is left below the cutoff is in the chunk it cuts through.
        await _delete_older_by_key(conn, cutoff_ns, rows_per_transaction)
    elif cutoff is not None:
        cutoff_ns = int(cutoff * NS)
        for name, lo, hi in await partitions(conn):
            if hi <= cutoff_ns and not longer:
                n = await conn.fetchval(f'SELECT count(*) FROM "{name}"')
                await conn.execute(f'DROP TABLE "{name}"')
                readings += n
                dropped += 1
            elif lo < cutoff_ns:
                # Row by row: what a rule keeps longer stays.
                readings += await _delete_older(conn, name, cutoff_ns, rows_per_transaction, longer)
        readings += await _delete_older(
            conn, "samples_default", cutoff_ns, rows_per_transaction, longer
        )
    # Series a rule keeps for a time of its own (shorter, or longer but
    # not forever): their rows past it.
    for sid, own_cut in sorted(own.items()):
        if own_cut is not None:
            readings += await _delete_in_batches(
                conn,
                "DELETE FROM samples WHERE (series_id, ts_ns, seq) IN (SELECT series_id, "
                f"ts_ns, seq FROM samples WHERE series_id = {int(sid)} AND ts_ns < $1 "
                "LIMIT $2)",
                own_cut,
                rows_per_transaction,
            )
    return readings, dropped


async def _delete_in_batches(conn: Any, sql: str, cutoff: float, batch: int) -> int:
    """Run a DELETE of at most `batch` rows ($1 the cutoff, $2 the batch) until
    it deletes fewer: small transactions, so the writer never waits long."""
    deleted = 0
    while True:
        status = await conn.execute(sql, cutoff, batch)
        n = int(status.rsplit(" ", 1)[1])
        deleted += n
        if n < batch:
            return deleted
        await asyncio.sleep(0)


async def _delete_older(
    conn: Any, table: str, cutoff_ns: int, batch: int, spared: Sequence[int] = ()
) -> int:
    """Rows of `table` older than the cutoff, but those of the `spared` series."""
    but = f" AND series_id NOT IN ({', '.join(str(int(s)) for s in spared)})" if spared else ""
    return await _delete_in_batches(
        conn,
        f'DELETE FROM "{table}" WHERE ctid = ANY(ARRAY('
        f'SELECT ctid FROM "{table}" WHERE ts_ns < $1{but} LIMIT $2))',
        cutoff_ns,
        batch,
    )


async def _delete_older_by_key(
    conn: Any, cutoff_ns: int, batch: int, spared: Sequence[int] = ()
) -> int:
    """By key: a hypertable's ctid is not unique across its chunks."""
    but = f" AND series_id NOT IN ({', '.join(str(int(s)) for s in spared)})" if spared else ""
    return await _delete_in_batches(
        conn,
        "DELETE FROM samples WHERE (series_id, ts_ns, seq) IN ("
        f"SELECT series_id, ts_ns, seq FROM samples WHERE ts_ns < $1{but} LIMIT $2)",
        cutoff_ns,
        batch,
    )
