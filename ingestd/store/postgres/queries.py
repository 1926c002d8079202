"""What the CLI reads from PostgreSQL: the same rows as from SQLite, through
asyncpg on a private event loop (the CLI is synchronous), streamed with a
server-side cursor so a large export never sits whole in memory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import asyncpg

from ingestd.errors import StoreError
from ingestd.pending import PENDING, pending_of, with_pending
from ingestd.rollups import ROLLUP_COLUMNS, ROLLUP_FROM, ROLLUP_ORDER, RollupRow
from ingestd.store import base
from ingestd.store.base import (
    QuarantineRecord,
    QuarantineRow,
    ReadingRow,
    SensorRow,
    StoreTotals,
    unreadable_schema,
)
from ingestd.store.postgres.faults import classify, redacted
from ingestd.store.postgres.schema import SCHEMA_VERSION

_CHUNK = 5000


class PostgresReader(base.Reader):
    def __init__(self, url: str, password: str | None = None) -> None:
        self.where = redacted(url)
        self._loop = asyncio.new_event_loop()
        try:
            self.conn = self._run(asyncpg.connect(url, password=password, timeout=10))
            version = None
            if self._run(self.conn.fetchval("SELECT to_regclass('ingestd_schema')")) is not None:
                version = self._run(self.conn.fetchval("SELECT max(version) FROM ingestd_schema"))
        except StoreError:
            self._loop.close()
            raise
        except Exception as exc:
            self._loop.close()
            raise StoreError(f"{self.where}: cannot read the database: {exc}") from None
        problem = unreadable_schema(self.where, version, SCHEMA_VERSION)
        if problem is not None:
            self.close()
            raise problem

    def _run(self, coro: Any) -> Any:
        try:
            return self._loop.run_until_complete(coro)
        except Exception as exc:
            if classify(exc) is not None or getattr(exc, "sqlstate", None):
                raise StoreError(f"{self.where}: {exc}") from None
            raise

    def _stream(self, sql: str, *args: Any) -> Iterator[Any]:
        """Rows through a cursor, a chunk at a time."""
        tr = self.conn.transaction(readonly=True)
        self._run(tr.start())
        try:
            cur = self._run(self.conn.cursor(sql, *args))
            while True:
                rows = self._run(cur.fetch(_CHUNK))
                yield from rows
                if len(rows) < _CHUNK:
                    break
        finally:
            self._run(tr.rollback())

    def close(self) -> None:
        if not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self.conn.close(timeout=2))
            self._loop.close()

    def sensors(self, like: str | None = None) -> Iterable[SensorRow]:
        where, args = "", []
        if like:
            where, args = "WHERE s.sensor LIKE $1", [_like(like)]
        sql = f"""SELECT s.sensor, s.metric, s.tags, s.unit, r.value, r.ts_ns,
                         st.expect_within, coalesce(st.seq_gaps, 0), coalesce(st.seq_missing, 0),
                         coalesce(st.state, '')
                  FROM series AS s
                  JOIN LATERAL (SELECT ts_ns, value FROM samples WHERE series_id = s.id
                                ORDER BY ts_ns DESC, seq DESC LIMIT 1) AS r ON true
                  LEFT JOIN sensor_status AS st ON st.sensor = s.sensor
                  {where}
                  ORDER BY s.sensor, s.metric, s.tags, s.unit"""
        return (SensorRow(*row) for row in self._stream(sql, *args))

    def readings(
        self,
        sensor: str | None,
        metric: str | None,
        since_ns: int,
        until_ns: int,
        limit: int | None,
        tags: Sequence[tuple[str, str]] = (),
    ) -> Iterable[ReadingRow]:
        sql = (
            "SELECT s.sensor, s.metric, r.ts_ns, r.value, s.tags, s.unit, r.seq FROM series AS s "
            "JOIN samples AS r ON r.series_id = s.id "
            "WHERE r.ts_ns >= $1 AND r.ts_ns < $2"
        )
        args: list[Any] = [since_ns, until_ns]
        sql += _series_filter(sensor, metric, tags, args)
        sql += " ORDER BY r.ts_ns, s.sensor, s.metric, s.tags, r.seq"
        if limit:
            args.append(limit)
            sql += f" LIMIT ${len(args)}"
        return (ReadingRow(*row) for row in self._stream(sql, *args))

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
        sql = (
            f"SELECT {ROLLUP_COLUMNS} {ROLLUP_FROM} "
            "WHERE r.width = $1 AND r.bucket >= $2 AND r.bucket < $3"
        )
        args: list[Any] = [width, since, until]
        sql += _series_filter(sensor, metric, tags, args)
        sql += f" ORDER BY {ROLLUP_ORDER}"
        # One snapshot for the pending readings and the rows: a close between
        # the two would count its readings twice, or not at all.
        tr = self.conn.transaction(isolation="repeatable_read", readonly=True)
        self._run(tr.start())
        try:
            pending = self._pending(sensor, metric, width, since, until, tags)
            if limit and not pending:
                args.append(limit)
                sql += f" LIMIT ${len(args)}"
            cur = self._run(self.conn.cursor(sql, *args))
            yield from with_pending(self._chunks(cur), pending, limit)
        finally:
            self._run(tr.rollback())

    def _chunks(self, cur: Any) -> Iterator[RollupRow]:
        while True:
            rows = self._run(cur.fetch(_CHUNK))
            yield from (RollupRow(*row) for row in rows)
            if len(rows) < _CHUNK:
                break

    def _pending(
        self,
        sensor: str | None,
        metric: str | None,
        width: int,
        since: int,
        until: int,
        tags: Sequence[tuple[str, str]],
    ) -> list[RollupRow]:
        """The readings not yet closed into the rollups, as one-reading rows."""
        blobs = self._run(self.conn.fetch(PENDING))

        def lookup(ids: list[int]) -> Iterable[Sequence[Any]]:
            args: list[Any] = [ids]
            sql = (
                "SELECT s.id, s.sensor, s.metric, s.tags, s.unit FROM series AS s "
                "WHERE s.id = ANY($1::bigint[])"
            ) + _series_filter(sensor, metric, tags, args)
            rows: Iterable[Sequence[Any]] = self._run(self.conn.fetch(sql, *args))
            return rows

        return pending_of(blobs, width, since, until, lookup)

    def quarantined(self, since: float, limit: int | None) -> Iterable[QuarantineRow]:
        sql = (
            "SELECT received_at, topic, reason, payload FROM quarantine WHERE received_at >= $1 "
            "ORDER BY received_at DESC, id DESC"
        )
        args: list[Any] = [since]
        if limit:
            sql += " LIMIT $2"
            args.append(limit)
        return (QuarantineRow(t, topic, r, bytes(p)) for t, topic, r, p in self._stream(sql, *args))

    def quarantine_page(
        self, since: float, until: float, reason: str, after_id: int, upto_id: int, limit: int
    ) -> list[QuarantineRecord]:
        rows = self._run(
            self.conn.fetch(
                "SELECT id, received_at, topic, reason, payload FROM quarantine "
                "WHERE id > $1 AND id <= $2 AND received_at >= $3 AND received_at < $4 "
                "AND strpos(reason, $5) > 0 ORDER BY id LIMIT $6",
                after_id,
                upto_id,
                since,
                until,
                reason,
                limit,
            )
        )
        return [QuarantineRecord(i, t, topic, r, bytes(p)) for i, t, topic, r, p in rows]

    def quarantine_last_id(self) -> int:
        return int(self._run(self.conn.fetchval("SELECT coalesce(max(id), 0) FROM quarantine")))

    def totals(self) -> StoreTotals:
        row = self._run(
            self.conn.fetchrow(
                """SELECT (SELECT count(*) FROM series),
                          (SELECT count(DISTINCT sensor) FROM series),
                          (SELECT count(*) FROM samples),
                          (SELECT count(*) FROM quarantine),
                          (SELECT min(ts_ns) FROM samples),
                          (SELECT max(ts_ns) FROM samples),
                          pg_database_size(current_database())"""
            )
        )
        series, sensors, readings, quarantined, first, last, size = row
        return StoreTotals(self.where, sensors, series, readings, quarantined, first, last, size)

    def backup(self, dest: str, progress: Callable[[int, int], None] | None = None) -> str:
        raise StoreError(
            f"ingestd backup copies SQLite files; for PostgreSQL ({self.where}) use its own "
            f"tools, e.g. pg_dump --format=custom --file {dest} "
            "(consistent while ingestd writes), or continuous archiving"
        )


def _series_filter(
    sensor: str | None, metric: str | None, tags: Sequence[tuple[str, str]], args: list[Any]
) -> str:
    """The conditions on series `s` (a sensor id or glob, a metric, tags),
    their values appended to `args` ($n numbered after those already there)."""
    sql = ""
    if sensor is not None:
        glob = "*" in sensor or "?" in sensor
        args.append(_like(sensor) if glob else sensor)
        sql += f" AND s.sensor {'LIKE' if glob else '='} ${len(args)}"
    if metric:
        args.append(metric)
        sql += f" AND s.metric = ${len(args)}"
    for key, value in tags:
        args += [key, value]
        sql += f" AND (nullif(s.tags, '')::jsonb ->> ${len(args) - 1}) = ${len(args)}"
    return sql


def _like(glob: str) -> str:
    """A glob as with SQLite (`*` and `?`), LIKE's own wildcards escaped."""
    pattern = glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return pattern.replace("*", "%").replace("?", "_")
