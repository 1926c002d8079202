"""The store interface: what the writer, maintenance and the CLI may ask of a
database, whatever the engine.

A backend (SQLite, PostgreSQL) implements three things:

- `Store`, the daemon's: opened (schema created and migrated) before anything
  is read from the broker; `batch()` is one transaction (readings, quarantine
  records and per-sensor state commit together, or not at all); `upkeep()`
  retention and housekeeping, never holding the writer up for long.
- `Batch`, one open transaction, counting what it did: `inserted` new
  readings, `duplicates` (a reading whose key is stored with the same value:
  a redelivery), `conflicts` (the key is stored with another value: quarantined
  in the same transaction, never silently dropped).
- `Reader`, the CLI's: read-only, safe beside a running daemon, rows streamed.

Errors: `StoreUnavailable(condition, detail)` (`CONDITIONS`) for what waiting
cures (the writer holds its data and retries); `StoreError` for the rest.

Every backend keeps the same schema contract for users who query it directly:
a `readings` view (sensor, metric, ts, value, tags, unit, ts_ns, seq) over
`series` and `samples`, and a `quarantine` table.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple

from ingestd.errors import StoreError
from ingestd.events import Reading, Rejected, SensorStatus, reading_payload
from ingestd.rollups import RollupRow

# What StoreUnavailable.condition may say (a metric label each: ingestd_store_unavailable).
LOCKED = "database locked"
DISK_FULL = "disk full"
IO_ERROR = "I/O error"
READ_ONLY = "database read-only"
CANNOT_OPEN = "cannot open database"
PROTOCOL = "locking protocol error"
NO_MEMORY = "out of memory"
REPLACED = "database replaced"  # the file at store.path is no longer the one written to
UNREACHABLE = "database unreachable"  # a server that does not answer or refuses for now
CONNECTION_LOST = "connection lost"  # dropped mid-transaction: the commit outcome is unknown
TIMEOUT = "statement timeout"
# The file was corrupt and is set aside (the batch goes to a fresh one).
CORRUPT = "database corrupt"
# Free space on the store's (or the spool's) filesystem below store.min_free_bytes.
DISK_LOW = "disk space low"
CONDITIONS = tuple(
    sorted(
        {
            LOCKED,
            DISK_FULL,
            IO_ERROR,
            READ_ONLY,
            CANNOT_OPEN,
            PROTOCOL,
            NO_MEMORY,
            REPLACED,
            UNREACHABLE,
            CONNECTION_LOST,
            TIMEOUT,
            CORRUPT,
            DISK_LOW,
        }
    )
)


def newer_schema(where: str, version: int, known: int) -> StoreError:
    """The daemon's refusal of a database a later ingestd migrated."""
    return StoreError(
        f"{where}: schema version {version} is newer than this ingestd "
        f"understands ({known}); upgrade ingestd"
    )


def unreadable_schema(where: str, version: int | None, known: int) -> StoreError | None:
    """Why the CLI cannot read a database of schema `version` (None or 0: no
    schema at all), or None if it can: the same words for every engine."""
    if version == known:
        return None
    if not version:
        return StoreError(f"{where}: not an ingestd database (no schema version)")
    return StoreError(
        f"{where}: schema version {version}, this ingestd reads {known}: "
        + (
            "upgrade ingestd"
            if version > known
            else "start the daemon once (it migrates the database), then try again"
        )
    )


class Batch(ABC):
    """One open transaction (see `Store.batch`)."""

    def __init__(self, now: float) -> None:
        self._now = now  # stamps the quarantine records the batch adds itself
        # Whose device state this batch writes (the instance's MQTT client id):
        # each instance finds its own again after a restart.
        self.owner = ""
        self.new_series: dict[tuple[str, str, str, str], int] = {}
        self.inserted = 0
        self.duplicates = 0
        self.pending = 0  # gauges' readings left to close (`Store.close_rollups`)
        self.conflicts: list[Rejected] = []
        self.quarantined = 0

    def conflict(self, r: Reading, stored: float) -> Rejected:
        """The quarantine record of a reading whose key holds another value: a
        second, different reading claiming that series and time, kept with
        both values, never silently dropped (the same words on every engine)."""
        return Rejected(
            r.topic,
            reading_payload(r, seq=r.seq, stored=stored),
            f"conflict: a different value ({stored:g}) is stored for "
            f"{r.sensor} {r.metric} at this time (ts_ns {r.ts_ns}); this one ({r.value:g}) "
            "was not stored",
            self._now,
            "conflict",
        )

    @abstractmethod
    async def add_readings(self, readings: Sequence[Reading]) -> None:
        """Store readings; a key already stored is a duplicate (same value) or a
        conflict (another value: quarantined in this transaction)."""

    @abstractmethod
    async def add_rejected(self, rejected: Sequence[Rejected]) -> None:
        """Quarantine records, with their reasons."""

    @abstractmethod
    async def execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """One statement for each row, `?` placeholders (the engine's own are
        substituted), in this transaction."""

    async def set_status(self, status: SensorStatus) -> None:
        """Per-sensor state (device counters, expect_within, the state a device
        reports), kept with the readings. Rows in sensor order: instances
        writing one database lock them in the same order.

        Sequence gaps and missing counts are deltas, added to the stored ones:
        a state rebuilt from nothing (evicted from memory, or another instance
        of a shared group) adds what it found and never replaces the totals.
        `last_seq` is the last writer's: a device counter may restart, so no
        larger number is more right than the newest.

        A batch written again (its first commit's outcome unknown: the
        connection died during COMMIT) must not add its gaps twice: a row
        that already holds the batch's `last_seq` has had them. (The counter
        moves with every new message, and a step back is not stored.)"""
        if status.sequences:
            again = "coalesce(sensor_status.last_seq, excluded.last_seq - 1) = excluded.last_seq"
            await self.execute_many(
                "INSERT INTO sensor_status (sensor, last_seq, seq_gaps, seq_missing) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (sensor) DO UPDATE SET "
                "last_seq = excluded.last_seq, "
                f"seq_gaps = sensor_status.seq_gaps + CASE WHEN {again} THEN 0 "
                "ELSE excluded.seq_gaps END, "
                f"seq_missing = sensor_status.seq_missing + CASE WHEN {again} THEN 0 "
                "ELSE excluded.seq_missing END",
                [(sensor, *v) for sensor, v in sorted(status.sequences.items())],
            )
        if status.expect_within:
            await self.execute_many(
                "INSERT INTO sensor_status (sensor, expect_within) VALUES (?, ?) "
                "ON CONFLICT (sensor) DO UPDATE SET expect_within = excluded.expect_within",
                sorted(status.expect_within.items()),
            )
        if status.states:
            await self.execute_many(
                "INSERT INTO sensor_status (sensor, state) VALUES (?, ?) "
                "ON CONFLICT (sensor) DO UPDATE SET state = excluded.state",
                sorted(status.states.items()),
            )
        if status.devices:
            items = sorted(status.devices.items())
            described = [
                (self.owner, name, device, position, description, self._now)
                for (name, device), (position, description) in items
                if description is not None
            ]
            if described:
                await self.execute_many(
                    "INSERT INTO device_state (owner, format, device, position, description, "
                    "updated) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner, format, device) "
                    "DO UPDATE SET position = excluded.position, "
                    "description = excluded.description, updated = excluded.updated",
                    described,
                )
            # Only the position moved: the row is there (a device's first save
            # carries its description). Were it gone, a row without one would
            # be no use: nothing is written, and after a restart the device
            # is unknown until it describes itself again.
            moved = [
                (position, self._now, self.owner, name, device)
                for (name, device), (position, description) in items
                if description is None
            ]
            if moved:
                await self.execute_many(
                    "UPDATE device_state SET position = ?, updated = ? "
                    "WHERE owner = ? AND format = ? AND device = ?",
                    moved,
                )
        if status.packets:
            await self.execute_many(
                "INSERT INTO device_state (owner, format, device, position, description, "
                "updated) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner, format, device) "
                "DO UPDATE SET position = excluded.position, updated = excluded.updated",
                [(self.owner, *PACKETS, pack_packets(status.packets), b"", self._now)],
            )


# The device state `open` loads: the instance's own, most recently updated first,
# at most what the formats' caches hold.
DEVICE_STATE_LOADED = 65536
# Device counters `open` loads (as many as the device state keeps): a sensor not
# loaded starts its counter afresh at its next message (its stored counts stay).
SEQUENCES_LOADED = 65536
# Rows device_state keeps at most, all instances together, the most recently
# updated: a device is not forgotten for being silent (its state is its
# BIRTH, however old), only for a flood of others (junk ids' BIRTHs).
DEVICE_STATE_KEPT = 4 * DEVICE_STATE_LOADED
# Upkeep's statement for that (the engine's placeholder for the offset).
DEVICE_STATE_TRIM = (
    "DELETE FROM device_state WHERE (owner, format, device) IN ("
    "SELECT owner, format, device FROM device_state ORDER BY updated DESC "
    "LIMIT {all} OFFSET {offset})"
)
# The row that holds the (packet id, CRC) of the last messages committed (see
# SensorStatus.packets), as (format, device) in device_state.
PACKETS = ("ingestd", "committed packets")
# The row that holds the topic filters the broker's persistent session was
# last subscribed to (JSON), so filters no route uses any more are
# unsubscribed at the next connection, even after a restart.
SUBSCRIPTIONS = ("ingestd", "subscriptions")


def pack_packets(packets: Sequence[tuple[int, int]]) -> bytes:
    """(packet id, CRC-32) pairs as 6 bytes each."""
    return b"".join(mid.to_bytes(2, "big") + crc.to_bytes(4, "big") for mid, crc in packets)


def unpack_packets(data: bytes) -> list[tuple[int, int]]:
    return [
        (int.from_bytes(data[i : i + 2], "big"), int.from_bytes(data[i + 2 : i + 6], "big"))
        for i in range(0, len(data) - len(data) % 6, 6)
    ]


def device_states(rows: Iterable[Sequence[Any]]) -> dict[str, list[tuple[str, bytes, bytes]]]:
    """(format, device, position, description) rows by format, in their order."""
    out: dict[str, list[tuple[str, bytes, bytes]]] = {}
    for name, device, position, description in rows:
        out.setdefault(name, []).append((device, bytes(position), bytes(description)))
    return out


@dataclass(frozen=True, slots=True)
class Upkeep:
    """What one maintenance pass did."""

    readings_deleted: int = 0
    quarantined_deleted: int = 0
    detail: dict[str, Any] | None = None  # engine-specific, logged at debug


def retention_exceptions(
    series: Iterable[tuple[int, str]],
    cutoff_ns: int | None,
    rules: Sequence[tuple[str, float]],
    now: float,
) -> dict[int, int | None]:
    """The series whose raw readings are kept otherwise than `cutoff_ns` (the
    global cutoff; None: forever), by the first rule (sensor glob, days; 0:
    forever) matching their sensor: series id -> its cutoff (None: forever)."""
    if not rules:
        return {}
    out: dict[int, int | None] = {}
    for sid, sensor in series:
        for glob, days in rules:
            if fnmatch.fnmatchcase(sensor, glob):
                own = None if days == 0 else int((now - days * 86400) * 1_000_000_000)
                if own != cutoff_ns:
                    out[int(sid)] = own
                break
    return out


class Store(ABC):
    """The daemon's handle on its database."""

    # Set by `open`: readings stored but no rollups (`ingestd rollups rebuild`).
    needs_rebuild: bool = False
    # Raw retention per sensor glob, (glob, days) in order (store.retention):
    # `upkeep` applies it beside the global cutoff.
    keep: tuple[tuple[str, float], ...] = ()

    # Where the data goes, for logs: a path, or a URL without its password.
    where: str
    # Batches that may be open at once (one connection each); the writer keeps
    # up to this many in flight.
    concurrent_batches: int = 1
    # Device sequence counters as last committed, sensor -> (last, gaps, missing):
    # loaded by `open`, so a gap across a restart of ingestd still counts.
    sequences: dict[str, tuple[int, int, int]]
    # The instance whose device state `open` loads and batches write (its MQTT
    # client id; set before `open`), and that state as last committed:
    # format -> [(device, position, description)], the most recently updated first.
    owner: str = ""
    devices: dict[str, list[tuple[str, bytes, bytes]]]
    # Database files found corrupt and set aside this run (a fresh one started).
    corrupt_files: int = 0

    @abstractmethod
    async def open(self) -> None:
        """Connect, create or migrate the schema. StoreUnavailable if it can't yet."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def batch(self, now: float | None = None) -> AbstractAsyncContextManager[Batch]:
        """One transaction: commits on exit, rolls back on error or cancellation.
        `now` stamps quarantine records the batch adds itself (conflicts)."""

    @abstractmethod
    async def upkeep(self, cutoff: float | None, rows_per_transaction: int) -> Upkeep:
        """Delete readings older than `cutoff` (Unix seconds; None: keep all) and
        quarantine records received before it, in small transactions; then the
        engine's housekeeping. Raises StoreError (or StoreUnavailable)."""

    pending_readings = 0  # this process left for the rollups: a trigger to close

    async def close_rollups(self, most: int) -> int:
        """Close about `most` pending readings into the rollups (`ingestd.closing`),
        oldest first, in one transaction; how many (0: none pending)."""
        return 0

    async def spool_forwarded(self, spool: str) -> int:
        """The last row of local spool `spool` (its id) that a batch committed
        to this store (see `ingestd.forward`); 0 if none. Engines that spool
        (a remote store) implement it."""
        raise StoreError(f"{self.where}: this store takes no spooled batches")

    @abstractmethod
    def advice(self, exc: Exception) -> str:
        """What an operator should do about `exc` (raised by `open`), in words."""

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SensorRow(NamedTuple):
    sensor: str
    metric: str
    tags: str
    unit: str
    value: float
    ts_ns: int  # the last reading's time
    expect_within: float | None
    seq_gaps: int
    seq_missing: int
    state: str  # what the device last said of itself (Homie's $state), or ""


class ReadingRow(NamedTuple):
    sensor: str
    metric: str
    ts_ns: int
    value: float
    tags: str
    unit: str
    seq: int = 0  # further readings of one message at the same series and time


class QuarantineRow(NamedTuple):
    received_at: float
    topic: str
    reason: str
    payload: bytes


class QuarantineRecord(NamedTuple):
    """A quarantine row with its id, for `ingestd quarantine replay`."""

    id: int
    received_at: float
    topic: str
    reason: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class StoreTotals:
    where: str
    sensors: int
    series: int
    readings: int
    quarantined: int
    first_ns: int | None
    last_ns: int | None
    size_bytes: int


class Reader(ABC):
    """Read-only access for the CLI, safe beside the running daemon; rows are
    streamed as the database yields them."""

    @abstractmethod
    def sensors(self, like: str | None = None) -> Iterable[SensorRow]:
        """Each series with its last reading; `like`: a glob on the sensor id
        (as `readings` takes it)."""

    @abstractmethod
    def readings(
        self,
        sensor: str | None,
        metric: str | None,
        since_ns: int,
        until_ns: int,
        limit: int | None,
        tags: Sequence[tuple[str, str]] = (),
    ) -> Iterable[ReadingRow]:
        """Readings in [since_ns, until_ns), by time then sensor; `sensor`: a
        glob on the sensor id (`*` any run, `?` one character, nothing else
        special; None: every sensor), `tags`: each (key, value) must match;
        `limit` 0 or None: all."""

    @abstractmethod
    def rollup_rows(
        self,
        sensor: str | None,
        metric: str | None,
        width: int,
        since: int,
        until: int,
        limit: int | None,
        tags: Sequence[tuple[str, str]] = (),
    ) -> Iterable[RollupRow]:
        """Rollups of interval `width` (seconds) with buckets starting in
        [since, until) (Unix seconds), by bucket, then series."""

    @abstractmethod
    def quarantined(self, since: float, limit: int | None) -> Iterable[QuarantineRow]:
        """Quarantine records received since `since` (Unix seconds), newest first."""

    @abstractmethod
    def quarantine_page(
        self, since: float, until: float, reason: str, after_id: int, upto_id: int, limit: int
    ) -> list[QuarantineRecord]:
        """Quarantine records received in [since, until) whose reason contains
        `reason` ("": any), with after_id < id <= upto_id, by id (arrival order)."""

    @abstractmethod
    def quarantine_last_id(self) -> int:
        """The id of the newest quarantine record (0: none): a replay goes no
        further, so records it writes itself are not read again."""

    @abstractmethod
    def totals(self) -> StoreTotals: ...

    @abstractmethod
    def backup(self, dest: str, progress: Callable[[int, int], None] | None = None) -> str:
        """A consistent copy of the database at `dest` (or what the engine
        offers instead); returns what was done, for the operator."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
