"""One batch of the PostgreSQL store, on one connection (see `PostgresStore.batch`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any, Protocol

import asyncpg

from ingestd.errors import NotPrimary, StoreError
from ingestd.events import Reading, Rejected
from ingestd.pending import SeriesKey
from ingestd.rollups import RollupPlan
from ingestd.store import base, series
from ingestd.store.postgres.rolling import pending_copy, roll


class Partitions(Protocol):
    """What a batch asks of its store (`PostgresStore`): known series ids, and
    the partitions that hold its readings."""

    deferred_periods: set[int]
    rollups: RollupPlan

    @property
    def series_ids(self) -> Mapping[tuple[str, str, str, str], int]: ...

    def partition_for(self, lo_ns: int, hi_ns: int) -> str: ...
    def missing_periods(self, stamps: Sequence[int]) -> list[int]: ...
    async def cover(self, conn: Any, periods: list[int]) -> None: ...
    def forget_partitions(self) -> None: ...


_PLACEHOLDER = re.compile(r"\?")
_SAMPLE_COLUMNS = ("series_id", "ts_ns", "seq", "value")
_SERIES, _TS, _SEQ = itemgetter(0), itemgetter(1), itemgetter(2)
_SAVEPOINT = "ingestd_direct"
_RETURNING = " RETURNING series_id, ts_ns, seq, value"
_KEYS = "unnest($1::text[], $2::text[], $3::text[], $4::text[])"
_NEW_SERIES = (
    f"INSERT INTO series (sensor, metric, tags, unit) SELECT * FROM {_KEYS} "
    "ORDER BY 1, 2, 3, 4 ON CONFLICT DO NOTHING RETURNING id, sensor, metric, tags, unit"
)
_SERIES_IDS = (
    "SELECT s.id, s.sensor, s.metric, s.tags, s.unit FROM series AS s "
    f"JOIN {_KEYS} AS k(sensor, metric, tags, unit) USING (sensor, metric, tags, unit)"
)
_TERM = "SELECT epoch FROM primary_role WHERE grp = $1 FOR SHARE"
_MOVE = (
    "INSERT INTO samples (series_id, ts_ns, seq, value) "
    "SELECT series_id, ts_ns, seq, value FROM ingestd_stage ORDER BY series_id, ts_ns, seq, i "
    "ON CONFLICT DO NOTHING"
)
# Readings with their pending copy for the rollups, as one statement: atomic
# outside a transaction, one round trip where BEGIN, COPY (two), the pending
# row's INSERT and COMMIT were five, each waiting behind the event loop's
# other work. `bench.fleet`, PostgreSQL, 6 rounds with the order alternating,
# medians: 200 devices 104,763 readings/s against 101,135 (won 4 of 6),
# 20,000 devices 68,751 against 66,134 (won 5 of 6).
_WITH_PENDING = (
    "WITH p AS (INSERT INTO rollup_pending (readings, records) VALUES ($5, $6)) "
    'INSERT INTO "{}" (series_id, ts_ns, seq, value) '
    "SELECT * FROM unnest($1::integer[], $2::bigint[], $3::integer[], $4::float8[])"
)
# Rows offered that differ from what is stored under their key (checked only
# when a batch inserted fewer rows than it offered).
_CONFLICTS = (
    "SELECT st.i, s.value FROM ingestd_stage AS st JOIN samples AS s "
    "ON s.series_id = st.series_id AND s.ts_ns = st.ts_ns AND s.seq = st.seq "
    "WHERE s.value IS DISTINCT FROM st.value ORDER BY st.i"
)


def key_order(records: Sequence[tuple[int, int, int, float]]) -> list[tuple[int, int, int, float]]:
    """`records` in key order (series_id, ts_ns, seq): three stable sorts on
    one int each, the least significant first, in about half the time of
    sorting the tuples (25,000 readings of 40,000 series: 5.2 ms against
    10.9; of 400 series 1.9 against 3.9). Readings of one key keep the order
    they came in."""
    out = sorted(records, key=_SEQ)
    out.sort(key=_TS)
    out.sort(key=_SERIES)
    return out


class Batch(base.Batch):
    """One batch on one connection; see `PostgresStore.batch`.

    The transaction is opened by the first write that needs one. A batch of
    readings alone (the common case: known series, nothing quarantined, no
    sensor state) is one COPY at the end, a transaction by itself: two round
    trips fewer than BEGIN ... COMMIT around it, and a batch waits on its
    round trips behind the event loop's other work. With rollups, readings
    whose copy goes pending (`ingestd.pending.dense`: not a counter's, not a
    dense batch's) are one statement with that copy (`_WITH_PENDING`). Either
    is written at `finish` (or when more readings come): a batch's other
    writes before then (quarantine, sensor state, a spool mark) open the
    transaction, and the readings commit in it; readings added twice with
    nothing else write the first ones as a commit of their own, with or
    without rollups (each is stored with its own rollup copy either way).
    """

    def __init__(self, store: Partitions, conn: Any, now: float) -> None:
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
            ids = await self._add_series(readings)
            records = [
                (ids[(r.sensor, r.metric, r.tags, r.unit)], r.ts_ns, r.seq, r.value)
                for r in readings
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
        plan = self._store.rollups
        new: Sequence[tuple[int, int, int, float]] = records
        sids: set[int] = set()
        if plan and plan.counters:
            counters = plan.counters
            sids = {
                rec[0] for rec, r in zip(records, readings, strict=True) if r.metric in counters
            }
        # Gauges' readings that `roll` would leave pending: their copy goes
        # with them, in the same statement (in the readings' order, which
        # settles a tie of times at the close).
        copy = pending_copy(plan, records, sids) if plan else None
        if await self._copy_direct(records, copy):
            self.inserted += len(records)
            if copy is not None:
                self.pending += len(records)
                return
        else:
            new = await self._careful(records, readings)
        if plan:
            self.pending += await roll(self._conn, plan, new, sids)

    async def _careful(
        self, records: list[tuple[int, int, int, float]], readings: Sequence[Reading]
    ) -> list[tuple[int, int, int, float]]:
        """Through the staging table; the rows inserted (with rollups, else [])."""
        await self._begin()
        self.at_savepoint = False
        conn = self._conn
        await conn.copy_records_to_table(
            "ingestd_stage", records=[(i, *r) for i, r in enumerate(records)]
        )
        new: list[tuple[int, int, int, float]] = []
        if self._store.rollups:
            new = [(r[0], r[1], r[2], r[3]) for r in await conn.fetch(_MOVE + _RETURNING)]
            inserted = len(new)
        else:
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
        return new

    async def _copy_direct(
        self, records: list[tuple[int, int, int, float]], copy: bytes | None = None
    ) -> bool:
        """COPY the rows into samples (with `copy`, a pending row's bytes: one
        INSERT of both); False if a key is already stored.

        In key order (the server's index work is what bounds a batch; sorted,
        it costs about 12% less, and two batches in flight at once then lock
        keys they share in the same order), into the one partition that holds
        them all where there is one (routing each row through the parent costs
        the server about 12% more). Outside a transaction the COPY is one."""
        records = key_order(records)
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
        if self._store.rollups and copy is None and not self.begun:
            await self._begin()  # the rollups commit with the rows
        if self.begun and not self.at_savepoint:
            await conn.execute(f"SAVEPOINT {_SAVEPOINT}")
        self.at_savepoint = False
        try:
            if copy is None:
                await conn.copy_records_to_table(target, records=records, columns=_SAMPLE_COLUMNS)
            else:
                await conn.execute(
                    _WITH_PENDING.format(target), *zip(*records, strict=True), len(records), copy
                )
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
            return await self._copy_direct(records, copy)
        return True

    async def _undo(self) -> None:
        """Undo a failed direct COPY (outside a transaction, it undid itself)."""
        if self.begun:
            await self._conn.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            self.at_savepoint = True

    async def _add_series(self, readings: Sequence[Reading]) -> dict[SeriesKey, int]:
        """The readings' series ids, those not known made or found. The ids
        known are taken before the first await: another batch's commit may
        make the cache forget some meanwhile (two batches are in flight)."""
        ids, missing = series.held_ids(readings, self._store.series_ids, self.new_series)
        if not missing:
            return ids
        await self._begin()
        self.at_savepoint = False
        # In key order: two instances inserting an overlapping set of new series
        # lock them in the same order (one waits for the other; no deadlock).
        # The rows made come back from the INSERT itself; only series it did
        # not make (another instance's, or forgotten by the cache) are looked
        # up after it: a wide fleet's first sight is one statement, not two.
        rows = list(await self._conn.fetch(_NEW_SERIES, *zip(*missing, strict=True)))
        made = {(r[1], r[2], r[3], r[4]) for r in rows}
        if others := [key for key in missing if key not in made]:
            rows += await self._conn.fetch(_SERIES_IDS, *zip(*others, strict=True))
        if len(rows) != len(missing):  # pragma: no cover - the INSERT above guarantees rows
            raise StoreError(f"{len(missing) - len(rows)} series vanished inside a transaction")
        shared: dict[str, str] = {}
        for sid, sensor, metric, tags, unit in rows:
            key = series.series_key(sensor, metric, tags, unit, shared)
            self.new_series[key] = ids[key] = sid
        return ids

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
