"""What rollups cost and what they buy (issue 25, "Speed and size").

    .venv/bin/python -m bench.rollups ingest --rounds 3   # rollups on vs off, both engines
    .venv/bin/python -m bench.rollups year                # a year of 1 Hz, hourly query
    .venv/bin/python -m bench.rollups size                # bytes on disk, both engines
    .venv/bin/python -m bench.rollups all --rounds 5      # the three, one run, about 17 minutes

ingest: the scenarios of `bench.bench` (a preloaded backlog, QoS 1
acknowledged after commit, one object per message or JSON arrays of 25
records = 50 readings per message) run with rollups off, on (the default:
1m and 1h), and on with `humidity` a counter, interleaved round by round;
the table gives each one's median and its ratio to rollups off in the same
run (the ratio of the medians, and the range of the per-round ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import bench
from bench.bench import Result, Scenario
from bench.pyspy import summarize
from ingestd.config import Settings, load_settings
from ingestd.store import open_store
from ingestd.store.postgres.connect import connect_writable
from ingestd.store.postgres.schema import create_partitions
from ingestd.store.sqlite.queries import SqliteReader
from tests.support.config import SHIPPED_CONFIG

OFF = (("INGESTD_ROLLUPS__ENABLED", "false"),)
ON = (("INGESTD_ROLLUPS__ENABLED", "true"),)
COUNTER = (*ON, ("INGESTD_PROCESSOR__KINDS", '{"humidity": "counter"}'))
VARIANTS = (("off", OFF), ("on", ON), ("on, humidity a counter", COUNTER))
FAST = (("INGESTD_MQTT__BROKER_MAX_INFLIGHT", "1000"),)


def ingest_scenarios(engines: list[str]) -> list[tuple[str, str, str, Scenario]]:
    """(engine, payload, variant, scenario) for every combination."""
    out = []
    for engine in engines:
        for payload, messages, batch in (
            ("JSON, 1 object", None, 0),
            ("JSON arrays of 25", 20_000, 25),
        ):
            for variant, env in VARIANTS:
                name = f"{engine}, {payload}, rollups {variant}"
                sc = Scenario(
                    name,
                    "ingestd",
                    1,
                    1000,
                    (*FAST, *env),
                    messages=messages,
                    batch=batch,
                    store=engine,
                )
                out.append((engine, payload, variant, sc))
    return out


def ingest(
    rounds: int, messages: int, engines: list[str], only: str = "", profile: Path | None = None
) -> str:
    chosen = [c for c in ingest_scenarios(engines) if only.lower() in c[3].name.lower()]
    results: dict[str, list[Result]] = {sc.name: [] for *_, sc in chosen}
    started = time.monotonic()
    for rnd in range(rounds):
        for *_, sc in chosen:
            prof = None
            if profile:
                profile.mkdir(parents=True, exist_ok=True)
                slug = re.sub(r"[^a-z0-9]+", "-", sc.name.lower()).strip("-")
                prof = profile / f"{slug}-{rnd + 1}.txt"
            r = bench.run_one(sc, messages, prof)
            results[sc.name].append(r)
            print(
                f"round {rnd + 1}: {sc.name}: {r.rate:,.0f} readings/s, cpu {r.cpu:.2f}s, "
                f"db cpu {r.db_cpu:.2f}s, lost {r.lost}",
                file=sys.stderr,
                flush=True,
            )
            if prof and prof.exists():
                print(summarize(prof, 25), file=sys.stderr, flush=True)
    lines = [
        f"{rounds} interleaved round(s), {time.monotonic() - started:.0f} s; QoS 1 acknowledged "
        f"after commit, broker in-flight 1000; {messages:,} messages of one object (2 readings) "
        "or 20,000 of 25 (50 readings).",
        "",
        "| engine | payload | rollups | readings/s (median) | min-max | vs off (median) "
        "| per-round ratios | daemon CPU s | DB CPU s | lost |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, payload, variant, sc in chosen:
        rs = results[sc.name]
        base = results.get(f"{engine}, {payload}, rollups off", rs)
        rates = [r.rate for r in rs]
        per_round = [a.rate / b.rate for a, b in zip(rs, base, strict=True)]
        ratio = statistics.median(rates) / statistics.median([b.rate for b in base])
        lines.append(
            f"| {engine} | {payload} | {variant} | {statistics.median(rates):,.0f} | "
            f"{min(rates):,.0f}-{max(rates):,.0f} | {ratio:.2f}x | "
            f"{min(per_round):.2f}-{max(per_round):.2f} | "
            f"{statistics.median([r.cpu for r in rs]):.2f} | "
            f"{statistics.median([r.db_cpu for r in rs]):.2f} | "
            f"{max(r.lost for r in rs)} |"
        )
    return "\n".join(lines) + "\n"


# A year that is over (2025, UTC): 31,536,000 seconds.
YEAR_START = 1_735_689_600
YEAR_SECONDS = 365 * 86400
NS = 1_000_000_000


def settings_for(db: str) -> Settings:
    """The shipped config (rollups 1m kept 90 days, 1h forever) on `db`."""
    key = "INGESTD_STORE__URL" if db.startswith("postgresql://") else "INGESTD_STORE__PATH"
    saved = {k: v for k, v in os.environ.items() if k.startswith("INGESTD_")}
    for k in saved:
        del os.environ[k]
    os.environ[key] = db
    try:
        return load_settings(SHIPPED_CONFIG)
    finally:
        del os.environ[key]
        os.environ.update(saved)


def create_database(db: str) -> None:
    """The schema, partitions ahead and views, made by the daemon's own store
    code (what `ingestd` does at start)."""
    settings = settings_for(db)

    async def run() -> None:
        store = open_store(settings.store, settings.rollup_plan())
        await store.open()
        await store.close()

    asyncio.run(run())


def cli(*args: str) -> tuple[float, str]:
    """Run `ingestd ARGS` as a user does (a fresh process); (seconds, stdout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ingestd", "--config", str(SHIPPED_CONFIG), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=bench.REPO,
        check=False,
    )
    took = time.monotonic() - began
    if proc.returncode != 0:
        raise RuntimeError(f"ingestd {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return took, proc.stdout


def best_of(n: int, f: Callable[[], object]) -> tuple[float, float]:
    """(median, min) seconds of n calls."""
    times = []
    for _ in range(n):
        began = time.perf_counter()
        f()
        times.append(time.perf_counter() - began)
    return statistics.median(times), min(times)


# One sensor at 1 Hz, values with two decimals (stored as 8-byte floats), in
# time order, generated by SQLite itself.
_YEAR_SQL = (
    "WITH RECURSIVE i(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM i WHERE n < ?) "
    "INSERT INTO samples (series_id, ts_ns, seq, value) "
    "SELECT ?, (? + n) * 1000000000, 0, 15.0 + ((n * 7919) % 2000) / 100.0 FROM i"
)
_RAW_HOURLY = (
    "SELECT ts_ns / 3600000000000 * 3600 AS bucket, count(*), min(value), max(value), "
    "avg(value), sum(value) FROM samples WHERE series_id = ? AND ts_ns >= ? AND ts_ns < ? "
    "GROUP BY 1 ORDER BY 1"
)


def year(work: Path) -> str:
    """A year of one sensor at 1 Hz in SQLite: the hourly query of the year
    from the rollups and from the raw readings."""
    path = work / "year.db"
    create_database(str(path))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    sid = conn.execute(
        "INSERT INTO series (sensor, metric) VALUES ('meter-1', 'temperature') RETURNING id"
    ).fetchone()[0]
    began = time.monotonic()
    conn.execute(_YEAR_SQL, (YEAR_SECONDS - 1, sid, YEAR_START))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    generated = time.monotonic() - began
    readings = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
    conn.close()
    print(f"year: {readings:,} readings generated in {generated:.0f} s", file=sys.stderr)
    rebuild_s, _ = cli("rollups", "rebuild", "--db", str(path))
    print(f"year: rollups rebuild {rebuild_s:.1f} s", file=sys.stderr)
    since, until = str(YEAR_START), str(YEAR_START + YEAR_SECONDS)
    query = ("query", "--db", str(path), "--sensor", "meter-1", "--since", since, "--until", until)
    cli_every, out = cli(*query, "--every", "1h", "--format", "csv")
    cli_every = min(
        cli_every, *(cli(*query, "--every", "1h", "--format", "csv")[0] for _ in range(4))
    )
    rows = len(out.splitlines()) - 1
    cli_none, _ = cli(*query, "--every", "1h", "--format", "csv", "--sensor", "absent")
    cli_none = min(
        cli_none,
        *(
            cli(*query, "--every", "1h", "--format", "csv", "--sensor", "absent")[0]
            for _ in range(4)
        ),
    )

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    lo, hi = YEAR_START * NS, (YEAR_START + YEAR_SECONDS) * NS
    reader = SqliteReader(path)
    rollup_med, rollup_min = best_of(
        9,
        lambda: list(
            reader.rollup_rows("meter-1", None, 3600, YEAR_START, YEAR_START + YEAR_SECONDS, None)
        ),
    )
    view_med, view_min = best_of(
        9,
        lambda: conn.execute(
            "SELECT bucket, count, min, max, mean FROM rollup_1h WHERE sensor = 'meter-1' "
            "AND bucket >= ? AND bucket < ? ORDER BY bucket",
            (YEAR_START, YEAR_START + YEAR_SECONDS),
        ).fetchall(),
    )
    raw_med, raw_min = best_of(3, lambda: conn.execute(_RAW_HOURLY, (sid, lo, hi)).fetchall())
    size = path.stat().st_size
    reader.close()
    conn.close()
    return (
        f"A year of one sensor at 1 Hz in SQLite ({readings:,} readings, {size / 1e9:.2f} GB "
        f"file), generated with SQL in {generated:.0f} s into a database ingestd's store "
        f"created; `ingestd rollups rebuild` {rebuild_s:.0f} s (the whole command). The "
        f"hourly query of the year ({rows:,} rows):\n\n"
        "| query | median | best |\n|---|---:|---:|\n"
        f"| `query --every 1h`'s SQL (the store's rollup_rows, in-process, rows fetched) "
        f"| {rollup_med * 1000:.1f} ms | {rollup_min * 1000:.1f} ms |\n"
        f"| the view: `SELECT ... FROM rollup_1h WHERE sensor = ...` | {view_med * 1000:.1f} ms "
        f"| {view_min * 1000:.1f} ms |\n"
        f"| raw scan: hourly GROUP BY over `samples` (count, min, max, avg, sum) "
        f"| {raw_med * 1000:,.0f} ms | {raw_min * 1000:,.0f} ms |\n"
        f"| `ingestd query --every 1h --format csv` as a command (process start included; "
        f"best of 5) | - | {cli_every * 1000:.0f} ms |\n"
        f"| the same command for a sensor that has no rows (its start-up alone; best of 5) "
        f"| - | {cli_none * 1000:.0f} ms |\n"
    )


# Bytes on disk: 100 sensors at 0.1 Hz; raw kept 30 days (store.retention_days),
# 1m rollups 90 days, 1h forever: after a year, what is on disk.
FLEET, STEP, RAW_DAYS, MINUTE_DAYS, YEAR_DAYS = 100, 10, 30, 90, 365
DAY = 86400
_FLEET_SQLITE = (
    "WITH RECURSIVE i(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM i WHERE n < ?) "
    "INSERT INTO samples (series_id, ts_ns, seq, value) "
    "SELECT s.id, (? + n * ?) * 1000000000, 0, 40.0 + ((n * 7919 + s.id * 104729) % 4000) / 100.0 "
    "FROM i CROSS JOIN series AS s"  # time order, the sensors interleaved, as ingested
)
_FLEET_PG = (
    "INSERT INTO samples (series_id, ts_ns, seq, value) "
    "SELECT s.id, ($1::bigint + n * $2::bigint) * 1000000000, 0, "
    "40.0 + ((n * 7919 + s.id * 104729) % 4000) / 100.0 "
    "FROM generate_series($3::bigint, $4::bigint) AS n CROSS JOIN series AS s ORDER BY n, s.id"
)
# Older months' rollups: the rebuilt month's rows, shifted back whole months.
_SHIFT = (
    "INSERT INTO rollups SELECT width, series_id, bucket - {d}, n, min, max, sum, "
    "first_ns - {d_ns}, first_value, last_ns - {d_ns}, last_value, increase "
    "FROM rollups WHERE width = {w} AND bucket >= {since}"
)


def fleet_plan(end: int) -> list[str]:
    """The statements that add the older months' rollups, then cut each
    interval at its retention."""
    since = end - RAW_DAYS * DAY
    out = []
    for width, days in ((60, MINUTE_DAYS), (3600, YEAR_DAYS)):
        months = -(-days // RAW_DAYS)
        out += [
            _SHIFT.format(d=k * RAW_DAYS * DAY, d_ns=k * RAW_DAYS * DAY * NS, w=width, since=since)
            for k in range(1, months)
        ]
        out.append(f"DELETE FROM rollups WHERE width = {width} AND bucket < {end - days * DAY}")
    return out


def counts(rows: list[tuple[object, ...]]) -> dict[str, int]:
    return {str(k): int(str(v)) for k, v in rows}


def size_sqlite(work: Path, end: int) -> dict[str, object]:
    path = work / "fleet.db"
    create_database(str(path))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO series (sensor, metric) VALUES (?, 'humidity')",
        [(f"room-{i:03d}",) for i in range(FLEET)],
    )
    began = time.monotonic()
    conn.execute(_FLEET_SQLITE, (RAW_DAYS * DAY // STEP - 1, end - RAW_DAYS * DAY, STEP))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    generated = time.monotonic() - began
    conn.close()
    rebuild_s, _ = cli("rollups", "rebuild", "--db", str(path))
    conn = sqlite3.connect(path, isolation_level=None)
    for sql in fleet_plan(end):
        conn.execute(sql)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    as_written = path.stat().st_size
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def tables() -> dict[str, int]:
        return counts(conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall())

    sizes = tables()
    rows = counts(conn.execute("SELECT width, count(*) FROM rollups GROUP BY width").fetchall())
    raw_rows = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
    total = path.stat().st_size
    conn.execute("DELETE FROM rollups WHERE width = 60")
    conn.execute("VACUUM")
    hourly = tables()["rollups"]
    conn.close()
    return {
        "raw": sizes["samples"],
        "raw_rows": raw_rows,
        "1m": sizes["rollups"] - hourly,
        "1h": hourly,
        "rows": rows,
        "other": sum(v for k, v in sizes.items() if k not in ("samples", "rollups")),
        "total": total,
        "note": f"file {as_written / 1e6:,.0f} MB as written (time order), "
        f"{total / 1e6:,.0f} MB after VACUUM; generated {generated:.0f} s, "
        f"rebuild {rebuild_s:.0f} s",
    }


async def _pg_fill(url: str, end: int) -> float:
    conn = await connect_writable(url, password=None, server_settings={})
    try:
        start = end - RAW_DAYS * DAY
        await create_partitions(
            conn, [((start + d * DAY) * NS, (start + (d + 1) * DAY) * NS) for d in range(RAW_DAYS)]
        )
        await conn.executemany(
            "INSERT INTO series (sensor, metric) VALUES ($1, 'humidity')",
            [(f"room-{i:03d}",) for i in range(FLEET)],
        )
        began = time.monotonic()
        per_day = DAY // STEP
        for d in range(RAW_DAYS):  # a day at a time: each into its partition, in time order
            await conn.execute(_FLEET_PG, start, STEP, d * per_day, (d + 1) * per_day - 1)
        return time.monotonic() - began
    finally:
        await conn.close()


async def _pg_sizes(url: str, end: int) -> dict[str, object]:
    conn = await connect_writable(url, password=None, server_settings={})
    try:
        for sql in fleet_plan(end):
            await conn.execute(sql)
        await conn.execute("VACUUM FULL rollups")
        await conn.execute("VACUUM ANALYZE")
        raw = int(
            await conn.fetchval(
                "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('samples')"
            )
        )
        raw_rows = await conn.fetchval("SELECT count(*) FROM samples")
        raw_index = int(
            await conn.fetchval(
                "SELECT sum(pg_indexes_size(relid)) FROM pg_partition_tree('samples')"
            )
        )
        partitions = await conn.fetchval(
            "SELECT count(*) FROM pg_partition_tree('samples') WHERE isleaf"
        )
        both = await conn.fetchval("SELECT pg_total_relation_size('rollups')")
        rows = counts(await conn.fetch("SELECT width, count(*) FROM rollups GROUP BY width"))
        tables = await conn.fetchval(  # (a sum: numeric)
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class AS c "
            "JOIN pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'm')"
        )
        database = await conn.fetchval("SELECT pg_database_size(current_database())")
        await conn.execute("DELETE FROM rollups WHERE width = 60")
        await conn.execute("VACUUM FULL rollups")
        hourly = await conn.fetchval("SELECT pg_total_relation_size('rollups')")
        return {
            "raw": raw,
            "raw_rows": raw_rows,
            "1m": both - hourly,
            "1h": hourly,
            "rows": rows,
            "other": int(tables) - raw - both,
            "total": int(tables),
            "note": f"{partitions} partitions of samples (a day each, with the default); "
            f"raw = {(raw - raw_index) / 1e6:,.0f} MB of table + {raw_index / 1e6:,.0f} MB "
            "of primary-key index (filled in time order, the sensors interleaved, as "
            "ingested); "
            f"pg_database_size {database / 1e6:,.0f} MB (with the catalogs)",
        }
    finally:
        await conn.close()


def size_postgres(end: int) -> dict[str, object]:
    _, url = bench.postgres_database()
    create_database(url)
    generated = asyncio.run(_pg_fill(url, end))
    rebuild_s, _ = cli("rollups", "rebuild", "--db", url)
    out = asyncio.run(_pg_sizes(url, end))
    out["note"] = f"{out['note']}; generated {generated:.0f} s, rebuild {rebuild_s:.0f} s"
    return out


def size(work: Path, engines: list[str]) -> str:
    end = int(time.time()) // DAY * DAY  # raw readings: the 30 days up to today
    found = {}
    for engine in engines:
        found[engine] = size_sqlite(work, end) if engine == "sqlite" else size_postgres(end)
        print(f"size: {engine}: {found[engine]}", file=sys.stderr, flush=True)

    def mb(v: object) -> str:
        return f"{int(str(v)) / 1e6:,.1f}"

    lines = [
        f"Bytes on disk after a year of {FLEET} sensors at 0.1 Hz, raw readings kept "
        f"{RAW_DAYS} days, 1m rollups {MINUTE_DAYS} days, 1h forever (the shipped "
        "[rollups] defaults). Generated: the last 30 days of raw readings with SQL "
        "(time order, sensors interleaved), their rollups by `ingestd rollups rebuild`, "
        "and the older months' rollups as copies of that month's shifted back (what "
        "retention leaves after a year).",
        "",
        "| engine | raw (30 days) | rollup 1m (90 days) | rollup 1h (365 days) | other "
        "| total | bytes/reading raw |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, f in found.items():
        rows = f["rows"]
        assert isinstance(rows, dict)
        lines.append(
            f"| {engine} | {mb(f['raw'])} MB ({int(str(f['raw_rows'])):,} rows) "
            f"| {mb(f['1m'])} MB ({rows.get('60', 0):,} rows) "
            f"| {mb(f['1h'])} MB ({rows.get('3600', 0):,} rows) | {mb(f['other'])} MB "
            f"| {mb(f['total'])} MB | {int(str(f['raw'])) / int(str(f['raw_rows'])):.1f} |"
        )
    lines.append("")
    lines += [f"- {engine}: {f['note']}" for engine, f in found.items()]
    lines.append(
        "- SQLite: page bytes per table (dbstat) after VACUUM; total is the file. "
        "PostgreSQL: pg_total_relation_size (heap, indexes, TOAST; samples summed over "
        "its partitions), rollups after VACUUM FULL; total is ingestd's tables."
    )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("ingest", "year", "size", "all"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--messages", type=int, default=100_000, help="ingest: one-object messages")
    p.add_argument("--engines", default="sqlite,postgres")
    p.add_argument("--workdir", type=Path, default=None, help="year, size: where (a few GB)")
    p.add_argument("--only", default="", help="ingest: the scenarios whose name contains this")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR", help="ingest: py-spy")
    a = p.parse_args()
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    out: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="ingestd-rollups-", dir=a.workdir))
    try:
        # Each part's table as soon as it is done (a later part's failure keeps it).
        if a.what in ("ingest", "all"):
            out.append(ingest(a.rounds, a.messages, engines, a.only, a.profile))
            print(out[-1], flush=True)
        if a.what in ("year", "all"):
            out.append(year(work))
            print(out[-1], flush=True)
        if a.what in ("size", "all"):
            out.append(size(work, engines))
            print(out[-1], flush=True)
    finally:
        bench.stop_postgres()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
