"""The PostgreSQL store: one database that many ingestd instances write into.

A connection per batch in flight (up to `concurrent_batches`, opened with
the store and kept), one for upkeep. A batch COPYs its samples straight into
the partition that holds them (a batch of readings alone is that COPY, a
transaction by itself); if a key is already stored that COPY fails, is undone
(a savepoint, or its own transaction), and the samples go through a
session-local staging table and `INSERT ... SELECT ... ON CONFLICT DO
NOTHING` instead: redeliveries are no-ops, as in SQLite, and a different
value under a stored key is a conflict, quarantined in the same transaction.
New series are upserted in a fixed order, so two instances creating the same
series at once both succeed (one waits for the other) instead of
deadlocking.

A connection that dies during a batch's commit (COMMIT, or the lone COPY)
leaves the outcome unknown: the batch is held and written again; its
readings are then stored or counted as already stored (duplicates), and its
quarantine rows are written once (a unique index).

store.url may name several hosts (`connect`): connections go to the one that
takes writes. A new connection on another server than the one the store was
opened on (a promoted standby, or the same server restarted) opens the store
afresh: the series ids and counters it keeps in memory are read again from
that server, which may lack what the old one had (asynchronous replication).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import asyncpg  # the optional dependency: this module is imported only for PostgreSQL
import structlog

from ingestd.errors import StoreError, StoreUnavailable
from ingestd.events import NS
from ingestd.pending import drained
from ingestd.rollups import NEEDS_REBUILD, RollupPlan
from ingestd.store import base, series
from ingestd.store.base import Upkeep
from ingestd.store.postgres.batch import Batch
from ingestd.store.postgres.connect import connect_writable, server_of
from ingestd.store.postgres.faults import classify, kept, redacted
from ingestd.store.postgres.rolling import close, close_settings, create_views
from ingestd.store.postgres.schema import (
    DAY_NS,
    create_partitions,
    ensure_partitions,
    is_hypertable,
    migrate,
    partitions,
    uncovered,
)
from ingestd.store.postgres.upkeep import upkeep as run_upkeep

log = structlog.get_logger("ingestd.store")

_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS ingestd_stage "
    "(i integer, series_id integer, ts_ns bigint, seq integer, value double precision) "
    "ON COMMIT DELETE ROWS"
)
# Creating a partition on the batch path waits at most this long for its locks
# (another instance's DDL, writers holding the parent): past it, the batch's
# readings go to the default partition and creation is tried again later.
_PARTITION_LOCK_TIMEOUT_MS = 2000
_PARTITION_RETRY_AFTER = 60.0  # seconds before the batch path tries again after a failure


async def _series_ids(conn: asyncpg.Connection) -> series.SeriesIds:
    """The SERIES_KEPT most recently made series, a few thousand rows a query
    (all at once took ~30 MB more at its peak than the cache it fills)."""
    cache, shared = series.series_cache(), dict[str, str]()
    after = await conn.fetchval(
        "SELECT id FROM series ORDER BY id DESC LIMIT 1 OFFSET $1", series.SERIES_KEPT - 1
    )
    after = (after or 0) - 1
    while rows := await conn.fetch(
        "SELECT sensor, metric, tags, unit, id FROM series WHERE id > $1 ORDER BY id LIMIT 4096",
        after,
    ):
        series.remember(cache, rows, shared)
        after = rows[-1][4]
    return cache


class PostgresStore(base.Store):
    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        statement_timeout_ms: int = 30000,
        partition_days: int = 1,
        partitions_ahead: int = 3,
        partitions_behind: int = 30,
        retention_days: float = 0.0,
        clock: Any = time.time,
        rollups: RollupPlan | None = None,
    ) -> None:
        self.url = url
        self.rollups = rollups or RollupPlan()
        self.where = redacted(url)
        self._password = password
        self.statement_timeout_ms = statement_timeout_ms
        self.partition_days = partition_days
        self.partitions_ahead = partitions_ahead
        self.partitions_behind = partitions_behind
        self.retention_days = retention_days
        self.clock = clock
        # Series ids by recency (series.SERIES_KEPT): one not held is looked up.
        self.series_ids = series.series_cache()
        self.sequences: dict[str, tuple[int, int, int]] = {}
        self.devices: dict[str, list[tuple[str, bytes, bytes]]] = {}
        # Connections not in a batch; a batch takes one. Up to
        # `concurrent_batches` batches are open at once (the writer's pipeline):
        # the server loads one while the daemon sends the next.
        self._idle: list[Any] = []
        self._opened = False
        self._opening = asyncio.Lock()
        self.concurrent_batches = 2
        self._partitioned_until = 0  # ts_ns up to which partitions exist ahead
        # (name, from ts_ns, to ts_ns) of the range partitions, as last listed.
        self._ranges: list[tuple[str, int, int]] = []
        # Periods (ts_ns // period) a batch needed while inside a transaction.
        self.deferred_periods: set[int] = set()
        self._covering = asyncio.Lock()  # one creation at a time per instance
        self._cover_after = 0.0  # monotonic time before which the batch path creates none
        self.hypertable = False  # TimescaleDB: it makes the chunks, drop_chunks() expires them
        # (group, epoch) of the primary role this store writes for (None: a
        # member's store): every batch checks the term is still its own.
        self.fence: tuple[str, int] | None = None
        # (host:port, postmaster start) of the server the store was opened on.
        self.server: tuple[str, object] | None = None

    async def connect(self) -> Any:
        try:
            return await connect_writable(
                self.url,
                password=self._password,
                server_settings={
                    "application_name": "ingestd",
                    "statement_timeout": str(self.statement_timeout_ms),
                    # Acknowledged means durable: a server configured with
                    # synchronous_commit = off would lose acknowledged batches
                    # in a crash (measured: 1,104 of 40,000 readings at kill -9).
                    "synchronous_commit": "on",
                },
            )
        except Exception as exc:
            raise self.translate(exc) from exc

    async def open(self) -> None:
        async with self._opening:
            if not self._opened:
                await self._open()

    async def _open(self) -> None:
        conn = await self.connect()
        try:
            server = await server_of(conn)
            if self.server is not None and server[0] != self.server[0]:
                log.warning(
                    "the store is on another server now: a failover, or another host "
                    "of store.url took over; its state is read afresh",
                    store=self.where,
                    server=server[0],
                    was=self.server[0],
                )
            self.server = server
            await migrate(conn, self.where, self.partition_days)
            await create_views(conn, self.rollups.widths)
            if self.rollups:
                self.needs_rebuild = bool(await conn.fetchval(NEEDS_REBUILD))
            self.hypertable = await is_hypertable(conn)
            await self.ensure_partitions_ahead(conn)
            await conn.execute(_STAGE)
            self.series_ids = await _series_ids(conn)
            rows = await conn.fetch(
                "SELECT sensor, last_seq, seq_gaps, seq_missing FROM sensor_status "
                "WHERE last_seq IS NOT NULL LIMIT $1",
                base.SEQUENCES_LOADED,
            )
            self.sequences = {r[0]: (r[1], r[2], r[3]) for r in rows}
            rows = await conn.fetch(
                "SELECT format, device, position, description FROM device_state "
                "WHERE owner = $1 AND description IS NOT NULL ORDER BY updated DESC LIMIT $2",
                self.owner,
                base.DEVICE_STATE_LOADED,
            )
            self.devices = base.device_states(rows)
        except BaseException as exc:
            with suppress(Exception):
                await conn.close(timeout=2)
            if isinstance(exc, Exception) and not isinstance(exc, StoreError):
                raise self.translate(exc) from exc
            raise
        self._idle.append(conn)
        # The pipeline's other connections now, not in the middle of the
        # first burst (a connection and its staging table: tens of ms).
        for _ in range(self.concurrent_batches - 1):
            try:
                fresh = await self._fresh()
            except StoreUnavailable:
                break  # the batch that needs it opens it (or waits out why it cannot)
            if fresh is None:
                return  # another server already: the next batch opens the store on it
            self._idle.append(fresh)
        self._opened = True

    async def _take(self) -> Any:
        """An idle connection, or a new one (None: a new one is on another
        server than the store was opened on, which is now closed)."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            # Closed by the server while idle (a restart, pg_terminate_backend,
            # idle_session_timeout): start afresh, and say so.
            log.warning("store connection closed by the server; reconnecting", store=self.where)
        return await self._fresh()

    async def _fresh(self) -> Any:
        """A new connection, ready for batches (None: it is on another server
        than the store was opened on; the store is closed, to open afresh)."""
        conn = await self.connect()
        try:
            if await server_of(conn) != self.server:
                self._reset(conn)
                return None
            await conn.execute(_STAGE)
        except BaseException as exc:
            conn.terminate()
            if isinstance(exc, Exception):
                raise self.translate(exc) from exc
            raise
        return conn

    async def ensure_partitions_ahead(self, conn: Any) -> None:
        if self.hypertable:
            return
        now_ns = int(self.clock() * NS)
        created = await ensure_partitions(conn, now_ns, self.partition_days, self.partitions_ahead)
        if created:
            log.info("partitions created", partitions=created)
        self._partitioned_until = now_ns + self.partitions_ahead * self.partition_days * 86400 * NS
        self._ranges = await partitions(conn)

    def partition_for(self, lo_ns: int, hi_ns: int) -> str:
        """The range partition holding [lo_ns, hi_ns], else the parent table."""
        for name, lo, hi in self._ranges:
            if lo <= lo_ns and hi_ns < hi:
                return name
        return "samples"

    def forget_partitions(self) -> None:
        self._ranges = []

    def missing_periods(self, stamps: Sequence[int]) -> list[int]:
        """The partition periods (ts_ns // period length) these readings fall
        into that have no partition yet and are within the bound: from
        `partitions_behind` periods before the current one (and not wholly
        older than the retention cutoff, which would drop it at once) to
        `partitions_ahead` after it. Readings outside it go to the default
        partition. From the cached list: no round trip."""
        if self.hypertable:
            return []
        step = self.partition_days * DAY_NS
        now = self.clock()
        current = int(now * NS) // step
        first = current - self.partitions_behind
        if self.retention_days:
            first = max(first, int((now - self.retention_days * 86400) * NS) // step)
        last = current + self.partitions_ahead
        taken = [(lo, hi) for _, lo, hi in self._ranges]
        return sorted(
            p
            for p in {ts // step for ts in stamps}
            if first <= p <= last and uncovered(p * step, (p + 1) * step, taken)
        )

    async def cover(self, conn: Any, periods: list[int]) -> None:
        """Create the partitions for `periods` (and those deferred), on a
        connection outside a transaction; the cache is then listed afresh.

        A lock not had in time, or a statement timeout (moving many rows out
        of the default partition), is not the batch's failure: its readings go
        to the default partition, and the batch path tries again a minute on."""
        async with self._covering:
            wanted = sorted(set(periods) | self.deferred_periods)
            self.deferred_periods.clear()
            if time.monotonic() < self._cover_after:
                return
            # Another batch of this instance may have made them meanwhile.
            wanted = self.missing_periods([p * self.partition_days * DAY_NS for p in wanted])
            if not wanted:
                return
            step = self.partition_days * DAY_NS
            try:
                created = await create_partitions(
                    conn,
                    [(p * step, (p + 1) * step) for p in wanted],
                    lock_timeout_ms=_PARTITION_LOCK_TIMEOUT_MS,
                )
                self._ranges = await partitions(conn)
            except asyncpg.PostgresError as exc:
                # 23514: rows of the range written to the default partition
                # meanwhile. Either way the readings are stored (in the default
                # partition) and creation is tried again later.
                if not kept(exc) and getattr(exc, "sqlstate", "") != "23514":
                    raise
                self._cover_after = time.monotonic() + _PARTITION_RETRY_AFTER
                log.warning(
                    "could not create partitions for arriving readings now; "
                    "they go to the default partition",
                    error=str(exc),
                    retry_seconds=_PARTITION_RETRY_AFTER,
                )
                return
        if created:
            log.info("partitions created for arriving readings", partitions=created)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        self._opened = False
        for conn in idle:
            with suppress(Exception):
                await conn.close(timeout=2)

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    def translate(self, exc: BaseException) -> Exception:
        unavailable = classify(exc)
        if unavailable is not None:
            return unavailable
        return StoreError(f"{self.where}: {exc}")

    async def _connection(self) -> Any:
        """A connection on the store's server, the store opened there first."""
        await self.open()
        conn = await self._take()
        if conn is None:  # the server changed: open the store on the new one
            await self.open()
            conn = await self._take()
            if conn is None:
                raise StoreUnavailable(base.CONNECTION_LOST, "the server changed again")
        return conn

    @asynccontextmanager
    async def batch(self, now: float | None = None) -> AsyncIterator[Batch]:
        conn = await self._connection()
        tx = Batch(self, conn, time.time() if now is None else now)
        tx.owner = self.owner
        try:
            if self.fence is not None:
                await tx.fenced(*self.fence)
            yield tx
            await tx.finish()
        except BaseException as exc:
            await self._abandon(conn, exc, tx.begun)
            if isinstance(exc, Exception) and not isinstance(exc, StoreError):
                raise self.translate(exc) from exc
            raise
        self._idle.append(conn)
        self.pending_readings += tx.pending
        self.series_ids.update(tx.new_series)

    async def close_rollups(self, most: int) -> int:
        if not self.rollups:
            return 0
        conn = await self._connection()
        try:
            async with conn.transaction():
                await conn.execute(close_settings(self.statement_timeout_ms))
                # Before the pending rows: `rollups rebuild` holds the table
                # while it takes them all, so a close waits for it.
                await conn.execute("LOCK TABLE rollups IN ROW EXCLUSIVE MODE")
                closed = await close(conn, self.rollups, most)
        except BaseException as exc:
            self._reset(conn)
            if isinstance(exc, Exception) and not isinstance(exc, StoreError):
                raise self.translate(exc) from exc
            raise
        self._idle.append(conn)
        self.pending_readings = drained(self.pending_readings, closed)
        return closed

    async def spool_forwarded(self, spool: str) -> int:
        conn = await self._connection()
        try:
            upto = await conn.fetchval("SELECT upto FROM spool_forwarded WHERE spool = $1", spool)
        except BaseException as exc:
            self._reset(conn)
            if isinstance(exc, Exception):
                raise self.translate(exc) from exc
            raise
        self._idle.append(conn)
        return int(upto or 0)

    async def _abandon(self, conn: Any, exc: BaseException, begun: bool) -> None:
        """Roll back; keep the connection if it is still good, else start afresh."""
        if not begun:
            # No transaction open. The connection is good after an error the
            # server reported that leaves it so; after anything else (it died,
            # or the task was cancelled in the middle of a COPY) start afresh.
            if (
                isinstance(exc, asyncpg.PostgresError)
                and not conn.is_closed()
                and (classify(exc) is None or kept(exc))
            ):
                self._idle.append(conn)
            else:
                self._reset(conn)
            return
        try:
            if not conn.is_closed():
                await asyncio.wait_for(conn.execute("ROLLBACK"), 5)
        except Exception:
            self._reset(conn)
            return
        except BaseException:
            self._reset(conn)
            raise
        if classify(exc) is not None and (conn.is_closed() or not kept(exc)):
            self._reset(conn)
        else:
            self._idle.append(conn)

    def _reset(self, conn: Any) -> None:
        """Drop this connection and the idle ones; the next batch opens afresh
        (the schema checked, series and counters read again)."""
        conn.terminate()
        idle, self._idle = self._idle, []
        for other in idle:
            other.terminate()
        self._opened = False

    async def upkeep(self, cutoff: float | None, rows_per_transaction: int) -> Upkeep:
        """Partitions ahead of need; retention drops whole partitions older than
        the cutoff (`ingestd.store.postgres.upkeep`)."""
        return await run_upkeep(self, cutoff, rows_per_transaction)

    def advice(self, exc: Exception) -> str:
        text = str(exc)
        lowered = text.lower()
        if "password authentication failed" in lowered or "no password" in lowered:
            return (
                f"PostgreSQL at {self.where} refused the password - set store.password_file "
                f"(or PGPASSWORD / ~/.pgpass) ({text})"
            )
        if getattr(exc, "condition", None) == base.READ_ONLY:
            return (
                f"PostgreSQL at {self.where} takes no writes - a standby not yet promoted, "
                f"or default_transaction_read_only; waiting for a host that does ({text})"
            )
        if "does not exist" in lowered and "database" in lowered:
            return f"{text} - create it (createdb) or fix store.url"
        if "connect" in lowered or "refused" in lowered:
            return f"PostgreSQL at {self.where} does not answer - is it running? ({text})"
        return text
