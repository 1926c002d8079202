"""Loads shaped like a fleet: a wide one (thousands of devices, each seen a few
times), SenML packs as RFC 8428 devices write them, and CPU per QoS 1 message
against mosquitto_sub's, each ratio measured in the same run.

    .venv/bin/python -m bench.fleet                   # 3 interleaved rounds
    .venv/bin/python -m bench.fleet --only "20,000" --rounds 1

The backlog is preloaded with paho (one topic per device; mosquitto_pub takes
one topic per process) while the consumer is not running, then timed as
bench.bench times it: from the consumer's connection to its last reading
committed. Broker as config/mosquitto.conf says (1000 in flight, no queue
limit), QoS 1, acknowledged after commit.

The fleets in id order run on an empty store and again on a store already
holding 4,000,000 of their readings from before (`--held`), SQLite's and
PostgreSQL's: 10,000 a series for 200 devices (28 hours of one every 10 s),
100 a series for 20,000 (17 minutes). Either way each series' readings fill
B-tree pages of their own, as in a store in use, and a batch rewrites one
page per series it holds; on an empty store a run's readings of many series
share pages. The held store is made once a run, with `ingestd import`, and
copied for each round: the SQLite file synced to disk, the PostgreSQL
database (vacuumed and analyzed once) with `CREATE DATABASE ... TEMPLATE`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from bench import bench
from bench.bench import T0, Result, Scenario
from tests.support.brokers import Mosquitto
from tests.support.config import SHIPPED_CONFIG
from tests.support.mqtt import publish

FAST = (("INGESTD_MQTT__BROKER_MAX_INFLIGHT", "1000"),)


@dataclass(frozen=True)
class Shape:
    devices: int
    metrics: int = 2  # readings per JSON message
    senml: bool = False  # packs of 25 records of 2 metrics, device-shaped
    # Each round of the fleet in an order of its own (a field's devices do not
    # report in the order they were first seen, which is their series' ids).
    shuffled: bool = False
    # Readings the store (SQLite's or PostgreSQL's) holds before the run, the
    # fleet's own from before T0: a store after days in the field, where each
    # series' readings fill B-tree pages of their own, not an empty one, where
    # a few hundred thousand readings of thousands of series share pages.
    held: int = 0


SHAPES: dict[str, Shape] = {}
STORES: dict[str, str] = {}


def _scenario(name: str, shape: Shape, messages: int | None = None, **kw: object) -> Scenario:
    SHAPES[name] = shape
    STORES[name] = str(kw.get("store", "sqlite"))
    batch = 25 if shape.senml else 0
    return Scenario(
        name, "ingestd", 1, 1000, FAST, messages=messages, batch=batch,
        payload="senml" if shape.senml else "json", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def scenarios() -> list[Scenario]:
    """Every scenario; the runs on a store in use only with --held above 0."""
    held_runs = [
        _scenario(f"ingestd, 200 devices x 2 metrics, {held()}", Shape(200, held=HELD[0])),
        _scenario(f"ingestd, 20,000 devices x 2 metrics, {held()}", Shape(20_000, held=HELD[0])),
    ]
    held_pg = [
        _scenario(
            f"ingestd -> PostgreSQL, 200 devices x 2 metrics, {held()}",
            Shape(200, held=HELD[0]),
            store="postgres",
        ),
        _scenario(
            f"ingestd -> PostgreSQL, 20,000 devices x 2 metrics, {held()}",
            Shape(20_000, held=HELD[0]),
            store="postgres",
        ),
    ]
    return [
        _scenario("ingestd, 200 devices x 2 metrics", Shape(200)),
        _scenario("ingestd, 20,000 devices x 2 metrics", Shape(20_000)),
        _scenario(
            "ingestd, 20,000 devices x 2 metrics, each round in random order",
            Shape(20_000, shuffled=True),
        ),
        *(held_runs if HELD[0] else []),
        _scenario("ingestd -> PostgreSQL, 200 devices x 2 metrics", Shape(200), store="postgres"),
        _scenario(
            "ingestd -> PostgreSQL, 20,000 devices x 2 metrics", Shape(20_000), store="postgres"
        ),
        *(held_pg if HELD[0] else []),
        _scenario(
            "ingestd, SenML packs as devices send them (200 devices, 50 records)",
            Shape(200, senml=True),
            messages=20_000,
        ),
        Scenario(bench.MOSQUITTO_SUB_QOS1, "mosquitto_sub", 1, 1000),
    ]


def _json(i: int, shape: Shape, ts: float | None = None) -> bytes:
    """Message `i` of the fleet: its metrics at `ts` (default: T0 + i ms)."""
    ts = T0 + i * 0.001 if ts is None else ts
    fields = ", ".join(f'"m{k}": {(i * 7 + k) % 100 / 4}' for k in range(shape.metrics))
    return ("{" + f'"ts": {ts:.3f}, {fields}' + "}").encode()


def _senml(i: int, device: int) -> bytes:
    """A pack as RFC 8428 devices write it: a base name per device, a base
    time, a unit on every record, relative times."""
    records = []
    for j in range(25):
        head = f'"bn": "urn:dev:site3:dev{device}:", "bt": {T0 + i * 0.025:.3f}, ' if j == 0 else ""
        t = j * 0.001
        records.append(f'{{{head}"n": "temperature", "u": "Cel", "t": {t:.3f}, "v": {20 + j % 9}}}')
        records.append(f'{{"n": "humidity", "u": "%RH", "t": {t:.3f}, "v": {(i + j) % 100}}}')
    return ("[" + ", ".join(records) + "]").encode()


def preload(
    broker: Mosquitto, messages: int, qos: int, workdir: Path, batch: int = 0, payload: str = "json"
) -> None:
    """One topic per device, published with paho before the consumer runs."""
    shape = SHAPES.get(_current[0], Shape(bench.SENSORS))
    bench.TEMPLATE[0] = ""
    if shape.held and STORES[_current[0]] == "postgres":
        bench.TEMPLATE[0] = held_database(shape, _import_env[0])  # copied by the run
    elif shape.held:
        held_store(shape, workdir / "ingestd.db", _import_env[0])

    order = list(range(shape.devices))

    def messages_() -> Iterator[tuple[str, bytes]]:
        for i in range(messages):
            round_no, device = divmod(i, shape.devices)
            if shape.shuffled:
                if device == 0:
                    random.Random(round_no).shuffle(order)
                device = order[device]
            body = _senml(i, device) if shape.senml else _json(i, shape)
            yield f"sensors/dev{device}/telemetry", body

    publish(broker.port, messages_(), qos=qos, inflight=1000)


_current = [""]
_import_env: list[tuple[tuple[str, str], ...]] = [()]  # the run's --intervals, for the import

HELD = [4_000_000]  # readings in the store before the "already holding" runs (--held)


def held() -> str:
    return f"on a store already holding {HELD[0]:,} readings"


# A store made once a run (per shape, store and settings), copied for each round.
_held: dict[tuple[Shape, str, tuple[tuple[str, str], ...]], str] = {}


def _held_import(shape: Shape, work: Path, db: str, env: tuple[tuple[str, str], ...]) -> None:
    """`ingestd import` into `db` (a file or a URL) of `shape.held` readings of
    the fleet's series, a reading every 10 s of each in the time before T0, as
    the daemon stores the fleet's messages (its own routes, series and
    rollups; `env`: the run's settings, its intervals)."""
    messages = shape.held // shape.metrics
    lines = work / "held.jsonl"
    with lines.open("w") as fh:
        for j in range(messages):
            device = j % shape.devices
            ts = T0 - 10.0 * (messages - j) / shape.devices
            payload = _json(j, shape, ts).decode()
            topic = f"sensors/dev{device}/telemetry"
            fh.write(json.dumps({"topic": topic, "payload": payload, "received": ts}) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "ingestd", "import", "--config", str(SHIPPED_CONFIG),
         "--db", db, "--no-progress", str(lines)],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")},
             **dict(env)},
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    lines.unlink()
    if done.returncode != 0:
        raise RuntimeError(f"bench: making the held store failed:\n{done.stderr[-3000:]}")


def held_store(shape: Shape, into: Path, env: tuple[tuple[str, str], ...] = ()) -> None:
    """`into` (the run's SQLite file) holding `shape.held` readings
    (`_held_import`), checkpointed and on disk before the run (a copy's dirty
    pages written back during it would be timed with it)."""
    made = _held.get((shape, "sqlite", env))
    if made is None:
        work = Path(tempfile.mkdtemp(prefix="ingestd-bench-held-"))
        atexit.register(shutil.rmtree, work, True)
        made = str(work / "held.db")
        _held_import(shape, work, made, env)
        with contextlib.closing(sqlite3.connect(made)) as db:
            stored = db.execute("SELECT count(*) FROM samples").fetchone()[0]
            assert stored == shape.held, f"the held store has {stored} readings"
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _held[(shape, "sqlite", env)] = made
    shutil.copyfile(made, into)
    with into.open("rb+") as fh:
        os.fsync(fh.fileno())


def held_database(shape: Shape, env: tuple[tuple[str, str], ...] = ()) -> str:
    """A database on the benchmark's PostgreSQL cluster holding `shape.held`
    readings (`_held_import`), vacuumed and analyzed as autovacuum leaves a
    store in use; each round's database is a copy (`bench.TEMPLATE`)."""
    made = _held.get((shape, "postgres", env))
    if made is None:
        pg = bench.postgres_cluster()
        made = f"held_{len(_held)}"
        url = pg.create_db(made)
        work = Path(tempfile.mkdtemp(prefix="ingestd-bench-held-"))
        try:
            _held_import(shape, work, url, env)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # samples is split a partition a day (as shipped): the run's readings
        # go to T0's, which holds the held readings of that day only (none
        # when T0 is midnight, UTC).
        day_ns = int(T0) // 86_400 * 86_400 * 10**9
        ((all_, in_day),) = pg.sql(
            f"SELECT count(*), count(*) FILTER (WHERE ts_ns >= {day_ns}) FROM samples", made
        )
        stored, today = int(all_), int(in_day)
        assert stored == shape.held, f"the held database has {stored} readings"
        pg.sql("VACUUM ANALYZE", made)
        print(
            f"bench: held database for {shape.devices:,} devices: {today:,} of its "
            f"{stored:,} readings in the run's partition (T0's day)",
            file=sys.stderr,
        )
        _held[(shape, "postgres", env)] = made
    return made


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="", help="scenarios whose name contains this ('|'-separated)")
    p.add_argument(
        "--intervals", help="ingestd's [rollups] intervals, comma-separated ('' for off)"
    )
    p.add_argument("--profile", type=Path, help="sample ingestd with py-spy; profiles in DIR")
    p.add_argument(
        "--held",
        type=int,
        default=HELD[0],
        help=f"readings the store holds before the runs on a store in use (default {HELD[0]:,})",
    )
    args = p.parse_args()
    if args.held < 0 or args.held % 2:
        p.error("--held: a number of readings >= 0, even (2 a message); 0: no such runs")
    HELD[0] = args.held
    chosen_env: tuple[tuple[str, str], ...] = ()
    if args.intervals is not None:
        names = [n.strip() for n in args.intervals.split(",") if n.strip()]
        chosen_env = (("INGESTD_ROLLUPS__INTERVALS", json.dumps(names)),)
    _import_env[0] = chosen_env
    chosen = [
        s for s in scenarios()
        if not args.only or any(w in s.name.lower() for w in args.only.lower().split("|"))
    ]  # fmt: skip
    bench.preload = preload  # the fleet's shapes, not bench's 8 topics
    results: dict[str, list[Result]] = {s.name: [] for s in chosen}
    started = time.monotonic()
    try:
        for r in range(args.rounds):
            for chosen_sc in chosen:
                _current[0] = chosen_sc.name
                sc = chosen_sc
                if sc.consumer == "ingestd":
                    sc = replace(sc, env=sc.env + chosen_env)
                prof = None
                if args.profile and sc.consumer == "ingestd":
                    args.profile.mkdir(parents=True, exist_ok=True)
                    slug = "".join(c if c.isalnum() else "-" for c in sc.name.lower())
                    prof = args.profile / f"{slug}-{r + 1}.txt"
                res = bench.run_one(sc, args.messages, prof)
                results[sc.name].append(res)
                print(f"round {r + 1}: {sc.name}: {res.rate:,.0f} readings/s", file=sys.stderr)
    finally:
        for pg in bench._PG:  # noqa: SLF001 - the benchmark's own cluster
            pg.cleanup()
    print(report(results, args, time.monotonic() - started))
    return 0


def report(results: dict[str, list[Result]], args: argparse.Namespace, seconds: float) -> str:
    med = statistics.median
    lines = [
        f"{args.rounds} interleaved round(s), {seconds:.0f} s; medians.",
        "",
        "| scenario | messages | readings/s (median) | min-max | its CPU µs/message after "
        "start-up | start-up CPU s | PostgreSQL server's CPU µs/message | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rate = {n: med([r.rate for r in rs]) for n, rs in results.items() if rs}
    # CPU a message costs: from the consumer's connection (ingestd's start-up,
    # about 0.4 s of imports and opening the store, is not per message) to its exit.
    cpu = {
        n: med([(r.cpu - r.start_cpu) / r.messages * 1e6 for r in rs])
        for n, rs in results.items()
        if rs
    }

    def server(rs: list[Result]) -> str:
        """The database server's CPU a message (SQLite's is in ingestd's own)."""
        if rs[0].scenario.store != "postgres":
            return "-"
        return f"{med([r.db_cpu / r.messages * 1e6 for r in rs]):.1f}"

    for name, rs in results.items():
        rates = [r.rate for r in rs]
        lines.append(
            f"| {name} | {rs[0].messages:,} | {rate[name]:,.0f} | {min(rates):,.0f}-"
            f"{max(rates):,.0f} | {cpu[name]:.1f} | {med([r.start_cpu for r in rs]):.2f} | "
            f"{server(rs)} | {med([r.rss_mb for r in rs]):.1f} |"
        )
    lines.append("")
    wide, narrow = "20,000 devices x 2 metrics", "200 devices x 2 metrics"
    pairs = [
        ("SQLite wide / narrow", f"ingestd, {wide}", f"ingestd, {narrow}"),
        (
            "SQLite wide, each round in random order / narrow",
            f"ingestd, {wide}, each round in random order",
            f"ingestd, {narrow}",
        ),
        (
            "PostgreSQL wide / narrow",
            f"ingestd -> PostgreSQL, {wide}",
            f"ingestd -> PostgreSQL, {narrow}",
        ),
        (
            f"SQLite wide / narrow, {held()}",
            f"ingestd, {wide}, {held()}",
            f"ingestd, {narrow}, {held()}",
        ),
        (
            f"PostgreSQL wide / narrow, {held()}",
            f"ingestd -> PostgreSQL, {wide}, {held()}",
            f"ingestd -> PostgreSQL, {narrow}, {held()}",
        ),
    ]
    for label, a, b in pairs:
        if a in rate and b in rate:
            lines.append(f"- {label}: {rate[a] / rate[b]:.2f}x")
    mosq = bench.MOSQUITTO_SUB_QOS1
    narrow = "ingestd, 200 devices x 2 metrics"
    if mosq in cpu and narrow in cpu:
        lines.append(
            f"- CPU per QoS 1 message, ingestd / mosquitto_sub: {cpu[narrow] / cpu[mosq]:.2f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
