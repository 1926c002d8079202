"""The SQLite schema and its migrations.

`series` (one row per sensor, metric, tags and unit) and `samples` (series id,
integer Unix nanoseconds, seq, value; a WITHOUT ROWID table keyed by
(series_id, ts_ns, seq)); the view `readings` joins them and is what users
query; `quarantine` keeps what was not stored, with the reason;
`sensor_status` per-sensor state. The version is SQLite's `user_version`;
each migration runs in one transaction with the version it sets.
"""

from __future__ import annotations

import aiosqlite

from ingestd.store.base import newer_schema

MIGRATIONS: tuple[str, ...] = (
    # 1: initial schema
    """
    CREATE TABLE series (
        id      INTEGER PRIMARY KEY,
        sensor  TEXT NOT NULL,
        metric  TEXT NOT NULL,
        UNIQUE (sensor, metric)
    );
    CREATE TABLE samples (
        series_id INTEGER NOT NULL REFERENCES series(id),
        ts        REAL NOT NULL,
        value     REAL NOT NULL,
        PRIMARY KEY (series_id, ts)
    ) WITHOUT ROWID;
    CREATE VIEW readings (sensor, metric, ts, value) AS
        SELECT s.sensor, s.metric, r.ts, r.value
        FROM samples AS r JOIN series AS s ON s.id = r.series_id;
    CREATE TABLE quarantine (
        id          INTEGER PRIMARY KEY,
        received_at REAL NOT NULL,
        topic       TEXT NOT NULL,
        payload     BLOB NOT NULL,
        reason      TEXT NOT NULL
    );
    CREATE INDEX quarantine_by_time ON quarantine (received_at);
    """,
    # 2: tags and units. A series is now (sensor, metric, tags); tags are a
    # JSON object with sorted keys ('' for none), so json_extract() queries them.
    """
    CREATE TABLE series_v2 (
        id      INTEGER PRIMARY KEY,
        sensor  TEXT NOT NULL,
        metric  TEXT NOT NULL,
        tags    TEXT NOT NULL DEFAULT '',
        unit    TEXT NOT NULL DEFAULT '',
        UNIQUE (sensor, metric, tags)
    );
    INSERT INTO series_v2 (id, sensor, metric) SELECT id, sensor, metric FROM series;
    DROP VIEW readings;
    DROP TABLE series;
    ALTER TABLE series_v2 RENAME TO series;
    CREATE VIEW readings (sensor, metric, ts, value, tags, unit) AS
        SELECT s.sensor, s.metric, r.ts, r.value, s.tags, s.unit
        FROM samples AS r JOIN series AS s ON s.id = r.series_id;
    """,
    # 3: exact time and distinct readings. Time is integer Unix nanoseconds (a
    # REAL of seconds merged readings < 240 ns apart); `seq` numbers readings of
    # one message that share series and time; the unit is part of a series'
    # identity (SenML sends one name in several units). Old times are taken to
    # the microsecond, which is all a REAL of seconds carried.
    """
    CREATE TABLE series_v3 (
        id      INTEGER PRIMARY KEY,
        sensor  TEXT NOT NULL,
        metric  TEXT NOT NULL,
        tags    TEXT NOT NULL DEFAULT '',
        unit    TEXT NOT NULL DEFAULT '',
        UNIQUE (sensor, metric, tags, unit)
    );
    INSERT INTO series_v3 (id, sensor, metric, tags, unit)
        SELECT id, sensor, metric, tags, unit FROM series;
    CREATE TABLE samples_v3 (
        series_id INTEGER NOT NULL,
        ts_ns     INTEGER NOT NULL,
        seq       INTEGER NOT NULL DEFAULT 0,
        value     REAL NOT NULL,
        PRIMARY KEY (series_id, ts_ns, seq)
    ) WITHOUT ROWID;
    INSERT INTO samples_v3 (series_id, ts_ns, seq, value)
        SELECT series_id, CAST(round(ts * 1000000) AS INTEGER) * 1000, 0, value FROM samples;
    DROP VIEW readings;
    DROP TABLE samples;
    DROP TABLE series;
    ALTER TABLE series_v3 RENAME TO series;
    ALTER TABLE samples_v3 RENAME TO samples;
    CREATE VIEW readings (sensor, metric, ts, value, tags, unit, ts_ns, seq) AS
        SELECT s.sensor, s.metric, r.ts_ns / 1e9, r.value, s.tags, s.unit, r.ts_ns, r.seq
        FROM samples AS r JOIN series AS s ON s.id = r.series_id;
    """,
    # 4: per-sensor state kept with the readings: the device's message counter
    # (gaps = messages lost upstream) and how long it may stay silent.
    """
    CREATE TABLE sensor_status (
        sensor        TEXT PRIMARY KEY,
        last_seq      INTEGER,
        seq_gaps      INTEGER NOT NULL DEFAULT 0,
        seq_missing   INTEGER NOT NULL DEFAULT 0,
        expect_within REAL NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    """,
    # 5: the state a device reports of itself (Homie's $state).
    """
    ALTER TABLE sensor_status ADD COLUMN state TEXT NOT NULL DEFAULT '';
    """,
    # 6: what a stateful format must find again after a restart (a Sparkplug
    # node's BIRTH and sequence), per instance (owner: its MQTT client id),
    # written with the chunk it follows.
    """
    CREATE TABLE device_state (
        owner       TEXT NOT NULL,
        format      TEXT NOT NULL,
        device      TEXT NOT NULL,
        position    BLOB NOT NULL,
        description BLOB,
        updated     REAL NOT NULL,
        PRIMARY KEY (owner, format, device)
    ) WITHOUT ROWID;
    """,
    # 7: rollups (ingestd.store.rollups): per interval (width, seconds),
    # series and bucket (its start, Unix seconds), kept with the readings.
    """
    CREATE TABLE rollups (
        width       INTEGER NOT NULL,
        series_id   INTEGER NOT NULL,
        bucket      INTEGER NOT NULL,
        n           INTEGER NOT NULL,
        min         REAL NOT NULL,
        max         REAL NOT NULL,
        sum         REAL NOT NULL,
        first_ns    INTEGER NOT NULL,
        first_value REAL NOT NULL,
        last_ns     INTEGER NOT NULL,
        last_value  REAL NOT NULL,
        increase    REAL,
        PRIMARY KEY (width, series_id, bucket)
    ) WITHOUT ROWID;
    """,
    # 8: gauges' readings not yet in the rollups, a batch's to a row
    # (ingestd.rollups.pack), closed into them by the daemon.
    """
    CREATE TABLE rollup_pending (
        id       INTEGER PRIMARY KEY,
        readings INTEGER NOT NULL,
        records  BLOB NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(conn: aiosqlite.Connection, where: str) -> None:
    """Bring the schema to SCHEMA_VERSION; refuse a newer one."""
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise newer_schema(where, version, SCHEMA_VERSION)
    for number in range(version + 1, SCHEMA_VERSION + 1):
        script = MIGRATIONS[number - 1]
        try:
            await conn.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                await conn.rollback()
            raise
