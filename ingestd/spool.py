"""The local spool: batches the remote store (PostgreSQL) cannot take now are
committed to a SQLite file on this machine, then acknowledged, and forwarded
later (`ingestd.forward`).

"Acknowledged" keeps meaning "durable on this machine's disk": a batch is
acknowledged to the broker only after its spool transaction committed
(synchronous = FULL). One row per batch, the batch as MessagePack, in arrival
order (the row id). A spool belongs to one process at a time: the file is
held with an exclusive lock, so a second ingestd given the same file is
refused rather than mixing two instances' batches (a lock on `<path>.lock`;
the file itself stays readable, by `ingestd stats`).

Each spool file has an id (made when the file is): the remote store records,
in the same transaction as a forwarded batch, the last row id forwarded from
that spool, so a batch forwarded but not yet removed from the file (kill -9
between the two) is not forwarded twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import msgspec
import structlog

from ingestd.diskguard import DiskGuard
from ingestd.errors import StoreError, StoreUnavailable
from ingestd.events import Reading, Rejected, SensorStatus, merge_statuses
from ingestd.store.base import CANNOT_OPEN, DISK_LOW
from ingestd.store.sqlite.conditions import classify, ro_uri

log = structlog.get_logger("ingestd.spool")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spooled_at REAL NOT NULL,
    readings INTEGER NOT NULL,
    moved INTEGER NOT NULL,
    data BLOB NOT NULL,
    status BLOB NOT NULL  -- the batch's SensorStatus, read alone at start
);
"""


class SpooledBatch(msgspec.Struct, array_like=True):
    """A batch as the writer would have committed it."""

    readings: list[Reading]
    rejected: list[Rejected]
    status: SensorStatus
    # Readings the processor moved into `rejected` (limits, clocks): with
    # `readings`, every reading the batch accounts for.
    moved: int = 0


_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE = msgspec.msgpack.Decoder(SpooledBatch).decode
_DECODE_STATUS = msgspec.msgpack.Decoder(SensorStatus).decode


@dataclass(frozen=True, slots=True)
class Entry:
    """One spooled batch, as the file's index keeps it."""

    id: int
    spooled_at: float
    readings: int  # to store, and moved to quarantine: the batch's whole account
    size: int  # bytes of its data


@dataclass(frozen=True, slots=True)
class SpoolState:
    """What the spool holds (for metrics, /readyz, the summary line)."""

    batches: int
    readings: int
    bytes: int
    oldest: float | None  # when the oldest batch was spooled (Unix seconds)
    full: bool


class Spool:
    def __init__(self, path: Path, max_bytes: int, min_free_bytes: int | None = 0) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        # Batches wait while the spool's filesystem has less free (0: no guard).
        self.disk = DiskGuard(self.path, min_free_bytes)
        self.id = ""
        self._conn: aiosqlite.Connection | None = None
        self._lock: int | None = None  # the lock file's descriptor, held while open
        self._index: collections.deque[Entry] = collections.deque()
        self.bytes = 0
        self.readings = 0
        # The first row id this process spooled: rows before it were left by
        # an earlier run (counted apart: this run did not decode them).
        self.first_own = 1
        # True while batches go to the spool rather than to the store: from
        # the first batch the store could not take until the spool is empty.
        self.active = False
        self.pending = 0  # spool writes under way
        self.wake = asyncio.Event()  # set when batches are spooled: the forwarder drains
        self.full = False  # the last batch offered did not fit
        # The device state the spooled batches carry, merged (read at open):
        # newer than the store's, which a restart must go on from.
        self.held: SensorStatus | None = None
        # Batches up to this row are in the store (forwarded) but still in the
        # file: its disk refused the removal. They are not forwarded again,
        # and once every batch is, the file is started afresh.
        self.forwarded_upto = 0
        self._busy = asyncio.Lock()  # one file operation at a time (a fresh start)
        self._undeleted = False  # forwarded rows the disk would not let go are in the file

    async def open(self) -> None:
        """Open (or make) the file and take it for this process; StoreError if
        another process holds it, StoreUnavailable if the disk refuses now."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _take_lock(self.path)
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            self._release()
            if isinstance(exc, sqlite3.Error):
                raise self._translate(exc) from exc
            raise StoreUnavailable(CANNOT_OPEN, f"spool {self.path}: {exc}") from exc
        try:
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = FULL")
            await conn.executescript(_SCHEMA)
            cur = await conn.execute("SELECT value FROM meta WHERE key = 'id'")
            row = await cur.fetchone()
            if row is None:
                self.id = str(uuid.uuid4())
                await conn.execute("INSERT INTO meta (key, value) VALUES ('id', ?)", (self.id,))
            else:
                self.id = str(row[0])
            cur = await conn.execute(
                "SELECT id, spooled_at, readings + moved, length(data) FROM batches ORDER BY id"
            )
            self._index = collections.deque(Entry(*r) for r in await cur.fetchall())
            cur = await conn.execute("SELECT status FROM batches ORDER BY id")
            self.held = held(_DECODE_STATUS(r[0]) for r in await cur.fetchall())
            cur = await conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'batches'")
            last = await cur.fetchone()
        except sqlite3.Error as exc:
            await conn.close()
            self._release()
            raise self._translate(exc) from exc
        self._conn = conn
        self.first_own = (last[0] if last else 0) + 1
        self.bytes = sum(e.size for e in self._index)
        self.readings = sum(e.readings for e in self._index)
        # A reopen (a fresh start, or the connection made again after one
        # failed) keeps the spool active: the new file is empty, but a batch
        # put meanwhile (waiting for `_busy`) would sit in it unseen, the
        # forwarder asleep and later batches going past it to the store. The
        # forwarder turns it off, once the file is empty and nothing is on its way.
        self.active = self.active or bool(self._index)
        self.forwarded_upto = 0

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        self._release()

    async def _connection(self) -> aiosqlite.Connection:
        """The file's connection, for a caller holding `_busy`: opened again
        after a fresh start that could not (StoreUnavailable while it still
        cannot)."""
        if self._conn is None:
            await self.open()
        assert self._conn is not None
        return self._conn

    async def _start_afresh(self) -> None:
        """Every batch in the file is forwarded, but the file cannot shrink
        (its disk is full): a new, empty file in its place (a new id). The
        caller holds `_busy`, so a batch put meanwhile waits for the new file."""
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")
        self._release()
        self._undeleted = False
        await self.open()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _translate(self, exc: sqlite3.Error) -> StoreError:
        return classify(exc) or StoreError(f"spool {self.path}: {exc}")

    def state(self) -> SpoolState:
        oldest = self._index[0].spooled_at if self._index else None
        return SpoolState(len(self._index), self.readings, self.bytes, oldest, self.full)

    def __len__(self) -> int:
        return len(self._index)

    async def put(self, batch: SpooledBatch) -> bool:
        """Commit a batch to the file; False if it does not fit in max_bytes.
        StoreUnavailable if the disk refuses it (full, I/O error) or its free
        space is below store.min_free_bytes."""
        data = _ENCODE(batch)
        low = self.disk.problem(2 * len(data))  # the row, and the log's copy
        if low is not None:
            raise StoreUnavailable(DISK_LOW, low)
        count = len(batch.readings) + batch.moved
        self.pending += 1
        try:
            async with self._busy:
                conn = await self._connection()
                # An empty spool takes a batch larger than max_bytes: a batch must
                # be able to go somewhere, and it is bounded (batch.max_readings,
                # or one chunk: a quarter of mqtt.max_inflight messages).
                if self._index and self.bytes + len(data) > self.max_bytes:
                    self.full = True
                    return False
                now = time.time()
                try:
                    cur = await conn.execute(
                        "INSERT INTO batches (spooled_at, readings, moved, data, status) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (now, len(batch.readings), batch.moved, data, _ENCODE(batch.status)),
                    )
                except sqlite3.Error as exc:
                    raise self._translate(exc) from exc
                assert cur.lastrowid is not None
                self._index.append(Entry(cur.lastrowid, now, count, len(data)))
                self.bytes += len(data)
                self.readings += count
                self.full = False
                return True
        finally:
            self.pending -= 1

    async def take(
        self, max_readings: int, upto: int | None = None, after: int = 0
    ) -> list[tuple[Entry, SpooledBatch]]:
        """The oldest batches, up to about `max_readings` (at least one), all
        of this run's or all of an earlier run's; with `upto`, instead, the
        batches after row `after` up to row `upto`, about `max_readings`."""
        async with self._busy:
            chosen: list[Entry] = []
            total = 0
            for e in self._index:
                if e.id <= max(self.forwarded_upto, after):
                    continue
                if upto is not None and e.id > upto:
                    break
                if chosen and (
                    total + e.readings > max_readings
                    or (
                        upto is None
                        and (e.id >= self.first_own) != (chosen[0].id >= self.first_own)
                    )
                ):
                    break
                chosen.append(e)
                total += e.readings
            if not chosen:
                # Without opening the file: an empty spool whose fresh start
                # could not open its new one must let the forwarder see it
                # empty, and the writer go back to the store.
                return []
            conn = await self._connection()
            try:
                cur = await conn.execute(
                    "SELECT id, data FROM batches WHERE id BETWEEN ? AND ? ORDER BY id",
                    (chosen[0].id, chosen[-1].id),
                )
                rows = await cur.fetchall()
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc
        data = {r[0]: r[1] for r in rows}
        return [(e, _DECODE(data[e.id])) for e in chosen]

    async def remove(self, upto: int) -> int:
        """Remove the batches up to row `upto` (forwarded); the readings removed.

        A deletion needs room on the disk (SQLite's log). Without it the rows
        stay in the file, marked forwarded (never taken again), and leave the
        count; forwarding goes on with the batches after them, and the next
        deletion that finds room takes them too. Once every batch in the file
        is forwarded, a deletion the disk refuses starts the file afresh,
        which frees the space. (Raising here instead stalled the forwarder
        for good: it tried the same deletion again before anything else.)"""
        async with self._busy:
            conn = await self._connection()
            self.forwarded_upto = max(self.forwarded_upto, upto)
            removed = 0
            while self._index and self._index[0].id <= upto:
                e = self._index.popleft()
                self.bytes -= e.size
                self.readings -= e.readings
                removed += e.readings
            try:
                await conn.execute("DELETE FROM batches WHERE id <= ?", (upto,))
                self._undeleted = False
                return removed
            except sqlite3.Error as exc:
                error = self._translate(exc)
                if not self._index:
                    try:
                        await self._start_afresh()
                    except StoreUnavailable as again:
                        # The old file is gone with what it held; the new one
                        # is opened by the next use (`_connection`). Raising
                        # here left the removed batches counted as spooled.
                        log.warning(
                            "spool could not start afresh; opened again at its next use",
                            error=str(again),
                            spool=str(self.path),
                        )
                    return removed
                if not isinstance(error, StoreUnavailable):
                    raise error from exc
                if not self._undeleted:  # said once, until a deletion or a fresh start
                    self._undeleted = True
                    log.warning(
                        "spool rows forwarded but not deleted (the disk refuses); kept, "
                        "marked forwarded, until a deletion finds room or the file starts "
                        "afresh",
                        upto=upto,
                        error=str(exc),
                        spool=str(self.path),
                    )
                return removed


def held(statuses: Iterable[SensorStatus]) -> SensorStatus | None:
    """Spooled batches' device state, merged in order (None if there is none)."""
    merged: list[SensorStatus] = list(statuses)
    if not merged:
        return None
    packets = next((st.packets for st in reversed(merged) if st.packets), ())
    return msgspec.structs.replace(merge_statuses(merged), packets=packets)


def _take_lock(path: Path) -> int:
    """The spool's lock file, locked for this process (StoreError if another holds it)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"the spool {path} is in use by another ingestd: give each instance its own "
            "(store.spool.path, or its own store.path)"
        ) from None
    except OSError:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd


def read_state(path: Path) -> SpoolState | None:
    """The spool at `path` as the CLI sees it (read-only, beside a running
    daemon); None if there is no such file."""
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(ro_uri(path), uri=True, timeout=1)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute(
            "SELECT count(*), coalesce(sum(readings + moved), 0), "
            "coalesce(sum(length(data)), 0), min(spooled_at) FROM batches"
        ).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return SpoolState(row[0], row[1], row[2], row[3], False)


__all__ = ["Entry", "Spool", "SpoolState", "SpooledBatch", "read_state"]
