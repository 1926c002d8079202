"""The SQLite store: the daemon's connection and its transactional batches.

One file in WAL mode (readers never block the writer). Samples are keyed by
(series_id, ts_ns, seq) (see `schema`), so a redelivered reading is a no-op:
the first write wins, and a different value under a stored key is a conflict,
quarantined. Every write goes through `async with store.batch() as tx:`, one
transaction that commits on exit and rolls back on any error or cancellation.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from ingestd.diskguard import BYTES_PER_READING, DiskGuard
from ingestd.errors import StoreError, StoreUnavailable
from ingestd.events import Reading, Rejected
from ingestd.pending import drained
from ingestd.rollups import NEEDS_REBUILD, RollupPlan
from ingestd.store import base, series
from ingestd.store.base import CORRUPT, DISK_LOW, REPLACED, Upkeep
from ingestd.store.sqlite import corrupt, rolling
from ingestd.store.sqlite.conditions import classify
from ingestd.store.sqlite.purge import purge
from ingestd.store.sqlite.rows import ROWS_PER_INSERT, insert
from ingestd.store.sqlite.schema import migrate

_SERIES_PER_STATEMENT = 256
_NEW_SERIES = "INSERT OR IGNORE INTO series (sensor, metric, tags, unit) VALUES {values}"
_SERIES_IDS = (  # VALUES first: an index search each (an IN scanned the table)
    "WITH v (sensor, metric, tags, unit) AS (VALUES {values}) "
    "SELECT s.id, s.sensor, s.metric, s.tags, s.unit FROM v CROSS JOIN series AS s "
    "ON s.sensor = v.sensor AND s.metric = v.metric AND s.tags = v.tags AND s.unit = v.unit"
)
# Rows offered that differ from what is stored under their key (checked only
# when a batch inserted fewer rows than it offered).
_CONFLICTS = (
    "WITH offered (i, series_id, ts_ns, seq, value) AS (VALUES {values}) "
    "SELECT o.i, s.value FROM offered AS o JOIN samples AS s "
    "ON s.series_id = o.series_id AND s.ts_ns = o.ts_ns AND s.seq = o.seq "
    "WHERE s.value IS NOT o.value"
)

_SIDE = ("-wal", "-shm")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Batch(base.Batch):
    """One open transaction; see `SqliteStore.batch`.

    After `add_readings`: `inserted` new rows, `duplicates` rows already stored
    with the same value (a redelivery), and `conflicts`, readings whose key
    holds a different value, quarantined in the same transaction.
    """

    def __init__(self, store: SqliteStore, conn: aiosqlite.Connection, now: float) -> None:
        super().__init__(now)
        self._store = store
        self._conn = conn
        # BEGIN IMMEDIATE goes with the batch's first statement: for its rows,
        # in the same step as the insert (`rows.insert`), queued before the
        # event loop turns to the next chunk (see `_first`).
        self.begun = False

    def _first(self) -> tuple[str, ...]:
        """The statements to send before this batch's next one: its BEGIN,
        once. A batch that sends none (no readings, nothing quarantined) has
        no transaction to commit."""
        if self.begun:
            return ()
        self.begun = True
        return ("BEGIN IMMEDIATE",)

    async def _begin(self) -> None:
        for sql in self._first():
            await self._conn.execute(sql)

    async def add_readings(self, readings: Sequence[Reading]) -> None:
        if not readings:
            return
        disk = self._store.disk
        low = disk.problem(len(readings) * BYTES_PER_READING) if disk is not None else None
        if low is not None:  # this batch would take the disk below its minimum
            raise StoreUnavailable(DISK_LOW, low)
        known = self._store.series_ids
        try:
            # Every series already known: the common case, in one comprehension.
            rows = [
                (known[(r.sensor, r.metric, r.tags, r.unit)], r.ts_ns, r.seq, r.value)
                for r in readings
            ]
        except KeyError:
            await self._begin()
            rows = await self._rows_with_new_series(readings)
        first = self._first()
        if self._store.rollups:
            first += ("SAVEPOINT ingestd_rows",)
        inserted = await insert(self._conn, rows, first)
        self.inserted += inserted
        plan = self._store.rollups
        if inserted == len(rows):
            if plan:
                await self._conn.execute("RELEASE ingestd_rows")
                self.pending += await rolling.roll(
                    self._conn, plan, rows, rolling.counter_series(rows, readings, plan.counters)
                )
            return
        if plan:
            # Which rows are new: the insert again, undone, returning them.
            await self._conn.execute("ROLLBACK TO ingestd_rows")
            await self._conn.execute("RELEASE ingestd_rows")
            new = await rolling.insert_returning(self._conn, rows)
        conflicts = await self._conflicts(rows, readings)
        self.duplicates += len(rows) - inserted - len(conflicts)
        if conflicts:
            await self.add_rejected(conflicts)
            self.conflicts += conflicts
        if plan:
            self.pending += await rolling.roll(
                self._conn, plan, new, rolling.counter_series(rows, readings, plan.counters)
            )

    async def _conflicts(
        self, rows: list[tuple[int, int, int, float]], readings: Sequence[Reading]
    ) -> list[Rejected]:
        """Readings not inserted because their key holds a different value.

        The same key with the same value is a redelivery (a duplicate); with
        another value it is a second, different reading claiming that series
        and time: quarantined with both values, never silently dropped.
        """
        found: list[tuple[int, float]] = []
        for start in range(0, len(rows), ROWS_PER_INSERT):
            part = rows[start : start + ROWS_PER_INSERT]
            sql = _CONFLICTS.format(values=", ".join(["(?, ?, ?, ?, ?)"] * len(part)))
            params = list(chain.from_iterable((start + i, *row) for i, row in enumerate(part)))
            async with self._conn.execute(sql, params) as cur:
                found += [(int(i), float(v)) for i, v in await cur.fetchall()]
        return [self.conflict(readings[i], stored) for i, stored in sorted(found)]

    async def _rows_with_new_series(
        self, readings: Sequence[Reading]
    ) -> list[tuple[int, int, int, float]]:
        """A batch's rows, its new series made and looked up a few hundred a statement."""
        ids, missing = series.held_ids(readings, self._store.series_ids, self.new_series)
        shared: dict[str, str] = {}
        for start in range(0, len(missing), _SERIES_PER_STATEMENT):
            part = missing[start : start + _SERIES_PER_STATEMENT]
            values = ", ".join(["(?, ?, ?, ?)"] * len(part))
            params = list(chain.from_iterable(part))
            await self._conn.execute(_NEW_SERIES.format(values=values), params)
            async with self._conn.execute(_SERIES_IDS.format(values=values), params) as cur:
                for sid, *key in await cur.fetchall():
                    k = series.series_key(key[0], key[1], key[2], key[3], shared)
                    self.new_series[k] = ids[k] = int(sid)
        return [
            (ids[(r.sensor, r.metric, r.tags, r.unit)], r.ts_ns, r.seq, r.value) for r in readings
        ]

    async def execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        await self._begin()
        await self._conn.executemany(sql, rows)

    async def add_rejected(self, rejected: Sequence[Rejected]) -> None:
        if not rejected:
            return
        await self._begin()
        await self._conn.executemany(
            "INSERT INTO quarantine (received_at, topic, payload, reason) VALUES (?, ?, ?, ?)",
            [(r.received_at, r.topic, r.payload, r.reason) for r in rejected],
        )
        self.quarantined += len(rejected)


async def _series_ids(conn: aiosqlite.Connection) -> series.SeriesIds:
    """The SERIES_KEPT most recently made series, read a few thousand rows at a
    time: the whole result at once (262,144 rows of five objects) took ~30 MB
    more at its peak than the cache it fills."""
    cache, shared = series.series_cache(), dict[str, str]()
    async with conn.execute(
        "SELECT id FROM series ORDER BY id DESC LIMIT 1 OFFSET ?", (series.SERIES_KEPT - 1,)
    ) as cur:
        first = await cur.fetchone()
    async with conn.execute(
        "SELECT sensor, metric, tags, unit, id FROM series WHERE id >= ? ORDER BY id",
        (first[0] if first else 0,),
    ) as cur:
        while rows := await cur.fetchmany(4096):
            series.remember(cache, rows, shared)
    return cache


class SqliteStore(base.Store):
    def __init__(
        self,
        path: Path,
        *,
        synchronous: Literal["full", "normal"] = "full",
        busy_timeout_ms: int = 1000,
        rollups: RollupPlan | None = None,
        check_seconds: float = 5.0,
        set_aside_corrupt: bool = True,
        disk: DiskGuard | None = None,
    ) -> None:
        self.path = Path(path)
        # The check at the first open (seconds; 0: the header only); a corrupt
        # file set aside (the daemon's) or only reported (a command's).
        self.check_seconds = check_seconds
        self.set_aside_corrupt = set_aside_corrupt
        self.disk = disk
        self._checked = not set_aside_corrupt
        self.rollups = rollups or RollupPlan()
        self.where = str(path)
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        # Series ids by recency (series.SERIES_KEPT): one not held is looked up.
        self.series_ids = series.series_cache()
        # Device sequence counters as last committed: (last, gaps, missing).
        self.sequences: dict[str, tuple[int, int, int]] = {}
        self.devices: dict[str, list[tuple[str, bytes, bytes]]] = {}
        self._conn: aiosqlite.Connection | None = None
        self._writing = asyncio.Lock()  # a transaction at a time: a batch's or a close's
        # (device, inode) of the file the connection has open: a file deleted or
        # replaced under a running daemon is noticed before anything is acked.
        self._identity: tuple[int, int] | None = None
        # ... and of its -wal and -shm files, which are ours to set aside then.
        self._side_files: dict[str, tuple[int, int] | None] = {}

    async def open(self) -> None:
        """Open (creating and migrating the schema). Raises StoreUnavailable if it can't.

        The first open checks the file (`corrupt.check`); a corrupt one, found
        then or by the open itself, is set aside and a fresh one opened."""
        if self._conn is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(base.CANNOT_OPEN, f"{self.path.parent}: {exc}") from None
        if not self._checked:
            self._checked = True
            found = await corrupt.check_at_open(self.path, self.check_seconds, self.busy_timeout_ms)
            if found is not None:
                self._set_aside_corrupt(found, "at start (checked before opening)")
        try:
            await self._connect()
        except corrupt.CorruptDatabase as exc:
            if not self.set_aside_corrupt:
                raise
            self._set_aside_corrupt(exc.found, "while opening")
            await self._connect()

    def _set_aside_corrupt(self, found: str, when: str) -> str:
        """Set the corrupt database aside (its connection closed); what the
        StoreUnavailable raised for it says."""
        said = corrupt.set_aside_reported(self.path, found, when)
        self.corrupt_files += 1
        self._side_files = {}
        return said

    async def _connect(self) -> None:
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            async with conn.execute("PRAGMA journal_mode = WAL") as cur:
                row = await cur.fetchone()
            if row is None or str(row[0]).lower() != "wal":
                raise StoreError(f"{self.path}: could not enable WAL mode (got {row!r})")
            await conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            await migrate(conn, str(self.path))
            await rolling.create_views(conn, self.rollups.widths)
            if self.rollups:
                async with conn.execute(NEEDS_REBUILD) as cur:
                    self.needs_rebuild = bool((await cur.fetchone() or (0,))[0])
            self.series_ids = await _series_ids(conn)
            async with conn.execute(
                "SELECT sensor, last_seq, seq_gaps, seq_missing "
                "FROM sensor_status WHERE last_seq IS NOT NULL LIMIT ?",
                (base.SEQUENCES_LOADED,),
            ) as cur:
                self.sequences = {row[0]: (row[1], row[2], row[3]) for row in await cur.fetchall()}
            async with conn.execute(
                "SELECT format, device, position, description FROM device_state "
                "WHERE owner = ? AND description IS NOT NULL ORDER BY updated DESC LIMIT ?",
                (self.owner, base.DEVICE_STATE_LOADED),
            ) as cur:
                self.devices = base.device_states(await cur.fetchall())
            self._identity = _identity(self.path)
            self._side_files = {sfx: _identity(Path(f"{self.path}{sfx}")) for sfx in _SIDE}
            if self._identity is None:
                raise StoreUnavailable(REPLACED, f"{self.path} vanished while being opened")
        except BaseException as exc:
            await conn.close()
            if isinstance(exc, sqlite3.Error):
                raise self._translate(exc) from exc
            raise
        self._conn = conn

    def _set_aside_side_files(self) -> list[str]:
        """Move our -wal and -shm away from a path whose database is no longer ours.

        SQLite does not checkpoint into a moved file, so our write-ahead log
        stays beside the newcomer, which would replay it (pages of another
        database) on open. Only files with the identity we opened are moved.
        """
        moved: list[str] = []
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for sfx, ident in self._side_files.items():
            side = Path(f"{self.path}{sfx}")
            if ident is not None and _identity(side) == ident:
                aside = side.with_name(f"{side.name}.orphaned-{stamp}")
                with suppress(OSError):
                    side.rename(aside)
                    moved.append(str(aside))
        self._side_files = {}
        return moved

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(sqlite3.Error):
                await conn.close()

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def upkeep(self, cutoff: float | None, rows_per_transaction: int) -> Upkeep:
        """Retention and a WAL checkpoint, on a connection of its own in small
        transactions: SQLite has one writer at a time, and the daemon's busy
        timeout covers the few milliseconds a deletion holds the lock."""
        try:
            async with aiosqlite.connect(self.path, isolation_level=None) as conn:
                await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
                done = await purge(
                    conn, cutoff, rows_per_transaction, self.keep, self.rollups, time.time()
                )
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        return done

    def advice(self, exc: Exception) -> str:
        """Why the database cannot be opened, and what to do about it."""
        path = self.path
        text = str(exc)
        lowered = text.lower()
        user = _user()
        if "permission denied" in lowered or "read-only" in lowered or "readonly" in lowered:
            missing = not path.parent.exists()
            where, verb = (path.parent, "create") if missing else (path, "write")
            why = "read-only file system" if "read-only" in lowered else "permission denied"
            return (
                f"cannot {verb} {where}: {why} for user {user} - set store.path to a "
                f"place {user} can write (e.g. var/ingestd.db), or run as a user that can"
            )
        if "no space" in lowered or "disk full" in lowered:
            return f"the disk holding {path} is full - free space there ({text})"
        return text

    def _translate(self, exc: sqlite3.Error) -> Exception:
        if corrupt.is_corrupt(exc):
            return corrupt.CorruptDatabase(self.path, str(exc))
        unavailable = classify(exc)
        if unavailable is not None:
            return unavailable
        return StoreError(f"{self.path}: {exc}")

    @asynccontextmanager
    async def batch(self, now: float | None = None) -> AsyncIterator[Batch]:
        """One transaction: commits on exit, rolls back on error or cancellation.

        Transient SQLite conditions surface as StoreUnavailable; the caller holds
        its data and retries. So does a database file that was deleted or
        replaced while open: the commit went to a file nobody will read again,
        so it does not count; the connection is dropped and the retry writes
        the batch to whatever is at `store.path` now (a new database if nothing).
        `now` stamps quarantine records the batch adds (conflicts).
        """
        low = self.disk.problem() if self.disk is not None else None
        if low is not None:
            raise StoreUnavailable(DISK_LOW, low)
        async with self._writing, self._transaction(begin=False) as conn:
            tx = Batch(self, conn, time.time() if now is None else now)
            tx.owner = self.owner
            yield tx
        self.pending_readings += tx.pending
        self.series_ids.update(tx.new_series)

    @asynccontextmanager
    async def _transaction(self, begin: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        """A transaction on the connection; `begin` False: the caller begins it
        (a `Batch`, with its first statement), and one never begun is not
        committed."""
        await self.open()
        conn = self._conn
        assert conn is not None
        try:
            if begin:
                await conn.execute("BEGIN IMMEDIATE")
            yield conn
            if conn.in_transaction:
                await conn.execute("COMMIT")
        except BaseException as exc:
            await self._abandon(conn, exc)
            if isinstance(exc, sqlite3.Error):
                error = self._translate(exc)
                if isinstance(error, corrupt.CorruptDatabase) and self.set_aside_corrupt:
                    error = await self._corrupt_while_writing(error.found)
                raise error from exc
            raise
        if _identity(self.path) != self._identity:
            await self._reset()
            moved = self._set_aside_side_files()
            aside = f"; its write-ahead log was set aside as {', '.join(moved)}" if moved else ""
            raise StoreUnavailable(
                REPLACED,
                f"{self.path} was deleted or replaced while ingestd had it open; "
                "that batch went to the old file and is written again to the file now at "
                f"the path (readings acknowledged before this went with the old file){aside}",
            )

    async def close_rollups(self, most: int) -> int:
        async with self._writing, self._transaction() as conn:
            closed = await rolling.close(conn, self.rollups, most)
        self.pending_readings = drained(self.pending_readings, closed)
        return closed

    async def _corrupt_while_writing(self, found: str) -> StoreUnavailable:
        """The batch met a corrupt page: with the connection closed, the file
        is set aside and the batch (held by the writer) written again to a
        fresh one. A file no longer at the path is not ours to move."""
        await self._reset()
        if _identity(self.path) != self._identity:
            self._set_aside_side_files()
            return StoreUnavailable(REPLACED, f"{self.path} was replaced; {found}")
        return StoreUnavailable(CORRUPT, self._set_aside_corrupt(found, "while writing a batch"))

    async def _abandon(self, conn: aiosqlite.Connection, exc: BaseException) -> None:
        try:
            # On the connection's thread, after whatever is queued there: a
            # batch cancelled while its BEGIN waited in the queue is rolled
            # back once it has run (in_transaction, read here, said no yet).
            await conn.rollback()
        except sqlite3.Error:
            pass
        except BaseException:
            # Cancelled while rolling back: drop the connection; SQLite rolls back.
            await self._reset()
            raise
        unavailable = classify(exc) if isinstance(exc, sqlite3.Error) else None
        if unavailable is not None and unavailable.condition != "database locked":
            # After disk-full, I/O errors or a read-only file, start afresh.
            await self._reset()

    async def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(Exception):
                await conn.close()


def _user() -> str:
    try:
        import pwd  # noqa: PLC0415 - POSIX only

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())
