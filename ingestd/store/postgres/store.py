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
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from operator import itemgetter
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # the optional dependency: this module is imported only for PostgreSQL
import structlog

from ingestd.errors import NotPrimary, StoreError, StoreUnavailable
from ingestd.events import NS, Reading, Rejected
from ingestd.store import base
from ingestd.store.base import Upkeep
from ingestd.store.postgres.schema import (
    DAY_NS,
    create_partitions,
    ensure_partitions,
    is_hypertable,
    migrate,
    partitions,
    uncovered,
)

log = structlog.get_logger("ingestd.store")

_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS ingestd_stage "
    "(i integer, series_id integer, ts_ns bigint, seq integer, value double precision) "
    "ON COMMIT DELETE ROWS"
)
_PLACEHOLDER = re.compile(r"\?")
_SAMPLE_COLUMNS = ("series_id", "ts_ns", "seq", "value")
_TS = itemgetter(1)
_SAVEPOINT = "ingestd_direct"
_TERM = "SELECT epoch FROM primary_role WHERE grp = $1 FOR SHARE"
# Creating a partition on the batch path waits at most this long for its locks
# (another instance's DDL, writers holding the parent): past it, the batch's
# readings go to the default partition and creation is tried again later.
_PARTITION_LOCK_TIMEOUT_MS = 2000
_PARTITION_RETRY_AFTER = 60.0  # seconds before the batch path tries again after a failure
_MOVE = (
    "INSERT INTO samples (series_id, ts_ns, seq, value) "
    "SELECT series_id, ts_ns, seq, value FROM ingestd_stage ORDER BY series_id, ts_ns, seq, i "
    "ON CONFLICT DO NOTHING"
)
# Rows offered that differ from what is stored under their key (checked only
# when a batch inserted fewer rows than it offered).
_CONFLICTS = (
    "SELECT st.i, s.value FROM ingestd_stage AS st JOIN samples AS s "
    "ON s.series_id = st.series_id AND s.ts_ns = st.ts_ns AND s.seq = st.seq "
    "WHERE s.value IS DISTINCT FROM st.value ORDER BY st.i"
)
# SQLSTATE (or its class, two characters) -> condition: what waiting can cure.
_TRANSIENT = {
    "08": base.CONNECTION_LOST,  # connection exception
    "57P01": base.UNREACHABLE,  # admin shutdown
    "57P02": base.UNREACHABLE,  # crash shutdown
    "57P03": base.UNREACHABLE,  # cannot connect now (starting up, recovering)
    "57014": base.TIMEOUT,  # query canceled: statement_timeout
    "53100": base.DISK_FULL,
    "53200": base.NO_MEMORY,
    "53300": base.UNREACHABLE,  # too many connections
    "40001": base.LOCKED,  # serialization failure
    "40P01": base.LOCKED,  # deadlock detected
    "55P03": base.LOCKED,  # lock not available
    "25006": base.READ_ONLY,  # read-only transaction (a standby, default_transaction_read_only)
    "58030": base.IO_ERROR,
}


def redacted(url: str) -> str:
    """The URL without a password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[2]}"))


def classify(exc: BaseException) -> StoreUnavailable | None:
    """A StoreUnavailable for what waiting can cure, None for real errors."""
    if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError):
        return StoreUnavailable(base.CONNECTION_LOST, str(exc) or type(exc).__name__)
    if isinstance(exc, asyncpg.exceptions.InterfaceError) and any(
        # The connection died under an operation; it cannot be used again.
        sign in str(exc)
        for sign in ("closed", "another operation is in progress")
    ):
        return StoreUnavailable(base.CONNECTION_LOST, str(exc))
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # The protocol state after the server dropped the connection mid-query
        # ("cannot switch to state ..."): a new connection cures it.
        return StoreUnavailable(base.CONNECTION_LOST, str(exc))
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return StoreUnavailable(base.UNREACHABLE, str(exc) or type(exc).__name__)
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str):
        condition = _TRANSIENT.get(state) or _TRANSIENT.get(state[:2])
        if condition:
            return StoreUnavailable(condition, str(exc))
    return None


class Batch(base.Batch):
    """One batch on one connection; see `PostgresStore.batch`.

    The transaction is opened by the first write that needs one. A batch of
    readings alone (the common case: known series, nothing quarantined, no
    sensor state) is one COPY at the end, a transaction by itself: two round
    trips fewer than BEGIN ... COMMIT around it, and a batch waits on its
    round trips behind the event loop's other work.
    """

    def __init__(self, store: PostgresStore, conn: Any, now: float) -> None:
        super().__init__(now)
        self._store = store
        self._conn = conn
        self.begun = False  # BEGIN sent (with a savepoint, in the same round trip)
        # True while nothing was written since that savepoint: a direct COPY
        # then needs no savepoint of its own.
        self.at_savepoint = False
        # Readings for the direct COPY, written at the end (or before another
        # batch of readings): their records and the readings themselves.
        self._pending: tuple[list[tuple[int, int, int, float]], Sequence[Reading]] | None = None

    async def _begin(self) -> None:
        if not self.begun:
            await self._conn.execute(f"BEGIN; SAVEPOINT {_SAVEPOINT}")
            self.begun = True
            self.at_savepoint = True

    async def fenced(self, group: str, epoch: int) -> None:
        """Open the transaction with the primary role's row read FOR SHARE: a
        member taking the role over (UPDATE epoch) waits for this commit, and a
        batch begun after it sees the new epoch and is refused (NotPrimary)."""
        await self._begin()
        now = await self._conn.fetchval(_TERM, group)
        if now != epoch:
            raise NotPrimary(
                f"the primary role of group {group!r} moved on (term {epoch} -> {now}); "
                "this member no longer writes for it"
            )

    async def add_readings(self, readings: Sequence[Reading]) -> None:
        if not readings:
            return
        known = self._store.series_ids
        try:
            # Every series already known: the common case, in one comprehension.
            records = [
                (known[(r.sensor, r.metric, r.tags, r.unit)], r.ts_ns, r.seq, r.value)
                for r in readings
            ]
        except KeyError:
            await self._add_series(readings)
            new = self.new_series
            records = [
                (known.get(key) or new[key], r.ts_ns, r.seq, r.value)
                for r in readings
                if (key := (r.sensor, r.metric, r.tags, r.unit))
            ]
        if self._pending is not None:
            await self._write_pending()
        self._pending = (records, readings)

    async def finish(self) -> None:
        """Write what is pending and commit."""
        if self._pending is not None:
            await self._write_pending()
        if self.begun:
            await self._conn.execute("COMMIT")

    async def _write_pending(self) -> None:
        assert self._pending is not None
        (records, readings), self._pending = self._pending, None
        # Fresh readings (the common case) go straight into samples with COPY;
        # a key already stored fails that COPY, which is then undone (a
        # savepoint, or its own transaction) and the batch goes the careful
        # way, through the staging table, to tell duplicates from conflicts.
        if await self._copy_direct(records):
            self.inserted += len(records)
            return
        await self._careful(records, readings)

    async def _careful(
        self, records: list[tuple[int, int, int, float]], readings: Sequence[Reading]
    ) -> None:
        await self._begin()
        self.at_savepoint = False
        conn = self._conn
        await conn.copy_records_to_table(
            "ingestd_stage", records=[(i, *r) for i, r in enumerate(records)]
        )
        status = await conn.execute(_MOVE)
        inserted = int(status.rsplit(" ", 1)[1])
        self.inserted += inserted
        if inserted < len(records):
            conflicts = await self._conflicts(readings)
            self.duplicates += len(records) - inserted - len(conflicts)
            if conflicts:
                await self.add_rejected(conflicts)
                self.conflicts += conflicts
        await conn.execute("TRUNCATE ingestd_stage")

    async def _copy_direct(self, records: list[tuple[int, int, int, float]]) -> bool:
        """COPY the rows into samples; False if a key is already stored.

        In key order (the server's index work is what bounds a batch; sorted,
        it costs about 12% less, and two batches in flight at once then lock
        keys they share in the same order), into the one partition that holds
        them all where there is one (routing each row through the parent costs
        the server about 12% more). Outside a transaction the COPY is one."""
        records = sorted(records)
        stamps = list(map(_TS, records))
        store = self._store
        lo_ns, hi_ns = min(stamps), max(stamps)
        target = store.partition_for(lo_ns, hi_ns)
        if target == "samples" or store.deferred_periods:
            # Not all in one known partition (a backlog, midnight, a device
            # clock far off): the periods it needs, from the cache, no I/O.
            missing = store.missing_periods(stamps) if target == "samples" else []
            if self.begun:
                # This transaction may hold locks the DDL would wait for: the
                # next batch that starts outside one creates them.
                store.deferred_periods.update(missing)
            elif missing or store.deferred_periods:
                await store.cover(self._conn, missing)
                target = store.partition_for(lo_ns, hi_ns)
        conn = self._conn
        if self.begun and not self.at_savepoint:
            await conn.execute(f"SAVEPOINT {_SAVEPOINT}")
        self.at_savepoint = False
        try:
            await conn.copy_records_to_table(target, records=records, columns=_SAMPLE_COLUMNS)
        except asyncpg.exceptions.UniqueViolationError:
            await self._undo()
            return False
        except (asyncpg.exceptions.UndefinedTableError, asyncpg.exceptions.CheckViolationError):
            if target == "samples":
                raise
            # The partition went (retention, by another instance) or changed
            # bounds since it was listed: route through the parent this time.
            await self._undo()
            self._store.forget_partitions()
            return await self._copy_direct(records)
        return True

    async def _undo(self) -> None:
        """Undo a failed direct COPY (outside a transaction, it undid itself)."""
        if self.begun:
            await self._conn.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            self.at_savepoint = True

    async def _add_series(self, readings: Sequence[Reading]) -> None:
        known = self._store.series_ids
        missing = sorted(
            {
                key
                for r in readings
                if (key := (r.sensor, r.metric, r.tags, r.unit)) not in known
                and key not in self.new_series
            }
        )
        if not missing:
            return
        cols = list(zip(*missing, strict=True))
        await self._begin()
        self.at_savepoint = False
        # In key order: two instances inserting an overlapping set of new series
        # lock them in the same order (one waits for the other; no deadlock).
        await self._conn.execute(
            "INSERT INTO series (sensor, metric, tags, unit) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
            "ORDER BY 1, 2, 3, 4 ON CONFLICT DO NOTHING",
            *cols,
        )
        found = await self._conn.fetch(
            "SELECT s.id, s.sensor, s.metric, s.tags, s.unit FROM series AS s "
            "JOIN unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
            "AS k(sensor, metric, tags, unit) USING (sensor, metric, tags, unit)",
            *cols,
        )
        for row in found:
            self.new_series[(row["sensor"], row["metric"], row["tags"], row["unit"])] = row["id"]
        if len(found) != len(missing):  # pragma: no cover - the INSERT above guarantees rows
            raise StoreError(f"{len(missing) - len(found)} series vanished inside a transaction")

    async def _conflicts(self, readings: Sequence[Reading]) -> list[Rejected]:
        return [
            self.conflict(readings[i], stored) for i, stored in await self._conn.fetch(_CONFLICTS)
        ]

    async def execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        await self._begin()
        self.at_savepoint = False
        numbered = iter(range(1, sql.count("?") + 1))
        await self._conn.executemany(_PLACEHOLDER.sub(lambda _: f"${next(numbered)}", sql), rows)

    async def add_rejected(self, rejected: Sequence[Rejected]) -> None:
        if not rejected:
            return
        await self._begin()
        self.at_savepoint = False
        await self._conn.executemany(
            "INSERT INTO quarantine (received_at, topic, payload, reason) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            # In key order, like samples: batches in flight at once that
            # quarantine the same message lock its row in the same order.
            sorted((r.received_at, r.topic, r.payload, r.reason) for r in rejected),
        )
        self.quarantined += len(rejected)


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
    ) -> None:
        self.url = url
        self.where = redacted(url)
        self._password = password
        self.statement_timeout_ms = statement_timeout_ms
        self.partition_days = partition_days
        self.partitions_ahead = partitions_ahead
        self.partitions_behind = partitions_behind
        self.retention_days = retention_days
        self.clock = clock
        # Series ids by recency (base.SERIES_KEPT): one not held is looked up.
        self.series_ids = base.series_cache(())
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

    async def _connect(self) -> Any:
        try:
            return await asyncpg.connect(
                self.url,
                password=self._password,
                timeout=10,
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
            raise self._translate(exc) from exc

    async def open(self) -> None:
        async with self._opening:
            if not self._opened:
                await self._open()

    async def _open(self) -> None:
        conn = await self._connect()
        try:
            await migrate(conn, self.where, self.partition_days)
            self.hypertable = await is_hypertable(conn)
            await self._partition(conn)
            await conn.execute(_STAGE)
            rows = await conn.fetch(
                "SELECT sensor, metric, tags, unit, id FROM series ORDER BY id DESC LIMIT $1",
                base.SERIES_KEPT,
            )
            self.series_ids = base.series_cache(rows)
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
                raise self._translate(exc) from exc
            raise
        self._idle.append(conn)
        # The pipeline's other connections now, not in the middle of the
        # first burst (a connection and its staging table: tens of ms).
        for _ in range(self.concurrent_batches - 1):
            try:
                self._idle.append(await self._fresh())
            except StoreUnavailable:
                break  # the batch that needs it opens it (or waits out why it cannot)
        self._opened = True

    async def _take(self) -> Any:
        """An idle connection, or a new one."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            # Closed by the server while idle (a restart, pg_terminate_backend,
            # idle_session_timeout): start afresh, and say so.
            log.warning("store connection closed by the server; reconnecting", store=self.where)
        return await self._fresh()

    async def _fresh(self) -> Any:
        """A new connection, ready for batches."""
        conn = await self._connect()
        try:
            await conn.execute(_STAGE)
        except BaseException as exc:
            conn.terminate()
            if isinstance(exc, Exception):
                raise self._translate(exc) from exc
            raise
        return conn

    async def _partition(self, conn: Any) -> None:
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
                if not _kept(exc):
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

    def _translate(self, exc: BaseException) -> Exception:
        unavailable = classify(exc)
        if unavailable is not None:
            return unavailable
        return StoreError(f"{self.where}: {exc}")

    @asynccontextmanager
    async def batch(self, now: float | None = None) -> AsyncIterator[Batch]:
        await self.open()
        conn = await self._take()
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
                raise self._translate(exc) from exc
            raise
        self._idle.append(conn)
        self.series_ids.update(tx.new_series)

    async def _abandon(self, conn: Any, exc: BaseException, begun: bool) -> None:
        """Roll back; keep the connection if it is still good, else start afresh."""
        if not begun:
            # No transaction open. The connection is good after an error the
            # server reported that leaves it so; after anything else (it died,
            # or the task was cancelled in the middle of a COPY) start afresh.
            if (
                isinstance(exc, asyncpg.PostgresError)
                and not conn.is_closed()
                and (classify(exc) is None or _kept(exc))
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
        if classify(exc) is not None and (conn.is_closed() or not _kept(exc)):
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
        the cutoff and deletes, in small transactions, what is older in the
        partition that straddles it (and in the default partition)."""
        conn = await self._connect()
        try:
            # Upkeep is not held to the writer's statement timeout: counting a
            # large partition before dropping it may take a while.
            await conn.execute("SET statement_timeout = 0")
            await self._partition(conn)
            readings = quarantined = dropped = 0
            if cutoff is not None and self.hypertable:
                cutoff_ns = int(cutoff * NS)
                readings = await conn.fetchval(
                    "SELECT count(*) FROM samples WHERE ts_ns < $1", cutoff_ns
                )
                dropped = len(
                    await conn.fetch("SELECT drop_chunks('samples', older_than => $1)", cutoff_ns)
                )
                # What is left below the cutoff is in the chunk it cuts through.
                await _delete_older_by_key(conn, cutoff_ns, rows_per_transaction)
            elif cutoff is not None:
                cutoff_ns = int(cutoff * NS)
                for name, lo, hi in await partitions(conn):
                    if hi <= cutoff_ns:
                        n = await conn.fetchval(f'SELECT count(*) FROM "{name}"')
                        await conn.execute(f'DROP TABLE "{name}"')
                        readings += n
                        dropped += 1
                    elif lo < cutoff_ns:
                        readings += await _delete_older(conn, name, cutoff_ns, rows_per_transaction)
                readings += await _delete_older(
                    conn, "samples_default", cutoff_ns, rows_per_transaction
                )
            if cutoff is not None:
                quarantined = await _delete_in_batches(
                    conn,
                    "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine "
                    "WHERE received_at < $1 ORDER BY received_at LIMIT $2)",
                    cutoff,
                    rows_per_transaction,
                )
            await conn.execute(
                base.DEVICE_STATE_TRIM.format(all="ALL", offset="$1"), base.DEVICE_STATE_KEPT
            )
        except Exception as exc:
            raise self._translate(exc) from exc
        finally:
            with suppress(Exception):
                await conn.close(timeout=2)
        return Upkeep(readings, quarantined, {"partitions_dropped": dropped})

    def advice(self, exc: Exception) -> str:
        text = str(exc)
        lowered = text.lower()
        if "password authentication failed" in lowered or "no password" in lowered:
            return (
                f"PostgreSQL at {self.where} refused the password - set store.password_file "
                f"(or PGPASSWORD / ~/.pgpass) ({text})"
            )
        if "does not exist" in lowered and "database" in lowered:
            return f"{text} - create it (createdb) or fix store.url"
        if "connect" in lowered or "refused" in lowered:
            return f"PostgreSQL at {self.where} does not answer - is it running? ({text})"
        return text


def _kept(exc: BaseException) -> bool:
    """Conditions after which the connection itself is still good."""
    state = getattr(exc, "sqlstate", "")
    return state in ("57014", "40001", "40P01", "55P03")


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


async def _delete_older(conn: Any, table: str, cutoff_ns: int, batch: int) -> int:
    return await _delete_in_batches(
        conn,
        f'DELETE FROM "{table}" WHERE ctid = ANY(ARRAY('
        f'SELECT ctid FROM "{table}" WHERE ts_ns < $1 LIMIT $2))',
        cutoff_ns,
        batch,
    )


async def _delete_older_by_key(conn: Any, cutoff_ns: int, batch: int) -> int:
    """By key: a hypertable's ctid is not unique across its chunks."""
    return await _delete_in_batches(
        conn,
        "DELETE FROM samples WHERE (series_id, ts_ns, seq) IN ("
        "SELECT series_id, ts_ns, seq FROM samples WHERE ts_ns < $1 LIMIT $2)",
        cutoff_ns,
        batch,
    )
