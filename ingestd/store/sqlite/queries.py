"""What the CLI reads from a SQLite database: read-only connections (safe next
to the running daemon: WAL readers never block its writer), each query led by
the (series_id, ts_ns) key, rows streamed as they are read."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

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
from ingestd.store.sqlite.backup import backup_file
from ingestd.store.sqlite.conditions import ro_uri
from ingestd.store.sqlite.schema import SCHEMA_VERSION


class SqliteReader(base.Reader):
    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            raise StoreError(f"{path}: no database here (is store.path right? --db PATH)")
        try:
            conn = sqlite3.connect(ro_uri(path), uri=True, timeout=5)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot read the database: {exc}") from None
        problem = unreadable_schema(str(path), version, SCHEMA_VERSION)
        if problem is not None:
            conn.close()
            raise problem
        self.conn = conn

    def close(self) -> None:
        self.conn.close()

    def sensors(self, like: str | None = None) -> Iterable[SensorRow]:
        args: tuple[str, ...]
        where, args = "", ()
        if like:
            where, args = "WHERE s.sensor GLOB ?", (_glob(like),)
        cur = self.conn.execute(
            f"""SELECT s.sensor, s.metric, s.tags, s.unit, r.value, r.ts_ns,
                       st.expect_within, coalesce(st.seq_gaps, 0), coalesce(st.seq_missing, 0),
                       coalesce(st.state, '')
                FROM series AS s JOIN samples AS r
                  ON r.series_id = s.id
                 AND (r.ts_ns, r.seq) = (SELECT ts_ns, seq FROM samples WHERE series_id = s.id
                                        ORDER BY ts_ns DESC, seq DESC LIMIT 1)
                LEFT JOIN sensor_status AS st ON st.sensor = s.sensor
                {where}
                ORDER BY s.sensor, s.metric, s.tags, s.unit""",
            args,
        )
        return map(SensorRow._make, cur)

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
            "WHERE r.ts_ns >= ? AND r.ts_ns < ?"
        )
        args: list[Any] = [since_ns, until_ns]
        sql += _series_filter(sensor, metric, tags, args)
        sql += " ORDER BY r.ts_ns, s.sensor, s.metric, s.tags, r.seq"
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        return map(ReadingRow._make, self.conn.execute(sql, args))

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
            "WHERE r.width = ? AND r.bucket >= ? AND r.bucket < ?"
        )
        args: list[Any] = [width, since, until]
        sql += _series_filter(sensor, metric, tags, args)
        sql += f" ORDER BY {ROLLUP_ORDER}"
        # One snapshot for the pending readings and the rows: a close between
        # the two would count its readings twice, or not at all.
        self.conn.execute("BEGIN")
        try:
            pending = self._pending(sensor, metric, width, since, until, tags)
            if limit and not pending:
                sql += " LIMIT ?"
                args.append(limit)
            rows = map(RollupRow._make, self.conn.execute(sql, args))
            yield from with_pending(rows, pending, limit)
        finally:
            self.conn.execute("COMMIT")

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
        try:
            blobs = self.conn.execute(PENDING).fetchall()
        except sqlite3.OperationalError as exc:  # a database from before rollup_pending
            if "no such table" not in str(exc):
                raise StoreError(f"{self.path}: {exc}") from None
            return []

        def lookup(ids: list[int]) -> Iterable[Sequence[Any]]:
            args: list[Any] = [json.dumps(ids)]
            sql = (
                "SELECT s.id, s.sensor, s.metric, s.tags, s.unit FROM series AS s "
                "WHERE s.id IN (SELECT value FROM json_each(?))"
            ) + _series_filter(sensor, metric, tags, args)
            return self.conn.execute(sql, args)

        return pending_of(blobs, width, since, until, lookup)

    def quarantined(self, since: float, limit: int | None) -> Iterable[QuarantineRow]:
        sql = (
            "SELECT received_at, topic, reason, payload FROM quarantine WHERE received_at >= ? "
            "ORDER BY received_at DESC, id DESC"
        )
        args: list[Any] = [since]
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        return (
            QuarantineRow(t, topic, r, bytes(p)) for t, topic, r, p in self.conn.execute(sql, args)
        )

    def quarantine_page(
        self, since: float, until: float, reason: str, after_id: int, upto_id: int, limit: int
    ) -> list[QuarantineRecord]:
        cur = self.conn.execute(
            "SELECT id, received_at, topic, reason, payload FROM quarantine "
            "WHERE id > ? AND id <= ? AND received_at >= ? AND received_at < ? "
            "AND instr(reason, ?) > 0 ORDER BY id LIMIT ?",
            (after_id, upto_id, since, until, reason, limit),
        )
        return [QuarantineRecord(i, t, topic, r, bytes(p)) for i, t, topic, r, p in cur]

    def quarantine_last_id(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(id), 0) FROM quarantine").fetchone()[0])

    def totals(self) -> StoreTotals:
        one = self.conn.execute
        series = one("SELECT count(*) FROM series").fetchone()[0]
        sensors_n = one("SELECT count(DISTINCT sensor) FROM series").fetchone()[0]
        readings = one("SELECT count(*) FROM samples").fetchone()[0]
        quarantined = one("SELECT count(*) FROM quarantine").fetchone()[0]
        # Per series along the key (two index probes each), not a scan of samples.
        first = one(
            "SELECT min((SELECT min(ts_ns) FROM samples WHERE series_id = s.id)) FROM series AS s"
        ).fetchone()[0]
        last = one(
            "SELECT max((SELECT max(ts_ns) FROM samples WHERE series_id = s.id)) FROM series AS s"
        ).fetchone()[0]
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return StoreTotals(
            str(self.path), sensors_n, series, readings, quarantined, first, last, size
        )

    def backup(self, dest: str, progress: Callable[[int, int], None] | None = None) -> str:
        target = Path(dest)
        backup_file(self.path, target, progress)
        return f"backed up {self.path} to {target} ({target.stat().st_size / 1e6:,.1f} MB)"


def _series_filter(
    sensor: str | None, metric: str | None, tags: Sequence[tuple[str, str]], args: list[Any]
) -> str:
    """The conditions on series `s` (a sensor id or glob, a metric, tags),
    their values appended to `args`."""
    sql = ""
    if sensor is not None:
        glob = _is_glob(sensor)
        sql += " AND s.sensor GLOB ?" if glob else " AND s.sensor = ?"
        args.append(_glob(sensor) if glob else sensor)
    if metric:
        sql += " AND s.metric = ?"
        args.append(metric)
    for key, value in tags:
        # A bound JSON path: the key never becomes SQL text.
        sql += " AND json_extract(nullif(s.tags, ''), ?) = ?"
        args += ["$." + json.dumps(key), value]
    return sql


def _is_glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


def _glob(pattern: str) -> str:
    """The CLI's glob as SQLite's GLOB reads it: `*` and `?` only, `[` literal."""
    return pattern.replace("[", "[[]")
